//! An independent invariant checker: reads every PortAssignment and, where given, the
//! agents' in-memory tables (`/debug/table`), and reports every broken guarantee.
//! Used by the reliability tests and by hand (`portassign check`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    time::Duration,
};

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;

pub use portassign_api::table::{TableDocument, TableEntry};
use portassign_api::{
    PortAssignment,
    pods::{PodProtocol, declared_ports},
    range::{PortRange, PortRanges},
};

pub use self::fetch::{FetchError, fetch_table, get, get_with};

mod fetch;

/// One broken guarantee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Node concerned.
    pub node: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.message)
    }
}

/// What the checker expects of the cluster.
#[derive(Clone, Debug)]
pub struct Expectations {
    /// Every object must have been reconciled at its current generation.
    pub settled: bool,
    /// An object still present this long after its deletion was requested is stuck.
    pub stuck_after: Duration,
    /// Allocation range per node, when known (taken from the agents' tables otherwise).
    pub ranges: HashMap<String, PortRange>,
}

impl Default for Expectations {
    fn default() -> Self {
        Self { settled: true, stuck_after: Duration::from_secs(60), ranges: HashMap::new() }
    }
}

type Entry = (u16, String, String, String);

/// Checks the statuses of `objects` (all nodes) and, for each agent table given, that
/// its memory holds exactly what the statuses of its node hold.
pub fn check(
    objects: &[PortAssignment],
    agents: &[TableDocument],
    expect: &Expectations,
    now: Timestamp,
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut ranges: HashMap<String, PortRanges> =
        expect.ranges.iter().map(|(node, range)| (node.clone(), PortRanges::from(*range))).collect();
    // The ranges claims' objects draw from, as their agents say (no expectation: claims
    // are the agents' own objects).
    let mut claim_ranges: HashMap<String, PortRanges> = HashMap::new();
    for agent in agents {
        if let Ok(range) = agent.range.parse() {
            ranges.entry(agent.node.clone()).or_insert(range);
        }
        if let Ok(range) = agent.claim_range.parse::<PortRanges>()
            && !range.is_empty()
        {
            claim_ranges.insert(agent.node.clone(), range);
        }
    }
    let mut held: BTreeMap<&str, BTreeSet<Entry>> = BTreeMap::new();
    let mut by_port: HashMap<(&str, u16), String> = HashMap::new();
    for object in objects {
        let node = object.spec.node_name.as_str();
        let id = format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any());
        let mut fail = |message: String| violations.push(Violation { node: node.to_owned(), message });
        if let Some(deleted) = &object.metadata.deletion_timestamp {
            let waited = now.duration_since(deleted.0);
            if waited.as_secs_f64() > expect.stuck_after.as_secs_f64() {
                fail(format!("{id} is stuck deleting for {:.0}s", waited.as_secs_f64()));
            }
            // An object being deleted holds no ports.
            continue;
        }
        let status = object.status.clone().unwrap_or_default();
        let current = status.observed_generation.is_some() && status.observed_generation == object.metadata.generation;
        if expect.settled && !current {
            fail(format!(
                "{id} is not reconciled: generation {:?}, observed {:?}",
                object.metadata.generation, status.observed_generation
            ));
        }
        let ready = status.ready_condition().is_some_and(|c| c.status == "True");
        let wanted: BTreeSet<&str> = object.spec.keys.iter().map(String::as_str).collect();
        let recorded: BTreeSet<&str> = status.ports.iter().map(|e| e.key.as_str()).collect();
        if current {
            for extra in recorded.difference(&wanted) {
                fail(format!("{id} records a port for key {extra} that is not in spec"));
            }
            if ready {
                for missing in wanted.difference(&recorded) {
                    fail(format!("{id} is Ready but key {missing} has no port"));
                }
            }
        }
        // A claim's object holds ports of the claims' range only, every other object
        // ports of the keys' ranges only: the scheduler's count of the claims' range is
        // the truth only if nothing else takes from it.
        let claim = object.labels().contains_key(portassign_api::dra::CLAIM_LABEL);
        let range = if claim { claim_ranges.get(node) } else { ranges.get(node) };
        for entry in &status.ports {
            if let Some(range) = range
                && !range.contains(entry.port)
            {
                let which = if claim { "claims' range" } else { "range" };
                fail(format!("{id} key {} holds port {} outside the {which} {range}", entry.key, entry.port));
            }
            if let Some(other) = by_port.insert((node, entry.port), format!("{id} key {}", entry.key)) {
                fail(format!("port {} is held twice: by {other} and by {id} key {}", entry.port, entry.key));
            }
            let (ns, name) = id.split_once('/').unwrap_or_default();
            held.entry(node).or_default().insert((entry.port, ns.to_owned(), name.to_owned(), entry.key.clone()));
        }
    }
    for agent in agents {
        let node = agent.node.as_str();
        if !agent.ready {
            violations.push(Violation { node: node.to_owned(), message: "agent is not ready".into() });
            continue;
        }
        let memory: BTreeSet<Entry> =
            agent.ports.iter().map(|e| (e.port, e.namespace.clone(), e.name.clone(), e.key.clone())).collect();
        let statuses = held.get(node).cloned().unwrap_or_default();
        for (port, ns, name, key) in memory.difference(&statuses) {
            violations.push(Violation {
                node: node.to_owned(),
                message: format!("agent holds port {port} for {ns}/{name} key {key}, which no status records"),
            });
        }
        for (port, ns, name, key) in statuses.difference(&memory) {
            violations.push(Violation {
                node: node.to_owned(),
                message: format!(
                    "status of {ns}/{name} records port {port} for key {key}, which the agent does not hold"
                ),
            });
        }
    }
    violations
}

