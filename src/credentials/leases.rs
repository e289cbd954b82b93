//! The Vault leases dbward holds, keyed by lease id: every dynamic credential from its fetch
//! until its lease is revoked, expires, or is given up. A replaced lease that sessions still use
//! is renewed (`sys/leases/renew`) at 2/3 of each grant up to the role's max TTL; one nobody uses
//! is revoked (`sys/leases/revoke`). Failed renewals and revocations back off per lease, so
//! a Vault that keeps failing costs one request per lease per backoff step; a 403 is not retried
//! at all until the next login or reload ([`super::denials`]): a lease whose revocation is denied
//! is left to expire, one whose renewal is denied is kept, unrenewed, until it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::denials::LeaseOp;
use super::schedule::{earliest, next_lease_action, wake_at, LeaseAction, LeaseClock, LeaseRole, LeaseView};
use super::{CredentialStore, EndBy, Held};
use crate::backoff::Backoff;
use crate::vault::{secrets, VaultError};

#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<String, HeldLease>>,
    /// Wakes the lease task: a lease was added or replaced, or its last session ended.
    pub(crate) wake: Arc<Notify>,
}

struct HeldLease {
    database: String,
    held: Arc<Held>,
    clock: LeaseClock,
    retry: Backoff,
}

/// One held lease as a pass over them sees it.
struct Snapshot {
    id: String,
    database: String,
    held: Arc<Held>,
    clock: LeaseClock,
    retry_at: Option<Instant>,
}

impl Leases {
    pub(crate) fn add(&self, database: &str, held: Arc<Held>, clock: LeaseClock) {
        let Some(lease) = &held.cred.lease else { return };
        let id = lease.id.clone();
        let entry = HeldLease {
            database: database.to_string(),
            held,
            clock,
            retry: Backoff::default(),
        };
        self.held.lock().unwrap().insert(id, entry);
        self.wake.notify_one();
    }

    fn snapshot(&self) -> Vec<Snapshot> {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(|(id, l)| Snapshot {
                id: id.clone(),
                database: l.database.clone(),
                held: l.held.clone(),
                clock: l.clock,
                retry_at: l.retry.next_attempt(),
            })
            .collect()
    }

    /// The Vault login generations that created a lease still held.
    pub(super) fn generations(&self) -> std::collections::HashSet<u64> {
        let held = self.held.lock().unwrap();
        held.values().map(|l| l.held.token_generation).collect()
    }

    /// The newest credential held for `database` (the highest generation).
    pub(crate) fn newest(&self, database: &str) -> Option<Arc<Held>> {
        self.held
            .lock()
            .unwrap()
            .values()
            .filter(|l| l.database == database)
            .max_by_key(|l| l.held.cred.generation)
            .map(|l| l.held.clone())
    }

    pub(crate) fn count(&self, database: &str) -> usize {
        self.held
            .lock()
            .unwrap()
            .values()
            .filter(|l| l.database == database)
            .count()
    }

    fn forget(&self, id: &str) {
        self.held.lock().unwrap().remove(id);
    }

    /// A renewal or revocation failed: the next attempt waits. Returns how long.
    fn failed(&self, id: &str) -> Option<Duration> {
        self.held.lock().unwrap().get_mut(id).map(|l| l.retry.failed())
    }

    #[cfg(test)]
    pub(crate) fn failures(&self, id: &str) -> u32 {
        self.held.lock().unwrap().get(id).map_or(0, |l| l.retry.failures())
    }

    /// Vault denied renewing it: kept until it ends, never renewed again.
    fn stop_renewing(&self, id: &str) {
        if let Some(l) = self.held.lock().unwrap().get_mut(id) {
            l.clock.at_max = true;
        }
    }

    #[cfg(test)]
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.held.lock().unwrap().contains_key(id)
    }

    fn renewed(&self, id: &str, clock: LeaseClock) {
        if let Some(l) = self.held.lock().unwrap().get_mut(id) {
            l.clock = clock;
            l.retry.succeeded();
        }
    }
}

