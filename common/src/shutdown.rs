//! Shutdown as a value: SIGTERM or SIGINT cancels a token; services watch the token at intake
//! and drain everything downstream of it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Default time a service has to drain after the signal before it gives up and exits.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(20);

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancel first: nothing (not even a log line to a closed pipe) may stand in its way.
        trigger.cancel();
        tracing::info!("shutdown signal received: draining");
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
