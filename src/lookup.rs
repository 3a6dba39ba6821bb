//! Lookups both ways: which port a key holds, and which key holds a port on a node.
//! Served by `portassign key|port`, also as the kubectl plugin `kubectl portassign`.

use kube::{Api, Client, ResourceExt, api::ListParams};
use serde::Serialize;

use portassign_api::{PortAssignment, node_selector};

/// One assignment found by a lookup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    /// Namespace of the PortAssignment.
    pub namespace: String,
    /// Name of the PortAssignment.
    pub name: String,
    /// Node the port is on.
    pub node: String,
    /// The key.
    pub key: String,
    /// The port.
    pub port: u16,
}

/// What to look for.
#[derive(Clone, Debug)]
pub enum Query {
    /// The port(s) of a key (a key may be listed by objects on several nodes).
    Key(String),
    /// The key holding a port, on one node or on every node.
    Port {
        /// The port.
        port: u16,
        /// Restrict to this node.
        node: Option<String>,
    },
}

/// The assignments of `objects` that answer `query`. Objects being deleted hold no
/// ports, so they are left out.
pub fn find<'a>(objects: impl IntoIterator<Item = &'a PortAssignment>, query: &Query) -> Vec<Match> {
    let mut out = Vec::new();
    for object in objects {
        if object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(status) = &object.status else { continue };
        for entry in &status.ports {
            let hit = match query {
                Query::Key(key) => &entry.key == key,
                Query::Port { port, node } => {
                    entry.port == *port && node.as_ref().is_none_or(|n| *n == object.spec.node_name)
                }
            };
            if hit {
                out.push(Match {
                    namespace: object.namespace().unwrap_or_default(),
                    name: object.name_any(),
                    node: object.spec.node_name.clone(),
                    key: entry.key.clone(),
                    port: entry.port,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.node, a.port, &a.namespace, &a.name).cmp(&(&b.node, b.port, &b.namespace, &b.name)));
    out
}

/// Lists the objects a query needs: one namespace or all, one node or all.
pub async fn list(
    client: Client,
    namespace: Option<&str>,
    node: Option<&str>,
) -> Result<Vec<PortAssignment>, kube::Error> {
    let api: Api<PortAssignment> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut params = ListParams::default();
    if let Some(node) = node {
        params = params.fields(&node_selector(node));
    }
    Ok(api.list(&params).await?.items)
}

/// Output format of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// A JSON array.
    Json,
    /// A YAML list.
    Yaml,
}

/// Renders matches in `format`.
pub fn render(matches: &[Match], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(matches).unwrap_or_default() + "\n",
        Format::Yaml => serde_saphyr::to_string(&matches).unwrap_or_default(),
        Format::Table => {
            let header = ["NAMESPACE", "NAME", "NODE", "KEY", "PORT"].map(String::from);
            let rows: Vec<[String; 5]> =
                std::iter::once(header)
                    .chain(matches.iter().map(|m| {
                        [m.namespace.clone(), m.name.clone(), m.node.clone(), m.key.clone(), m.port.to_string()]
                    }))
                    .collect();
            let widths: Vec<usize> = (0..5).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
            let mut out = String::new();
            for row in rows {
                let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                out.push_str(cells.join("   ").trim_end());
                out.push('\n');
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portassign_api::{PortAssignmentSpec, PortAssignmentStatus, PortEntry, Protocol};

    fn object(ns: &str, name: &str, node: &str, ports: &[(&str, u16)]) -> PortAssignment {
        let mut o = PortAssignment::new(
            name,
            PortAssignmentSpec {
                node_name: node.into(),
                protocol: Protocol::Tcp,
                keys: ports.iter().map(|(k, _)| k.to_string()).collect(),
            },
        );
        o.metadata.namespace = Some(ns.into());
        o.status = Some(PortAssignmentStatus {
            ports: ports.iter().map(|(k, p)| PortEntry { key: k.to_string(), port: *p }).collect(),
            ..Default::default()
        });
        o
    }

    #[test]
    fn finds_a_key_and_a_port_both_ways() {
        let objects = vec![
            object("a", "pool", "n1", &[("team-a/s1", 20000), ("team-a/s2", 20001)]),
            object("b", "pool", "n2", &[("team-b/s1", 20000)]),
        ];
        let by_key = find(&objects, &Query::Key("team-a/s2".into()));
        assert_eq!(by_key.len(), 1);
        assert_eq!((by_key[0].node.as_str(), by_key[0].port), ("n1", 20001));

        let on_n2 = find(&objects, &Query::Port { port: 20000, node: Some("n2".into()) });
        assert_eq!(on_n2.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), vec!["team-b/s1"]);
        let everywhere = find(&objects, &Query::Port { port: 20000, node: None });
        assert_eq!(everywhere.len(), 2, "the same number on two nodes");
        assert!(find(&objects, &Query::Key("nope".into())).is_empty());
    }

    #[test]
    fn objects_being_deleted_hold_nothing() {
        let mut o = object("a", "pool", "n1", &[("k", 20000)]);
        o.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(find([&o], &Query::Key("k".into())).is_empty());
    }

    #[test]
    fn renders_table_json_and_yaml() {
        let m =
            vec![Match { namespace: "a".into(), name: "pool".into(), node: "n1".into(), key: "k".into(), port: 20000 }];
        let table = render(&m, Format::Table);
        assert_eq!(table.lines().next(), Some("NAMESPACE   NAME   NODE   KEY   PORT"));
        assert_eq!(table.lines().nth(1), Some("a           pool   n1     k     20000"));
        let json: serde_json::Value = serde_json::from_str(&render(&m, Format::Json)).unwrap();
        assert_eq!(json[0]["port"], 20000);
        let yaml: serde_json::Value = serde_saphyr::from_str(&render(&m, Format::Yaml)).unwrap();
        assert_eq!(yaml[0]["key"], "k");
    }
}
