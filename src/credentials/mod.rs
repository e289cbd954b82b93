//! Credentials for every database entry: the cache and what a connection asks of it. The cache
//! (moka) holds each entry's current credential for as long as Vault says it is valid (minus a
//! margin), shared by all connections and fetched once however many connections ask at the same
//! moment; Vault errors are remembered briefly (`recent_errors.rs`).
//!
//! The rest of the module keeps the cache full without clients waiting on Vault:
//! - `fetch.rs`: one read from Vault (with one re-login on a denial), its metrics and logs;
//! - `schedule.rs`: the pure timing (when to refresh, renew, revoke), unit-tested with paused time;
//! - `lifecycle.rs`: the background tasks, each sleeping until its next deadline or a wake-up;
//! - `leases.rs`: the leases dbward holds, renewed while in use and revoked when unused;
//! - `denials.rs`: background operations Vault refused with 403, not retried until a new login;
//! - `state.rs`: `vault.state_file`, the token and credentials kept across restarts;
//! - `budget.rs`: how many new credentials an entry may make per lease period, and how often a
//!   failure may drop one;
//! - `error.rs`: why an entry has no credential, and what the client is told.

mod budget;
mod denials;
mod error;
mod fetch;
#[doc(hidden)]
pub(crate) mod fuzzing;
mod leases;
mod lifecycle;
mod recent_errors;
mod schedule;
mod state;
#[cfg(test)]
mod test_support;
mod tokens;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{CredentialSource, CredentialsConfig};
use crate::metrics::Metrics;
use crate::upstream::scram::KeyCache;
use crate::vault::{Auth, Credential, VaultClient};

pub(crate) use error::CredentialError;
use schedule::Schedule;

use denials::Denials;
use leases::Leases;
use recent_errors::RecentErrors;

/// A credential dbward holds, with what the lifecycle needs to know about it. The renewal clock
/// of its lease is kept by `leases.rs`, not here: `Held` does not change after the fetch, apart
/// from how many sessions use it.
pub(crate) struct Held {
    cred: Credential,
    /// The Vault login that obtained it: its lease dies with that token.
    token_generation: u64,
    /// Client sessions using it now.
    in_use: AtomicUsize,
    /// When it is replaced in the background and how long the cache hands it out.
    schedule: Schedule,
    /// The SCRAM salted password, computed on the first upstream login with this credential.
    scram_keys: Arc<KeyCache>,
    /// When the credential ends for good, once the lifecycle knows (lease max TTL reached, or
    /// the max TTL of the token that created the lease): sessions are retired before it.
    hard_end: watch::Sender<Option<HardEnd>>,
}

/// The end a credential cannot be renewed past, and what sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HardEnd {
    pub(crate) at: tokio::time::Instant,
    pub(crate) by: EndBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndBy {
    LeaseMaxTtl,
    TokenMaxTtl,
}

impl EndBy {
    /// The `reason` label of `dbward_sessions_retired_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            EndBy::LeaseMaxTtl => "lease_max_ttl",
            EndBy::TokenMaxTtl => "token_max_ttl",
        }
    }

    pub(crate) fn text(self) -> &'static str {
        match self {
            EndBy::LeaseMaxTtl => "lease max TTL",
            EndBy::TokenMaxTtl => "Vault token max TTL",
        }
    }
}

/// A session's view of its credential's hard end: retired at the first transaction boundary
/// after [`schedule::retire_at`].
pub(crate) struct Retirement {
    hard_end: watch::Receiver<Option<HardEnd>>,
    fetched_at: tokio::time::Instant,
    /// `credentials.retire_margin`; None: the default rule.
    margin: Option<Duration>,
}

impl Retirement {
    /// The hard end, if known, and when the session should go (a margin before it).
    pub(crate) fn due_at(&self) -> Option<(HardEnd, tokio::time::Instant)> {
        let end = (*self.hard_end.borrow())?;
        let at = match self.margin {
            Some(m) => end.at.checked_sub(m).unwrap_or(end.at),
            None => schedule::retire_at(self.fetched_at, end.at),
        };
        Some((end, at))
    }

