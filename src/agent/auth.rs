//! Who may read the agent's `/metrics` and `/debug/table`: a caller shows a bearer token,
//! the API server says whose it is (TokenReview) and whether that user may `get` the
//! path (SubjectAccessReview on a non-resource URL), the way the API server itself
//! guards its own `/metrics`. Grants are therefore ordinary RBAC: a ClusterRole with
//! `nonResourceURLs: ["/metrics"]`, `verbs: ["get"]`.
//!
//! Verdicts are cached per token and path, an allowance for [`ALLOWED_TTL`] (longer than a
//! scrape interval, so most scrapes cost no API call), a refusal for [`REFUSED_TTL`] (so
//! a grant just made takes effect soon), in a cache of at most [`CACHE_ENTRIES`]
//! entries; at most [`REVIEWS_IN_FLIGHT`] reviews run at once, so callers with new
//! tokens cannot turn the agent into a flood of API calls.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::{FutureExt, future::BoxFuture};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// How long an allowance is reused: also how long a revoked grant or token keeps working.
pub const ALLOWED_TTL: Duration = Duration::from_secs(120);
/// How long a refusal (401 or 403) is reused.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Most verdicts kept; beyond it expired ones go first, then the oldest.
pub const CACHE_ENTRIES: usize = 256;
/// Most reviews asked of the API server at the same time.
pub const REVIEWS_IN_FLIGHT: usize = 4;
/// The verb every protected path is reviewed for.
const VERB: &str = "get";

/// What the API server said about a token and a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The token's user may `get` the path.
    Allowed,
    /// The token is not valid (expired, revoked, not a token of this cluster): why.
    Unauthenticated(String),
    /// The token is valid but its user may not `get` the path: who, and why.
    Forbidden(String),
}

/// Decides on tokens. The real one asks the API server ([`ApiReviewer`]); tests and the
/// fuzzer plug in their own.
pub trait Reviewer: Send + Sync + 'static {
    /// The verdict on `token` for `get` on `path`, or why none could be had.
    fn review(&self, token: String, path: String) -> BoxFuture<'static, Result<Verdict, String>>;
}

/// Reviews tokens with the API server: TokenReview, then SubjectAccessReview. Needs
/// `create` on `tokenreviews` (authentication.k8s.io) and `subjectaccessreviews`
/// (authorization.k8s.io).
pub struct ApiReviewer {
    client: Client,
}

impl ApiReviewer {
    /// A reviewer calling the API server with `client` (the agent's own identity).
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Reviewer for ApiReviewer {
    fn review(&self, token: String, path: String) -> BoxFuture<'static, Result<Verdict, String>> {
        let client = self.client.clone();
        async move {
            let review =
                TokenReview { spec: TokenReviewSpec { token: Some(token), audiences: None }, ..Default::default() };
            let reviewed = Api::<TokenReview>::all(client.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| format!("TokenReview failed: {e}"))?;
            let status = reviewed.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "the token is not valid".into());
                return Ok(Verdict::Unauthenticated(why));
            }
            let user = status.user.unwrap_or_default();
            let name = user.username.clone().unwrap_or_default();
            let access = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username,
                    groups: user.groups,
                    uid: user.uid,
                    extra: user.extra,
                    non_resource_attributes: Some(NonResourceAttributes {
                        path: Some(path.clone()),
                        verb: Some(VERB.into()),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let decided = Api::<SubjectAccessReview>::all(client)
                .create(&PostParams::default(), &access)
                .await
                .map_err(|e| format!("SubjectAccessReview failed: {e}"))?;
            let decision = decided.status.unwrap_or_default();
            if decision.allowed {
                Ok(Verdict::Allowed)
            } else {
                let reason = decision.reason.filter(|r| !r.is_empty()).map(|r| format!(": {r}")).unwrap_or_default();
                Ok(Verdict::Forbidden(format!("user {name:?} may not {VERB} {path}{reason}")))
            }
        }
        .boxed()
    }
}

/// The guard of the protected paths: a reviewer and its bounded cache of verdicts.
pub struct Access {
    reviewer: Arc<dyn Reviewer>,
    cache: Mutex<HashMap<(String, String), (Verdict, Instant)>>,
    in_flight: Semaphore,
}

impl Access {
    /// A guard deciding with `reviewer`.
    pub fn new(reviewer: Arc<dyn Reviewer>) -> Self {
        Self { reviewer, cache: Mutex::new(HashMap::new()), in_flight: Semaphore::new(REVIEWS_IN_FLIGHT) }
    }

    /// A guard asking the API server through `client`.
    pub fn kubernetes(client: Client) -> Self {
        Self::new(Arc::new(ApiReviewer::new(client)))
    }

