//! Logging set-up for binaries: `tracing` with an env filter (`RUST_LOG`), as text or JSON.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber: JSON lines when `json` is true, text otherwise. The filter
/// comes from `RUST_LOG`, defaulting to `info`. Calling it twice keeps the first.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if result.is_err() {
        tracing::debug!("logging was already initialised");
    }
}
