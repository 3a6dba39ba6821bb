//! The CDI specs the plugin writes: one file per prepared claim, one CDI device per
//! prepared request, whose only edits are the request's environment variables
//! ([`port_env`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use portassign_api::dra::{CDI_KIND, PreparedDevice, port_env};
use serde::Serialize;

/// The CDI spec version the files declare (environment edits need no newer one).
pub const CDI_VERSION: &str = "0.6.0";

/// Why a claim's spec could not be written or removed.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// The claim's UID cannot name a file.
    #[error("claim UID {0:?} is not usable in a CDI spec file name")]
    BadUid(String),
    /// Writing, syncing or renaming the spec failed.
    #[error("cannot write CDI spec {}: {source}", path.display())]
    Write {
        /// The file that failed.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Removing the spec failed.
    #[error("cannot remove CDI spec {}: {source}", path.display())]
    Remove {
        /// The spec file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// A CDI spec (the subset the plugin writes).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// [`CDI_VERSION`].
    pub cdi_version: String,
    /// [`CDI_KIND`].
    pub kind: String,
    /// One per prepared request.
    pub devices: Vec<Device>,
}

/// A CDI device of a [`Spec`].
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// `<claim uid>-<request, sanitized>` ([`device_name`]).
    pub name: String,
    /// What the runtime applies to a container that gets the device.
    pub container_edits: ContainerEdits,
}

/// The edits of a CDI [`Device`]: environment variables only.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ContainerEdits {
    /// `NAME=value` lines.
    pub env: Vec<String>,
}

/// Makes `name` usable in a CDI device name (`[a-zA-Z0-9_.-]`): every other character
/// (the `/` of a subrequest, say) becomes `_`.
pub fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect()
}

/// The CDI device name of a claim's request: `<claim uid>-<request, sanitized>`. Request
/// names are DNS labels (`/`-joined for subrequests), so distinct requests keep distinct
/// names.
pub fn device_name(claim_uid: &str, request: &str) -> String {
    format!("{claim_uid}-{}", sanitize(request))
}

/// The fully qualified CDI device ID the kubelet hands to the runtime: `<kind>=<name>`.
pub fn device_id(name: &str) -> String {
    format!("{CDI_KIND}={name}")
}

/// The file name of a claim's spec: `<vendor>-<class>_<claim uid>.json`.
pub fn spec_file_name(claim_uid: &str) -> String {
    format!("{}_{claim_uid}.json", CDI_KIND.replace('/', "-"))
}

/// The spec of a prepared claim.
pub fn spec(claim_uid: &str, devices: &[PreparedDevice]) -> Spec {
    Spec {
        cdi_version: CDI_VERSION.to_string(),
        kind: CDI_KIND.to_string(),
        devices: devices
            .iter()
            .map(|device| Device {
                name: device_name(claim_uid, &device.request),
                container_edits: ContainerEdits { env: port_env(device) },
            })
            .collect(),
    }
}

/// The path of a claim's spec in `dir`, if the UID can name a file (Kubernetes UIDs are
/// UUIDs; anything that could leave the directory or hide the file is refused).
pub fn spec_path(dir: &Path, claim_uid: &str) -> Result<PathBuf, CdiError> {
    let usable = claim_uid.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && claim_uid.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if usable { Ok(dir.join(spec_file_name(claim_uid))) } else { Err(CdiError::BadUid(claim_uid.to_string())) }
}

/// Writes the spec of a prepared claim to `dir`, replacing any earlier one atomically (a
/// temporary file, synced, then renamed: the runtime never reads half a spec). Returns
/// the file written.
pub async fn write_spec(dir: &Path, claim_uid: &str, spec: &Spec) -> Result<PathBuf, CdiError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = spec_path(dir, claim_uid)?;
    let json = serde_json::to_vec_pretty(spec).expect("a CDI spec serializes");
    // Hidden and not `.json`: the runtime's spec scan ignores it. Unique, so that two
    // concurrent prepares of one claim do not write into the same temporary file.
    let temp = dir.join(format!(
        ".{}.{}-{}.tmp",
        spec_file_name(claim_uid),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = async {
        let mut file = tokio::fs::File::create(&temp).await?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &json).await?;
        file.sync_all().await
    }
    .await;
    if let Err(source) = written {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(CdiError::Write { path: temp, source });
    }
    if let Err(source) = tokio::fs::rename(&temp, &path).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(CdiError::Write { path, source });
    }
    Ok(path)
}

/// Removes a claim's spec from `dir`; a spec that is not there is already removed.
pub async fn remove_spec(dir: &Path, claim_uid: &str) -> Result<(), CdiError> {
    let path = spec_path(dir, claim_uid)?;
    match tokio::fs::remove_file(&path).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CdiError::Remove { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizer_replaces_slashes() {
        assert_eq!(sanitize("a/b"), "a_b");
        assert_eq!(sanitize("container-0-request-0"), "container-0-request-0");
        assert_eq!(sanitize("x y:z.1_2"), "x_y_z.1_2");
        assert_eq!(device_name("0f3c-uid", "a/b"), "0f3c-uid-a_b");
        assert_eq!(device_id("0f3c-uid-a_b"), "portassign.io/port=0f3c-uid-a_b");
    }

    #[test]
    fn file_is_named_by_kind_and_uid() {
        assert_eq!(spec_file_name("1234"), "portassign.io-port_1234.json");
        assert_eq!(spec_path(Path::new("/cdi"), "1234").unwrap(), Path::new("/cdi/portassign.io-port_1234.json"));
        for bad in ["", "../x", "a/b", ".hidden", "-x"] {
            assert!(matches!(spec_path(Path::new("/cdi"), bad), Err(CdiError::BadUid(_))), "{bad:?}");
        }
    }

    #[test]
    fn spec_lists_one_device_per_request() {
        let devices = [PreparedDevice {
            request: "web/http".into(),
            pool: "node-1".into(),
            device: "ports".into(),
            share_id: None,
            ports: vec![40001, 40002],
        }];
        let json = serde_json::to_value(spec("u1", &devices)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cdiVersion": "0.6.0",
                "kind": "portassign.io/port",
                "devices": [{
                    "name": "u1-web_http",
                    "containerEdits": {"env": [
                        "PORTASSIGN_PORT=40001",
                        "PORTASSIGN_PORT_WEB_HTTP=40001",
                        "PORTASSIGN_PORTS=40001,40002",
                    ]},
                }],
            })
        );
    }
}