    /// Number of verdicts cached (for tests).
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the request with `headers` may `get` `path`: `Ok` or the response to send.
    pub async fn decide(&self, headers: &HeaderMap, path: &str) -> Result<(), Response> {
        let Some(token) = bearer_token(headers) else {
            return Err(unauthorized("a bearer token is required: send Authorization: Bearer TOKEN"));
        };
        let key = (token.to_owned(), path.to_owned());
        let verdict = match self.cached_verdict(&key) {
            Some(verdict) => verdict,
            None => {
                let _permit = self.in_flight.acquire().await.map_err(|_| unavailable("the agent is stopping"))?;
                // Another request may have reviewed the same token while this one waited.
                match self.cached_verdict(&key) {
                    Some(verdict) => verdict,
                    None => {
                        let verdict = self.reviewer.review(key.0.clone(), key.1.clone()).await.map_err(|why| {
                            warn!(path, error = %why, "could not review a token");
                            unavailable(&format!("could not review the token with the API server: {why}"))
                        })?;
                        self.remember(key, verdict.clone());
                        verdict
                    }
                }
            }
        };
        match verdict {
            Verdict::Allowed => Ok(()),
            Verdict::Unauthenticated(why) => {
                debug!(path, %why, "refused a token");
                Err(unauthorized(&format!("the token was not accepted: {why}")))
            }
            Verdict::Forbidden(why) => {
                debug!(path, %why, "refused a user");
                Err((StatusCode::FORBIDDEN, format!("{why}\n")).into_response())
            }
        }
    }

    fn cached_verdict(&self, key: &(String, String)) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).filter(|(verdict, at)| at.elapsed() < ttl(verdict)).map(|(verdict, _)| verdict.clone())
    }

    fn remember(&self, key: (String, String), verdict: Verdict) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&key) {
            cache.retain(|_, (verdict, at)| at.elapsed() < ttl(verdict));
        }
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&key) {
            let oldest = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (verdict, Instant::now()));
    }
}

fn ttl(verdict: &Verdict) -> Duration {
    if *verdict == Verdict::Allowed { ALLOWED_TTL } else { REFUSED_TTL }
}

/// The token of an `Authorization: Bearer TOKEN` header (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(char::is_whitespace))
        .then_some(token)
}

fn unauthorized(why: &str) -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], format!("{why}\n")).into_response()
}

fn unavailable(why: &str) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

/// Middleware of the protected routes: passes the request on only if [`Access::decide`] does.
pub async fn require(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    match access.decide(request.headers(), &path).await {
        Ok(()) => next.run(request).await,
        Err(response) => response,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Allows token "reader" on /metrics only, forbids "other", rejects the rest; counts reviews.
    struct Fake(AtomicUsize);

    impl Reviewer for Fake {
        fn review(&self, token: String, path: String) -> BoxFuture<'static, Result<Verdict, String>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let verdict = match token.as_str() {
                "reader" if path == "/metrics" => Verdict::Allowed,
                "reader" | "other" => Verdict::Forbidden(format!("may not get {path}")),
                "broken" => return async { Err("API server down".to_owned()) }.boxed(),
                _ => Verdict::Unauthenticated("unknown token".into()),
            };
            async move { Ok(verdict) }.boxed()
        }
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    async fn status(access: &Access, headers: &HeaderMap, path: &str) -> u16 {
        match access.decide(headers, path).await {
            Ok(()) => 200,
            Err(response) => response.status().as_u16(),
        }
    }

    #[test]
    fn reads_only_well_formed_bearer_headers() {
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert_eq!(bearer_token(&headers("Bearer")), None);
        assert_eq!(bearer_token(&headers("Bearer a b")), None);
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn answers_401_403_503_and_caches_verdicts_per_token_and_path() {
        let fake = Arc::new(Fake(AtomicUsize::new(0)));
        let access = Access::new(fake.clone());
        assert_eq!(status(&access, &HeaderMap::new(), "/metrics").await, 401);
        assert_eq!(status(&access, &headers("Bearer nope"), "/metrics").await, 401);
        assert_eq!(status(&access, &headers("Bearer other"), "/metrics").await, 403);
        assert_eq!(status(&access, &headers("Bearer reader"), "/debug/table").await, 403);
        assert_eq!(status(&access, &headers("Bearer broken"), "/metrics").await, 503);
        let before = fake.0.load(Ordering::SeqCst);
        for _ in 0..5 {
            assert_eq!(status(&access, &headers("Bearer reader"), "/metrics").await, 200);
        }
        assert_eq!(fake.0.load(Ordering::SeqCst), before + 1, "one review for five requests");
        // A failed review is not remembered.
        assert_eq!(status(&access, &headers("Bearer broken"), "/metrics").await, 503);
        assert_eq!(fake.0.load(Ordering::SeqCst), before + 2);
    }

    #[tokio::test]
    async fn the_cache_stays_bounded() {
        let access = Access::new(Arc::new(Fake(AtomicUsize::new(0))));
        for i in 0..CACHE_ENTRIES * 3 {
            status(&access, &headers(&format!("Bearer t{i}")), "/metrics").await;
        }
        assert_eq!(access.cached(), CACHE_ENTRIES);
    }
}
