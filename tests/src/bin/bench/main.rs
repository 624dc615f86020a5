//! `make bench`: Ferrybox's throughput and latency, each against a baseline measured in the
//! same run on the same broker and database. Prints one table and one `ratio <name> <value>`
//! line per comparison. `FERRYBOX_BENCH_MESSAGES` sets the message count of the throughput
//! runs (default 100,000); `FERRYBOX_BENCH_ONLY=relay|inbox|soak` runs one section (`backlog`: only the log relay's large
//! backlog drain, with its log lines).

/// The allocator the reference services run with (see their `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cpu;
mod inbox;
mod relay;
mod soak;

use ferrybox::AvroCodec;
use ferrybox::testing;

/// What the sections measured, printed at the end.
#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<(&'static str, f64)>,
    ratios: Vec<(&'static str, f64)>,
}

impl Report {
    pub(crate) fn row(&mut self, what: &'static str, value: f64) {
        eprintln!("  {what}: {value:.1}");
        self.rows.push((what, value));
    }

    pub(crate) fn ratio(&mut self, name: &'static str, value: f64) {
        self.ratios.push((name, value));
    }

    fn print(&self) {
        println!();
        println!("| {:<54} | value         |", "measurement");
        println!("|{}|---------------|", "-".repeat(56));
        for (what, value) in &self.rows {
            println!("| {what:<54} | {value:>13.1} |");
        }
        println!();
        for (name, value) in &self.ratios {
            println!("ratio {name} {value:.3}");
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let only = std::env::var("FERRYBOX_BENCH_ONLY").unwrap_or_default();
    let codec = AvroCodec::new(&testing::registry_url());
    let mut report = Report::default();
    println!(
        "Ferrybox benchmarks: {} messages of ~200 bytes per throughput run",
        inbox::messages()
    );
    if only.is_empty() || only == "relay" {
        relay::run(&mut report).await?;
    }
    // One large backlog drained by the log relay, with the relay's log lines: for looking
    // into the backlog figure alone.
    if only == "backlog" {
        ferrybox::telemetry::install(None, false);
        relay::backlog_only(&mut report).await?;
    }
    if only.is_empty() || only == "inbox" {
        inbox::run(&codec, &mut report).await?;
    }
    if only.is_empty() || only == "soak" {
        soak::run(&mut report).await?;
    }
    report.print();
    Ok(())
}
