//! The port table fed arbitrary sequences of reservations, commits, deletions and
//! restarts (rebuilds from what was committed), with its invariants checked after every
//! step: no port held twice, the per-port and per-object views agree, the free count is
//! right, busy or already-held ports are never handed out, committed keys keep their
//! ports, and everything committed survives a restart.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portassign::{
    agent::table::{ObjectId, PortTable, Recorded},
    range::PortRange,
};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Object wants these keys (indices into a small key space, so keys recur).
    Want(u8, Vec<u8>),
    /// The last reservation of the object becomes durable.
    Commit(u8),
    /// The object is deleted.
    Delete(u8),
    /// A port of the range becomes busy (or free again) on the node.
    Flip(u16),
    /// The agent restarts and rebuilds from the durable records, plus a stray record
    /// (a port outside the range, or one another object holds: a status edited by hand).
    Restart { stray_object: u8, stray_key: u8, stray_port: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    first: u16,
    size: u8,
    ops: Vec<Op>,
}

fn obj(o: u8) -> ObjectId {
    ObjectId::new(format!("ns{}", o % 3), format!("o{}", o % 8))
}

fn key(k: u8) -> String {
    format!("k{}", k % 16)
}

fuzz_target!(|input: Input| {
    let first = input.first.max(1);
    let last = first.saturating_add(u16::from(input.size % 32));
    let range = PortRange::new(first, last).expect("first >= 1 and first <= last");
    let mut table = PortTable::new(range);
    let mut busy: BTreeSet<u16> = BTreeSet::new();
    let mut durable: BTreeMap<ObjectId, BTreeMap<String, u16>> = BTreeMap::new();
    let mut last: BTreeMap<ObjectId, BTreeMap<String, u16>> = BTreeMap::new();
    for op in input.ops.into_iter().take(200) {
        match op {
            Op::Want(o, keys) => {
                let id = obj(o);
                let keys: Vec<String> = keys.iter().take(40).map(|k| key(*k)).collect();
                let held_before: HashSet<u16> = table.entries().iter().map(|(p, _)| *p).collect();
                let r = table.reserve(&id, keys.iter().map(String::as_str), &mut |p| !busy.contains(&p));
                for (k, p) in &r.added {
                    assert!(!busy.contains(p), "busy port {p} given to {k}");
                    assert!(range.contains(*p), "port {p} outside {range}");
                    assert!(!held_before.contains(p), "held port {p} given again to {k}");
                }
                for k in &keys {
                    assert!(r.ports.contains_key(k) != r.unassigned.contains(k), "key {k} both or neither");
                }
                assert_eq!(r.shortage.is_some(), !r.unassigned.is_empty());
                if let Some(before) = durable.get(&id) {
                    for (k, p) in before {
                        if keys.contains(k) {
                            assert_eq!(r.ports.get(k), Some(p), "key {k} moved");
                        }
                    }
                }
                last.insert(id, r.ports);
            }
            Op::Commit(o) => {
                let id = obj(o);
                if let Some(ports) = last.remove(&id) {
                    table.commit(&id, &ports);
                    durable.insert(id, ports);
                }
            }
            Op::Delete(o) => {
                let id = obj(o);
                table.release_object(&id);
                durable.remove(&id);
                last.remove(&id);
            }
            Op::Flip(p) => {
                let port = range.first() + p % (range.len() as u16).max(1);
                if !busy.remove(&port) {
                    busy.insert(port);
                }
            }
            Op::Restart { stray_object, stray_key, stray_port } => {
                let mut records: Vec<Recorded<u8>> = durable
                    .iter()
                    .enumerate()
                    .map(|(age, (id, ports))| Recorded {
                        object: id.clone(),
                        age: age as u8,
                        ports: ports.iter().map(|(k, p)| (k.clone(), *p)).collect(),
                    })
                    .collect();
                let stray =
                    Recorded { object: obj(stray_object), age: u8::MAX, ports: vec![(key(stray_key), stray_port)] };
                records.push(stray.clone());
                let displaced = table.rebuild(records);
                for d in &displaced {
                    assert_eq!(d.loser.object.as_ref(), &stray.object, "only the stray can lose: {d:?}");
                    assert_eq!(table.holder(d.port), Some(&d.keeper));
                }
                // The stray record is now what the table holds for its object: make it durable
                // so the model matches (the agent would write it back on its next reconcile).
                let id = stray.object.clone();
                match table.ports_of(&id) {
                    Some(ports) => durable.insert(id, ports.clone()),
                    None => durable.remove(&id),
                };
                last.clear();
            }
        }
        let mut seen = HashSet::new();
        for (port, holder) in table.entries() {
            assert!(seen.insert(port), "port {port} listed twice");
            assert_eq!(table.ports_of(&holder.object).and_then(|m| m.get(&holder.key)), Some(&port));
        }
        let per_object: usize = table.object_ids().iter().filter_map(|id| table.ports_of(id)).map(BTreeMap::len).sum();
        assert_eq!(seen.len(), per_object, "per-port and per-object views disagree");
        assert_eq!(table.held(), seen.len());
        let held_in_range = seen.iter().filter(|p| range.contains(**p)).count();
        assert_eq!(table.free_in_range(), range.len() - held_in_range);
        for (id, ports) in &durable {
            for (k, p) in ports {
                let holder = table.holder(*p).map(|h| (h.object.as_ref().clone(), h.key.clone()));
                assert_eq!(holder, Some((id.clone(), k.clone())), "durable {id} {k}={p} not held");
            }
        }
    }
});
