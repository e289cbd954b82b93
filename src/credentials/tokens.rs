//! Revoking the Vault tokens of past logins once no held lease belongs to them (see
//! [`crate::vault::Auth::revoke_retired`]), and every token at shutdown.

use std::sync::Arc;
use std::time::Duration;

use super::CredentialStore;
use crate::shutdown::Shutdown;

/// How often replaced tokens are looked at: a lease ending is noticed this late at most.
const RETIRE_CHECK: Duration = Duration::from_secs(1);

impl CredentialStore {
    /// Until `stop`: revokes each replaced token once none of the leases dbward holds was
    /// created by it. One revoke-self per token (with backoff when Vault cannot be reached).
    pub(super) async fn retire_tokens(self: Arc<Self>, stop: Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RETIRE_CHECK) => {}
                _ = stop.stopping() => return,
            }
            if self.auth.retired().len() == 0 {
                continue;
            }
            let in_use = self.leases.generations();
            self.auth.revoke_retired(&in_use).await;
        }
    }

    /// At shutdown, after the drain and the lease revocations: revokes the current Vault token
    /// and any replaced one still waiting.
    pub(crate) async fn revoke_vault_tokens(&self) {
        self.auth.revoke_all_tokens().await;
    }
}