/// Vault's answer to a lease that no longer exists ("lease not found", "lease expired").
fn lease_is_gone(e: &VaultError) -> bool {
    matches!(e.status(), Some(400) | Some(404))
}

impl CredentialStore {
    /// One pass over the held leases: does what is due now and returns when the next thing is
    /// due (None: nothing until woken). After renewing or revoking it returns `now`, so the
    /// caller looks again at once; every such action changes the lease's state (its clock, its
    /// backoff, or its removal), so the passes end.
    pub(crate) async fn lease_step(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut next = None;
        let mut acted = false;
        for l in self.leases.snapshot() {
            let Some(lease) = &l.held.cred.lease else { continue };
            // The hard end, once known: the token that created the lease reached its max TTL
            // (the lease dies with it), or the lease will not be extended (not renewable, max TTL
            // reached, renewal denied, or renew_in_use off).
            if let Some(end) = self.auth.token_end(l.held.token_generation) {
                l.held.limit(Instant::from_std(end), EndBy::TokenMaxTtl);
            }
            // An entry removed by a reload: its leases get the default treatment.
            let (renew_in_use, revoke_unused) = self
                .entry(&l.database)
                .map(|e| (e.cfg.renew_in_use, e.cfg.revoke_unused))
                .unwrap_or((true, true));
            if !lease.renewable || l.clock.at_max || !renew_in_use {
                l.held.limit(l.clock.end(), EndBy::LeaseMaxTtl);
            }
            // A credential newer than the cached one was fetched a moment ago and is on its way
            // into the cache (its lease is held first): it is not a replaced one to revoke.
            let current = self
                .cache
                .get(&l.database)
                .await
                .is_some_and(|c| Arc::ptr_eq(&c, &l.held) || c.cred.generation < l.held.cred.generation);
            let role = if current {
                LeaseRole::Current {
                    until: l.held.cache_until(),
                }
            } else {
                LeaseRole::Replaced {
                    in_use: l.held.in_use(),
                }
            };
            let view = LeaseView {
                clock: l.clock,
                role,
                renewable: lease.renewable,
                renew_in_use,
                revoke_unused,
                retry_at: l.retry_at,
            };
            let denied = |op| self.denials.is_denied(&l.database, op, self.auth.generation());
            match next_lease_action(&view, now) {
                LeaseAction::Forget => self.leases.forget(&l.id),
                // Denied under this login: asking again would only be denied again.
                LeaseAction::Revoke if denied(LeaseOp::Revoke) => {
                    tracing::debug!(database = %l.database, lease = %lease.id, "revocation denied under this login; the lease is left to expire");
                    self.leases.forget(&l.id);
                }
                LeaseAction::Renew if denied(LeaseOp::Renew) => {
                    tracing::debug!(database = %l.database, lease = %lease.id, "renewal denied under this login; the lease ends at its TTL");
                    self.leases.stop_renewing(&l.id);
                }
                LeaseAction::Revoke => {
                    self.revoke(&l.id, &l.database, &l.held, "replaced and no longer used")
                        .await;
                    acted = true;
                }
                LeaseAction::Renew => {
                    self.renew(&l.id, &l.database, &l.held).await;
                    acted = true;
                }
                LeaseAction::Wait(at) => next = earliest(next, at),
            }
        }
        if acted {
            Some(Instant::now())
        } else {
            wake_at(next, now)
        }
    }