/// The bearer token `portassign check` shows the agents for `/debug/table`: the contents
/// of `token_file` if given, else the token of the kubeconfig's user (a `token` or
/// `tokenFile` entry, or the pod's ServiceAccount token in a cluster). A user who
/// authenticates with a client certificate, an exec plugin or an auth provider has no
/// token to show; then the error says so and how to get one (no token is minted).
pub fn caller_token(config: &kube::Config, token_file: Option<&std::path::Path>) -> Result<String, String> {
    use secrecy::ExposeSecret;
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))
            .and_then(|t| if t.is_empty() { Err(format!("the token file {} is empty", path.display())) } else { Ok(t) })
    };
    if let Some(path) = token_file {
        return read(path);
    }
    let auth = &config.auth_info;
    if let Some(token) = &auth.token {
        return Ok(token.expose_secret().trim().to_owned());
    }
    if let Some(path) = &auth.token_file {
        return read(std::path::Path::new(path));
    }
    let how = if auth.client_certificate.is_some() || auth.client_certificate_data.is_some() {
        "a client certificate"
    } else if auth.exec.is_some() {
        "an exec plugin"
    } else if auth.auth_provider.is_some() {
        "an auth provider"
    } else {
        "no credentials"
    };
    Err(format!(
        "the agents' /debug/table needs a bearer token, and the kubeconfig's user authenticates with {how}: \
         pass --token-file FILE with a token of an identity allowed to get /debug/table, for example \
         `kubectl create token SERVICEACCOUNT > FILE` for a ServiceAccount bound to the chart's table-reader ClusterRole"
    ))
}

