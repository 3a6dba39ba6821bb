//! Port ranges: what the agent assigns from, shared by the agent, the CLI and the checker.

use std::{fmt, str::FromStr};

/// The default allocation range: below both the NodePort range and the usual ephemeral
/// range (Linux's `ip_local_port_range` defaults to 32768-60999).
pub const DEFAULT_RANGE: &str = "20000-29999";
/// The Kubernetes NodePort range of a default cluster (`--service-node-port-range`),
/// which the agent leaves out by default.
pub const NODEPORT_RANGE: &str = "30000-32767";

/// An inclusive range of ports, `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// Why a port range could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    /// Not of the form `FIRST-LAST`.
    #[error("port range {0:?} is not of the form FIRST-LAST, for example 20000-29999")]
    Syntax(String),
    /// A bound is not a port number.
    #[error("port range bound {0:?} is not a number between 1 and 65535")]
    Bound(String),
    /// The bounds are in the wrong order.
    #[error("port range {first}-{last} is empty: the first port must not be above the last")]
    Empty {
        /// First port given.
        first: u16,
        /// Last port given.
        last: u16,
    },
}

impl PortRange {
    /// A range from `first` to `last` inclusive; port 0 is never part of a range.
    pub fn new(first: u16, last: u16) -> Result<Self, RangeError> {
        if first == 0 {
            return Err(RangeError::Bound("0".into()));
        }
        if first > last {
            return Err(RangeError::Empty { first, last });
        }
        Ok(Self { first, last })
    }

    /// First port of the range.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// Last port of the range.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (first, last) = s.trim().split_once('-').ok_or_else(|| RangeError::Syntax(s.into()))?;
        let bound = |b: &str| b.trim().parse::<u16>().map_err(|_| RangeError::Bound(b.trim().into()));
        PortRange::new(bound(first)?, bound(last)?)
    }
}

/// Several port ranges, written `A-B,C-D` (a single port `N` stands for `N-N`): the
/// ranges the agent assigns from, or ports it must leave alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRanges(Vec<PortRange>);

impl PortRanges {
    /// The given ranges, in the order given.
    pub fn new(ranges: Vec<PortRange>) -> Self {
        Self(ranges)
    }

    /// The ranges.
    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    /// Whether no range is listed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first range that contains `port`.
    pub fn find(&self, port: u16) -> Option<PortRange> {
        self.0.iter().copied().find(|r| r.contains(port))
    }

    /// Whether a range contains `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.find(port).is_some()
    }
}

impl From<PortRange> for PortRanges {
    fn from(range: PortRange) -> Self {
        Self(vec![range])
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if range.first == range.last {
                write!(f, "{}", range.first)?;
            } else {
                write!(f, "{range}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for PortRanges {
    type Err = RangeError;

    /// `A-B,C-D,N`; the empty string (or `none`) is no range at all.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(Self::default());
        }
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim) {
            if item.contains('-') {
                out.push(item.parse()?);
            } else {
                let port = item.parse::<u16>().map_err(|_| RangeError::Bound(item.into()))?;
                out.push(PortRange::new(port, port)?);
            }
        }
        Ok(Self(out))
    }
}

/// A set of ports: 65,536 bits, membership a bit test.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Box<[u64; 1024]>);

impl PortSet {
    /// The empty set.
    pub fn new() -> Self {
        Self(Box::new([0; 1024]))
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    /// Adds `port`.
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port / 64)] |= 1 << (port % 64);
    }

    /// Removes `port`.
    pub fn remove(&mut self, port: u16) {
        self.0[usize::from(port / 64)] &= !(1 << (port % 64));
    }

    /// Number of ports in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Whether some port of `self` is missing from `other`.
    pub fn has_any_outside(&self, other: &PortSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & !b != 0)
    }
}

impl Default for PortSet {
    fn default() -> Self {
        Self::new()
    }
}

impl From<&PortRanges> for PortSet {
    fn from(ranges: &PortRanges) -> Self {
        let mut set = Self::new();
        for range in ranges.ranges() {
            for port in range.first..=range.last {
                set.insert(port);
            }
        }
        set
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({} ports)", self.len())
    }
}

