//! The chart's RBAC, proven with SubjectAccessReviews against the real API server: the
//! ServiceAccounts can make every call the agent and the janitor make, and nothing else
//! that matters (least privilege). The RBAC is the one `helm template` renders from
//! charts/portassign; the agents of every other test run with it too.

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::{Api, api::PostParams};
use portassign_testkit::{Cluster, Identity};

/// One row of the proof: may `who` do `verb` on `resource` (`group/resource[/sub]`, or
/// `url:/PATH` for a non-resource URL such as the agents' `/metrics`) in `namespace`
/// (`*` for all namespaces, `-` for a cluster-scoped resource or a URL), optionally on
/// one object `name`?
struct Row {
    verb: &'static str,
    resource: &'static str,
    namespace: &'static str,
    name: &'static str,
    allowed: bool,
}

const fn can(verb: &'static str, resource: &'static str, namespace: &'static str) -> Row {
    Row { verb, resource, namespace, name: "", allowed: true }
}

const fn cannot(verb: &'static str, resource: &'static str, namespace: &'static str) -> Row {
    Row { verb, resource, namespace, name: "", allowed: false }
}

const PA: &str = "portassign.io/portassignments";
const PA_STATUS: &str = "portassign.io/portassignments/status";
const EVENTS: &str = "events.k8s.io/events";
const CLAIMS: &str = "resource.k8s.io/resourceclaims";
const SLICES: &str = "resource.k8s.io/resourceslices";
const CLAIM_DRIVER: &str = "resource.k8s.io/resourceclaims/driver";
const LEASES: &str = "coordination.k8s.io/leases";
const TOKEN_REVIEWS: &str = "authentication.k8s.io/tokenreviews";
const ACCESS_REVIEWS: &str = "authorization.k8s.io/subjectaccessreviews";
const METRICS: &str = "url:/metrics";
const TABLE: &str = "url:/debug/table";

/// What the agent calls, and a sample of what it must not be able to do. `SYS` stands
/// for the chart's namespace, `ANY` for an application namespace.
fn agent_rows() -> Vec<Row> {
    vec![
        // Rebuild (list), watch, finalizer (patch), confirm a vanished object (list by name).
        can("list", PA, "*"),
        can("watch", PA, "*"),
        can("patch", PA, "*"),
        can("patch", PA_STATUS, "*"),
        can("create", EVENTS, "ANY"),
        can("patch", EVENTS, "ANY"),
        // Guard /metrics and /debug/table: whose is a token, may that user get the path.
        can("create", TOKEN_REVIEWS, "-"),
        can("create", ACCESS_REVIEWS, "-"),
        cannot("create", "authorization.k8s.io/localsubjectaccessreviews", "SYS"),
        cannot("get", METRICS, "-"),
        cannot("get", TABLE, "-"),
        // The node's pods (field selector spec.nodeName): their host ports are never assigned.
        can("list", "/pods", "*"),
        can("watch", "/pods", "*"),
        cannot("get", "/pods", "*"),
        cannot("create", "/pods", "ANY"),
        cannot("update", "/pods", "ANY"),
        cannot("patch", "/pods", "ANY"),
        cannot("delete", "/pods", "ANY"),
        cannot("patch", "/pods/status", "ANY"),
        cannot("create", "/pods/exec", "ANY"),
        cannot("get", "/pods/log", "ANY"),
        cannot("create", "/pods/eviction", "ANY"),
        // The DRA driver (on by default): a claim's ports live in a PortAssignment of its
        // own, created at prepare, read back when prepared again, deleted at unprepare.
        can("get", PA, "*"),
        can("create", PA, "*"),
        can("delete", PA, "*"),
        // Which allocation results of a claim are this node's (and its ports shown in its
        // status); the node's pool.
        can("get", CLAIMS, "*"),
        can("create", SLICES, "-"),
        can("patch", SLICES, "-"),
        cannot("list", CLAIMS, "*"),
        cannot("update", CLAIMS, "ANY"),
        can("patch", "resource.k8s.io/resourceclaims/status", "ANY"),
        cannot("update", "resource.k8s.io/resourceclaims/status", "ANY"),
        // The driver's synthetic permission for status.devices: its own node's claims only.
        Row { name: "ports.portassign.io", ..can("associated-node:patch", CLAIM_DRIVER, "ANY") },
        Row { name: "ports.portassign.io", ..cannot("arbitrary-node:patch", CLAIM_DRIVER, "ANY") },
        Row { name: "another.driver.io", ..cannot("associated-node:patch", CLAIM_DRIVER, "ANY") },
        cannot("delete", SLICES, "-"),
        cannot("update", SLICES, "-"),
        cannot("create", "resource.k8s.io/deviceclasses", "-"),
        cannot("update", PA, "*"),
        cannot("deletecollection", PA, "*"),
        cannot("update", PA_STATUS, "*"),
        cannot("delete", EVENTS, "ANY"),
        cannot("get", "/secrets", "*"),
        cannot("list", "/secrets", "SYS"),
        cannot("update", "/configmaps", "SYS"),
        cannot("create", "/pods", "SYS"),
        cannot("list", "/nodes", "-"),
        cannot("create", "/serviceaccounts/token", "SYS"),
        cannot("create", "rbac.authorization.k8s.io/clusterrolebindings", "-"),
        cannot("escalate", "rbac.authorization.k8s.io/clusterroles", "-"),
        cannot("update", "apiextensions.k8s.io/customresourcedefinitions", "-"),
        cannot("impersonate", "/users", "-"),
        cannot("create", LEASES, "SYS"),
        cannot("*", "*/*", "*"),
    ]
}

