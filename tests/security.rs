//! What the agent exposes on the node, against a real kube-apiserver: `/metrics` and
//! `/debug/table` only for tokens the API server accepts and authorizes, on every
//! address the agent listens on; health probes that a flood of slow connections cannot
//! starve; and the Pod Security level the chart's agent pod needs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use portassign::{
    agent::{self, probe::SocketProbe, server::HttpOptions},
    checker::{get, get_with},
};
use portassign_testkit::{AgentProcess, World, chart, eventually, port_block, unique};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// This host's addresses an agent on the wildcard address answers on: loopback, and the
/// address of the interface that routes outwards, if there is one (found by connecting a
/// UDP socket, which sends nothing).
fn local_addresses() -> Vec<IpAddr> {
    let mut addresses = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let outward = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip());
    if let Ok(ip) = outward
        && !ip.is_loopback()
        && !ip.is_unspecified()
    {
        addresses.push(ip);
    }
    addresses
}

/// An in-process agent for the world's node, as the chart's ServiceAccount, on `listen`.
async fn start_agent(w: &World, listen: SocketAddr, http: HttpOptions) -> agent::Running {
    let config = agent::Config { listen, http, ..w.agent_config(&w.node, port_block(4)) };
    agent::start(w.agent_identity.client(), config, Arc::new(SocketProbe::detect())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_table_answer_only_tokens_the_api_server_authorizes_on_every_address() {
    let w = World::new("auth").await;
    let agent = start_agent(&w, SocketAddr::from(([0, 0, 0, 0], 0)), HttpOptions::default()).await;
    eventually("agent ready", Duration::from_secs(30), || async { agent.is_ready().then_some(()) }).await;
    w.create("pool", &["a", "b"]).await;
    w.ready_ports("pool").await;

    let reader = w.reader_identity.token();
    // Authenticated, but granted neither path: the janitor, and the agent itself.
    let janitor = w.janitor_identity.token();
    let own = w.agent_identity.token();
    let addresses = local_addresses();
    println!("agent on {}, asked on {addresses:?}", agent.http_addr);
    let mut wrong = Vec::new();
    for ip in &addresses {
        let base = format!("http://{}", SocketAddr::new(*ip, agent.http_addr.port()));
        for path in ["/healthz", "/readyz"] {
            let (code, _) = get(&format!("{base}{path}")).await.unwrap();
            if code != 200 {
                wrong.push(format!("{base}{path} without a token: {code}, expected 200"));
            }
        }
        for path in ["/metrics", "/debug/table"] {
            let url = format!("{base}{path}");
            let cases: [(&str, Option<&str>, u16); 5] = [
                ("no token", None, 401),
                ("a token of no one", Some("not-a-token"), 401),
                ("the reader's token", Some(&reader), 200),
                ("the janitor's token", Some(&janitor), 403),
                ("the agent's own token", Some(&own), 403),
            ];
            for (who, token, expected) in cases {
                let (code, body) = get_with(&url, token).await.unwrap();
                println!("GET {url} with {who}: {code} {}", body.lines().next().unwrap_or_default());
                if code != expected {
                    wrong.push(format!("GET {url} with {who}: {code}, expected {expected}: {body}"));
                }
                if expected == 200 && path == "/debug/table" && !body.contains("\"key\":\"a\"") {
                    wrong.push(format!("GET {url} with {who}: not the table: {body}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    agent.stop().await.unwrap();
    w.cleanup().await;
}

/// `portassign check` shows the caller's token: an admin's kubeconfig reads the table, a
/// kubeconfig of an identity without the grant is refused with the agent's 403.
#[tokio::test(flavor = "multi_thread")]
async fn portassign_check_authenticates_with_the_callers_credentials() {
    let w = World::new("checkauth").await;
    let agent = AgentProcess::new(&w.agent_identity.kubeconfig, &w.node).range(port_block(4)).start().await;
    let check = |kubeconfig: &std::path::Path| {
        let output = std::process::Command::new(portassign_testkit::portassign_bin())
            .args(["check", "--unsettled", "--agent", &agent.url])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("PORTASSIGN_TOKEN_FILE")
            .output()
            .expect("run portassign check");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let cluster = portassign_testkit::Cluster::shared().await;
    // Read (exit 0 or 1: objects of other tests may be mid-change), not refused (exit 2).
    let (code, text) = check(cluster.kubeconfig());
    assert!(matches!(code, Some(0 | 1)) && text.contains("and 1 agent tables"), "admin: {text}");
    let (code, text) = check(&w.janitor_identity.kubeconfig);
    assert_eq!(code, Some(2), "janitor: {text}");
    assert!(text.contains("HTTP 403") && text.contains("may not get /debug/table"), "{text}");
    w.cleanup().await;
}

/// Opens a connection from `from` (a loopback address) and sends a request head a byte
/// at a time, never finishing it; when the agent closes it, waits a little and opens
/// another. Until `until`.
async fn slow_client(from: IpAddr, addr: SocketAddr, until: Instant) -> usize {
    let mut connections = 0;
    while Instant::now() < until {
        let connect = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from, 0))?;
            socket.connect(addr).await
        };
        let Ok(mut stream) = connect.await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        connections += 1;
        let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\n").await;
        let mut buf = [0u8; 64];
        loop {
            if Instant::now() >= until {
                return connections;
            }
            tokio::select! {
                read = stream.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { break },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if stream.write_all(b"X").await.is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connections
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// 400 slow clients from 127.0.0.2 (loopback) for 12 s against an agent capped at 32
/// connections: every readiness probe from 127.0.0.1 (kubelet-like: a new connection,
/// 1 s timeout, every 200 ms) answers 200, and the agent's open descriptors stay within
/// a small multiple of its cap, far below the flood's 400.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_slow_connections_does_not_make_readyz_fail() {
    let w = World::new("flood").await;
    let cap = 32;
    let agent = AgentProcess::new(&w.agent_identity.kubeconfig, &w.node)
        .range(port_block(2))
        .arg("--http-max-connections")
        .arg(&cap.to_string())
        .start()
        .await;
    let pid = agent.pid().expect("running");
    let idle = open_descriptors(pid);
    let addr: SocketAddr = agent.url.trim_start_matches("http://").parse().unwrap();
    let until = Instant::now() + Duration::from_secs(12);
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let flood: Vec<_> = (0..400).map(|_| tokio::spawn(slow_client(attacker, addr, until))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let url = format!("{}/readyz", agent.url);
    let (mut probes, mut failed, mut most_descriptors) = (0, Vec::new(), 0);
    while Instant::now() + Duration::from_millis(500) < until {
        probes += 1;
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(1), get(&url)).await {
            Ok(Ok((200, _))) => {}
            other => failed.push(format!("probe {probes} after {:?}: {other:?}", started.elapsed())),
        }
        most_descriptors = most_descriptors.max(open_descriptors(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut connections = 0;
    for client in flood {
        connections += client.await.unwrap();
    }
    println!(
        "{probes} probes, {} failed; {connections} slow connections; agent descriptors: {idle} idle, at most {most_descriptors} under the flood",
        failed.len()
    );
    assert!(connections >= 400, "the flood opened only {connections} connections");
    assert!(failed.is_empty(), "readiness probes failed under the flood:\n{}", failed.join("\n"));
    // Closed connections give their descriptor back once their task runs again, so under
    // churn a few dozen more than the cap are open for a moment; unbounded, it is ~400.
    assert!(
        most_descriptors <= idle + 2 * cap + 16,
        "the agent held {most_descriptors} descriptors (idle {idle}, cap {cap}): connections are not bounded"
    );
    drop(agent);
    w.cleanup().await;
}

/// A client that never finishes its headers is cut off at the header deadline, and an
/// oversized head gets 431 instead of being buffered.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_oversized_request_heads_are_cut_off() {
    let w = World::new("heads").await;
    let http = HttpOptions { header_timeout: Duration::from_secs(1), ..Default::default() };
    let agent = start_agent(&w, SocketAddr::from(([127, 0, 0, 1], 0)), http).await;

    let mut slow = TcpStream::connect(agent.http_addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3), "closed only after {:?}", started.elapsed());

    let mut big = TcpStream::connect(agent.http_addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let _ = big.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "answer to a 64 KiB header: {answer:?}");
    agent.stop().await.unwrap();
    w.cleanup().await;
}

/// The agent's pod as the chart renders it, in `namespace`.
fn rendered_agent_pod(namespace: &str) -> Pod {
    let rendered = chart::render(namespace, &[]).expect("helm template");
    let daemonset = chart::of_kind(&rendered, "DaemonSet").next().expect("the chart renders a DaemonSet").clone();
    let template = &daemonset["spec"]["template"];
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "agent", "namespace": namespace, "labels": template["metadata"]["labels"] },
        "spec": template["spec"],
    }))
    .expect("a pod from the DaemonSet's template")
}

/// In a namespace enforcing the `baseline` Pod Security level the agent pod is refused
/// with the message the DaemonSet controller would record; with the label the chart's
/// documentation gives, it is admitted. Admission decides without a kubelet.
#[tokio::test(flavor = "multi_thread")]
async fn pod_security_baseline_refuses_the_agent_pod_and_the_documented_label_admits_it() {
    let w = World::new("psa").await;
    let namespaces: Api<Namespace> = Api::all(w.client.clone());
    let ns = unique("psa-baseline");
    let namespace: Namespace = serde_json::from_value(json!({
        "metadata": { "name": ns, "labels": { "pod-security.kubernetes.io/enforce": "baseline" } }
    }))
    .unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &ns);
    let pod = rendered_agent_pod(&ns);

    let refused = pods.create(&PostParams::default(), &pod).await.expect_err("baseline admits no hostNetwork pod");
    let kube::Error::Api(status) = refused else { panic!("not an API refusal: {refused}") };
    println!("refused: {}", status.message);
    assert_eq!(status.code, 403);
    assert!(
        status.message.contains("violates PodSecurity \"baseline:latest\"")
            && status.message.contains("hostNetwork=true"),
        "{}",
        status.message
    );

    // The label NOTES.txt and the README give.
    let label = json!({ "metadata": { "labels": { "pod-security.kubernetes.io/enforce": "privileged" } } });
    namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(label)).await.unwrap();
    let admitted = pods.create(&PostParams::default(), &pod).await.expect("admitted with enforce=privileged");
    assert_eq!(admitted.spec.and_then(|s| s.host_network), Some(true));
    namespaces.delete(&ns, &DeleteParams::default()).await.unwrap();
    w.cleanup().await;
}
