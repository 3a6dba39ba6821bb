//! Keys as the agent meets them: arbitrary strings (the CRD schema limits them on the API
//! server, but an object written under an older schema, or a schema edited by hand, can
//! hold anything). Each distinct key gets its own port or is reported unassigned, the
//! event notes that name keys stay within their size limit on a character boundary, and
//! a key lookup finds exactly the entries recorded for that key.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portassign::{
    agent::{
        context::truncate,
        reconcile::describe,
        table::{ObjectId, PortTable},
    },
    api::{PortAssignment, PortAssignmentSpec, PortAssignmentStatus, PortEntry},
    lookup::{Query, find},
    range::PortRange,
};

#[derive(Arbitrary, Debug)]
struct Input {
    keys: Vec<String>,
    size: u8,
    note_limit: u16,
}

fuzz_target!(|input: Input| {
    let range = PortRange::new(40000, 40000 + u16::from(input.size % 64)).expect("a valid range");
    let mut table = PortTable::new(range);
    let id = ObjectId::new("ns", "o");
    let keys: Vec<&str> = input.keys.iter().take(300).map(String::as_str).collect();
    let reservation = table.reserve(&id, keys.iter().copied(), &mut |_| true);
    let mut distinct: Vec<&str> = keys.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let mut ports: Vec<u16> = reservation.ports.values().copied().collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), reservation.ports.len(), "two keys share a port");
    assert_eq!(distinct.len().min(range.len()), reservation.ports.len());
    for key in &distinct {
        assert!(reservation.ports.contains_key(*key) || reservation.unassigned.iter().any(|k| k == key));
    }

    let limit = usize::from(input.note_limit.max(3));
    let note = describe(&reservation.added);
    let cut = truncate(note.clone(), limit);
    assert!(cut.len() <= limit, "note of {} bytes for a limit of {limit}", cut.len());
    if note.len() <= limit {
        assert_eq!(cut, note);
    } else {
        assert!(cut.ends_with("...") && note.starts_with(&cut[..cut.len() - 3]));
    }

    let mut object = PortAssignment::new(
        "o",
        PortAssignmentSpec { node_name: "n".into(), protocol: Default::default(), keys: input.keys.clone() },
    );
    object.metadata.namespace = Some("ns".into());
    object.status = Some(PortAssignmentStatus {
        ports: reservation.ports.iter().map(|(key, port)| PortEntry { key: key.clone(), port: *port }).collect(),
        ..Default::default()
    });
    for key in distinct.iter().take(20) {
        let found = find([&object], &Query::Key((*key).to_owned()));
        let expected = usize::from(reservation.ports.contains_key(*key));
        assert_eq!(found.len(), expected, "lookup of {key:?}");
    }
});
