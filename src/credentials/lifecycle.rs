//! The background lifecycle ([`CredentialStore::maintain`]), driven by deadlines: every task
//! sleeps until the earliest time something is due, or until it is woken, and never polls.
//!
//! - one task per database entry refreshes its credential: at `refresh_fraction` of the lease,
//!   after a static role's rotation, every `refresh_interval` for KV, when the cache dropped it,
//!   or when a new Vault login replaced the token that owns its lease. It is woken by a 28P01
//!   rejection, a new login, and retired by a reload that removes or changes the entry. A Vault
//!   call hanging for one entry holds up no other entry and no lease;
//! - one task keeps the held leases ([`super::leases`]): woken when a credential is replaced or
//!   its last session ends;
//! - one task notices the token being replaced by `Auth::keep_alive` (see [`CredentialStore::watch_token`]);
//! - one task looks the token up every `token_check_interval` ([`CredentialStore::check_token`]):
//!   a revoked token's credentials are dropped;
//! - `Auth::keep_alive` itself keeps the Vault token alive.
//!
//! Failures back off ([`crate::backoff`]); the backoff's end is one of the deadlines.

use std::future::pending;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::schedule::{next_refresh, wake_at, Next};
use super::{CredentialStore, Entry};
use crate::shutdown::Shutdown;

/// How often the token is looked at while `Auth::keep_alive` is renewing or replacing it (from
/// 2/3 of its TTL until a new token is in): a mutex read, never a Vault request.
const TOKEN_RECHECK: Duration = Duration::from_millis(250);

/// Sleeps until `at` (forever if None).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => pending().await,
    }
}

impl CredentialStore {
    /// Runs the background lifecycle until `stop`: warms the cache (every entry's credential is
    /// fetched at start), refreshes credentials before they are due, renews replaced leases
    /// still in use, revokes unused ones, keeps the Vault token alive. Entries a reload adds get
    /// their task here.
    pub(crate) async fn maintain(self: Arc<Self>, stop: Shutdown) {
        tokio::spawn(self.auth.clone().keep_alive({
            let stop = stop.clone();
            async move { stop.stopping().await }
        }));
        tokio::spawn(self.clone().watch_token(stop.clone()));
        tokio::spawn(self.clone().check_token(stop.clone()));
        tokio::spawn(self.clone().keep_leases(stop.clone()));
        tokio::spawn(self.clone().retire_tokens(stop.clone()));
        loop {
            let entries: Vec<(String, Arc<Entry>)> = self
                .entries
                .read()
                .unwrap()
                .iter()
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect();
            for (name, entry) in entries {
                if !entry.started.swap(true, Ordering::SeqCst) {
                    tokio::spawn(self.clone().keep_entry(name, entry, stop.clone()));
                }
            }
            tokio::select! {
                _ = self.entries_changed.notified() => {}
                _ = stop.stopping() => return,
            }
        }
    }

    /// The task of one database entry: sleeps until its credential is due (or the backoff
    /// after a failure ends), then refreshes it.
    async fn keep_entry(self: Arc<Self>, name: String, entry: Arc<Entry>, stop: Shutdown) {
        let mut token = self.token_seen.subscribe();
        loop {
            // Seen before deciding: a login from now on wakes the wait below.
            let login = (*token.borrow_and_update()).max(self.auth.generation());
            let cached = self.cache.get(&name).await;
            let retry_at = entry.backoff.lock().unwrap().next_attempt();
            let now = Instant::now();
            match next_refresh(entry.cfg.kind(), cached.as_deref(), login, retry_at, now) {
                Next::Now(reason) => tokio::select! {
                    _ = self.refresh_step(&name, &entry, reason, cached.is_some()) => {}
                    _ = entry.retired.cancelled() => return,
                    _ = stop.stopping() => return,
                },
                Next::At(at) => tokio::select! {
                    _ = sleep_until(wake_at(at, now)) => {}
                    _ = entry.wake.notified() => {}
                    _ = token.changed() => {}
                    _ = entry.retired.cancelled() => return,
                    _ = stop.stopping() => return,
                },
            }
        }
    }

