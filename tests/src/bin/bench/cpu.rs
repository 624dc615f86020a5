//! CPU time: how much CPU a piece of work costs per message, the whole machine's (every
//! process, every core: the broker, the database, this process) from `/proc/stat`, and one
//! process's (a WAL sender) from `/proc/<pid>/stat`. The log mode's machine bound adds the WAL
//! sender's, measured during the relay's own run, to the plain producer's (summing
//! `pg_recvlogical`'s whole run instead, client program included, gave a "bound" the relay
//! beat).

use std::future::Future;

/// The kernel's clock ticks per second for `/proc/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Seconds the machine's cores have spent busy since boot (user, system, interrupts, stolen),
/// or `None` where there is no `/proc/stat`.
fn busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest time is within user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum::<u64>();
    Some(busy as f64 / TICKS_PER_SECOND)
}

/// Runs `work` and gives its output with the machine's busy CPU seconds meanwhile (`NaN`
/// where they cannot be read).
pub(crate) async fn busy_during<T>(work: impl Future<Output = T>) -> (T, f64) {
    let before = busy_seconds();
    let output = work.await;
    let spent = match (before, busy_seconds()) {
        (Some(before), Some(after)) => after - before,
        _ => f64::NAN,
    };
    (output, spent)
}

/// CPU seconds (user and system) process `pid` has spent, from `/proc/<pid>/stat`; `None`
/// where it cannot be read (the process is gone, or another kernel).
pub(crate) fn process_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces): field 3 on; utime
    // and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / TICKS_PER_SECOND)
}