/// Keys holding a port that a pod of the same node declares (a `hostPort`, or any port of
/// a `hostNetwork` pod, for a protocol the key's object asks for), from the pod until it
/// is terminal: traffic to the port may reach the pod instead of the key's sandbox. The
/// agent never assigns such a port, so each of these is a pod that arrived later.
pub fn pod_conflicts(objects: &[PortAssignment], pods: &[Pod]) -> Vec<Violation> {
    let mut declared: HashMap<(&str, u16), Vec<(String, PodProtocol)>> = HashMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else { continue };
        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        for d in declared_ports(pod) {
            declared.entry((node, d.port)).or_default().push((name.clone(), d.protocol));
        }
    }
    let mut out = Vec::new();
    for object in objects.iter().filter(|o| o.metadata.deletion_timestamp.is_none()) {
        let node = object.spec.node_name.as_str();
        let id = format!("{}/{}", object.namespace().unwrap_or_default(), object.name_any());
        for entry in object.status.iter().flat_map(|s| &s.ports) {
            for (pod, protocol) in declared.get(&(node, entry.port)).into_iter().flatten() {
                if protocol.clashes_with(object.spec.protocol) {
                    out.push(Violation {
                        node: node.to_owned(),
                        message: format!(
                            "port {} held by {id} key {} is declared by pod {pod} ({}): traffic to it may reach the pod",
                            entry.port,
                            entry.key,
                            protocol.as_str()
                        ),
                    });
                }
            }
        }
    }
    out
}

/// The label that exempts a pod (or a namespace) from the chart's admission policy.
pub const EXEMPT_LABEL: &str = "portassign.io/host-ports";
/// The chart's admission policy's annotations: the ranges it keeps, and the ports in them
/// the agent never assigns (so the policy admits them).
pub const POLICY_RANGES_ANNOTATION: &str = "portassign.io/port-ranges";
/// See [`POLICY_RANGES_ANNOTATION`].
pub const POLICY_NEVER_ANNOTATION: &str = "portassign.io/never-assigned";

/// The host ports the cluster keeps for portassign on a node: its ranges, minus the ports
/// the agent never assigns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptPorts {
    /// The agent's ranges.
    pub ranges: PortRanges,
    /// Ports of the ranges it never assigns (`--exclude-ports`, the NodePort range).
    pub never: PortRanges,
}

impl KeptPorts {
    /// Whether a pod declaring `port` would be refused by the admission policy.
    pub fn keeps(&self, port: u16) -> bool {
        self.ranges.contains(port) && !self.never.contains(port)
    }

    /// What the chart's admission policy keeps, from its annotations; `None` when it
    /// carries none or they do not parse.
    pub fn from_policy(annotations: &BTreeMap<String, String>) -> Option<Self> {
        let ranges: PortRanges = annotations.get(POLICY_RANGES_ANNOTATION)?.parse().ok()?;
        let never = annotations.get(POLICY_NEVER_ANNOTATION).map_or(Ok(PortRanges::default()), |n| n.parse()).ok()?;
        (!ranges.is_empty()).then_some(Self { ranges, never })
    }

    /// What an agent keeps, from its table: its ranges minus its exclusions.
    pub fn from_table(table: &TableDocument) -> Option<Self> {
        let ranges: PortRanges = table.range.parse().ok()?;
        let mut never: Vec<PortRange> = Vec::new();
        for text in [&table.skipped.excluded_by_flag, &table.skipped.nodeport_range] {
            never.extend(text.parse::<PortRanges>().ok()?.ranges());
        }
        Some(Self { ranges, never: PortRanges::new(never) })
    }
}

impl fmt::Display for KeptPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ranges)?;
        if !self.never.is_empty() {
            write!(f, " (except {})", self.never)?;
        }
        Ok(())
    }
}

/// A pod that declares a host port the cluster keeps for portassign: one the admission
/// policy would refuse today (made before it, or exempt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInRange {
    /// The pod's node, `None` while unscheduled.
    pub node: Option<String>,
    /// The pod, `namespace/name`.
    pub pod: String,
    /// Its container declaring the port.
    pub container: String,
    /// The port and its protocol, `20017/TCP`.
    pub port: String,
    /// Whether the port is a container port of a hostNetwork pod (else a hostPort).
    pub host_network: bool,
    /// Whether the pod carries the exemption label.
    pub labelled: bool,
    /// The kept ports it falls in.
    pub kept: String,
}

