//! `portassign key|port` (also `kubectl portassign`) against the real API server.

use std::{path::Path, process::Command};

use portassign_testkit::{Cluster, World, port_block};

/// Runs the CLI as the user (admin) would.
fn lookup(kubeconfig: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portassign"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run portassign");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_finds_its_port_and_a_port_finds_its_key() {
    let cluster = Cluster::shared().await;
    let kubeconfig = cluster.kubeconfig();
    let w = World::on(cluster, "lookup").await;
    let agent = w.agent(port_block(10)).await;
    w.create("pool", &["team-a/sandbox-7", "team-a/sandbox-8"]).await;
    let ports = w.ready_ports("pool").await;
    let port = ports["team-a/sandbox-7"].to_string();

    let (code, out, _) = lookup(kubeconfig, &["key", "team-a/sandbox-7", "-n", &w.ns, "-o", "json"]);
    assert_eq!(code, 0);
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found.as_array().map(Vec::len), Some(1));
    assert_eq!(found[0]["port"].to_string(), port);
    assert_eq!(found[0]["node"], w.node.as_str());
    assert_eq!(found[0]["name"], "pool");

    let (code, out, _) = lookup(kubeconfig, &["port", &port, "--node", &w.node]);
    assert_eq!(code, 0);
    let row = out.lines().nth(1).expect("a table row");
    assert!(row.contains("team-a/sandbox-7") && row.contains(&w.ns), "row: {row}");

    let (code, out, _) = lookup(kubeconfig, &["port", &port, "--node", &w.node, "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("key: team-a/sandbox-7"), "yaml: {out}");

    let (code, _, err) = lookup(kubeconfig, &["key", "team-a/nobody", "-n", &w.ns]);
    assert_eq!(code, 1, "no match is a failure exit");
    assert!(err.contains("holds no port"), "stderr: {err}");
    let (code, _, _) = lookup(kubeconfig, &["port", "1", "--node", &w.node]);
    assert_eq!(code, 1);

    agent.stop().await.unwrap();
    w.cleanup().await;
}
