//! The agent's command-line values that come from outside (the chart's values, an
//! operator's flags): every parser gets the same bytes, and each checks its own laws.
//! A new flag parser is one more line in `fuzz_target!`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portassign::range::{PortPool, PortRange, PortRanges};

/// `--range`: a parsed range holds at least one port, none of them 0, and prints as
/// `FIRST-LAST`, which parses back to the same range.
fn range(text: &str) {
    let Ok(range) = text.parse::<PortRange>() else { return };
    assert!(range.first() >= 1 && range.first() <= range.last(), "{text:?} gave {range:?}");
    assert_eq!(range.len(), usize::from(range.last() - range.first()) + 1);
    assert!(range.contains(range.first()) && range.contains(range.last()));
    let printed = range.to_string();
    assert_eq!(printed.parse::<PortRange>(), Ok(range), "{text:?} printed as {printed:?}");
}

/// `--port-range` and `--exclude-ports`: a parsed list prints as text that parses back
/// to the same list.
fn ranges(text: &str) -> Option<PortRanges> {
    let ranges = text.parse::<PortRanges>().ok()?;
    let printed = ranges.to_string();
    assert_eq!(printed.parse::<PortRanges>().as_ref(), Ok(&ranges), "{text:?} printed as {printed:?}");
    Some(ranges)
}

/// The pool the three flags make (`RANGES|EXCLUDED|NODEPORT`): a port is assignable
/// exactly when it lies in a range and no rule keeps it out, and the pool counts them.
fn pool(text: &str) {
    let mut parts = text.splitn(3, '|');
    let (Some(Some(assign)), Some(Some(excluded))) = (parts.next().map(ranges), parts.next().map(ranges)) else {
        return;
    };
    let node_port = match parts.next().map(str::parse::<PortRange>) {
        None => None,
        Some(Ok(range)) => Some(range),
        Some(Err(_)) => return,
    };
    let Ok(pool) = PortPool::new(assign.clone(), excluded.clone(), node_port) else { return };
    let mut count = 0;
    for port in 1..=u16::MAX {
        let kept_out = !assign.contains(port) || excluded.contains(port) || node_port.is_some_and(|r| r.contains(port));
        assert_eq!(pool.contains(port), !kept_out, "port {port} of {text:?}");
        assert_eq!(pool.exclusion(port).is_some(), kept_out, "port {port} of {text:?}");
        count += usize::from(!kept_out);
    }
    assert_eq!(pool.len(), count, "{text:?}");
    assert!(count > 0, "an empty pool is refused: {text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    range(text);
    ranges(text);
    pool(text);
});