/// What the janitor calls, and a sample of what it must not be able to do.
fn janitor_rows() -> Vec<Row> {
    vec![
        can("list", "/nodes", "-"),
        can("list", PA, "*"),
        can("patch", PA, "*"),
        can("patch", PA_STATUS, "*"),
        can("create", EVENTS, "ANY"),
        can("create", LEASES, "SYS"),
        Row { verb: "get", resource: LEASES, namespace: "SYS", name: "portassign-janitor", allowed: true },
        Row { verb: "update", resource: LEASES, namespace: "SYS", name: "portassign-janitor", allowed: true },
        Row { verb: "update", resource: LEASES, namespace: "SYS", name: "some-other-lease", allowed: false },
        cannot("create", LEASES, "default"),
        cannot("delete", "/nodes", "-"),
        cannot("delete", PA, "*"),
        cannot("create", PA, "*"),
        cannot("get", "/secrets", "*"),
        cannot("create", "/pods", "SYS"),
        cannot("watch", PA, "*"),
        cannot("create", TOKEN_REVIEWS, "-"),
        cannot("get", METRICS, "-"),
        cannot("get", TABLE, "-"),
        cannot("*", "*/*", "*"),
    ]
}

/// The kit's reader, bound through the chart's httpAuth values to the chart's
/// metrics-reader and table-reader ClusterRoles: it reads both paths, and nothing else.
fn reader_rows() -> Vec<Row> {
    vec![
        can("get", METRICS, "-"),
        can("get", TABLE, "-"),
        cannot("post", METRICS, "-"),
        cannot("get", "url:/debug/pprof", "-"),
        cannot("get", "url:/logs", "-"),
        cannot("list", PA, "*"),
        cannot("create", TOKEN_REVIEWS, "-"),
        cannot("get", "/secrets", "*"),
        cannot("*", "*/*", "*"),
    ]
}

/// Asks the API server whether `who` may do what `row` says.
async fn review(admin: &Api<SubjectAccessReview>, who: &Identity, system: &str, row: &Row) -> bool {
    let url = row.resource.strip_prefix("url:");
    let (group, rest) = if url.is_some() { ("", "") } else { row.resource.split_once('/').expect("group/resource") };
    let (resource, subresource) = rest.split_once('/').map_or((rest, None), |(r, s)| (r, Some(s.to_owned())));
    let namespace = match row.namespace {
        "*" | "-" => None,
        "SYS" => Some(system.to_owned()),
        "ANY" => Some("some-app".to_owned()),
        other => Some(other.to_owned()),
    };
    let account_namespace = who.user.split(':').nth(2).expect("system:serviceaccount:NS:NAME");
    let spec = SubjectAccessReviewSpec {
        user: Some(who.user.clone()),
        groups: Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{account_namespace}"),
            "system:authenticated".into(),
        ]),
        resource_attributes: url.is_none().then(|| ResourceAttributes {
            verb: Some(row.verb.into()),
            group: Some(group.into()),
            resource: Some(resource.into()),
            subresource,
            namespace,
            name: (!row.name.is_empty()).then(|| row.name.to_owned()),
            ..Default::default()
        }),
        non_resource_attributes: url
            .map(|path| NonResourceAttributes { path: Some(path.into()), verb: Some(row.verb.into()) }),
        ..Default::default()
    };
    let asked = SubjectAccessReview { spec, ..Default::default() };
    let answer = admin.create(&PostParams::default(), &asked).await.expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

async fn prove(who: &Identity, rows: Vec<Row>, system: &str) {
    let cluster = Cluster::shared().await;
    let admin: Api<SubjectAccessReview> = Api::all(cluster.admin.client());
    let mut wrong = Vec::new();
    for row in &rows {
        let allowed = review(&admin, who, system, row).await;
        let what = format!(
            "{} {} in {}{}",
            row.verb,
            row.resource,
            row.namespace,
            if row.name.is_empty() { String::new() } else { format!(" named {}", row.name) }
        );
        println!("{:<7} {} {what}", if allowed { "can" } else { "cannot" }, who.user);
        if allowed != row.allowed {
            wrong.push(format!("{} {} {what}", who.user, if allowed { "CAN" } else { "CANNOT" }));
        }
    }
    assert!(wrong.is_empty(), "the chart's RBAC differs from what the code needs:\n{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_service_account_can_make_exactly_the_agents_calls() {
    let cluster = Cluster::shared().await;
    prove(&cluster.agent, agent_rows(), &cluster.namespace).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_janitor_service_account_can_make_exactly_the_janitors_calls() {
    let cluster = Cluster::shared().await;
    prove(&cluster.janitor, janitor_rows(), &cluster.namespace).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reader_can_get_metrics_and_the_table_and_nothing_else() {
    let cluster = Cluster::shared().await;
    prove(&cluster.reader, reader_rows(), &cluster.namespace).await;
}