/// Why a port is not one the agent assigns, when the rule is static (from its flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// The port lies in none of the ranges.
    OutsideRanges,
    /// The port lies in an excluded range (`--exclude-ports`).
    Excluded(PortRange),
    /// The port lies in the cluster's NodePort range (`--node-port-range`).
    NodePort(PortRange),
}

impl Exclusion {
    /// Short name of the rule, as `/debug/table` shows it.
    pub fn rule(&self) -> &'static str {
        match self {
            Exclusion::OutsideRanges => "outside-ranges",
            Exclusion::Excluded(_) => "excluded-by-flag",
            Exclusion::NodePort(_) => "nodeport-range",
        }
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::OutsideRanges => write!(f, "outside every range of --port-range"),
            Exclusion::Excluded(r) => write!(f, "in {r}, excluded by --exclude-ports"),
            Exclusion::NodePort(r) => write!(f, "in the NodePort range {r} (--node-port-range)"),
        }
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// No range was given.
    #[error("no port range given: --port-range needs at least one FIRST-LAST")]
    NoRange,
    /// The exclusions leave nothing to assign.
    #[error("the exclusions ({0}) leave no port of the ranges to assign")]
    Empty(String),
}

/// The ports the agent assigns: several ranges minus excluded ports and the cluster's
/// NodePort range. Built once from the flags; membership is a bit lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPool {
    ranges: PortRanges,
    excluded: PortRanges,
    node_port: Option<PortRange>,
    /// Every assignable port, ascending.
    ports: Vec<u16>,
    member: PortSet,
}

impl PortPool {
    /// The ports of `ranges` that are neither `excluded` nor in `node_port`.
    pub fn new(ranges: PortRanges, excluded: PortRanges, node_port: Option<PortRange>) -> Result<Self, PoolError> {
        if ranges.is_empty() {
            return Err(PoolError::NoRange);
        }
        let member = PortSet::from(&ranges);
        let mut pool = Self { ranges, excluded, node_port, ports: Vec::new(), member };
        for port in 1..=u16::MAX {
            if pool.member.contains(port) && pool.exclusion_of_member(port).is_some() {
                pool.member.remove(port);
            }
        }
        pool.ports = (1..=u16::MAX).filter(|p| pool.member.contains(*p)).collect();
        if pool.ports.is_empty() {
            return Err(PoolError::Empty(pool.describe_exclusions()));
        }
        Ok(pool)
    }

    fn exclusion_of_member(&self, port: u16) -> Option<Exclusion> {
        if let Some(range) = self.excluded.find(port) {
            return Some(Exclusion::Excluded(range));
        }
        self.node_port.filter(|r| r.contains(port)).map(Exclusion::NodePort)
    }

    /// Whether the agent may assign `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.member.contains(port)
    }

    /// The static rule that keeps `port` out of the pool, if one does.
    pub fn exclusion(&self, port: u16) -> Option<Exclusion> {
        if !self.ranges.contains(port) {
            return Some(Exclusion::OutsideRanges);
        }
        self.exclusion_of_member(port)
    }

    /// Number of assignable ports.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Always false: a pool holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th assignable port, ascending (`i < len()`).
    pub fn port_at(&self, i: usize) -> u16 {
        self.ports[i]
    }

    /// The ranges assigned from, as given.
    pub fn ranges(&self) -> &PortRanges {
        &self.ranges
    }

    /// The excluded ranges, as given.
    pub fn excluded(&self) -> &PortRanges {
        &self.excluded
    }

    /// The NodePort range kept out, if any.
    pub fn node_port(&self) -> Option<PortRange> {
        self.node_port
    }

    fn describe_exclusions(&self) -> String {
        let mut parts = vec![format!("--exclude-ports {}", self.excluded)];
        if let Some(r) = self.node_port {
            parts.push(format!("--node-port-range {r}"));
        }
        parts.join(", ")
    }
}