    async fn renew(&self, id: &str, database: &str, h: &Held) {
        let lease = h.cred.lease.as_ref().expect("only leases are held");
        let Some(token) = self.auth.current() else {
            let retry_in = self.leases.failed(id);
            tracing::debug!(database, lease = %lease.id, ?retry_in, "no Vault token to renew the lease with yet");
            return;
        };
        match secrets::renew_lease(&self.vault, &token.token, &lease.id, lease.duration).await {
            Ok(granted) => {
                let granted = granted.unwrap_or_default();
                let clock = LeaseClock {
                    at_max: granted.saturating_add(Duration::from_secs(1)) < lease.duration,
                    ..LeaseClock::new(Instant::now(), granted)
                };
                self.leases.renewed(id, clock);
                if clock.at_max {
                    h.limit(clock.end(), EndBy::LeaseMaxTtl);
                }
                self.metrics
                    .lease_renewals_total
                    .with_label_values(&[database, "ok"])
                    .inc();
                tracing::info!(database, lease = %lease.id, in_use = h.in_use(), granted = ?granted, at_max = clock.at_max, "renewed lease still in use");
            }
            Err(e) => {
                self.metrics
                    .lease_renewals_total
                    .with_label_values(&[database, "error"])
                    .inc();
                if e.is_denied() {
                    self.leases.stop_renewing(id);
                    self.denied(database, LeaseOp::Renew, token.generation, &e);
                    return;
                }
                let retry_in = self.after_failure(id, &e);
                tracing::warn!(database, lease = %lease.id, in_use = h.in_use(), error = %e, ?retry_in, "lease renewal failed");
            }
        }
    }

    /// A renewal or revocation failed (not denied): a lease Vault no longer knows has nothing
    /// left to renew or revoke and is forgotten; any other failure backs off. Returns how long.
    fn after_failure(&self, id: &str, e: &VaultError) -> Option<Duration> {
        if lease_is_gone(e) {
            self.leases.forget(id);
            None
        } else {
            self.leases.failed(id)
        }
    }

    async fn revoke(&self, id: &str, database: &str, h: &Held, why: &str) {
        let lease = h.cred.lease.as_ref().expect("only leases are held");
        let Some(token) = self.auth.current() else {
            let retry_in = self.leases.failed(id);
            tracing::debug!(database, lease = %lease.id, ?retry_in, "no Vault token to revoke the lease with yet");
            return;
        };
        match secrets::revoke_lease(&self.vault, &token.token, &lease.id).await {
            Ok(_) => {
                self.metrics
                    .lease_revocations_total
                    .with_label_values(&[database, "ok"])
                    .inc();
                tracing::info!(database, lease = %lease.id, username = %h.cred.username, why, "revoked lease");
                self.leases.forget(id);
            }
            Err(e) => {
                self.metrics
                    .lease_revocations_total
                    .with_label_values(&[database, "error"])
                    .inc();
                if e.is_denied() {
                    // Left to expire: only a policy change would let a retry succeed.
                    self.leases.forget(id);
                    self.denied(database, LeaseOp::Revoke, token.generation, &e);
                    return;
                }
                let retry_in = self.after_failure(id, &e);
                tracing::warn!(database, lease = %lease.id, error = %e, ?retry_in, "lease revocation failed");
            }
        }
    }

    /// Vault answered 403 to `op` for `database` under login `generation`: counted every
    /// time, logged once (with the path, the missing capability and the fix) until the next
    /// login or reload, and not attempted again until then.
    fn denied(&self, database: &str, op: LeaseOp, generation: u64, e: &VaultError) {
        self.metrics
            .vault_denied_total
            .with_label_values(&[database, op.label()])
            .inc();
        if self.denials.record(database, op, generation) {
            tracing::warn!(
                database,
                path = op.path(),
                capability = "update (missing)",
                login = %self.auth.login_description(),
                error = %e,
                fix = %op.fix(database),
                "Vault denied {} of {}: not retried until the next Vault login or a config reload",
                op.label(),
                op.path(),
            );
        }
    }

    /// On clean shutdown: revoke every lease dbward still holds (one attempt each, none where
    /// Vault denied revocation under this login).
    pub(crate) async fn revoke_all(&self) {
        let generation = self.auth.generation();
        for l in self.leases.snapshot() {
            if self.denials.is_denied(&l.database, LeaseOp::Revoke, generation) {
                continue;
            }
            self.revoke(&l.id, &l.database, &l.held, "dbward is shutting down")
                .await;
        }
    }
}
