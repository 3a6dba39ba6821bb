//! Port ranges: what the agent assigns from, shared by the agent, the CLI and the checker.

use std::{fmt, str::FromStr};

/// The default allocation range: below both the NodePort range and the usual ephemeral
/// range (Linux's `ip_local_port_range` defaults to 32768-60999).
pub const DEFAULT_RANGE: &str = "20000-29999";
/// The Kubernetes NodePort range of a default cluster (`--service-node-port-range`).
pub const NODEPORT_RANGE: (u16, u16) = (30000, 32767);

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

    /// The port after `port`, wrapping around to the start of the range.
    pub(crate) fn after(&self, port: u16) -> u16 {
        if port >= self.last || port < self.first { self.first } else { port + 1 }
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
}
