//! The shape of the code, checked: the agent's modules import each other without a
//! cycle, and the crates by role keep their dependencies (the client compiles no server,
//! metrics or flag parser; the checker cannot reach the agent). docs/design.md §13.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

/// The sibling modules of `src/agent/` that `source` (one module's file, its tests cut
/// off) names: `super::x`, `use super::{x::…, y}`, `crate::agent::x`.
fn sibling_references(source: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |name: &str| {
        if siblings.contains(name) {
            out.insert(name.to_owned());
        }
    };
    for prefix in ["super::", "crate::agent::"] {
        let mut rest = source;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // A group: the first segment of each top-level item.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            add(item.trim().split("::").next().unwrap_or_default());
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        item.push(c);
                    }
                }
                add(item.trim().split("::").next().unwrap_or_default());
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                add(&name);
            }
        }
    }
    out
}

/// A cycle in `graph`, if one is, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn agent_import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/agent");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.extension().is_some_and(|e| e == "rs") && name != "mod" {
            let source = std::fs::read_to_string(&path).unwrap();
            // A module's tests may use anything, and a comment's link imports nothing:
            // only the module's code counts.
            let code = source.split("#[cfg(test)]\nmod tests").next().unwrap();
            let code: String = code
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .map(|line| format!("{line}\n"))
                .collect();
            files.insert(name, code);
        }
    }
    let siblings: BTreeSet<String> = files.keys().cloned().collect();
    files.iter().map(|(name, code)| (name.clone(), sibling_references(code, &siblings))).collect()
}

#[test]
fn the_agents_modules_import_each_other_without_a_cycle() {
    let graph = agent_import_graph();
    // The graph is read for real: the modules the design names import what it says.
    assert!(graph["reconcile"].contains("context"), "{graph:?}");
    assert!(graph["context"].contains("state"), "{graph:?}");
    assert!(graph["state"].contains("table") && graph["state"].contains("node_ports"), "{graph:?}");
    assert_eq!(find_cycle(&graph), None, "an import cycle in src/agent/ (graph: {graph:?})");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let siblings: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
    let a = sibling_references("use super::{b::X, c};\nfn f() { super::c::g() }", &siblings);
    assert_eq!(a, ["b", "c"].map(String::from).into());
    let b = sibling_references("use crate::agent::a::Y;", &siblings);
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a".to_owned(), a), ("b".to_owned(), b), ("c".to_owned(), BTreeSet::new())].into();
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "a".into()]));
}

/// The packages `package` compiles (normal dependencies, any depth).
fn dependencies(package: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_program_embedding_the_client_compiles_no_server_metrics_or_flag_parser() {
    let client = dependencies("portassign-client");
    assert!(client.contains("kube-client") && client.contains("portassign-api"), "{client:?}");
    for unwanted in ["portassign", "portassign-checker", "axum", "prometheus-client", "clap"] {
        assert!(!client.contains(unwanted), "portassign-client compiles {unwanted}");
    }
    // hyper comes with the Kubernetes client; its server side must not.
    let hyper_server = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked", "-e", "normal,features", "-p", "portassign-client", "-i", "hyper"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    let features = String::from_utf8_lossy(&hyper_server.stdout);
    assert!(features.contains("hyper feature \"client\""), "{features}");
    assert!(!features.contains("hyper feature \"server\""), "portassign-client compiles hyper's server:\n{features}");
}

#[test]
fn the_checker_cannot_reach_the_agent() {
    let checker = dependencies("portassign-checker");
    assert!(checker.contains("portassign-api"), "{checker:?}");
    for unwanted in ["portassign", "portassign-client", "axum", "prometheus-client", "clap"] {
        assert!(!checker.contains(unwanted), "portassign-checker compiles {unwanted}");
    }
}
