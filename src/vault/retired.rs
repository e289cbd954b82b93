//! Vault tokens dbward no longer uses, until they are revoked. A re-login (the old token nears
//! its max TTL, or Vault denied a request) leaves the previous token alive for the rest of its
//! TTL, able to do everything the role allows. It is revoked with `auth/token/revoke-self`
//! once no held lease was created by it: revoking a token revokes its leases, and the database
//! role's revocation statements may end the sessions that use them. At shutdown, after the
//! drain, the current token goes too.
//!
//! Tokens read from `vault.auth.token_file` (method `token`) are the operator's, not dbward's:
//! they are never revoked.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{auth, Auth, VaultToken};
use crate::backoff::Backoff;

/// At most this many replaced tokens wait for revocation; older ones expire by themselves.
const MAX_RETIRED: usize = 16;

/// Replaced tokens waiting for their leases to end.
pub(crate) struct RetiredTokens {
    /// False for the `token` method.
    revocable: bool,
    tokens: Mutex<Vec<Retired>>,
}

struct Retired {
    token: Arc<VaultToken>,
    /// When it was replaced: a read made with it just before may still be in flight, and the
    /// lease it brings back would die with the token.
    since: Instant,
    retry: Backoff,
}

impl RetiredTokens {
    pub(crate) fn new(revocable: bool) -> Self {
        RetiredTokens {
            revocable,
            tokens: Mutex::default(),
        }
    }

    /// `old` was replaced by a new login.
    pub(crate) fn push(&self, old: Arc<VaultToken>) {
        if !self.revocable {
            return;
        }
        let mut tokens = self.tokens.lock().unwrap();
        if tokens.iter().any(|r| r.token.generation == old.generation) {
            return;
        }
        tokens.push(Retired {
            token: old,
            since: Instant::now(),
            retry: Backoff::default(),
        });
        if tokens.len() > MAX_RETIRED {
            tokens.remove(0);
        }
    }

    /// How many wait (for tests and logs).
    pub(crate) fn len(&self) -> usize {
        self.tokens.lock().unwrap().len()
    }
}

impl Auth {
    /// Revokes every replaced token whose login generation is not in `in_use` (the generations
    /// that created a lease dbward still holds). Tokens already expired are dropped unasked.
    pub(crate) async fn revoke_retired(&self, in_use: &HashSet<u64>) {
        let now = Instant::now();
        // Past the request timeout, no request made with the old token is still running.
        let settled = self.client().request_timeout() + std::time::Duration::from_secs(1);
        let due: Vec<Arc<VaultToken>> = {
            let mut tokens = self.retired().tokens.lock().unwrap();
            tokens.retain(|r| r.token.remaining(now).is_none_or(|left| !left.is_zero()));
            tokens
                .iter()
                .filter(|r| now.duration_since(r.since) >= settled)
                .filter(|r| !in_use.contains(&r.token.generation) && r.retry.ready())
                .map(|r| r.token.clone())
                .collect()
        };
        for token in due {
            let done = self
                .revoke_token(&token, "replaced by a new login and no lease of it is held")
                .await;
            let mut tokens = self.retired().tokens.lock().unwrap();
            if done {
                tokens.retain(|r| r.token.generation != token.generation);
            } else if let Some(r) = tokens.iter_mut().find(|r| r.token.generation == token.generation) {
                r.retry.failed();
            }
        }
    }

    /// At shutdown, after the drain: revokes the current token and every replaced one (and so
    /// every lease they created). Each is tried once.
    pub(crate) async fn revoke_all_tokens(&self) {
        if !self.retired().revocable {
            return;
        }
        let mut all: Vec<Arc<VaultToken>> = {
            let mut tokens = self.retired().tokens.lock().unwrap();
            tokens.drain(..).map(|r| r.token).collect()
        };
        all.extend(self.current());
        for token in all {
            self.revoke_token(&token, "dbward is shutting down").await;
            self.forget(&token);
        }
    }

    /// True when the token is gone (revoked now, or Vault no longer knows it).
    async fn revoke_token(&self, token: &VaultToken, why: &str) -> bool {
        match auth::revoke_self(self.client(), &token.token).await {
            Ok(()) => {
                tracing::info!(generation = token.generation, reason = why, "revoked the Vault token");
                true
            }
            // 403: the token is already revoked or expired (Vault says "permission denied" for
            // an unknown token), or the policy lacks revoke-self; either way, asking again would
            // not help.
            Err(e) if e.is_denied() => {
                tracing::warn!(
                    generation = token.generation,
                    path = "auth/token/revoke-self",
                    error = %e,
                    "Vault refused to revoke a token dbward no longer uses; it stays valid until its TTL ends"
                );
                true
            }
            Err(e) => {
                tracing::warn!(generation = token.generation, error = %e, "cannot revoke a Vault token dbward no longer uses; will retry");
                false
            }
        }
    }
}
