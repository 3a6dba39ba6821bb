//! What `/proc` says about a process: CPU time and memory.

/// User + system CPU seconds of a process so far (0 when it cannot be read).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `kB` line of `/proc/<pid>/status`, such as `VmHWM:` (0 when it cannot be read).
pub fn proc_status_kib(pid: Option<u32>, field: &str) -> u64 {
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix(field).and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0)
}
