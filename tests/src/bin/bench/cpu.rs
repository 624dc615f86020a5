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

/// A timed window's start: the machine's busy CPU seconds from then on, and this process's.
pub(crate) struct Window {
    machine: Option<f64>,
    own: Option<f64>,
}

impl Window {
    pub(crate) fn start() -> Self {
        Self {
            machine: busy_seconds(),
            own: process_seconds(std::process::id()),
        }
    }

    /// The machine's busy CPU seconds since the window started (`NaN` where they cannot be
    /// read).
    pub(crate) fn busy(&self) -> f64 {
        match (self.machine, busy_seconds()) {
            (Some(before), Some(after)) => after - before,
            _ => f64::NAN,
        }
    }

    /// This process's CPU seconds since the window started (`NaN` where they cannot be read).
    pub(crate) fn own(&self) -> f64 {
        match (self.own, process_seconds(std::process::id())) {
            (Some(before), Some(after)) => after - before,
            _ => f64::NAN,
        }
    }
}

/// Runs `work` and gives its output with the machine's busy CPU seconds meanwhile (`NaN`
/// where they cannot be read).
pub(crate) async fn busy_during<T>(work: impl Future<Output = T>) -> (T, f64) {
    let window = Window::start();
    let output = work.await;
    (output, window.busy())
}

/// A rate and what it cost the machine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// Messages per second.
    pub(crate) rate: f64,
    /// Busy CPU seconds per message, every process on every core.
    pub(crate) cpu: f64,
    /// For the log relay: the CPU seconds per message of the WAL senders that decoded the log
    /// for it (every shard's together).
    pub(crate) sender: Option<f64>,
}

impl Measured {
    /// A rate whose `n` messages kept the machine busy for `busy` CPU seconds.
    pub(crate) fn of(rate: f64, busy: f64, n: usize) -> Self {
        Self {
            rate,
            cpu: busy / n as f64,
            sender: None,
        }
    }
}

/// The middle of `v` (not empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median rate and the median CPU of `runs` (not empty).
pub(crate) fn median_of(runs: &[Measured]) -> Measured {
    let senders: Vec<f64> = runs.iter().filter_map(|m| m.sender).collect();
    Measured {
        rate: median(runs.iter().map(|m| m.rate).collect()),
        cpu: median(runs.iter().map(|m| m.cpu).collect()),
        sender: (!senders.is_empty()).then(|| median(senders)),
    }
}

/// The machine's cores.
pub(crate) fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64
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
