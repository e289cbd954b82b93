//! `recheck_interval`: while a session lasts, its upstream host is asked again every interval
//! whether it still is what `target_session_attrs` asked for (a demoted primary may keep
//! accepting reads; a standby may have been promoted). When it no longer is, the relay ends the
//! session at its next transaction boundary with 57P01 saying why, so that the application
//! reconnects and lands on a host of the right kind.
//!
//! Each check is one short connection with the session's credential to the session's own
//! address, bounded by connect_timeout; a check that fails to connect changes nothing (a host
//! that went away is keepalive's to notice).

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::oneshot;

use crate::config::TargetSessionAttrs;
use crate::upstream::scram::KeyCache;
use crate::upstream::session_attrs::ServerRole;
use crate::upstream::{self, UpstreamSettings};

/// Why the session's host no longer fits, for the client's 57P01.
pub(super) type Reason = String;

/// Ends the check when the session ends.
pub(super) struct Guard(tokio::task::JoinHandle<()>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a session needs to check its host again.
pub(super) struct Login {
    pub(super) params: Vec<(String, String)>,
    pub(super) password: SecretString,
    pub(super) keys: Arc<KeyCache>,
}

/// Starts the checks for a session on `host` (found to be `role`), when the entry asks for them and the session's
/// host was chosen for its kind; None otherwise.
pub(super) fn start(
    settings: &UpstreamSettings,
    host: &Arc<UpstreamSettings>,
    role: &ServerRole,
    label: &str,
    login: Login,
) -> Option<(oneshot::Receiver<Reason>, Guard)> {
    let every = settings.ha.recheck_interval?;
    let attrs = match settings.ha.target_session_attrs {
        TargetSessionAttrs::Any => return None,
        // Taken as a standby in the first pass: it should stay one. Taken in the second pass
        // (no standby was up): any host was fine.
        TargetSessionAttrs::PreferStandby if role.hot_standby == Some(true) => TargetSessionAttrs::Standby,
        TargetSessionAttrs::PreferStandby => return None,
        a => a,
    };
    let (tx, rx) = oneshot::channel();
    let (host, label) = (host.clone(), label.to_string());
    let task = tokio::spawn(run(host, label, attrs, every, login, tx));
    Some((rx, Guard(task)))
}

async fn run(
    host: Arc<UpstreamSettings>,
    label: String,
    attrs: TargetSessionAttrs,
    every: Duration,
    login: Login,
    tx: oneshot::Sender<Reason>,
) {
    loop {
        tokio::time::sleep(every).await;
        match upstream::hosts::recheck(&host, attrs, &login.params, &login.password, &login.keys).await {
            Ok(None) => {}
            Ok(Some(mismatch)) => {
                tracing::info!(upstream = %label, %attrs, reason = %mismatch, "the session's upstream host no longer meets target_session_attrs");
                let _ = tx.send(format!(
                    "dbward: upstream host {label} no longer meets target_session_attrs={attrs}: {mismatch}; reconnect to reach a host that does"
                ));
                return;
            }
            Err(e) => tracing::debug!(upstream = %label, error = %e, "recheck of the upstream host failed"),
        }
    }
}
