//! Waking the relay: a `LISTEN` connection that calls back on each notification, and a sleep
//! that shutdown cuts short.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::Backoff;
use crate::error::{Error, Result};

/// Keeps a connection listening on `channel` and calls `wake` for each notification (and once
/// after each (re)connection, for what was committed while no one listened), reconnecting
/// when the connection fails, until `stop`.
pub(crate) async fn listen(
    url: String,
    channel: &'static str,
    wake: impl Fn() + Send,
    backoff: Backoff,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let error = match listen_once(&url, channel, &wake, &stop).await {
            Ok(()) => return,
            Err(e) => e,
        };
        failures += 1;
        let delay = backoff.delay(failures);
        tracing::warn!(error = %error, ?delay, channel, "listener lost its connection; polling until it is back");
        if sleep_or_shutdown(delay, &stop).await {
            return;
        }
    }
}

/// How often the listener checks its connection is alive.
const LISTEN_HEALTH_CHECK: Duration = Duration::from_secs(10);

async fn listen_once(
    url: &str,
    channel: &str,
    wake: &(impl Fn() + Send),
    stop: &CancellationToken,
) -> Result<()> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|e| Error::Pool(e.to_string()))?;
    conn.batch_execute(&format!("LISTEN {channel}")).await?;
    // Rows may have been committed while no one listened.
    wake();
    loop {
        let next = {
            let mut notifications = std::pin::pin!(conn.notifications_stream());
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = notifications.next() => Some(next),
                () = tokio::time::sleep(LISTEN_HEALTH_CHECK) => None,
            }
        };
        match next {
            Some(Some(Ok(_))) => wake(),
            Some(Some(Err(e))) => return Err(e.into()),
            Some(None) => return Err(Error::Pool("notification stream ended".into())),
            None => conn.batch_execute("SELECT 1").await?,
        }
    }
}

/// Sleeps for `delay`; true when shutdown came first.
pub(crate) async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(delay) => false,
    }
}
