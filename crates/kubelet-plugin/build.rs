//! Fetches the kubelet's two gRPC protos (DRA v1 and plugin registration) at a pinned
//! version, checks them against known digests and compiles them with tonic. Nothing of
//! them is committed.
//!
//! Source, in order:
//! - `PORTASSIGN_KUBELET_PROTO_DIR`: a directory holding `dra/v1/api.proto` and
//!   `pluginregistration/v1/api.proto` (offline builds);
//! - verified copies already in `OUT_DIR` (an earlier build);
//! - the Go module zip of `k8s.io/kubelet` from the first http(s) entry of `GOPROXY`
//!   (default `https://proxy.golang.org`).
//!
//! Whatever the source, each file must have the pinned SHA-256.

use std::env;
use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The Go module and version the protos come from.
const MODULE: &str = "k8s.io/kubelet";
const VERSION: &str = "v0.36.3";
const DEFAULT_PROXY: &str = "https://proxy.golang.org";
const PROTO_DIR_ENV: &str = "PORTASSIGN_KUBELET_PROTO_DIR";

/// The protos: path under the include root (also their path in the module, below
/// `pkg/apis/`), and their SHA-256 at [`VERSION`].
const PROTOS: [(&str, &str); 2] = [
    ("dra/v1/api.proto", "b3066ad7f6abcfd0003c47b06ceb801d76997d78d6be505597478d3905b9cc57"),
    ("pluginregistration/v1/api.proto", "7a67a0000a1a167c155286834bc9ccb489f8bcdb394e006daba270189c272afa"),
];

type Result<T, E = String> = std::result::Result<T, E>;

fn main() {
    if let Err(error) = run() {
        eprintln!("error: portassign-kubelet-plugin: cannot get the kubelet protos: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={PROTO_DIR_ENV}");
    println!("cargo:rerun-if-env-changed=GOPROXY");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let root = out_dir.join("kubelet-protos");

    match env::var_os(PROTO_DIR_ENV).filter(|dir| !dir.is_empty()) {
        Some(dir) => copy_from_dir(Path::new(&dir), &root)?,
        None if have_verified(&root) => {}
        None => download(&root)?,
    }

    let files: Vec<PathBuf> = PROTOS.iter().map(|(path, _)| PathBuf::from(path)).collect();
    let fds =
        protox::compile(&files, [&root]).map_err(|e| format!("cannot parse the protos in {}: {e}", root.display()))?;
    tonic_prost_build::configure()
        .build_server(true)
        // The tests talk to the plugin through these clients.
        .build_client(true)
        // No `connect` helpers: the plugin only serves, on Unix sockets.
        .build_transport(false)
        .compile_fds(fds)
        .map_err(|e| format!("cannot generate code from the protos: {e}"))
}

/// The protos from a local directory (offline builds), checked and copied to `root`.
fn copy_from_dir(dir: &Path, root: &Path) -> Result<()> {
    for (path, digest) in PROTOS {
        let source = dir.join(path);
        println!("cargo:rerun-if-changed={}", source.display());
        let bytes =
            fs::read(&source).map_err(|e| format!("cannot read {} ({PROTO_DIR_ENV}): {e}", source.display()))?;
        verify(&bytes, digest, &source.display().to_string())?;
        write(root, path, &bytes)?;
    }
    Ok(())
}

/// Whether `root` already holds both protos with the pinned digests.
fn have_verified(root: &Path) -> bool {
    PROTOS.iter().all(|(path, digest)| fs::read(root.join(path)).is_ok_and(|bytes| sha256_hex(&bytes) == *digest))
}

/// The module zip from the Go module proxy; both protos extracted, checked and written.
fn download(root: &Path) -> Result<()> {
    let url = format!("{}/{MODULE}/@v/{VERSION}.zip", proxy());
    let started = Instant::now();
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
    let agent: ureq::Agent =
        ureq::Agent::config_builder().tls_config(tls).timeout_global(Some(Duration::from_secs(300))).build().into();
    let zip = agent
        .get(&url)
        .call()
        .and_then(|mut response| response.body_mut().with_config().limit(64 << 20).read_to_vec())
        .map_err(|e| format!("cannot download {url}: {e} (set {PROTO_DIR_ENV} to build offline)"))?;
    let mut archive = zip::ZipArchive::new(Cursor::new(zip)).map_err(|e| format!("{url} is not a zip archive: {e}"))?;
    for (path, digest) in PROTOS {
        let name = format!("{MODULE}@{VERSION}/pkg/apis/{path}");
        let mut bytes = Vec::new();
        archive
            .by_name(&name)
            .map_err(|e| format!("{url} has no {name}: {e}"))?
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot extract {name} from {url}: {e}"))?;
        verify(&bytes, digest, &format!("{name} in {url}"))?;
        write(root, path, &bytes)?;
    }
    // Not a cargo directive: shown with `cargo build -vv`.
    println!("fetched the kubelet protos from {url} in {:.1?}", started.elapsed());
    Ok(())
}

/// The first http(s) entry of `GOPROXY` (entries are separated by `,` or `|`), else the
/// default proxy.
fn proxy() -> String {
    env::var("GOPROXY")
        .unwrap_or_default()
        .split([',', '|'])
        .map(str::trim)
        .find(|entry| entry.starts_with("https://") || entry.starts_with("http://"))
        .unwrap_or(DEFAULT_PROXY)
        .trim_end_matches('/')
        .to_string()
}

fn verify(bytes: &[u8], expected: &str, what: &str) -> Result<()> {
    let actual = sha256_hex(bytes);
    if actual == expected {
        Ok(())
    } else {
        Err(format!("checksum mismatch for {what}: sha256 is {actual}, expected {expected} (k8s.io/kubelet {VERSION})"))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `root/path` through a temporary file, so that an interrupted build never
/// leaves a partial proto behind.
fn write(root: &Path, path: &str, bytes: &[u8]) -> Result<()> {
    let target = root.join(path);
    let parent = target.parent().ok_or_else(|| format!("{} has no parent", target.display()))?;
    fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let temp = target.with_extension("proto.tmp");
    fs::write(&temp, bytes).map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
    fs::rename(&temp, &target).map_err(|e| format!("cannot rename {} to {}: {e}", temp.display(), target.display()))
}