impl From<PortRange> for PortPool {
    /// A pool of one range, nothing excluded.
    fn from(range: PortRange) -> Self {
        Self::new(range.into(), PortRanges::default(), None).expect("a range holds at least one port")
    }
}

impl fmt::Display for PortPool {
    /// The ranges, then what is excluded from them: `20000-29999`, or
    /// `20000-29999 minus 25000-25099`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ranges)?;
        let mut minus: Vec<String> = self
            .excluded
            .ranges()
            .iter()
            .filter(|e| self.ranges.ranges().iter().any(|r| r.overlaps(e)))
            .map(|e| PortRanges::from(*e).to_string())
            .collect();
        if let Some(r) = self.node_port.filter(|n| self.ranges.ranges().iter().any(|r| r.overlaps(n))) {
            minus.push(format!("{r} (NodePort)"));
        }
        if !minus.is_empty() {
            write!(f, " minus {}", minus.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(first, last).unwrap()
    }

    #[test]
    fn parses_and_rejects_ranges() {
        assert_eq!("20000-29999".parse::<PortRange>(), Ok(range(20000, 29999)));
        assert_eq!(" 5 - 5 ".parse::<PortRange>(), Ok(range(5, 5)));
        assert!(matches!("20000".parse::<PortRange>(), Err(RangeError::Syntax(_))));
        assert!(matches!("0-10".parse::<PortRange>(), Err(RangeError::Bound(_))));
        assert!(matches!("1-70000".parse::<PortRange>(), Err(RangeError::Bound(_))));
        assert_eq!("9-3".parse::<PortRange>(), Err(RangeError::Empty { first: 9, last: 3 }));
        assert!(range(10, 20).overlaps(&range(20, 30)));
        assert!(!range(10, 19).overlaps(&range(20, 30)));
    }

    #[test]
    fn parses_lists_of_ranges_and_single_ports() {
        let list: PortRanges = "20000-20009, 22 ,30000-30001".parse().unwrap();
        assert_eq!(list.ranges(), &[range(20000, 20009), range(22, 22), range(30000, 30001)]);
        assert_eq!(list.to_string(), "20000-20009,22,30000-30001");
        assert!("".parse::<PortRanges>().unwrap().is_empty());
        assert!("none".parse::<PortRanges>().unwrap().is_empty());
        assert!(matches!("20000-x".parse::<PortRanges>(), Err(RangeError::Bound(_))));
        assert!(matches!("1,,2".parse::<PortRanges>(), Err(RangeError::Bound(_))));
        assert!(matches!("0".parse::<PortRanges>(), Err(RangeError::Bound(_))));
    }

    #[test]
    fn a_pool_is_its_ranges_minus_exclusions_and_the_node_port_range() {
        let pool =
            PortPool::new("100-109,200-201".parse().unwrap(), "103,105-106".parse().unwrap(), Some(range(108, 300)))
                .unwrap();
        assert_eq!(pool.ports, vec![100, 101, 102, 104, 107]);
        assert_eq!(pool.len(), 5);
        assert!(pool.contains(104) && !pool.contains(103) && !pool.contains(200));
        assert_eq!(pool.exclusion(103), Some(Exclusion::Excluded(range(103, 103))));
        assert_eq!(pool.exclusion(106), Some(Exclusion::Excluded(range(105, 106))));
        assert_eq!(pool.exclusion(201), Some(Exclusion::NodePort(range(108, 300))));
        assert_eq!(pool.exclusion(150), Some(Exclusion::OutsideRanges));
        assert_eq!(pool.exclusion(107), None);
        assert_eq!(pool.to_string(), "100-109,200-201 minus 103,105-106,108-300 (NodePort)");
        assert_eq!(
            PortPool::new("100-101".parse().unwrap(), "100-101".parse().unwrap(), None),
            Err(PoolError::Empty("--exclude-ports 100-101".into()))
        );
        assert_eq!(PortPool::new(PortRanges::default(), PortRanges::default(), None), Err(PoolError::NoRange));
        assert_eq!(PortPool::from(range(1, 65535)).len(), 65535);
    }
}