    /// Replaces `database`'s credential now; on failure the entry backs off and the cached
    /// credential serves while it is valid. `cached` is what the decision saw: when nothing was
    /// cached, a client may have fetched one since, and going through the cache then reuses it.
    async fn refresh_step(&self, database: &str, entry: &Entry, reason: &'static str, cached: bool) {
        tracing::debug!(database, reason, "refreshing credential");
        let result = if cached {
            let before = self.cache.get(database).await.map(|c| c.cred.generation);
            match self.fetch(database).await {
                // The minting budget gave the current credential back: nothing was replaced,
                // and the entry waits its backoff rather than asking again at once.
                Ok(same) if Some(same.cred.generation) == before => {
                    let wait = entry.backoff.lock().unwrap().failed();
                    tracing::debug!(database, retry_in = ?wait, "minting budget spent; the current credential stays");
                    return;
                }
                Ok(new) => {
                    self.cache.insert(database.to_string(), new).await;
                    // The replaced lease is renewed or revoked from now on.
                    self.leases.wake.notify_one();
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            // Through the cache's single flight, shared with clients that ask meanwhile.
            self.get(database).await.map(|_| ())
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .credential_refreshes_total
            .with_label_values(&[database, outcome])
            .inc();
        match result {
            Ok(()) => {
                entry.backoff.lock().unwrap().succeeded();
                self.recent_errors.forget(database).await;
            }
            Err(e) => {
                let wait = entry.backoff.lock().unwrap().failed_with(&e.error);
                let left = self
                    .cache
                    .get(database)
                    .await
                    .and_then(|c| c.cred.expires_at())
                    .map(|e| e.saturating_duration_since(std::time::Instant::now()));
                tracing::warn!(
                    database,
                    error = %e.error,
                    retry_in = ?wait,
                    cached_valid_for = ?left,
                    "background refresh failed; the cached credential serves while it is valid"
                );
            }
        }
    }

    /// The lease task: one pass when something is due or it is woken.
    async fn keep_leases(self: Arc<Self>, stop: Shutdown) {
        loop {
            let next = tokio::select! {
                next = self.lease_step() => next,
                _ = stop.stopping() => return,
            };
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = self.leases.wake.notified() => {}
                _ = stop.stopping() => return,
            }
        }
    }

    /// Records a Vault login generation seen by a fetch or the token watch; a newer one wakes
    /// the entry tasks.
    pub(crate) fn saw_token_generation(&self, generation: u64) {
        self.token_seen.send_if_modified(|seen| {
            let newer = generation > *seen;
            if newer {
                *seen = generation;
            }
            newer
        });
        self.state_changed.notify_one();
    }

    /// Notices a new login made by `Auth::keep_alive`, which replaces the token at 2/3 of its
    /// TTL or later (renewal refused, max TTL near) and tells nobody. Until then this sleeps;
    /// from then until the token changes it looks every [`TOKEN_RECHECK`]. Logins made by a
    /// fetch are reported by the fetch itself.
    async fn watch_token(self: Arc<Self>, stop: Shutdown) {
        let mut seen = self.token_seen.subscribe();
        loop {
            seen.borrow_and_update();
            let token = self.auth.current();
            if let Some(t) = &token {
                self.saw_token_generation(t.generation);
            }
            let now = Instant::now();
            let acts_at = token.as_ref().and_then(|t| {
                t.ttl
                    .map(|ttl| crate::vault::limits::later(Instant::from_std(t.obtained_at), ttl.saturating_mul(2) / 3))
            });
            let wake = match acts_at {
                Some(at) if at > now => Some(at),
                Some(_) => Some(now + TOKEN_RECHECK),
                // No token yet, or one without a TTL: only a fetch logs in.
                None => None,
            };
            tokio::select! {
                _ = sleep_until(wake) => {}
                _ = seen.changed() => {}
                _ = stop.stopping() => return,
            }
        }
    }
}

impl CredentialStore {
    /// Looks the token up (`auth/token/lookup-self`) every `token_check_interval`, so that a
    /// token revoked in Vault (an incident response: "so the service cannot cling to cached
    /// permissions") is noticed within the interval rather than at its next renewal. A 403
    /// means revoked, unless another Vault cluster now answers at the address (see
    /// [`crate::vault::cluster`]); Vault unreachable or failing means nothing (the cache keeps
    /// serving).
    async fn check_token(self: Arc<Self>, stop: Shutdown) {
        use crate::vault::cluster::{self, Denial};
        let every = self.auth.check_interval();
        // Learnt after the first lookup that succeeds: one sys/health request.
        let mut known_cluster: Option<String> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.stopping() => return,
            }
            let Some(token) = self.auth.current() else { continue };
            match crate::vault::auth::lookup_self(self.auth.client(), &token.token).await {
                Ok(_) => {
                    if known_cluster.is_none() {
                        known_cluster = cluster::cluster_id(self.auth.client()).await;
                        tracing::debug!(cluster_id = ?known_cluster, "the token's Vault cluster");
                    }
                }
                Err(e) if e.is_denied() => {
                    let now = cluster::cluster_id(self.auth.client()).await;
                    match cluster::denial(known_cluster.as_deref(), now.as_deref()) {
                        Denial::Reinitialised { before, now } => {
                            self.vault_reinitialised(&token, &before, &now).await;
                            known_cluster = Some(now);
                        }
                        Denial::Revoked => {
                            self.vault.count_denied("", "lookup-self");
                            self.token_revoked(&token, &e).await;
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "token lookup failed; cached credentials keep serving"),
            }
        }
    }

    /// Another Vault cluster answers: the old token and leases mean nothing to it, but the
    /// cached credentials' Postgres roles still work. They keep serving; dbward logs in again,
    /// and a login that succeeds makes every entry fetch anew (the cached credential serving
    /// until the new one arrives). A login that fails changes nothing: the entries' own
    /// schedule asks again, and their credentials serve while valid.
    async fn vault_reinitialised(&self, token: &Arc<crate::vault::VaultToken>, before: &str, now: &str) {
        tracing::warn!(
            generation = token.generation,
            cluster_before = before,
            cluster_now = now,
            "Vault answers with another cluster_id: it was initialised anew and knows neither dbward's token nor \
             its leases. Cached credentials keep serving while their Postgres roles live; logging in again"
        );
        self.auth.forget(token);
        match self.auth.token().await {
            Ok(t) => self.saw_token_generation(t.generation),
            Err(e) => tracing::warn!(
                error = %e,
                "the login to the new Vault cluster failed; cached credentials keep serving while valid"
            ),
        }
    }

    /// Vault denied the token's own lookup: it was revoked. Every credential it obtained is
    /// dropped (KV and static ones too: they were read with it), and dbward logs in again; new
    /// connections get only what the new login may read, or the login's refusal.
    pub(crate) async fn token_revoked(&self, token: &Arc<crate::vault::VaultToken>, e: &crate::vault::VaultError) {
        tracing::warn!(
            generation = token.generation,
            error = %e,
            "Vault denied the token's own lookup: the token was revoked. Dropping every credential it obtained \
             and logging in again"
        );
        self.auth.forget(token);
        self.cache.invalidate_all();
        self.recent_errors.forget_all();
        let entries: Vec<Arc<Entry>> = self.entries.read().unwrap().values().cloned().collect();
        match self.auth.token().await {
            Ok(t) => self.saw_token_generation(t.generation),
            Err(e) => tracing::warn!(error = %e, "the new Vault login failed; clients are refused until one succeeds"),
        }
        for entry in entries {
            entry.wake.notify_one();
        }
        self.leases.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::schedule::{schedule, LeaseClock};
    use crate::credentials::test_support::{creds, held, leased, store};

    fn refreshes(store: &CredentialStore, outcome: &str) -> u64 {
        store
            .metrics
            .credential_refreshes_total
            .with_label_values(&["d", outcome])
            .get()
    }

    fn start(store: &Arc<CredentialStore>) -> Shutdown {
        let stop = Shutdown::new();
        let entry = store.entry("d").unwrap();
        tokio::spawn(store.clone().keep_entry("d".into(), entry, stop.clone()));
        stop
    }

    // The store's token file does not exist: every fetch fails at once, without a network.
    #[tokio::test(start_paused = true)]
    async fn an_entry_whose_fetch_keeps_failing_retries_on_its_backoff_only() {
        let store = store(creds("database", ""));
        let _stop = start(&store);
        tokio::time::sleep(Duration::from_secs(60)).await;
        // Backoff waits of 0.5-1 s, 1-2 s, 2-4 s... : 6 or 7 attempts fit in a minute.
        let attempts = refreshes(&store, "error");
        assert!((5..=8).contains(&attempts), "{attempts} refresh attempts in 60 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_credential_is_left_alone_until_a_rejection_or_a_new_login_wakes_the_task() {
        let store = store(creds("database", ""));
        let cur = held(
            schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0),
            1,
        );
        store.cache.insert("d".into(), cur.clone()).await;
        let _stop = start(&store);
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(refreshes(&store, "error"), 0, "refreshed before it was due");

        // A login newer than the one that obtained the lease: replaced at once (and the fetch
        // fails here, so the entry backs off).
        store.saw_token_generation(2);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(refreshes(&store, "error"), 1);
        let again = held(
            schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0),
            2,
        );
        store.cache.insert("d".into(), again.clone()).await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(
            refreshes(&store, "error"),
            1,
            "a credential of the new login was replaced"
        );

        // 28P01 for the cached credential: dropped, and fetched again at once.
        store.rejected("d", again.generation).await;
        assert!(store.peek("d").await.is_none());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(refreshes(&store, "error"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_cannot_be_revoked_is_retried_on_its_backoff_only() {
        let store = store(creds("database", ""));
        let when = schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0);
        let replaced = leased(when, "database/creds/r/abc");
        let clock = LeaseClock::new(Instant::now(), Duration::from_secs(3600));
        store.leases.add("d", replaced, clock);
        let stop = Shutdown::new();
        tokio::spawn(store.clone().keep_leases(stop.clone()));
        // No Vault token yet: every revocation attempt fails and backs off.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let failures = store.leases.failures("database/creds/r/abc");
        assert!((5..=8).contains(&failures), "{failures} revocation attempts in 60 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_whose_revocation_was_denied_under_this_login_is_left_to_expire_unasked() {
        use crate::credentials::denials::LeaseOp;
        let store = store(creds("database", ""));
        let when = schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0);
        let replaced = leased(when, "database/creds/r/abc");
        let clock = LeaseClock::new(Instant::now(), Duration::from_secs(3600));
        store.leases.add("d", replaced, clock);
        // Denied under the current login (none yet: generation 0).
        assert!(store.denials.record("d", LeaseOp::Revoke, 0));
        let stop = Shutdown::new();
        tokio::spawn(store.clone().keep_leases(stop.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!store.leases.holds("database/creds/r/abc"), "the lease is still held");
        assert_eq!(
            store.leases.failures("database/creds/r/abc"),
            0,
            "a revocation was attempted"
        );
        // A reload tries again: a lease held now gets its revocation attempt.
        store.update_entries([("d".to_string(), creds("database", ""))]).await;
        let again = leased(when, "database/creds/r/def");
        store.leases.add("d", again, clock);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(store.leases.failures("database/creds/r/def"), 1);
    }

    // The lease of a new credential is held just before the credential goes into the cache; a
    // lease pass in between once revoked it as "replaced", and clients got 28P01.
    #[tokio::test(start_paused = true)]
    async fn a_credential_newer_than_the_cached_one_is_not_revoked_as_replaced() {
        use crate::credentials::test_support::leased_as;
        let store = store(creds("database", ""));
        let when = schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0);
        let cur = leased_as(when, "database/creds/r/old", 1);
        let clock = LeaseClock::new(Instant::now(), Duration::from_secs(3600));
        store.cache.insert("d".into(), cur.clone()).await;
        store.leases.add("d", cur, clock);
        store.leases.add("d", leased_as(when, "database/creds/r/new", 2), clock);
        let stop = Shutdown::new();
        tokio::spawn(store.clone().keep_leases(stop.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(store.leases.holds("database/creds/r/new"));
        // A revocation would have been attempted (and failed here: no Vault token).
        assert_eq!(store.leases.failures("database/creds/r/new"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_session_of_a_replaced_lease_ending_wakes_its_revocation() {
        let store = store(creds("database", ""));
        let when = schedule(&creds("database", ""), Some(Duration::from_secs(3600)), 1.0);
        let cur = leased(when, "database/creds/r/abc");
        store.cache.insert("d".into(), cur.clone()).await;
        let clock = LeaseClock::new(Instant::now(), Duration::from_secs(3600));
        store.leases.add("d", cur, clock);
        let session = store.checkout("d").await.unwrap();
        let stop = Shutdown::new();
        tokio::spawn(store.clone().keep_leases(stop.clone()));
        // Replaced while a session uses it: kept, renewal due only at 2/3 of the hour.
        store.cache.invalidate("d").await;
        store.leases.wake.notify_one();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(store.leases.failures("database/creds/r/abc"), 0);
        drop(session);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Revocation attempted at once (it fails here: no Vault token).
        assert_eq!(store.leases.failures("database/creds/r/abc"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_retires_removed_entries_tasks_and_starts_added_ones() {
        let store = store(creds("database", ""));
        let stop = Shutdown::new();
        tokio::spawn(store.clone().maintain(stop.clone()));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let d_before = refreshes(&store, "error");
        assert!(d_before > 0, "no warm-start attempt for d");
        store.update_entries([("e".to_string(), creds("kv", ""))]).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            refreshes(&store, "error"),
            d_before,
            "the removed entry's task still runs"
        );
        let e = store
            .metrics
            .credential_refreshes_total
            .with_label_values(&["e", "error"])
            .get();
        assert!((5..=8).contains(&e), "{e} attempts for the added entry in 60 s");
        stop.run(Duration::ZERO).await;
    }
}
