//! CPU used during a run, from /proc (Linux; elsewhere the report says `null`).
//!
//! A load generator that shares its cores with the broker it loads — and perhaps with
//! other work on the machine — must say how much CPU the run actually got, or its
//! rates mean little. This reads this process's user+system time (all threads, so the
//! in-process broker too) and the machine's busy time at the start and end of the run.

use std::time::Instant;

use serde_json::{json, Value};

/// Kernel clock ticks per second in /proc (USER_HZ; 100 on every mainstream Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// A reading at one moment.
pub struct CpuSnapshot {
    at: Instant,
    /// This process's utime + stime, ticks.
    process: u64,
    /// The machine's non-idle time over all cores, ticks.
    machine_busy: u64,
}

/// Reads the counters now; `None` where /proc is unavailable.
pub fn snapshot() -> Option<CpuSnapshot> {
    let at = Instant::now();
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let process = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let all = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = all.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4).unwrap_or(&0);
    Some(CpuSnapshot {
        at,
        process,
        machine_busy: busy,
    })
}

/// `{process_cores, other_cores, cores}`: average cores this process and everything
/// else on the machine kept busy between two readings.
pub fn between(start: &Option<CpuSnapshot>, end: &Option<CpuSnapshot>) -> Value {
    let (Some(s), Some(e)) = (start, end) else {
        return Value::Null;
    };
    let secs = e.at.duration_since(s.at).as_secs_f64();
    if secs <= 0.0 {
        return Value::Null;
    }
    let cores = |ticks: u64| ((ticks as f64 / TICKS_PER_SEC / secs) * 100.0).round() / 100.0;
    let process = e.process.saturating_sub(s.process);
    let busy = e.machine_busy.saturating_sub(s.machine_busy);
    json!({
        "process_cores": cores(process),
        "other_cores": cores(busy.saturating_sub(process)),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_on_linux() {
        if cfg!(target_os = "linux") {
            let a = snapshot();
            assert!(a.is_some());
            let mut x = 0u64;
            for i in 0..5_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            std::hint::black_box(x);
            let b = snapshot();
            let v = between(&a, &b);
            assert!(v["process_cores"].as_f64().is_some(), "{v}");
        }
    }
}
