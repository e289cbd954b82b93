//! One credential read from Vault for a database entry: the token (logging in if needed), one
//! re-login when Vault denies (a revoked token or a changed role needs one; a policy that really
//! denies denies the new token too, and that is reported), the credential's schedule, and the
//! metrics and log line of every fetch. The new credential's lease is registered with
//! [`super::leases`] before anyone can use it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;

use super::schedule::{schedule, LeaseClock};
use super::{CredentialError, CredentialStore, Entry, Held};
use crate::clock::unix_now;
use crate::config::CredentialKind;
use crate::vault::{self, Credential, VaultError, VaultToken};

impl CredentialStore {
    pub(crate) async fn fetch(&self, database: &str) -> Result<Arc<Held>, CredentialError> {
        let Some(entry) = self.entry(database) else {
            return Err(CredentialError {
                database: database.to_string(),
                path: String::new(),
                error: vault::error::LocalError::EntryRemoved {
                    database: database.to_string(),
                }
                .into(),
                policies: None,
                login: self.login_description(),
            });
        };
        if let Some(reuse) = self.over_budget(database, &entry) {
            return Ok(reuse);
        }
        match self.read(database, &entry).await {
            Ok((cred, token_generation)) => {
                if cred.lease.is_some() {
                    entry.budget.minted(tokio::time::Instant::now(), entry.cfg.mint_budget);
                }
                Ok(self.keep(database, &entry, cred, token_generation))
            }
            Err(e) => {
                self.report_failure(database, &e);
                Err(e)
            }
        }
    }

    /// The credential to use instead of a new one when the entry's minting budget is spent: the
    /// newest held credential, if it is still valid. None: a new one may (or must) be made.
    fn over_budget(&self, database: &str, entry: &Entry) -> Option<Arc<Held>> {
        if entry.cfg.kind() != CredentialKind::Database {
            return None;
        }
        let newest = self.leases.newest(database)?;
        let period = newest.cred.lease.as_ref()?.duration;
        let now = tokio::time::Instant::now();
        if entry.budget.may_mint(now, entry.cfg.mint_budget, period) {
            return None;
        }
        let valid = newest.schedule.cache_for.is_none_or(|c| newest.fetched_at() + c > now);
        if !valid {
            // Refusing would fail clients that Vault would serve.
            return None;
        }
        self.metrics
            .credential_budget_exhausted_total
            .with_label_values(&[database])
            .inc();
        if entry.budget.first_exhaustion() {
            tracing::warn!(
                database,
                budget = entry.cfg.mint_budget,
                lease_period = ?period,
                username = %newest.cred.username,
                "this entry made credentials.mint_budget new credentials within one lease period: the newest \
                 valid credential is used again instead of a new one (a retry loop, a crash loop or a server \
                 refusing every login?); logged once, counted in dbward_credential_budget_exhausted_total"
            );
        }
        Some(newest)
    }

    /// Reads the entry's secret with a usable token; returns it with the login generation
    /// that obtained it.
    async fn read(&self, database: &str, entry: &Entry) -> Result<(Credential, u64), CredentialError> {
        let cfg = &entry.cfg;
        let wrap = |error: VaultError, policies: Option<String>| CredentialError {
            database: database.to_string(),
            path: cfg.vault_path(),
            error,
            policies,
            login: self.login_description(),
        };
        let token = self.auth.token().await.map_err(|e| wrap(e, None))?;
        self.note_token(&token);
        match vault::secrets::fetch(&self.vault, &token.token, cfg).await {
            Err(e) if e.is_denied() => match self.auth.relogin_after_denial(&token).await {
                Some(Ok(new)) => {
                    self.note_token(&new);
                    vault::secrets::fetch(&self.vault, &new.token, cfg)
                        .await
                        .map(|c| (c, new.generation))
                        .map_err(|e| wrap(e, Some(new.policies_text())))
                }
                Some(Err(login_err)) => Err(wrap(login_err, None)),
                None => Err(wrap(e, Some(token.policies_text()))),
            },
            other => other
                .map(|c| (c, token.generation))
                .map_err(|e| wrap(e, Some(token.policies_text()))),
        }
    }

    /// Numbers, schedules, counts and logs a fetched credential, and holds its lease.
    fn keep(&self, database: &str, entry: &Entry, cred: Credential, token_generation: u64) -> Arc<Held> {
        let held = self.adopt_credential(database, entry, cred, token_generation);
        let cred = &held.cred;
        self.metrics
            .credential_fetch_total
            .with_label_values(&[database, "ok"])
            .inc();
        let expiry = cred.valid_for.map(|v| unix_now() + v.as_secs_f64()).unwrap_or(0.0);
        self.metrics
            .credential_expiry_timestamp_seconds
            .with_label_values(&[database])
            .set(expiry);
        tracing::info!(
            database,
            path = %cred.path,
            username = %cred.username,
            lease = cred.lease.as_ref().map(|l| l.id.as_str()).unwrap_or("-"),
            valid_for = ?cred.valid_for,
            generation = cred.generation,
            "fetched credential from Vault"
        );
        held
    }

    /// Numbers and schedules a credential (fetched now, or taken over from the state file)
    /// and holds its lease.
    pub(super) fn adopt_credential(
        &self,
        database: &str,
        entry: &Entry,
        mut cred: Credential,
        token_generation: u64,
    ) -> Arc<Held> {
        cred.generation = entry.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let jitter = rand::thread_rng().gen_range(0.95..=1.0);
        let when = schedule(&entry.cfg, cred.valid_for, jitter);
        let held = Arc::new(Held::new(cred, token_generation, when));
        if let Some(lease) = &held.cred.lease {
            let clock = LeaseClock::new(held.fetched_at(), lease.duration);
            self.leases.add(database, held.clone(), clock);
        }
        self.state_changed.notify_one();
        held
    }

    fn report_failure(&self, database: &str, e: &CredentialError) {
        self.metrics
            .credential_fetch_total
            .with_label_values(&[database, "error"])
            .inc();
        if e.error.is_denied() {
            self.metrics
                .vault_denied_total
                .with_label_values(&[database, "read"])
                .inc();
        }
        tracing::warn!(
            database,
            path = %e.path,
            capability = if e.error.is_denied() { "read (missing)" } else { "read" },
            policies = e.policies.as_deref().unwrap_or("-"),
            login = %e.login,
            error = %e.error,
            "credential fetch failed"
        );
    }

    /// Publishes the token's expiry, and tells the lifecycle about a new login (dynamic
    /// credentials of older logins are then replaced).
    pub(super) fn note_token(&self, token: &VaultToken) {
        let at = token
            .remaining(Instant::now())
            .map(|left| (unix_now() + left.as_secs_f64()) as i64)
            .unwrap_or(0);
        self.metrics.vault_token_expiry_timestamp_seconds.set(at);
        self.saw_token_generation(token.generation);
    }
}
