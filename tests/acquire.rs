//! `portassign acquire|release` (the real binary) and the client API against the real
//! API server, with an agent running as the chart's ServiceAccount; callers run as a
//! ServiceAccount bound to the Role the README documents for them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpListener,
    path::Path,
    process::Command,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::{Api, api::PostParams};
use portassign::{
    api::PortAssignment,
    client::{self, Pool, PortClient, field_manager},
};
use portassign_testkit::{Cluster, Identity, World, cluster::service_account_identity, port_block, portassign_bin};

/// What a program that acquires ports needs (README, "Getting a port from a program").
const CALLER_VERBS: [&str; 5] = ["get", "list", "watch", "create", "patch"];

/// A ServiceAccount in the world's namespace, bound to a Role with `verbs` on
/// PortAssignments (none: no binding at all).
async fn caller(w: &World, name: &str, verbs: &[&str]) -> Identity {
    let cluster = Cluster::shared().await;
    let accounts: Api<ServiceAccount> = Api::namespaced(w.client.clone(), &w.ns);
    let mut account = ServiceAccount::default();
    account.metadata.name = Some(name.into());
    accounts.create(&PostParams::default(), &account).await.expect("create ServiceAccount");
    if !verbs.is_empty() {
        let mut role = Role::default();
        role.metadata.name = Some(name.into());
        role.rules = Some(vec![PolicyRule {
            api_groups: Some(vec!["portassign.io".into()]),
            resources: Some(vec!["portassignments".into()]),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..Default::default()
        }]);
        Api::<Role>::namespaced(w.client.clone(), &w.ns).create(&PostParams::default(), &role).await.expect("Role");
        let mut binding = RoleBinding::default();
        binding.metadata.name = Some(name.into());
        binding.role_ref =
            RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.into() };
        binding.subjects = Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(w.ns.clone()),
            ..Default::default()
        }]);
        Api::<RoleBinding>::namespaced(w.client.clone(), &w.ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("RoleBinding");
    }
    let dir = std::env::temp_dir().join(format!("portassign-callers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("identity dir");
    service_account_identity(&w.client, cluster.kubeconfig(), &dir, &w.ns, name).await.expect("caller identity")
}

/// The outcome of one run of the binary.
struct Run {
    code: i32,
    out: String,
    err: String,
}

/// Runs `program args...` with `kubeconfig` and `PATH` extended by `path`.
fn run(program: &Path, args: &[&str], kubeconfig: &Path, path: Option<&Path>) -> Run {
    let mut command = Command::new(program);
    command.args(args).env("KUBECONFIG", kubeconfig).env_remove("RUST_LOG");
    if let Some(dir) = path {
        command.env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()));
    }
    let out = command.output().unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into(),
        err: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `portassign ARGS...` (the real binary) as `who`.
fn portassign(who: &Identity, args: &[&str]) -> Run {
    run(&portassign_bin(), args, &who.kubeconfig, None)
}

/// The pool's key→port map and its field managers.
async fn pool_state(w: &World, name: &str) -> (PortAssignment, BTreeMap<String, u16>, Vec<String>) {
    let object = w.api().get(name).await.expect("get pool");
    let ports = portassign_testkit::ports_of(&object);
    let managers =
        object.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect::<Vec<_>>();
    (object, ports, managers)
}

