use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::*;
use portassign_api::{CONDITION_READY, PortAssignmentStatus, PortEntry};

#[test]
fn keys_are_checked_as_the_crd_checks_them() {
    for good in ["a", "team-a/sandbox-7", "A.b_c-d/9", &"k".repeat(MAX_KEY_LEN)] {
        assert!(validate_key(good).is_ok(), "{good}");
    }
    for (bad, says) in [
        ("", "empty"),
        ("-a", "start and end"),
        ("a/", "start and end"),
        ("a b", "' ' is not allowed"),
        ("a\nb", "is not allowed"),
        ("sandbox:7", "':' is not allowed"),
        (&"k".repeat(MAX_KEY_LEN + 1), "254 characters"),
    ] {
        let error = validate_key(bad).unwrap_err();
        assert!(error.to_string().contains(says), "{bad:?}: {error}");
        assert_eq!(error.exit_code(), exit::INVALID_KEY);
    }
}

#[test]
fn each_key_has_its_own_stable_field_manager_within_the_api_limit() {
    assert_eq!(field_manager("team-a/sandbox-7"), "portassign-client/team-a/sandbox-7");
    let long_a = format!("{}a", "k".repeat(200));
    let long_b = format!("{}b", "k".repeat(200));
    let (a, b) = (field_manager(&long_a), field_manager(&long_b));
    assert!(a.len() <= 128 && b.len() <= 128, "{} {}", a.len(), b.len());
    assert_ne!(a, b, "keys sharing a long prefix get different managers");
    assert_eq!(a, field_manager(&long_a), "stable");
}

#[test]
fn default_pools_are_named_after_node_and_protocol() {
    assert_eq!(Pool::on_node("worker-1").name, "ports-worker-1");
    assert_eq!(Pool::on_node("worker-1").protocol(Protocol::Udp).name, "ports-worker-1-udp");
    assert_eq!(Pool::named("mine", "worker-1").protocol(Protocol::Udp).name, "mine", "a named pool keeps its name");
    let long = "n".repeat(253);
    let name = Pool::default_name(&long, Protocol::TcpUdp);
    assert!(name.len() <= 253 && name.ends_with("-tcpudp"), "{name}");
    // A node name is not validated here: one whose 200th byte falls inside a character
    // is cut before that character (it used to panic), and two such names stay apart.
    for long in ["é".repeat(150), format!("n{}", "é".repeat(150)), format!("{}€", "n".repeat(199))] {
        let name = Pool::default_name(&long, Protocol::Tcp);
        assert!(name.len() <= 253, "{name}");
        assert_ne!(name, Pool::default_name(&format!("{long}x"), Protocol::Tcp), "the hash tells them apart");
    }
}

#[test]
fn every_shortage_has_one_reason_and_a_distinct_exit_code() {
    let mut codes: Vec<u8> = vec![exit::OTHER, exit::USAGE, exit::INVALID_KEY, exit::FORBIDDEN, exit::POOL_UNUSABLE];
    for (reason, shortage, code, _) in SHORTAGES {
        assert_eq!(Shortage::from_reason(reason), Some(*shortage));
        assert_eq!(shortage.exit_code(), *code);
        if *code != exit::NO_AGENT {
            codes.push(*code);
        }
    }
    codes.push(exit::NO_AGENT);
    let mut unique = codes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), codes.len(), "exit codes collide: {codes:?}");
    assert_eq!(Shortage::from_reason("SomethingNew"), None);
}

fn pool(generation: i64, keys: &[&str]) -> PortAssignment {
    let mut o = PortAssignment::new(
        "p",
        PortAssignmentSpec {
            node_name: "n".into(),
            protocol: Protocol::Tcp,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        },
    );
    o.metadata.generation = Some(generation);
    o
}

fn status(observed: i64, ports: &[(&str, u16)], ready: (&str, &str)) -> PortAssignmentStatus {
    PortAssignmentStatus {
        observed_generation: Some(observed),
        ports: ports.iter().map(|(k, p)| PortEntry { key: k.to_string(), port: *p }).collect(),
        conditions: vec![Condition {
            type_: CONDITION_READY.into(),
            status: ready.0.into(),
            reason: ready.1.into(),
            message: "why".into(),
            observed_generation: Some(observed),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        }],
        ..Default::default()
    }
}

#[test]
fn a_port_counts_only_from_a_status_that_covers_the_write() {
    let mut o = pool(5, &["k"]);
    assert_eq!(judge(&o, "k", Some(5)), Verdict::Wait, "no status yet");
    // A status of an older generation may still show a port the agent is about to
    // release (the key was removed and added back): not an answer.
    o.status = Some(status(4, &[("k", 20000)], ("True", reason::ALLOCATED)));
    assert_eq!(judge(&o, "k", Some(5)), Verdict::Wait);
    o.status = Some(status(5, &[("k", 20001)], ("True", reason::ALLOCATED)));
    assert_eq!(judge(&o, "k", Some(5)), Verdict::Port(20001));
    o.status = Some(status(7, &[("k", 20001)], ("True", reason::ALLOCATED)));
    assert_eq!(judge(&o, "k", Some(5)), Verdict::Port(20001), "a later status answers too");
}

#[test]
fn a_status_without_the_key_says_why_through_the_reason_table() {
    let mut o = pool(3, &["a", "k"]);
    o.status = Some(status(3, &[("a", 20000)], ("False", reason::RANGE_EXHAUSTED)));
    assert_eq!(judge(&o, "k", Some(3)), Verdict::Short(Shortage::RangeExhausted, "why".into()));
    o.status = Some(status(3, &[("a", 20000)], ("False", reason::PORT_CONFLICT)));
    assert_eq!(judge(&o, "k", Some(3)), Verdict::Short(Shortage::PortConflict, "why".into()));
    o.status = Some(status(3, &[("a", 20000)], ("False", "AReasonAddedLater")));
    assert_eq!(judge(&o, "k", Some(3)), Verdict::Wait, "an unknown reason is waited out");
    o.status = Some(status(3, &[("a", 20000)], ("False", reason::RANGE_EXHAUSTED)));
    assert_eq!(judge(&o, "a", Some(3)), Verdict::Port(20000), "keys that have a port are not short");
}

#[test]
fn errors_map_to_their_exit_codes() {
    let shortage =
        Error::Shortage { shortage: Shortage::PortConflict, key: "k".into(), node: "n".into(), message: "m".into() };
    assert_eq!(shortage.exit_code(), 7);
    assert!(shortage.to_string().starts_with("port conflict on node n: key \"k\" got no port: m"), "{shortage}");
    let none = Error::NoAgent {
        key: "k".into(),
        node: "n".into(),
        namespace: "ns".into(),
        pool: "p".into(),
        timeout: Duration::from_millis(1500),
    };
    assert_eq!(none.exit_code(), 5);
    assert!(none.to_string().starts_with("no agent answered within 1.5s"), "{none}");
}