impl fmt::Display for PodInRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.host_network { "hostNetwork port" } else { "hostPort" };
        write!(
            f,
            "node {}: pod {} container {} declares {kind} {} in portassign's ranges {}",
            self.node.as_deref().unwrap_or("(unscheduled)"),
            self.pod,
            self.container,
            self.port,
            self.kept
        )?;
        if self.labelled {
            write!(f, " (labelled {EXEMPT_LABEL}=allowed)")?;
        }
        Ok(())
    }
}

/// Pods that are not terminal and declare, on their node, a port `kept` says the cluster
/// keeps for portassign (`kept` gives it per node, `None` for the pods of a node it does
/// not know): every hostPort of any protocol, and every containerPort of a hostNetwork
/// pod, in containers and init containers. Read from the Pod objects directly, like the
/// admission policy reads them, not through the agent's code.
pub fn pods_in_ranges(pods: &[Pod], kept: impl Fn(Option<&str>) -> Option<KeptPorts>) -> Vec<PodInRange> {
    let mut out = Vec::new();
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let Some(spec) = pod.spec.as_ref().filter(|_| !matches!(phase, Some("Succeeded" | "Failed"))) else {
            continue;
        };
        let node = spec.node_name.clone();
        let Some(kept) = kept(node.as_deref()) else { continue };
        let host_network = spec.host_network == Some(true);
        let labelled = pod.labels().get(EXEMPT_LABEL).is_some_and(|v| v == "allowed");
        for container in spec.init_containers.iter().flatten().chain(&spec.containers) {
            for port in container.ports.iter().flatten() {
                let (number, on_host_network) = match port.host_port {
                    Some(host) if host > 0 => (host, false),
                    _ if host_network => (port.container_port, true),
                    _ => continue,
                };
                let Ok(number) = u16::try_from(number) else { continue };
                if kept.keeps(number) {
                    out.push(PodInRange {
                        node: node.clone(),
                        pod: format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                        container: container.name.clone(),
                        port: format!("{number}/{}", port.protocol.as_deref().unwrap_or("TCP")),
                        host_network: on_host_network,
                        labelled,
                        kept: kept.to_string(),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use portassign_api::{PortAssignmentSpec, PortAssignmentStatus, PortEntry, Protocol};

    fn object(name: &str, node: &str, keys: &[&str], ports: &[(&str, u16)], ready: bool) -> PortAssignment {
        let mut o = PortAssignment::new(
            name,
            PortAssignmentSpec {
                node_name: node.into(),
                protocol: Protocol::Tcp,
                keys: keys.iter().map(|k| k.to_string()).collect(),
            },
        );
        o.metadata.namespace = Some("ns".into());
        o.metadata.generation = Some(1);
        o.status = Some(PortAssignmentStatus {
            observed_generation: Some(1),
            ports: ports.iter().map(|(k, p)| PortEntry { key: k.to_string(), port: *p }).collect(),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: "Allocated".into(),
                message: String::new(),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::now()),
            }],
            ..Default::default()
        });
        o
    }

    fn agent(node: &str, ports: &[(u16, &str, &str)]) -> TableDocument {
        TableDocument {
            node: node.into(),
            range: "100-199".into(),
            claim_range: "500-509".into(),
            ready: true,
            ports: ports
                .iter()
                .map(|(p, name, key)| TableEntry {
                    port: *p,
                    namespace: "ns".into(),
                    name: name.to_string(),
                    key: key.to_string(),
                })
                .collect(),
            skipped: Default::default(),
            conflicts: vec![],
            explain: None,
        }
    }

    fn run(objects: &[PortAssignment], agents: &[TableDocument]) -> Vec<String> {
        check(objects, agents, &Expectations::default(), Timestamp::now()).iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn a_consistent_cluster_passes() {
        let objects = [
            object("a", "n1", &["k1", "k2"], &[("k1", 100), ("k2", 101)], true),
            object("b", "n2", &["k1"], &[("k1", 100)], true),
        ];
        assert!(run(&objects, &[agent("n1", &[(100, "a", "k1"), (101, "a", "k2")])]).is_empty());
    }

    #[test]
    fn finds_every_kind_of_violation() {
        let mut stuck = object("gone", "n1", &["k"], &[("k", 150)], true);
        stuck.metadata.deletion_timestamp =
            Some(Time(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(600)));
        let objects = [
            object("a", "n1", &["k1", "k2"], &[("k1", 100)], true),
            object("b", "n1", &["x"], &[("x", 100), ("old", 300)], false),
            stuck,
        ];
        let found = run(&objects, &[agent("n1", &[(100, "a", "k1"), (120, "a", "leak")])]);
        let expect = [
            "a is Ready but key k2 has no port",
            "port 100 is held twice",
            "records a port for key old that is not in spec",
            "port 300 outside the range 100-199",
            "ns/gone is stuck deleting",
            "agent holds port 120 for ns/a key leak, which no status records",
            "records port 100 for key x, which the agent does not hold",
        ];
        for e in expect {
            assert!(found.iter().any(|f| f.contains(e)), "missing {e:?} in {found:#?}");
        }
    }

    #[test]
    fn claims_and_keys_hold_ports_of_their_own_ranges_only() {
        let mut claim = object("claim-web", "n1", &["port"], &[("port", 500)], true);
        claim.metadata.labels = Some([(portassign_api::dra::CLAIM_LABEL.to_string(), "uid-1".to_string())].into());
        let mut stray = object("claim-db", "n1", &["port"], &[("port", 150)], true);
        stray.metadata.labels = claim.metadata.labels.clone();
        let key = object("keys", "n1", &["k"], &[("k", 505)], true);
        let agents = [agent("n1", &[(500, "claim-web", "port"), (150, "claim-db", "port"), (505, "keys", "k")])];
        let found = run(&[claim, stray, key], &agents);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found.iter().any(|f| f.contains("ns/claim-db key port holds port 150 outside the claims' range 500-509"))
        );
        assert!(found.iter().any(|f| f.contains("ns/keys key k holds port 505 outside the range 100-199")));
    }

    #[test]
    fn reports_a_pod_declaring_a_held_port_on_the_same_node() {
        let objects = [object("a", "n1", &["k1", "k2"], &[("k1", 100), ("k2", 101)], true)];
        let pod = |name: &str, node: &str, port: i32, protocol: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "web" },
                "spec": { "nodeName": node, "containers": [{ "name": "c", "ports": [
                    { "containerPort": 80, "hostPort": port, "protocol": protocol }
                ]}]}
            }))
            .unwrap()
        };
        let pods = [pod("same", "n1", 101, "TCP"), pod("other-node", "n2", 100, "TCP"), pod("udp", "n1", 100, "UDP")];
        let found: Vec<String> = pod_conflicts(&objects, &pods).iter().map(|v| v.to_string()).collect();
        assert_eq!(
            found,
            [
                "node n1: port 101 held by ns/a key k2 is declared by pod web/same (TCP): traffic to it may reach the pod"
            ]
        );
    }

    #[test]
    fn lists_pods_declaring_a_kept_port_whatever_the_protocol() {
        let pod = |name: &str, spec: serde_json::Value, labels: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "namespace": "web", "labels": labels },
                "spec": spec,
            }))
            .unwrap()
        };
        let ports = |ports: serde_json::Value| serde_json::json!({ "nodeName": "n1", "containers": [{ "name": "c", "ports": ports }] });
        let pods = [
            pod(
                "in",
                ports(serde_json::json!([{ "containerPort": 80, "hostPort": 150, "protocol": "SCTP" }])),
                serde_json::json!({}),
            ),
            pod("outside", ports(serde_json::json!([{ "containerPort": 80, "hostPort": 250 }])), serde_json::json!({})),
            pod(
                "excluded",
                ports(serde_json::json!([{ "containerPort": 80, "hostPort": 122 }])),
                serde_json::json!({}),
            ),
            pod("no-host-port", ports(serde_json::json!([{ "containerPort": 150 }])), serde_json::json!({})),
            pod(
                "host-network",
                serde_json::json!({ "nodeName": "n2", "hostNetwork": true, "initContainers": [{ "name": "side", "restartPolicy": "Always", "ports": [{ "containerPort": 101, "protocol": "UDP" }] }], "containers": [{ "name": "c" }] }),
                serde_json::json!({ "portassign.io/host-ports": "allowed" }),
            ),
            pod(
                "unknown-node",
                serde_json::json!({ "nodeName": "n3", "containers": [{ "name": "c", "ports": [{ "containerPort": 1, "hostPort": 150 }] }] }),
                serde_json::json!({}),
            ),
        ];
        let kept = KeptPorts { ranges: "100-199".parse().unwrap(), never: "120-129".parse().unwrap() };
        let found: Vec<String> = pods_in_ranges(&pods, |node| (node != Some("n3")).then(|| kept.clone()))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "node n1: pod web/in container c declares hostPort 150/SCTP in portassign's ranges 100-199 (except 120-129)",
                "node n2: pod web/host-network container side declares hostNetwork port 101/UDP in portassign's ranges 100-199 (except 120-129) (labelled portassign.io/host-ports=allowed)",
            ]
        );
    }

    #[test]
    fn the_kept_ports_come_from_the_policys_annotations_or_an_agents_table() {
        let annotations: BTreeMap<String, String> = [
            (POLICY_RANGES_ANNOTATION.to_owned(), "20000-29999,40000-40999".to_owned()),
            (POLICY_NEVER_ANNOTATION.to_owned(), "22,30000-32767".to_owned()),
        ]
        .into();
        let kept = KeptPorts::from_policy(&annotations).expect("parsed");
        assert!(kept.keeps(20000) && kept.keeps(40999) && !kept.keeps(19999) && !kept.keeps(30000));
        assert_eq!(KeptPorts::from_policy(&BTreeMap::new()), None);
        let mut table = agent("n1", &[]);
        table.skipped.excluded_by_flag = "150-159".into();
        let kept = KeptPorts::from_table(&table).expect("parsed");
        assert!(kept.keeps(100) && !kept.keeps(155) && !kept.keeps(200));
    }

    #[test]
    fn unreconciled_objects_fail_only_when_settled_is_expected() {
        let mut o = object("a", "n1", &["k1"], &[], false);
        o.metadata.generation = Some(2);
        assert_eq!(run(std::slice::from_ref(&o), &[]).len(), 1);
        let relaxed = Expectations { settled: false, ..Default::default() };
        assert!(check(&[o], &[], &relaxed, Timestamp::now()).is_empty());
    }

    #[test]
    fn the_callers_token_comes_from_the_kubeconfig_or_a_file_and_certificates_are_named() {
        let dir = std::env::temp_dir().join(format!("portassign-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        config.auth_info.token = Some("from-kubeconfig".to_owned().into());
        assert_eq!(caller_token(&config, None).unwrap(), "from-kubeconfig");
        assert_eq!(caller_token(&config, Some(&file)).unwrap(), "from-file", "--token-file wins");

        let mut certificate = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        certificate.auth_info.client_certificate_data = Some("LS0t".into());
        let error = caller_token(&certificate, None).unwrap_err();
        assert!(error.contains("client certificate") && error.contains("--token-file"), "{error}");
        std::fs::write(&file, "  \n").unwrap();
        assert!(caller_token(&certificate, Some(&file)).unwrap_err().contains("is empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