#[tokio::test(flavor = "multi_thread")]
async fn acquire_prints_the_port_the_status_shows_and_release_removes_the_key() {
    let w = World::new("acq-cli").await;
    let agent = w.agent(port_block(10)).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let pool = format!("ports-{}", w.node);

    // First use creates the node's default pool; plain output is the port alone.
    let first = portassign(&who, &["acquire", "team-a/sandbox-7", "--node", &w.node, "-n", &w.ns]);
    assert_eq!(first.code, 0, "stderr: {}", first.err);
    let port: u16 = first.out.trim().parse().unwrap_or_else(|_| panic!("a port number, got {:?}", first.out));
    let (object, ports, managers) = pool_state(&w, &pool).await;
    assert_eq!(ports.get("team-a/sandbox-7"), Some(&port), "the status shows the printed port");
    assert_eq!(object.spec.node_name, w.node);
    assert!(managers.contains(&field_manager("team-a/sandbox-7")), "{managers:?}");
    assert!(managers.contains(&client::POOL_MANAGER.to_owned()), "{managers:?}");

    // Idempotent; JSON and YAML for programs.
    let json = portassign(&who, &["acquire", "team-a/sandbox-7", "--node", &w.node, "-n", &w.ns, "-o", "json"]);
    assert_eq!(json.code, 0, "stderr: {}", json.err);
    let doc: serde_json::Value = serde_json::from_str(&json.out).expect("JSON");
    assert_eq!(doc["port"], port, "the same key gets the same port back");
    assert_eq!((doc["node"].as_str(), doc["pool"].as_str()), (Some(w.node.as_str()), Some(pool.as_str())));
    assert_eq!((doc["namespace"].as_str(), doc["protocol"].as_str()), (Some(w.ns.as_str()), Some("TCP")));
    let yaml = portassign(&who, &["acquire", "team-a/sandbox-8", "--node", &w.node, "-n", &w.ns, "-o", "yaml"]);
    assert_eq!(yaml.code, 0, "stderr: {}", yaml.err);
    let doc: serde_json::Value = serde_saphyr::from_str(&yaml.out).expect("YAML");
    let port8 = doc["port"].as_u64().expect("port") as u16;
    assert_eq!(pool_state(&w, &pool).await.1.get("team-a/sandbox-8"), Some(&port8));

    // The agent's own writes (finalizer, status) take no ownership of spec.keys, so
    // releasing a key removes it even though the agent wrote the object since.
    for entry in object.metadata.managed_fields.iter().flatten() {
        let manager = entry.manager.as_deref().unwrap_or_default();
        let fields = serde_json::to_string(&entry.fields_v1).unwrap_or_default();
        if !manager.starts_with(client::KEY_MANAGER_PREFIX) && manager != client::POOL_MANAGER {
            assert!(!fields.contains("f:keys"), "{manager} owns spec.keys: {fields}");
        }
    }

    // A key someone else also lists stays listed when this caller releases it.
    let mut other = w.api().get(&pool).await.unwrap();
    other.metadata.managed_fields = None;
    let shared = serde_json::json!({
        "apiVersion": "portassign.io/v1alpha1", "kind": "PortAssignment",
        "metadata": { "name": pool }, "spec": { "keys": ["team-a/sandbox-8"] }
    });
    w.api()
        .patch(&pool, &kube::api::PatchParams::apply("someone-else"), &kube::api::Patch::Apply(shared))
        .await
        .expect("another writer lists sandbox-8");
    let kept = portassign(&who, &["release", "team-a/sandbox-8", "-n", &w.ns]);
    assert_eq!(kept.code, 0, "stderr: {}", kept.err);
    assert!(kept.err.contains("stays listed") && kept.err.contains("another writer"), "stderr: {}", kept.err);
    let (object, ports, managers) = pool_state(&w, &pool).await;
    assert!(object.spec.keys.contains(&"team-a/sandbox-8".to_owned()));
    assert_eq!(ports.get("team-a/sandbox-8"), Some(&port8), "its port stays");
    assert!(!managers.contains(&field_manager("team-a/sandbox-8")), "the key's manager is gone: {managers:?}");

    // As a kubectl plugin: kubectl finds kubectl-portassign on PATH.
    let plugins = std::env::temp_dir().join(format!("portassign-plugin-{}", w.ns));
    std::fs::create_dir_all(&plugins).unwrap();
    let link = plugins.join("kubectl-portassign");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(portassign_bin(), &link).unwrap();
    let kubectl = portassign_testkit::tool("kubectl").expect("kubectl");
    let via = run(
        &kubectl,
        &["portassign", "release", "team-a/sandbox-7", "--node", &w.node, "-n", &w.ns],
        &who.kubeconfig,
        Some(&plugins),
    );
    assert_eq!(via.code, 0, "stderr: {}", via.err);
    assert!(via.out.contains(&format!("released key \"team-a/sandbox-7\" from pool {}/{pool}", w.ns)), "{}", via.out);
    let again =
        run(&kubectl, &["portassign", "release", "team-a/sandbox-7", "-n", &w.ns], &who.kubeconfig, Some(&plugins));
    assert_eq!(again.code, 0, "releasing twice is fine: {}", again.err);
    assert!(again.out.contains("nothing to release"), "{}", again.out);

    let released = portassign_testkit::eventually("sandbox-7's port released", Duration::from_secs(30), || async {
        let (object, ports, managers) = pool_state(&w, &pool).await;
        (!ports.contains_key("team-a/sandbox-7") && object.is_ready()).then_some((object, managers))
    })
    .await;
    assert!(!released.0.spec.keys.contains(&"team-a/sandbox-7".to_owned()));
    assert!(!released.1.contains(&field_manager("team-a/sandbox-7")), "no manager left behind: {:?}", released.1);

    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_key_is_refused_before_anything_is_written() {
    let w = World::new("acq-invalid").await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    for bad in ["team a/sandbox", "_leading", "sandbox:7"] {
        let r = portassign(&who, &["acquire", bad, "--node", &w.node, "-n", &w.ns]);
        assert_eq!(r.code, 3, "{bad:?}: {}", r.err);
        assert!(r.err.starts_with(&format!("error: invalid key {bad:?}")), "{}", r.err);
        assert!(r.err.contains("letters, digits, '-', '_', '.' and '/'"), "{}", r.err);
        assert!(r.out.is_empty());
        let r = portassign(&who, &["release", bad, "-n", &w.ns]);
        assert_eq!(r.code, 3, "release {bad:?}: {}", r.err);
    }
    assert!(w.api().list(&Default::default()).await.unwrap().items.is_empty(), "nothing was created");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_without_the_role_is_told_it_is_forbidden() {
    let w = World::new("acq-forbidden").await;
    let nobody = caller(&w, "nobody", &[]).await;
    let r = portassign(&nobody, &["acquire", "k", "--node", &w.node, "-n", &w.ns]);
    assert_eq!(r.code, 4, "{}", r.err);
    assert!(r.err.starts_with("error: forbidden: "), "{}", r.err);
    assert!(r.err.contains("system:serviceaccount:") && r.err.contains("cannot patch"), "{}", r.err);
    assert!(r.err.contains("get, list, watch, create and patch on portassignments.portassign.io"), "{}", r.err);
    // Without create, the first caller cannot make the pool.
    let no_create = caller(&w, "no-create", &["get", "list", "watch", "patch"]).await;
    let r = portassign(&no_create, &["acquire", "k", "--node", &w.node, "-n", &w.ns]);
    assert_eq!(r.code, 4, "{}", r.err);
    assert!(r.err.contains("cannot create"), "{}", r.err);
    let r = portassign(&nobody, &["release", "k", "-n", &w.ns]);
    assert_eq!(r.code, 4, "{}", r.err);
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_agent_within_the_timeout_fails_and_withdraws_the_key() {
    let w = World::new("acq-noagent").await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let started = std::time::Instant::now();
    let r = portassign(&who, &["acquire", "team-a/s1", "--node", &w.node, "-n", &w.ns, "--timeout", "2s"]);
    assert_eq!(r.code, 5, "{}", r.err);
    assert!(r.err.starts_with("error: no agent answered within 2s: key \"team-a/s1\""), "{}", r.err);
    assert!(r.err.contains(&format!("on node {}; is the portassign agent running on that node?", w.node)), "{}", r.err);
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited the timeout");
    let (object, _, managers) = pool_state(&w, &format!("ports-{}", w.node)).await;
    assert!(object.spec.keys.is_empty(), "the failed acquire left its key: {:?}", object.spec.keys);
    assert!(!managers.contains(&field_manager("team-a/s1")), "{managers:?}");
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_range_fails_with_its_own_code() {
    let w = World::new("acq-exhausted").await;
    let agent = w.agent(port_block(1)).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let r = portassign(&who, &["acquire", "first", "--node", &w.node, "-n", &w.ns]);
    assert_eq!(r.code, 0, "{}", r.err);
    let r = portassign(&who, &["acquire", "second", "--node", &w.node, "-n", &w.ns]);
    assert_eq!(r.code, 6, "{}", r.err);
    assert!(
        r.err.starts_with(&format!("error: range exhausted on node {}: key \"second\" got no port: ", w.node)),
        "{}",
        r.err
    );
    assert!(r.err.contains("every port of the node's range is assigned") && r.err.contains("withdrawn"), "{}", r.err);
    let pool = format!("ports-{}", w.node);
    let object = portassign_testkit::eventually("the pool Ready again", Duration::from_secs(30), || async {
        w.api().get(&pool).await.ok().filter(|o| o.is_ready())
    })
    .await;
    assert_eq!(object.spec.keys, vec!["first".to_owned()], "second was withdrawn, first kept");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_busy_on_the_node_fails_with_a_conflict() {
    let w = World::new("acq-conflict").await;
    let range = port_block(1);
    let _held = TcpListener::bind(("127.0.0.1", range.first())).expect("hold the only port of the range");
    let agent = w.agent(range).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let r = portassign(&who, &["acquire", "k", "--node", &w.node, "-n", &w.ns, "--timeout", "20s"]);
    assert_eq!(r.code, 7, "{}", r.err);
    assert!(
        r.err.starts_with(&format!("error: port conflict on node {}: key \"k\" got no port: ", w.node)),
        "{}",
        r.err
    );
    assert!(r.err.contains("in use by other programs on the node"), "{}", r.err);
    agent.stop().await.unwrap();
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_another_node_is_refused_and_left_as_it_was() {
    let w = World::new("acq-mismatch").await;
    w.create("shared", &["theirs"]).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let r = portassign(&who, &["acquire", "mine", "--node", "elsewhere", "--pool", "shared", "-n", &w.ns]);
    assert_eq!(r.code, 8, "{}", r.err);
    assert!(
        r.err.contains(&format!(
            "pool {}/shared cannot take key \"mine\": it is for node {}, not elsewhere",
            w.ns, w.node
        )),
        "{}",
        r.err
    );
    assert_eq!(w.api().get("shared").await.unwrap().spec.keys, vec!["theirs".to_owned()]);
    w.cleanup().await;
}

/// The concurrency proof: many callers, each with keys of its own, acquiring and
/// releasing on one pool at once, round after round, through the client API (server-side
/// apply, one field manager per key). Every acquire must return the port the status
/// shows, no caller's key may be lost (each holds one key for the whole run, whose port
/// must never change) or left behind, and no call may fail (no conflict errors).
///
/// The callers belong to several launchers (independent clients, as separate processes
/// would be), so writes of different launchers race at the API server; within one
/// launcher the client sends its writes to a pool one at a time. Callers pause up to 1 s
/// (fixed per caller and round) before each acquire and hold each port up to 0.5 s.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_callers_share_one_pool_without_losing_a_key() {
    const CALLERS: usize = 50;
    const LAUNCHERS: usize = 5;
    const ROUNDS: usize = 3;
    let w = World::new("acq-many").await;
    let range = port_block(3 * CALLERS as u16);
    let agent = w.agent(range).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let pool = Pool::on_node(&w.node);
    let api = Arc::new(w.api());
    let pause =
        |i: usize, round: usize, most: u64| Duration::from_millis((i as u64 * 7919 + round as u64 * 104_729) % most);
    let launchers: Vec<PortClient> =
        (0..LAUNCHERS).map(|_| PortClient::new(who.client(), &w.ns).timeout(Duration::from_secs(120))).collect();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CALLERS {
        let ports = launchers[i % LAUNCHERS].clone();
        let (pool, api) = (pool.clone(), api.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let kept_key = format!("caller-{i}/kept");
            tokio::time::sleep(pause(i, ROUNDS, 1000)).await;
            let kept = match ports.acquire(&pool, &kept_key).await {
                Ok(a) => a.port,
                Err(e) => return vec![format!("{kept_key}: {e}")],
            };
            for round in 0..ROUNDS {
                let key = format!("caller-{i}/round-{round}");
                tokio::time::sleep(pause(i, round, 1000)).await;
                match ports.acquire(&pool, &key).await {
                    Ok(a) => {
                        let object = api.get(&pool.name).await.expect("get pool");
                        let shown = portassign_testkit::ports_of(&object);
                        if shown.get(&key) != Some(&a.port) {
                            failures.push(format!(
                                "{key}: acquire said {} but the status shows {:?}",
                                a.port,
                                shown.get(&key)
                            ));
                        }
                        if shown.get(&kept_key) != Some(&kept) {
                            failures.push(format!(
                                "{kept_key} lost in round {round}: {:?} instead of {kept}",
                                shown.get(&kept_key)
                            ));
                        }
                    }
                    Err(e) => failures.push(format!("{key}: {e}")),
                }
                tokio::time::sleep(pause(i, round + 1, 500)).await;
                match ports.release(&pool.name, &key).await {
                    Ok(r) if r.removed && !r.still_listed => {}
                    Ok(r) => failures.push(format!("{key}: release did not remove it: {r:?}")),
                    Err(e) => failures.push(format!("{key}: release: {e}")),
                }
            }
            match ports.get(&pool.name, &kept_key).await {
                Ok(Some(a)) if a.port == kept => {}
                other => failures.push(format!("{kept_key} at the end: {other:?}, acquired {kept}")),
            }
            if let Err(e) = ports.release(&pool.name, &kept_key).await {
                failures.push(format!("{kept_key}: release: {e}"));
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.expect("caller task"));
    }
    println!("{CALLERS} callers x ({ROUNDS} rounds + 1 kept key) took {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

    // Nothing left behind: no key, no port, no caller's field manager, nothing in the agent.
    let (object, managers) = portassign_testkit::eventually("every port released", Duration::from_secs(60), || async {
        let (object, ports, managers) = pool_state(&w, &pool.name).await;
        (ports.is_empty() && object.is_ready()).then_some((object, managers))
    })
    .await;
    assert!(object.spec.keys.is_empty(), "keys left behind: {:?}", object.spec.keys);
    let left: BTreeSet<&String> = managers.iter().filter(|m| m.starts_with(client::KEY_MANAGER_PREFIX)).collect();
    assert!(left.is_empty(), "callers' managers left: {left:?}");
    let table =
        portassign::checker::fetch_table(&format!("http://{}", agent.http_addr), Some(&w.reader_identity.token()))
            .await
            .expect("table");
    assert!(table.ports.is_empty(), "the agent still holds {} ports", table.ports.len());
    agent.stop().await.unwrap();
    w.cleanup().await;
}

/// The example launcher (examples/launcher.rs): gets a port, serves on it, shows it
/// reachable, and on Ctrl-C releases the port before it exits.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_launcher_serves_on_its_port_and_releases_it_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    let w = World::new("acq-launcher").await;
    let agent = w.agent(port_block(5)).await;
    let who = caller(&w, "launcher", &CALLER_VERBS).await;
    let example = portassign_bin().parent().expect("target dir").join("examples/launcher");
    if !example.exists() {
        // `cargo test` builds the examples, `cargo test --test acquire` does not.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "-p", "portassign-client", "--example", "launcher"])
            .status()
            .expect("cargo build");
        assert!(built.success() && example.exists(), "could not build {}", example.display());
    }
    let mut child = Command::new(&example)
        .args(["--node", &w.node, "--key", "team-a/sandbox-1", "-n", &w.ns])
        .env("KUBECONFIG", &who.kubeconfig)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the launcher");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("launcher output");
        let serving = line.contains("serving");
        seen.push(line);
        if serving {
            break;
        }
    }
    let pool = format!("ports-{}", w.node);
    let port = pool_state(&w, &pool).await.1["team-a/sandbox-1"];
    assert!(seen[0].contains(&format!("holds port {port} on node {}", w.node)), "{seen:?}");
    assert!(seen[1].contains(&format!("reachable: connected to 127.0.0.1:{port}")), "{seen:?}");
    let greeting = std::io::read_to_string(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    assert_eq!(greeting.expect("read").trim_end(), format!("sandbox team-a/sandbox-1 on port {port}"));

    Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    let status = child.wait().expect("launcher exit");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("released team-a/sandbox-1")), "{rest:?}");
    let (object, ..) = pool_state(&w, &pool).await;
    assert!(object.spec.keys.is_empty(), "the launcher's key is gone: {:?}", object.spec.keys);
    agent.stop().await.unwrap();
    w.cleanup().await;
}
