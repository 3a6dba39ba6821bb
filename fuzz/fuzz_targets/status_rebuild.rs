//! The documents the agent rebuilds its table from: a list of PortAssignments as the API
//! server returns it, decoded exactly as the agent decodes it (objects that do not fit
//! the schema are set aside one by one, not the whole list), turned into records, rebuilt
//! into a table, and then reconciled against each object's spec.
//!
//! Checked: decoding never panics; every port the table holds was recorded by its
//! holder; every recorded port is either held by its recorder or reported displaced in
//! favour of a holder that is not younger; a key that is still wanted keeps the port it
//! was rebuilt with.

#![no_main]

use std::collections::BTreeMap;

use kube::core::{DeserializeGuard, ObjectList};
use libfuzzer_sys::fuzz_target;
use portassign::{
    agent::{recorded, table::PortTable},
    api::PortAssignment,
    range::PortRange,
};

fuzz_target!(|data: &[u8]| {
    let Ok(list) = serde_json::from_slice::<ObjectList<DeserializeGuard<PortAssignment>>>(data) else { return };
    let objects: Vec<PortAssignment> = list.items.into_iter().filter_map(|item| item.0.ok()).collect();
    // The API server lists a namespace/name once.
    let mut ids: Vec<_> = objects.iter().map(PortAssignment::id).collect();
    ids.sort();
    ids.dedup();
    if ids.len() != objects.len() {
        return;
    }
    let records: Vec<_> = objects.iter().filter_map(recorded).collect();
    let range = PortRange::new(20000, 20063).expect("a valid range");
    let mut table = PortTable::new(range);
    let displaced = table.rebuild(records.clone());

    let age_of: BTreeMap<_, _> = records.iter().map(|r| (r.object.clone(), r.age)).collect();
    for (port, holder) in table.entries() {
        let recorded_it = records
            .iter()
            .any(|r| r.object == *holder.object && r.ports.iter().any(|(k, p)| *k == holder.key && *p == port));
        assert!(recorded_it, "port {port} held by {}/{} without a record", holder.object, holder.key);
    }
    for record in &records {
        let mut first_port: BTreeMap<&str, u16> = BTreeMap::new();
        let mut sorted = record.ports.clone();
        sorted.sort();
        for (key, port) in &sorted {
            first_port.entry(key).or_insert(*port);
        }
        for (key, port) in first_port {
            if port == 0 {
                continue;
            }
            let held = table.holder(port).is_some_and(|h| *h.object == record.object && h.key == key);
            let lost =
                displaced.iter().find(|d| d.port == port && *d.loser.object == record.object && d.loser.key == key);
            assert!(held || lost.is_some(), "{} {key}={port} neither held nor displaced", record.object);
            if let Some(d) = lost {
                assert_eq!(table.holder(port), Some(&d.keeper));
                assert!(
                    age_of.get(d.keeper.object.as_ref()) <= age_of.get(&record.object),
                    "a younger object kept {port}"
                );
            }
        }
    }

    // Reconciling each object's spec afterwards keeps every rebuilt port of a wanted key.
    for object in &objects {
        if object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let id = object.id();
        let before = table.ports_of(&id).cloned().unwrap_or_default();
        let keys: Vec<&str> = object.spec.keys.iter().take(200).map(String::as_str).collect();
        let reservation = table.reserve(&id, keys.iter().copied(), &mut |_| true);
        for (key, port) in &before {
            if keys.contains(&key.as_str()) {
                assert_eq!(reservation.ports.get(key), Some(port), "{id} {key} moved on reconcile");
            }
        }
        table.commit(&id, &reservation.ports);
    }
});
