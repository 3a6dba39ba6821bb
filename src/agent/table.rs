//! The node's port table: which key of which object holds which port.
//!
//! Plain data, no Kubernetes and no sockets: the caller passes a probe closure that
//! says whether a port is free on the node. The table guarantees that no port is held
//! twice and that a key keeps its port until the caller says the release is durable.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

pub use portassign_api::ObjectId;
use portassign_api::range::{PortPool, PortRange};

/// Who holds a port: one key of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The object the key belongs to.
    pub object: Arc<ObjectId>,
    /// The key.
    pub key: String,
}

/// Why some keys could not get a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortage {
    /// Every port of the range is held by a key on this node.
    RangeExhausted,
    /// Some ports of the range are not held, but each of them is busy on the node.
    PortConflict,
}

/// The outcome of [`PortTable::reserve`] for one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The port of every wanted key that holds one: what the object's status should say.
    pub ports: BTreeMap<String, u16>,
    /// Ports newly taken by this call.
    pub added: Vec<(String, u16)>,
    /// Wanted keys left without a port.
    pub unassigned: Vec<String>,
    /// Why `unassigned` is not empty.
    pub shortage: Option<Shortage>,
}

/// A port that the rebuild took from a key because an older holder claims it too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Displaced {
    /// The key that lost the port (it will get a new one).
    pub loser: Holder,
    /// The key that keeps the port.
    pub keeper: Holder,
    /// The contested port.
    pub port: u16,
}

/// One object's recorded ports, as read from its status when the table is rebuilt.
#[derive(Clone, Debug)]
pub struct Recorded<T> {
    /// The object.
    pub object: ObjectId,
    /// Sort key deciding who keeps a contested port: the smaller (older) wins.
    pub age: T,
    /// Key and port pairs from the status.
    pub ports: Vec<(String, u16)>,
}

/// Ports released by a call, and the objects waiting for ports that should retry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Key and port pairs no longer held.
    pub ports: Vec<(String, u16)>,
    /// Objects that were short of ports and may now complete.
    pub wake: Vec<ObjectId>,
}

/// Which pool a reservation draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The pool of keys (`--port-range`): PortAssignments users write.
    Keys,
    /// The pool of ResourceClaims (`--dra-port-range`): the scheduler counts its ports,
    /// so nothing else may take them.
    Claims,
}

/// One pool and where its next search starts.
#[derive(Debug)]
struct Lane {
    pool: PortPool,
    /// Ports of the pool some key holds.
    held: usize,
    /// Index in the pool where the next search starts: allocation rotates through the
    /// pool so a port just freed (its sandbox possibly still shutting down) is reused last.
    cursor: usize,
}

impl Lane {
    fn new(pool: PortPool) -> Self {
        Self { pool, held: 0, cursor: 0 }
    }
}

/// The node's port table.
#[derive(Debug)]
pub struct PortTable {
    keys: Lane,
    claims: Option<Lane>,
    holders: HashMap<u16, Holder>,
    objects: HashMap<Arc<ObjectId>, BTreeMap<String, u16>>,
    /// Objects that asked for ports the table could not give.
    waiting: Vec<ObjectId>,
}

impl PortTable {
    /// An empty table allocating from `range`.
    pub fn new(range: PortRange) -> Self {
        Self::with_pool(range.into())
    }

    /// An empty table allocating from `pool`.
    pub fn with_pool(pool: PortPool) -> Self {
        Self::with_pools(pool, None)
    }

    /// An empty table allocating keys from `keys` and claims from `claims` (disjoint).
    pub fn with_pools(keys: PortPool, claims: Option<PortPool>) -> Self {
        Self {
            keys: Lane::new(keys),
            claims: claims.map(Lane::new),
            holders: HashMap::new(),
            objects: HashMap::new(),
            waiting: Vec::new(),
        }
    }

    /// The ports new assignments of keys come from.
    pub fn pool(&self) -> &PortPool {
        &self.keys.pool
    }

