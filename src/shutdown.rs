//! Shutdown in two stages: `stop_accepting` (listeners close, /readyz turns 503) and, after the
//! grace period, `terminate` (open sessions are told 57P01 and closed). A `TaskTracker` counts
//! the sessions still open so the process can exit as soon as the last one ends.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub(crate) struct Shutdown {
    stop_accepting: CancellationToken,
    terminate: CancellationToken,
    sessions: TaskTracker,
}

impl Shutdown {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stop_accepting.is_cancelled()
    }

    /// Resolves when listeners must stop accepting.
    pub(crate) async fn stopping(&self) {
        self.stop_accepting.cancelled().await
    }

    /// Resolves when open sessions must end now.
    pub(crate) async fn terminating(&self) {
        self.terminate.cancelled().await
    }

    pub(crate) fn sessions(&self) -> &TaskTracker {
        &self.sessions
    }

    /// Stops accepting, waits up to `grace` for open sessions, then terminates the rest and
    /// waits for them to finish closing.
    pub(crate) async fn run(&self, grace: Duration) {
        self.stop_accepting.cancel();
        self.sessions.close();
        let open = self.sessions.len();
        if open > 0 {
            tracing::info!(open, ?grace, "shutting down: waiting for open sessions to finish");
        }
        if tokio::time::timeout(grace, self.sessions.wait()).await.is_err() {
            tracing::info!(
                open = self.sessions.len(),
                "grace period over: closing open sessions with 57P01"
            );
        }
        self.terminate.cancel();
        self.sessions.wait().await;
    }
}