    /// Resolves once retirement is due (never, if the hard end stays unknown).
    pub(crate) async fn wait(&mut self) -> HardEnd {
        loop {
            match self.due_at() {
                Some((end, at)) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => return end,
                    r = self.hard_end.changed() => if r.is_err() { tokio::time::sleep_until(at).await; return end },
                },
                None => {
                    if self.hard_end.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl std::ops::Deref for Held {
    type Target = Credential;
    fn deref(&self) -> &Credential {
        &self.cred
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("cred", &self.cred)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl Held {
    pub(crate) fn new(cred: Credential, token_generation: u64, schedule: Schedule) -> Self {
        Held {
            cred,
            token_generation,
            in_use: AtomicUsize::new(0),
            schedule,
            scram_keys: Arc::default(),
            hard_end: watch::Sender::new(None),
        }
    }

    /// Records that the credential ends for good at `at` (the earliest such end is kept).
    pub(crate) fn limit(&self, at: tokio::time::Instant, by: EndBy) {
        self.hard_end.send_if_modified(|cur| {
            let earlier = cur.is_none_or(|c| at < c.at);
            if earlier {
                *cur = Some(HardEnd { at, by });
            }
            earlier
        });
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }
}

/// A session's use of a credential; the count drops when the session ends.
pub(crate) struct InUse {
    held: Arc<Held>,
    /// The lease task is told when the last session of a leased credential ends: a replaced
    /// lease nobody uses is revoked then.
    released: Arc<Notify>,
}

impl std::ops::Deref for InUse {
    type Target = Credential;
    fn deref(&self) -> &Credential {
        &self.held.cred
    }
}

impl InUse {
    pub(crate) fn scram_keys(&self) -> &Arc<KeyCache> {
        &self.held.scram_keys
    }

    /// What the session needs to leave before the credential's hard end.
    pub(crate) fn retirement(&self, margin: Option<Duration>) -> Retirement {
        Retirement {
            hard_end: self.held.hard_end.subscribe(),
            fetched_at: self.held.fetched_at(),
            margin,
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if self.held.in_use.fetch_sub(1, Ordering::SeqCst) == 1 && self.held.cred.lease.is_some() {
            self.released.notify_one();
        }
    }
}

/// Each credential leaves the cache when it stops being safe to hand out (`cache_for`).
struct LeaseExpiry;

impl Expiry<String, Arc<Held>> for LeaseExpiry {
    fn expire_after_create(&self, _key: &String, value: &Arc<Held>, created_at: Instant) -> Option<Duration> {
        let lived = created_at.saturating_duration_since(value.cred.fetched_at);
        value.schedule.cache_for.map(|d| d.saturating_sub(lived))
    }

    // Without this, moka keeps the replaced entry's remaining time when a refresh inserts over
    // an existing key, and the fresh credential would vanish with the old one's expiry.
    fn expire_after_update(
        &self,
        key: &String,
        value: &Arc<Held>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// One database entry as the store knows it. A reload that changes an entry replaces it with a
/// new `Entry` (and a new lifecycle task); the old one is retired.
struct Entry {
    cfg: CredentialsConfig,
    /// The last credential generation handed out (1 for the first credential).
    generation: AtomicU64,
    /// Background refresh attempts of this entry back off on failure.
    backoff: Mutex<Backoff>,
    /// The 28P01 explanation is logged once per entry at warn level.
    warned_rejected: AtomicBool,
    /// Wakes the entry's lifecycle task: its credential was dropped.
    wake: Notify,
    /// Cancelled when a reload removes or changes the entry: its task ends.
    retired: CancellationToken,
    /// The minting budget and the replacement gap.
    budget: budget::Budget,
    /// The entry's lifecycle task has been started.
    started: AtomicBool,
}

impl Entry {
    fn new(cfg: CredentialsConfig) -> Self {
        Entry {
            cfg,
            generation: AtomicU64::new(0),
            backoff: Mutex::new(Backoff::default()),
            warned_rejected: AtomicBool::new(false),
            wake: Notify::new(),
            retired: CancellationToken::new(),
            budget: budget::Budget::default(),
            started: AtomicBool::new(false),
        }
    }
}

/// The cache of credentials for every database entry, and the leases behind them.
pub(crate) struct CredentialStore {
    vault: Arc<VaultClient>,
    auth: Arc<Auth>,
    /// Changed only by a reload.
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    cache: Cache<String, Arc<Held>>,
    /// Every credential with a lease dbward has not given up yet, current ones included.
    leases: Leases,
    recent_errors: RecentErrors,
    /// Background operations Vault refused with 403, not retried until a new login or reload.
    denials: Denials,
    metrics: Arc<Metrics>,
    /// A reload added entries: the lifecycle starts their tasks.
    entries_changed: Notify,
    /// The newest Vault login generation seen; dynamic credentials of older logins are replaced.
    token_seen: watch::Sender<u64>,
    /// A new login or credential: the state file (if any) is rewritten.
    state_changed: Notify,
}

impl CredentialStore {
    pub(crate) fn new(
        vault: Arc<VaultClient>,
        auth: Arc<Auth>,
        databases: impl IntoIterator<Item = (String, CredentialsConfig)>,
        error_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let entries = databases
            .into_iter()
            .map(|(name, cfg)| (name, Arc::new(Entry::new(cfg))))
            .collect();
        Arc::new(CredentialStore {
            vault,
            auth,
            entries: RwLock::new(entries),
            cache: Cache::builder().expire_after(LeaseExpiry).build(),
            leases: Leases::default(),
            recent_errors: RecentErrors::new(error_ttl),
            denials: Denials::default(),
            metrics,
            entries_changed: Notify::new(),
            token_seen: watch::Sender::new(0),
            state_changed: Notify::new(),
        })
    }

    pub(crate) fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    fn entry(&self, database: &str) -> Option<Arc<Entry>> {
        self.entries.read().unwrap().get(database).cloned()
    }

    /// Applies reloaded database entries: new ones are added, changed ones start over with a
    /// fresh credential, removed ones are dropped. Credentials that sessions still use stay held
    /// (renewed, then revoked when unused) like any replaced credential.
    pub(crate) async fn update_entries(&self, databases: impl IntoIterator<Item = (String, CredentialsConfig)>) {
        let wanted: HashMap<String, CredentialsConfig> = databases.into_iter().collect();
        let mut stale = Vec::new();
        {
            let mut entries = self.entries.write().unwrap();
            entries.retain(|name, e| {
                let keep = wanted.get(name) == Some(&e.cfg);
                if !keep {
                    stale.push((name.clone(), e.clone()));
                }
                keep
            });
            for (name, cfg) in wanted {
                entries.entry(name).or_insert_with(|| Arc::new(Entry::new(cfg)));
            }
        }
        // The policy may have changed with the config: denied operations are tried again.
        self.denials.clear();
        for (name, old) in stale {
            old.retired.cancel();
            self.cache.invalidate(&name).await;
            self.recent_errors.forget(&name).await;
        }
        self.entries_changed.notify_one();
        self.leases.wake.notify_one();
    }

    /// The current credential (cached, or fetched now), counted as in use until the returned
    /// guard is dropped.
    pub(crate) async fn checkout(&self, database: &str) -> Result<InUse, CredentialError> {
        let held = self.get(database).await?;
        held.in_use.fetch_add(1, Ordering::SeqCst);
        Ok(InUse {
            held,
            released: self.leases.wake.clone(),
        })
    }

    /// The cached credential, or one fetched now (one fetch however many callers wait).
    pub(crate) async fn get(&self, database: &str) -> Result<Arc<Held>, CredentialError> {
        if let Some(c) = self.cache.get(database).await {
            self.metrics
                .credential_cache_total
                .with_label_values(&[database, "hit"])
                .inc();
            return Ok(c);
        }
        self.metrics
            .credential_cache_total
            .with_label_values(&[database, "miss"])
            .inc();
        if let Some(e) = self.recent_errors.get(database).await {
            return Err(e);
        }
        let result = self
            .cache
            .try_get_with(database.to_string(), self.fetch(database))
            .await;
        match result {
            Ok(c) => {
                self.recent_errors.forget(database).await;
                Ok(c)
            }
            Err(e) => {
                let e = CredentialError::clone(&e);
                self.recent_errors.remember(database, e.clone()).await;
                Err(e)
            }
        }
    }

    /// The cached credential without asking Vault.
    pub(crate) async fn peek(&self, database: &str) -> Option<Arc<Held>> {
        self.cache.get(database).await
    }

    /// Drops a credential the upstream refused (28P01), unless a newer one already replaced it.
    pub(crate) async fn rejected(&self, database: &str, generation: u64) {
        self.metrics
            .credential_rejected_total
            .with_label_values(&[database])
            .inc();
        let entry = self.entry(database);
        if let Some(e) = &entry {
            if !e.warned_rejected.swap(true, Ordering::SeqCst) {
                let role = match &e.cfg.source {
                    CredentialSource::Kv { path, .. } => format!("the KV secret at {path}"),
                    CredentialSource::Database { role, .. } | CredentialSource::Static { role, .. } => {
                        format!("Vault role {role:?} ({})", e.cfg.vault_path())
                    }
                };
                tracing::warn!(
                    database,
                    "the upstream refused a credential Vault issued (28P01). It was revoked or expired behind \
                     dbward's back, or a renewed lease did not extend the Postgres role: check that {role} has \
                     renew_statements that set VALID UNTIL (or none). dbward fetches a new credential; this is \
                     logged once, counted in dbward_credential_rejected_total"
                );
            }
        }
        if let Some(c) = self.cache.get(database).await {
            let may_drop = || {
                let ok = entry
                    .as_ref()
                    .is_none_or(|e| e.budget.may_drop_after_failure(tokio::time::Instant::now()));
                if !ok {
                    tracing::debug!(
                        database,
                        "a credential was dropped for a failure less than 10 s ago; the current one is kept"
                    );
                }
                ok
            };
            if c.cred.generation == generation && may_drop() {
                self.cache.invalidate(database).await;
                // The entry's task fetches the next one; the refused lease is now a replaced one.
                if let Some(e) = &entry {
                    e.wake.notify_one();
                }
                self.leases.wake.notify_one();
            }
        }
    }

    /// Vault leases held for `database` now (current and replaced ones).
    pub(crate) fn leases_held(&self, database: &str) -> usize {
        self.leases.count(database)
    }

    pub(crate) fn login_description(&self) -> String {
        self.auth.login_description()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::held;
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_refreshed_credential_gets_its_own_lifetime_not_the_replaced_ones() {
        let fresh = held(
            Schedule {
                refresh_after: None,
                cache_for: Some(S(40)),
            },
            1,
        );
        // The replaced credential had half a second left; the new one must get its full 40 s.
        let left = LeaseExpiry.expire_after_update(
            &"d".to_string(),
            &fresh,
            Instant::now(),
            Some(Duration::from_millis(500)),
        );
        assert!(left.unwrap() > S(39), "{left:?}");
        let kv = held(
            Schedule {
                refresh_after: None,
                cache_for: None,
            },
            1,
        );
        assert_eq!(
            LeaseExpiry.expire_after_update(&"d".to_string(), &kv, Instant::now(), Some(S(1))),
            None
        );
    }
}
