//! The agent's command-line values that come from outside (the chart's values, an
//! operator's flags): every parser gets the same bytes, and each checks its own laws.
//! A new flag parser is one more line in `fuzz_target!`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portassign::range::PortRange;

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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    range(text);
});