    /// The ports claims are given, when Dynamic Resource Allocation is on.
    pub fn claims_pool(&self) -> Option<&PortPool> {
        self.claims.as_ref().map(|lane| &lane.pool)
    }

    /// Number of ports of the claims' pool no claim holds (0 without one).
    pub fn free_for_claims(&self) -> usize {
        self.claims.as_ref().map_or(0, |lane| lane.pool.len() - lane.held)
    }

    /// Takes the objects that were short of ports, so the caller can wake them (a port
    /// became available by other means than a release, e.g. a pod on the node went away).
    pub fn take_waiting(&mut self) -> Vec<ObjectId> {
        std::mem::take(&mut self.waiting)
    }

    /// Number of ports held (inside or outside the range).
    pub fn held(&self) -> usize {
        self.holders.len()
    }

    /// Number of ports of the pool no key holds.
    pub fn free_in_range(&self) -> usize {
        self.keys.pool.len() - self.keys.held
    }

    /// Number of objects holding at least one port.
    pub fn objects(&self) -> usize {
        self.objects.len()
    }

    /// The objects holding at least one port.
    pub fn object_ids(&self) -> Vec<ObjectId> {
        self.objects.keys().map(|id| ObjectId::clone(id)).collect()
    }

    /// Who holds `port`, if anyone.
    pub fn holder(&self, port: u16) -> Option<&Holder> {
        self.holders.get(&port)
    }

    /// The ports `object` holds, by key.
    pub fn ports_of(&self, object: &ObjectId) -> Option<&BTreeMap<String, u16>> {
        self.objects.get(object)
    }

    /// Every held port with its holder, in port order.
    pub fn entries(&self) -> Vec<(u16, &Holder)> {
        let mut all: Vec<_> = self.holders.iter().map(|(p, h)| (*p, h)).collect();
        all.sort_unstable_by_key(|(p, _)| *p);
        all
    }

    /// Gives every key of `wanted` a port: the one it holds already, or a new one from
    /// the range that no key holds and that `is_free` reports free on the node.
    ///
    /// Keys the object holds but no longer wants keep their ports: they are released
    /// by [`PortTable::commit`] once the status without them is durable.
    pub fn reserve<'k>(
        &mut self,
        object: &ObjectId,
        wanted: impl IntoIterator<Item = &'k str>,
        is_free: &mut dyn FnMut(u16) -> bool,
    ) -> Reservation {
        self.reserve_from(Source::Keys, object, wanted, is_free)
    }

    /// [`Self::reserve`] from the pool of `source`. Without a claims' pool a claim gets
    /// no port ([`Shortage::RangeExhausted`]).
    pub fn reserve_from<'k>(
        &mut self,
        source: Source,
        object: &ObjectId,
        wanted: impl IntoIterator<Item = &'k str>,
        is_free: &mut dyn FnMut(u16) -> bool,
    ) -> Reservation {
        let id = self.intern(object);
        let mut out = Reservation::default();
        for key in wanted {
            if let Some(port) = self.objects.get(&id).and_then(|held| held.get(key)) {
                out.ports.insert(key.to_owned(), *port);
                continue;
            }
            if out.shortage.is_some() {
                out.unassigned.push(key.to_owned());
                continue;
            }
            match self.find_free(source, is_free) {
                Ok(port) => {
                    self.hold(port, Holder { object: id.clone(), key: key.to_owned() });
                    out.ports.insert(key.to_owned(), port);
                    out.added.push((key.to_owned(), port));
                }
                Err(shortage) => {
                    out.shortage = Some(shortage);
                    out.unassigned.push(key.to_owned());
                }
            }
        }
        self.waiting.retain(|w| w != object);
        if out.shortage.is_some() {
            self.waiting.push(object.clone());
        }
        self.forget_if_empty(&id);
        out
    }

    /// Records that the status of `object` now durably says `ports`: every port the
    /// object holds for a key not in `ports` is released.
    pub fn commit(&mut self, object: &ObjectId, ports: &BTreeMap<String, u16>) -> Released {
        let Some(held) = self.objects.get_mut(object) else {
            return Released::default();
        };
        let gone: Vec<(String, u16)> =
            held.iter().filter(|(key, port)| ports.get(*key) != Some(port)).map(|(k, p)| (k.clone(), *p)).collect();
        for (key, _) in &gone {
            held.remove(key);
        }
        if held.is_empty() {
            self.objects.remove(object);
        }
        self.free(gone)
    }

    /// Releases every port of `object` (it is being deleted).
    pub fn release_object(&mut self, object: &ObjectId) -> Released {
        self.waiting.retain(|w| w != object);
        match self.objects.remove(object) {
            Some(held) => self.free(held.into_iter().collect()),
            None => Released::default(),
        }
    }

    /// Replaces the table's content with the recorded ports of every object.
    ///
    /// A port recorded under two keys stays with the holder whose object has the
    /// smaller `age` (then namespace/name, then key); the other key is left without a
    /// port and reported as [`Displaced`]. A key recorded twice in one object keeps its
    /// first port.
    pub fn rebuild<T: Ord>(&mut self, mut records: Vec<Recorded<T>>) -> Vec<Displaced> {
        let claims = self.claims.as_ref().map(|lane| lane.pool.clone());
        *self = PortTable::with_pools(self.keys.pool.clone(), claims);
        records.sort_by(|a, b| a.age.cmp(&b.age).then_with(|| a.object.cmp(&b.object)));
        let mut displaced = Vec::new();
        for record in records {
            let id = self.intern(&record.object);
            let mut ports = record.ports;
            ports.sort();
            for (key, port) in ports {
                if port == 0 || self.objects.get(&id).is_some_and(|held| held.contains_key(&key)) {
                    continue;
                }
                let loser = Holder { object: id.clone(), key };
                match self.holders.get(&port) {
                    Some(keeper) => displaced.push(Displaced { loser, keeper: keeper.clone(), port }),
                    None => self.hold(port, loser),
                }
            }
            self.forget_if_empty(&id);
        }
        displaced
    }

    fn intern(&mut self, object: &ObjectId) -> Arc<ObjectId> {
        match self.objects.get_key_value(object) {
            Some((id, _)) => id.clone(),
            None => {
                let id = Arc::new(object.clone());
                self.objects.insert(id.clone(), BTreeMap::new());
                id
            }
        }
    }

    fn forget_if_empty(&mut self, object: &ObjectId) {
        if self.objects.get(object).is_some_and(BTreeMap::is_empty) {
            self.objects.remove(object);
        }
    }

    fn hold(&mut self, port: u16, holder: Holder) {
        let held = self.objects.entry(holder.object.clone()).or_default();
        held.insert(holder.key.clone(), port);
        if let Some(lane) = self.lane_of(port) {
            lane.held += 1;
        }
        let previous = self.holders.insert(port, holder);
        debug_assert!(previous.is_none(), "port {port} was held twice");
    }

    fn free(&mut self, ports: Vec<(String, u16)>) -> Released {
        for (_, port) in &ports {
            if self.holders.remove(port).is_some()
                && let Some(lane) = self.lane_of(*port)
            {
                lane.held -= 1;
            }
        }
        let wake = if ports.is_empty() { Vec::new() } else { std::mem::take(&mut self.waiting) };
        Released { ports, wake }
    }

    /// The lane whose pool has `port`.
    fn lane_of(&mut self, port: u16) -> Option<&mut Lane> {
        if self.keys.pool.contains(port) {
            return Some(&mut self.keys);
        }
        self.claims.as_mut().filter(|lane| lane.pool.contains(port))
    }

    fn find_free(&mut self, source: Source, is_free: &mut dyn FnMut(u16) -> bool) -> Result<u16, Shortage> {
        let lane = match source {
            Source::Keys => &mut self.keys,
            Source::Claims => match self.claims.as_mut() {
                Some(lane) => lane,
                None => return Err(Shortage::RangeExhausted),
            },
        };
        let len = lane.pool.len();
        if lane.held == len {
            return Err(Shortage::RangeExhausted);
        }
        let mut at = lane.cursor % len;
        let mut tried = 0usize;
        for _ in 0..len {
            let port = lane.pool.port_at(at);
            at = (at + 1) % len;
            if !self.holders.contains_key(&port) {
                tried += 1;
                if is_free(port) {
                    lane.cursor = at;
                    return Ok(port);
                }
            }
        }
        Err(if tried == 0 { Shortage::RangeExhausted } else { Shortage::PortConflict })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(first, last).unwrap()
    }

    fn obj(name: &str) -> ObjectId {
        ObjectId::new("ns", name)
    }

    fn all_free(_: u16) -> bool {
        true
    }

    #[test]
    fn claims_and_keys_never_take_from_each_others_pool() {
        let mut table = PortTable::with_pools(range(100, 101).into(), Some(range(200, 201).into()));
        let keys = table.reserve(&obj("keys"), ["a", "b", "c"], &mut all_free);
        assert_eq!(keys.ports.values().copied().collect::<Vec<_>>(), [100, 101]);
        assert_eq!(keys.shortage, Some(Shortage::RangeExhausted));
        let claims = table.reserve_from(Source::Claims, &obj("claim"), ["x", "y", "z"], &mut all_free);
        assert_eq!(claims.ports.values().copied().collect::<Vec<_>>(), [200, 201]);
        assert_eq!(claims.shortage, Some(Shortage::RangeExhausted));
        assert_eq!((table.free_in_range(), table.free_for_claims()), (0, 0));
        table.release_object(&obj("claim"));
        assert_eq!((table.free_in_range(), table.free_for_claims()), (0, 2));
        // A rebuild keeps both pools.
        table.rebuild(vec![Recorded { object: obj("claim"), age: 0, ports: vec![("x".into(), 201)] }]);
        assert_eq!((table.free_in_range(), table.free_for_claims()), (2, 1));
        // Without a claims' pool a claim gets nothing, not a key's port.
        let mut plain = PortTable::with_pool(range(100, 101).into());
        let none = plain.reserve_from(Source::Claims, &obj("claim"), ["x"], &mut all_free);
        assert!(none.ports.is_empty());
    }

    #[test]
    fn gives_each_key_a_distinct_port_from_the_range() {
        let mut table = PortTable::new(range(100, 109));
        let r = table.reserve(&obj("a"), ["k1", "k2", "k3"], &mut all_free);
        assert_eq!(r.ports.len(), 3);
        assert!(r.unassigned.is_empty() && r.shortage.is_none());
        let ports: HashSet<u16> = r.ports.values().copied().collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| (100..=109).contains(p)));
        assert_eq!(table.free_in_range(), 7);
    }

    #[test]
    fn never_gives_a_port_the_probe_reports_busy() {
        let mut table = PortTable::new(range(100, 104));
        let mut probe = |p: u16| p != 100 && p != 102;
        let r = table.reserve(&obj("a"), ["k1", "k2", "k3", "k4"], &mut probe);
        let ports: Vec<u16> = r.ports.values().copied().collect();
        assert!(!ports.contains(&100) && !ports.contains(&102));
        assert_eq!(r.ports.len(), 3);
        assert_eq!(r.shortage, Some(Shortage::PortConflict));
        assert_eq!(r.unassigned, vec!["k4".to_string()]);
    }

    #[test]
    fn keeps_ports_stable_and_never_reprobes_them() {
        let mut table = PortTable::new(range(100, 199));
        let first = table.reserve(&obj("a"), ["k1", "k2"], &mut all_free);
        // Everything is busy now (the sandboxes listen): existing keys keep their ports.
        let mut probed = Vec::new();
        let mut busy = |p: u16| {
            probed.push(p);
            false
        };
        let again = table.reserve(&obj("a"), ["k1", "k2"], &mut busy);
        assert_eq!(again.ports, first.ports);
        assert!(probed.is_empty(), "assigned ports were probed again: {probed:?}");
    }

    #[test]
    fn removed_keys_are_released_only_on_commit() {
        let mut table = PortTable::new(range(100, 101));
        let r = table.reserve(&obj("a"), ["k1", "k2"], &mut all_free);
        let k1 = r.ports["k1"];
        let shrunk = table.reserve(&obj("a"), ["k2"], &mut all_free);
        assert_eq!(table.holder(k1).map(|h| h.key.as_str()), Some("k1"), "released before the write");
        let other = table.reserve(&obj("b"), ["x"], &mut all_free);
        assert_eq!(other.shortage, Some(Shortage::RangeExhausted));
        let released = table.commit(&obj("a"), &shrunk.ports);
        assert_eq!(released.ports, vec![("k1".to_string(), k1)]);
        assert_eq!(released.wake, vec![obj("b")]);
        let retry = table.reserve(&obj("b"), ["x"], &mut all_free);
        assert_eq!(retry.ports["x"], k1);
    }

    #[test]
    fn uncommitted_reservations_survive_and_are_reused() {
        let mut table = PortTable::new(range(100, 199));
        let first = table.reserve(&obj("a"), ["k1"], &mut all_free);
        // The status write failed; the retry must not allocate a second port.
        let retry = table.reserve(&obj("a"), ["k1"], &mut all_free);
        assert_eq!(retry.ports, first.ports);
        assert!(retry.added.is_empty());
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn rotates_so_freed_ports_are_reused_last() {
        let mut table = PortTable::new(range(100, 102));
        let a = table.reserve(&obj("a"), ["k"], &mut all_free).ports["k"];
        table.release_object(&obj("a"));
        let b = table.reserve(&obj("b"), ["k"], &mut all_free).ports["k"];
        assert_ne!(a, b);
    }

    #[test]
    fn rebuild_gives_contested_ports_to_the_older_object() {
        let mut table = PortTable::new(range(100, 199));
        let displaced = table.rebuild(vec![
            Recorded { object: obj("young"), age: 2, ports: vec![("y".into(), 150), ("y2".into(), 151)] },
            Recorded { object: obj("old"), age: 1, ports: vec![("o".into(), 150)] },
        ]);
        assert_eq!(table.holder(150).map(|h| h.object.name.as_str()), Some("old"));
        assert_eq!(table.holder(151).map(|h| h.key.as_str()), Some("y2"));
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].loser.key, "y");
        assert_eq!(displaced[0].keeper.key, "o");
        // The displaced key gets a fresh port, the others keep theirs.
        let r = table.reserve(&obj("young"), ["y", "y2"], &mut all_free);
        assert_eq!(r.ports["y2"], 151);
        assert!(r.ports["y"] != 150 && r.ports["y"] != 151);
    }

    #[test]
    fn rebuild_breaks_age_ties_by_namespace_and_name() {
        let mut table = PortTable::new(range(100, 199));
        table.rebuild(vec![
            Recorded { object: ObjectId::new("b", "x"), age: 0, ports: vec![("k".into(), 120)] },
            Recorded { object: ObjectId::new("a", "z"), age: 0, ports: vec![("k".into(), 120)] },
        ]);
        assert_eq!(table.holder(120).map(|h| h.object.namespace.as_str()), Some("a"));
    }

    #[test]
    fn assigns_from_every_range_and_never_an_excluded_port() {
        let pool = PortPool::new("100-103,200-201".parse().unwrap(), "101,103".parse().unwrap(), Some(range(201, 201)))
            .unwrap();
        let mut table = PortTable::with_pool(pool);
        assert_eq!(table.free_in_range(), 3);
        let r = table.reserve(&obj("a"), ["k1", "k2", "k3", "k4"], &mut all_free);
        let got: HashSet<u16> = r.ports.values().copied().collect();
        assert_eq!(got, HashSet::from([100, 102, 200]));
        assert_eq!(r.shortage, Some(Shortage::RangeExhausted));
    }

    #[test]
    fn rebuild_keeps_ports_outside_the_range() {
        let mut table = PortTable::new(range(100, 101));
        table.rebuild(vec![Recorded { object: obj("a"), age: 0, ports: vec![("k".into(), 5000)] }]);
        assert_eq!(table.free_in_range(), 2);
        let r = table.reserve(&obj("a"), ["k"], &mut all_free);
        assert_eq!(r.ports["k"], 5000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Want(u8, Vec<u8>),
        Commit(u8),
        Delete(u8),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, proptest::collection::vec(0u8..8, 0..6)).prop_map(|(o, k)| Op::Want(o, k)),
            (0u8..6).prop_map(Op::Commit),
            (0u8..6).prop_map(Op::Delete),
            Just(Op::Restart),
        ]
    }

    proptest! {
        /// Under any sequence of reservations, commits, deletions and restarts from the
        /// committed record: no port is held twice, held ports match the per-object view,
        /// committed keys that are still wanted keep their port, and busy ports are never given.
        #[test]
        fn invariants_hold_under_any_history(ops in proptest::collection::vec(op(), 1..60), busy in proptest::collection::hash_set(1000u16..1016, 0..4)) {
            let range = range(1000, 1015);
            let mut table = PortTable::new(range);
            // What each object's status durably says, as the controller would have written it.
            let mut durable: BTreeMap<u8, BTreeMap<String, u16>> = BTreeMap::new();
            let mut last: BTreeMap<u8, BTreeMap<String, u16>> = BTreeMap::new();
            let mut is_free = |p: u16| !busy.contains(&p);
            for op in ops {
                match op {
                    Op::Want(o, keys) => {
                        let keys: Vec<String> = keys.iter().map(|k| format!("k{k}")).collect();
                        let r = table.reserve(&obj(&o.to_string()), keys.iter().map(String::as_str), &mut is_free);
                        for (k, p) in &r.added {
                            prop_assert!(!busy.contains(p), "busy port {} given to {}", p, k);
                            prop_assert!(range.contains(*p));
                        }
                        if let Some(before) = durable.get(&o) {
                            for (k, p) in before {
                                if keys.contains(k) {
                                    prop_assert_eq!(r.ports.get(k), Some(p), "key {} moved", k);
                                }
                            }
                        }
                        let free_unheld = (1000u16..=1015).filter(|p| table.holder(*p).is_none() && !busy.contains(p)).count();
                        if r.shortage.is_some() { prop_assert_eq!(free_unheld, 0); }
                        last.insert(o, r.ports);
                    }
                    Op::Commit(o) => {
                        if let Some(ports) = last.remove(&o) {
                            table.commit(&obj(&o.to_string()), &ports);
                            durable.insert(o, ports);
                        }
                    }
                    Op::Delete(o) => {
                        table.release_object(&obj(&o.to_string()));
                        durable.remove(&o);
                        last.remove(&o);
                    }
                    Op::Restart => {
                        let records = durable.iter().map(|(o, ports)| Recorded {
                            object: obj(&o.to_string()),
                            age: *o,
                            ports: ports.iter().map(|(k, p)| (k.clone(), *p)).collect(),
                        }).collect();
                        let displaced = table.rebuild(records);
                        prop_assert!(displaced.is_empty(), "committed statuses never share a port: {:?}", displaced);
                        last.clear();
                    }
                }
                let mut seen = HashSet::new();
                let mut count = 0;
                for (port, holder) in table.entries() {
                    prop_assert!(seen.insert(port));
                    prop_assert_eq!(table.ports_of(&holder.object).and_then(|m| m.get(&holder.key)), Some(&port));
                    count += 1;
                }
                let per_object: usize = durable.keys().chain(last.keys()).collect::<HashSet<_>>().iter()
                    .filter_map(|o| table.ports_of(&obj(&o.to_string()))).map(BTreeMap::len).sum();
                prop_assert_eq!(count, per_object);
                prop_assert_eq!(table.free_in_range(), 16 - (1000u16..=1015).filter(|p| table.holder(*p).is_some()).count());
                // Everything durable is still held in memory.
                for (o, ports) in &durable {
                    for (k, p) in ports {
                        prop_assert_eq!(table.holder(*p).map(|h| (h.object.name.clone(), h.key.clone())), Some((o.to_string(), k.clone())));
                    }
                }
            }
        }
    }
}
