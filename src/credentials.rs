//! Credentials and their lifecycle. The cache (moka) holds each database entry's current
//! credential for as long as Vault says it is valid (minus a margin), shared by all connections
//! and fetched once however many connections ask at the same moment. Vault errors are remembered
//! briefly, so a broken policy costs Vault one request per few seconds rather than one per
//! connection, and a fixed policy is seen at once.
//!
//! In the background ([`CredentialStore::maintain`]): a credential is replaced before it is due
//! (at `refresh_fraction` of its lease, when the Vault token that owns its lease is replaced, when
//! a static role rotates, every `refresh_interval` for KV); replaced leases that connections still
//! use are renewed up to their max TTL; unused ones are revoked. While Vault is down the cached
//! credential keeps serving until it actually expires; retries back off from 1 s to 5 min.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::Expiry;

use rand::Rng;
use serde_json::json;

use crate::backoff::Backoff;
use crate::config::{CredentialKind, CredentialsConfig};
use crate::metrics::Metrics;
use crate::pg::error::{sqlstate, PgError};
use crate::vault::{self, Auth, Credential, VaultClient, VaultError};

/// Why no credential could be had for a database entry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("database entry {database:?}: {error}")]
pub struct CredentialError {
    pub database: String,
    /// The Vault path the entry reads.
    pub path: String,
    pub error: VaultError,
    /// The policies of the token that was denied, when Vault denied.
    pub policies: Option<String>,
    /// Human description of how dbward logs in ("jwt role payments-service at auth/jwt").
    pub login: String,
}

impl CredentialError {
    /// What the client is told: what failed, and what to check.
    pub fn to_pg_error(&self) -> PgError {
        let e = &self.error;
        let is_login = e.is_login();
        if e.is_denied() && !is_login {
            let policies = self.policies.as_deref().unwrap_or("unknown");
            return PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("dbward: {e}"))
                .with_detail(format!(
                    "database entry {:?} reads {} as {}; the token's policies are: {policies}",
                    self.database, self.path, self.login
                ))
                .with_hint(format!(
                    "grant the \"read\" capability on {} in one of those policies (`dbward policy` prints what this config needs), or fix the path in the config",
                    self.path
                ));
        }
        if is_login {
            return PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("dbward: {e}"))
                .with_detail(format!(
                    "database entry {:?} could not log in to Vault as {}",
                    self.database, self.login
                ))
                .with_hint("check the auth role's bound claims and the workload token file");
        }
        if e.is_unavailable() {
            return PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("dbward: {e}"))
                .with_detail(format!(
                    "database entry {:?} has no valid cached credential for {} and Vault cannot be asked",
                    self.database, self.path
                ))
                .with_hint("check that Vault is up, unsealed and reachable from this host");
        }
        let code = match e.status() {
            Some(400..=499) => sqlstate::INVALID_AUTHORIZATION,
            _ => sqlstate::CONNECTION_FAILURE,
        };
        PgError::fatal(code, format!("dbward: {e}")).with_detail(format!(
            "database entry {:?} reads {} as {}",
            self.database, self.path, self.login
        ))
    }
}

/// A credential dbward holds, with what the lifecycle needs to know about it.
pub struct Held {
    pub cred: Credential,
    /// The Vault login that obtained it: its lease dies with that token.
    pub token_generation: u64,
    /// Client sessions using it now.
    in_use: AtomicUsize,
    /// When it is replaced in the background (a fraction of the lease, jittered).
    refresh_after: Option<Duration>,
    /// How long the cache may hand it out (None: until replaced).
    cache_for: Option<Duration>,
    /// The SCRAM salted password, computed on the first upstream login with this credential.
    pub scram_keys: Arc<crate::upstream::scram::KeyCache>,
    lease: Mutex<LeaseClock>,
}

/// When a lease was last extended and for how long.
#[derive(Debug, Clone, Copy)]
struct LeaseClock {
    renewed_at: Instant,
    duration: Duration,
    /// Vault granted less than asked: the max TTL is reached, renewing further is pointless.
    at_max: bool,
    /// Revoked, or Vault said the lease is gone.
    gone: bool,
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
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    /// When Vault will consider the lease over (renewals included).
    fn lease_end(&self) -> Option<Instant> {
        self.cred.lease.as_ref().map(|_| {
            let c = self.lease.lock().unwrap();
            c.renewed_at + c.duration
        })
    }
}

/// A session's use of a credential; the count drops when the session ends.
pub struct InUse(Arc<Held>);

impl std::ops::Deref for InUse {
    type Target = Credential;
    fn deref(&self) -> &Credential {
        &self.0.cred
    }
}

impl InUse {
    pub fn scram_keys(&self) -> &Arc<crate::upstream::scram::KeyCache> {
        &self.0.scram_keys
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Each credential leaves the cache when it stops being safe to hand out (see `cache_for`).
struct LeaseExpiry;

impl Expiry<String, Arc<Held>> for LeaseExpiry {
    fn expire_after_create(&self, _key: &String, value: &Arc<Held>, created_at: Instant) -> Option<Duration> {
        let lived = created_at.saturating_duration_since(value.cred.fetched_at);
        value.cache_for.map(|d| d.saturating_sub(lived))
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

struct Entry {
    cfg: CredentialsConfig,
    /// A background refresh of this entry is running.
    refreshing: AtomicBool,
    generation: Mutex<u64>,
    /// Background refresh attempts of this entry back off on failure.
    backoff: Mutex<Backoff>,
    /// The 28P01 explanation is logged once per entry at warn level.
    warned_rejected: AtomicBool,
}

/// The cache of credentials for every database entry, and the leases behind them.
pub struct CredentialStore {
    vault: Arc<VaultClient>,
    auth: Arc<Auth>,
    /// Changed only by a reload.
    entries: RwLock<HashMap<String, Arc<Entry>>>,
    cache: Cache<String, Arc<Held>>,
    /// Every credential with a lease dbward has not given up yet, current ones included.
    held: Mutex<Vec<(String, Arc<Held>)>>,
    recent_errors: Mutex<HashMap<String, (Instant, CredentialError)>>,
    error_ttl: Duration,
    metrics: Arc<Metrics>,
}

impl Entry {
    fn new(cfg: CredentialsConfig) -> Self {
        Entry {
            cfg,
            refreshing: AtomicBool::new(false),
            generation: Mutex::new(0),
            backoff: Mutex::new(Backoff::default()),
            warned_rejected: AtomicBool::new(false),
        }
    }
}

impl CredentialStore {
    fn entry(&self, database: &str) -> Option<Arc<Entry>> {
        self.entries.read().unwrap().get(database).cloned()
    }

    /// Applies reloaded database entries: new ones are added, changed ones start over with a
    /// fresh credential, removed ones are dropped. Credentials that sessions still use stay held
    /// (renewed, then revoked when unused) like any replaced credential.
    pub async fn update_entries(&self, databases: impl IntoIterator<Item = (String, CredentialsConfig)>) {
        let wanted: HashMap<String, CredentialsConfig> = databases.into_iter().collect();
        let mut stale = Vec::new();
        {
            let mut entries = self.entries.write().unwrap();
            entries.retain(|name, e| {
                let keep = wanted.get(name) == Some(&e.cfg);
                if !keep {
                    stale.push(name.clone());
                }
                keep
            });
            for (name, cfg) in wanted {
                entries.entry(name).or_insert_with(|| Arc::new(Entry::new(cfg)));
            }
        }
        for name in stale {
            self.cache.invalidate(&name).await;
            self.recent_errors.lock().unwrap().remove(&name);
        }
    }

    pub fn new(
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
        let cache = Cache::builder().expire_after(LeaseExpiry).build();
        Arc::new(CredentialStore {
            vault,
            auth,
            entries: RwLock::new(entries),
            cache,
            held: Mutex::new(Vec::new()),
            recent_errors: Mutex::new(HashMap::new()),
            error_ttl,
            metrics,
        })
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The current credential (cached, or fetched now), counted as in use until the returned
    /// guard is dropped.
    pub async fn checkout(&self, database: &str) -> Result<InUse, CredentialError> {
        let held = self.get(database).await?;
        held.in_use.fetch_add(1, Ordering::SeqCst);
        Ok(InUse(held))
    }

    /// The cached credential, or one fetched now (one fetch however many callers wait).
    pub async fn get(&self, database: &str) -> Result<Arc<Held>, CredentialError> {
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
        if let Some((at, e)) = self.recent_errors.lock().unwrap().get(database) {
            if at.elapsed() < self.error_ttl {
                return Err(e.clone());
            }
        }
        let result = self
            .cache
            .try_get_with(database.to_string(), self.fetch(database))
            .await;
        match result {
            Ok(c) => {
                self.recent_errors.lock().unwrap().remove(database);
                Ok(c)
            }
            Err(e) => {
                let e = CredentialError::clone(&e);
                self.recent_errors
                    .lock()
                    .unwrap()
                    .insert(database.to_string(), (Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The cached credential without asking Vault.
    pub async fn peek(&self, database: &str) -> Option<Arc<Held>> {
        self.cache.get(database).await
    }

    /// Drops a credential the upstream refused (28P01), unless a newer one already replaced it.
    pub async fn rejected(&self, database: &str, generation: u64) {
        self.metrics
            .credential_rejected_total
            .with_label_values(&[database])
            .inc();
        if let Some(e) = self.entry(database) {
            if !e.warned_rejected.swap(true, Ordering::SeqCst) {
                let role = match e.cfg.kind {
                    CredentialKind::Kv => format!("the KV secret at {}", e.cfg.vault_path()),
                    _ => format!(
                        "Vault role {:?} ({})",
                        e.cfg.role.as_deref().unwrap_or(""),
                        e.cfg.vault_path()
                    ),
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
            if c.cred.generation == generation {
                self.cache.invalidate(database).await;
            }
        }
    }

    pub fn login_description(&self) -> String {
        self.auth.login_description()
    }

    async fn fetch(&self, database: &str) -> Result<Arc<Held>, CredentialError> {
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
        let cfg = &entry.cfg;
        let path = cfg.vault_path();
        let wrap = |error: VaultError, policies: Option<String>| CredentialError {
            database: database.to_string(),
            path: path.clone(),
            error,
            policies,
            login: self.login_description(),
        };
        let result = async {
            let token = self.auth.token().await.map_err(|e| wrap(e, None))?;
            self.note_token(&token);
            match vault::secrets::fetch(&self.vault, &token.token, cfg).await {
                Err(e) if e.is_denied() => {
                    // A revoked token or a changed role needs a new login; a policy that really
                    // denies the path denies the new token too, and that is reported.
                    match self.auth.relogin_after_denial(&token).await {
                        Some(Ok(new)) => {
                            self.note_token(&new);
                            vault::secrets::fetch(&self.vault, &new.token, cfg)
                                .await
                                .map(|c| (c, new.generation))
                                .map_err(|e| wrap(e, Some(new.policies_text())))
                        }
                        Some(Err(login_err)) => Err(wrap(login_err, None)),
                        None => Err(wrap(e, Some(token.policies_text()))),
                    }
                }
                other => other
                    .map(|c| (c, token.generation))
                    .map_err(|e| wrap(e, Some(token.policies_text()))),
            }
        }
        .await;
        match result {
            Ok((mut cred, token_generation)) => {
                cred.generation = {
                    let mut g = entry.generation.lock().unwrap();
                    *g += 1;
                    *g
                };
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
                let jitter = rand::thread_rng().gen_range(0.95..=1.0);
                let Schedule {
                    refresh_after,
                    cache_for,
                } = schedule(cfg, cred.valid_for, jitter);
                let lease = LeaseClock {
                    renewed_at: cred.fetched_at,
                    duration: cred.lease.as_ref().map(|l| l.duration).unwrap_or_default(),
                    at_max: false,
                    gone: false,
                };
                let held = Arc::new(Held {
                    cred,
                    token_generation,
                    in_use: AtomicUsize::new(0),
                    refresh_after,
                    cache_for,
                    scram_keys: Arc::default(),
                    lease: Mutex::new(lease),
                });
                if held.cred.lease.is_some() {
                    self.held.lock().unwrap().push((database.to_string(), held.clone()));
                }
                Ok(held)
            }
            Err(e) => {
                self.metrics
                    .credential_fetch_total
                    .with_label_values(&[database, "error"])
                    .inc();
                if e.error.is_denied() {
                    self.metrics.vault_denied_total.with_label_values(&[database]).inc();
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
                Err(e)
            }
        }
    }

    fn note_token(&self, token: &vault::VaultToken) {
        let at = token
            .remaining(Instant::now())
            .map(|left| (unix_now() + left.as_secs_f64()) as i64)
            .unwrap_or(0);
        self.metrics.vault_token_expiry_timestamp_seconds.set(at);
    }

    /// Whether `database`'s current credential should be replaced now.
    fn due(&self, entry: &Entry, cur: &Held) -> Option<&'static str> {
        if entry.cfg.kind == CredentialKind::Database && cur.token_generation < self.auth.generation() {
            return Some("the Vault token that owns its lease was replaced");
        }
        match cur.refresh_after {
            Some(after) if cur.cred.fetched_at.elapsed() >= after => Some(match entry.cfg.kind {
                CredentialKind::Kv => "refresh_interval passed",
                CredentialKind::Static => "the static role's password rotated",
                CredentialKind::Database => "refresh_fraction of the lease passed",
            }),
            _ => None,
        }
    }

    /// Runs the background lifecycle until `stop`: refreshes due credentials, renews replaced
    /// leases still in use, revokes unused ones, keeps the Vault token alive.
    pub async fn maintain(self: Arc<Self>, stop: crate::shutdown::Shutdown) {
        tokio::spawn(self.auth.clone().keep_alive({
            let stop = stop.clone();
            async move { stop.stopping().await }
        }));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.stopping() => return,
            }
            // Each entry refreshes in a task of its own: a Vault call hanging for one entry
            // must not hold up the others or the lease bookkeeping.
            let entries: Vec<(String, Arc<Entry>)> = self
                .entries
                .read()
                .unwrap()
                .iter()
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect();
            for (name, entry) in entries {
                if entry.refreshing.swap(true, Ordering::SeqCst) {
                    continue;
                }
                let me = self.clone();
                tokio::spawn(async move {
                    me.refresh_step(&name, &entry).await;
                    entry.refreshing.store(false, Ordering::SeqCst);
                });
            }
            self.lease_step().await;
        }
    }

    async fn refresh_step(&self, database: &str, entry: &Entry) {
        let cached = self.cache.get(database).await;
        let reason = match &cached {
            Some(cur) => match self.due(entry, cur) {
                Some(r) => r,
                None => return,
            },
            None => "no valid credential is cached",
        };
        if !entry.backoff.lock().unwrap().ready() {
            return;
        }
        tracing::debug!(database, reason, "refreshing credential");
        let result = match cached {
            // Through the cache's single flight, shared with clients that ask meanwhile.
            None => self.get(database).await.map(|_| ()),
            Some(_) => match self.fetch(database).await {
                Ok(new) => {
                    self.cache.insert(database.to_string(), new).await;
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .credential_refreshes_total
            .with_label_values(&[database, outcome])
            .inc();
        match result {
            Ok(()) => {
                entry.backoff.lock().unwrap().succeeded();
                self.recent_errors.lock().unwrap().remove(database);
            }
            Err(e) => {
                let wait = entry.backoff.lock().unwrap().failed();
                let left = self
                    .cache
                    .get(database)
                    .await
                    .and_then(|c| c.cred.expires_at())
                    .map(|e| e.saturating_duration_since(Instant::now()));
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

    /// Renews replaced leases that sessions still use; revokes those nobody uses.
    async fn lease_step(&self) {
        let held: Vec<(String, Arc<Held>)> = self.held.lock().unwrap().clone();
        let now = Instant::now();
        for (database, h) in held {
            let Some(lease) = &h.cred.lease else { continue };
            // An entry removed by a reload: its leases get the default treatment.
            let (renew_in_use, revoke_unused) = self
                .entry(&database)
                .map(|e| (e.cfg.renew_in_use, e.cfg.revoke_unused))
                .unwrap_or((true, true));
            let current = self.cache.get(&database).await.is_some_and(|c| Arc::ptr_eq(&c, &h));
            let clock = *h.lease.lock().unwrap();
            let expired = h.lease_end().is_some_and(|end| end <= now);
            if clock.gone || expired {
                self.forget(&h);
                continue;
            }
            if current {
                continue;
            }
            if h.in_use() == 0 {
                if revoke_unused {
                    self.revoke(&database, &h, "replaced and no longer used").await;
                } else {
                    self.forget(&h);
                }
                continue;
            }
            let renew_due = clock.renewed_at + clock.duration * 2 / 3 <= now;
            if renew_in_use && lease.renewable && !clock.at_max && renew_due {
                self.renew(&database, &h).await;
            }
        }
    }

    fn forget(&self, h: &Arc<Held>) {
        self.held.lock().unwrap().retain(|(_, x)| !Arc::ptr_eq(x, h));
    }

    async fn renew(&self, database: &str, h: &Arc<Held>) {
        let lease = h.cred.lease.as_ref().expect("only leases are renewed");
        let Some(token) = self.auth.current() else { return };
        let body = json!({ "lease_id": lease.id, "increment": lease.duration.as_secs() });
        match self
            .vault
            .write("renew", "sys/leases/renew", Some(&token.token), &body)
            .await
        {
            Ok(resp) => {
                let granted = Duration::from_secs(resp.u64_field("/lease_duration").unwrap_or(0));
                let mut c = h.lease.lock().unwrap();
                c.renewed_at = Instant::now();
                c.duration = granted;
                c.at_max = granted + Duration::from_secs(1) < lease.duration;
                self.metrics
                    .lease_renewals_total
                    .with_label_values(&[database, "ok"])
                    .inc();
                tracing::info!(database, lease = %lease.id, in_use = h.in_use(), granted = ?granted, at_max = c.at_max, "renewed lease still in use");
            }
            Err(e) => {
                self.metrics
                    .lease_renewals_total
                    .with_label_values(&[database, "error"])
                    .inc();
                // 400 "lease not found"/"lease expired": nothing left to renew.
                if matches!(e.status(), Some(400) | Some(404)) {
                    h.lease.lock().unwrap().gone = true;
                }
                tracing::warn!(database, lease = %lease.id, in_use = h.in_use(), error = %e, "lease renewal failed");
            }
        }
    }

    async fn revoke(&self, database: &str, h: &Arc<Held>, why: &str) {
        let lease = h.cred.lease.as_ref().expect("only leases are revoked");
        let Some(token) = self.auth.current() else { return };
        let body = json!({ "lease_id": lease.id });
        match self
            .vault
            .write("revoke", "sys/leases/revoke", Some(&token.token), &body)
            .await
        {
            Ok(_) => {
                self.metrics
                    .lease_revocations_total
                    .with_label_values(&[database, "ok"])
                    .inc();
                tracing::info!(database, lease = %lease.id, username = %h.cred.username, why, "revoked lease");
                h.lease.lock().unwrap().gone = true;
                self.forget(h);
            }
            Err(e) => {
                self.metrics
                    .lease_revocations_total
                    .with_label_values(&[database, "error"])
                    .inc();
                if matches!(e.status(), Some(400) | Some(404)) {
                    self.forget(h);
                }
                tracing::warn!(database, lease = %lease.id, error = %e, "lease revocation failed");
            }
        }
    }

    /// On clean shutdown: revoke every lease dbward still holds.
    pub async fn revoke_all(&self) {
        let held: Vec<(String, Arc<Held>)> = self.held.lock().unwrap().clone();
        for (database, h) in held {
            self.revoke(&database, &h, "dbward is shutting down").await;
        }
    }

    /// Leases held now, for tests and diagnostics: (database, lease id, sessions using it).
    pub fn leases(&self) -> Vec<(String, String, usize)> {
        self.held
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(d, h)| h.cred.lease.as_ref().map(|l| (d.clone(), l.id.clone(), h.in_use())))
            .collect()
    }
}

/// When a credential is replaced in the background and how long the cache may hand it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_after: Option<Duration>,
    pub cache_for: Option<Duration>,
}

/// The schedule of a credential valid for `valid_for` (None: no lease). `jitter` (0.95 to 1)
/// spreads the refreshes of many dbward instances.
pub fn schedule(cfg: &CredentialsConfig, valid_for: Option<Duration>, jitter: f64) -> Schedule {
    match (cfg.kind, valid_for) {
        // KV secrets have no lease: re-read on the interval, handed out until replaced.
        (CredentialKind::Kv, _) | (_, None) => Schedule {
            refresh_after: Some(cfg.refresh_interval.0),
            cache_for: None,
        },
        // The password changes at rotation: fetched again just after; until then it is valid
        // (a login refused right at the rotation fetches the new one).
        (CredentialKind::Static, Some(v)) => Schedule {
            refresh_after: Some(v + Duration::from_secs(1)),
            cache_for: Some(v),
        },
        // Replaced at refresh_fraction, and always before the cache drops it (expiry_margin
        // before the lease ends), so no client waits for Vault once the first credential is in.
        (CredentialKind::Database, Some(v)) => {
            let cache_for = v.saturating_sub(cfg.expiry_margin.0);
            let latest = cache_for.saturating_sub(Duration::from_millis(500));
            Schedule {
                refresh_after: Some(v.mul_f64(cfg.refresh_fraction * jitter).min(latest)),
                cache_for: Some(cache_for),
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn creds(kind: &str, extra: &str) -> CredentialsConfig {
        let what = if kind == "kv" {
            "path = \"secret/data/a/db\""
        } else {
            "role = \"r\""
        };
        let text = format!(
            "[vault]\naddress = \"http://127.0.0.1:1\"\n[vault.auth]\nmethod = \"token\"\ntoken_file = \"/t\"\n\
             [[databases]]\nname = \"d\"\nlisten = [\"127.0.0.1:1\"]\nupstream = \"h:5432\"\n\
             [databases.credentials]\nkind = \"{kind}\"\n{what}\n{extra}\n"
        );
        Config::parse(&text).unwrap().databases.remove(0).credentials
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn dynamic_lease_is_replaced_at_two_thirds_and_before_the_cache_drops_it() {
        let hour = schedule(&creds("database", ""), Some(S(3600)), 1.0);
        assert_eq!(hour.refresh_after, Some(S(2400)));
        assert_eq!(hour.cache_for, Some(S(3598)));
        let jittered = schedule(&creds("database", ""), Some(S(3600)), 0.95);
        assert_eq!(jittered.refresh_after, Some(S(2280)));
        // A 6 s lease with the 2 s margin: 2/3 would be 4 s, when the cache drops it; refresh
        // earlier so that a client never finds the cache empty.
        let short = schedule(&creds("database", ""), Some(S(6)), 1.0);
        assert_eq!(short.cache_for, Some(S(4)));
        assert_eq!(short.refresh_after, Some(Duration::from_millis(3500)));
        let half = schedule(&creds("database", "refresh_fraction = 0.5"), Some(S(600)), 1.0);
        assert_eq!(half.refresh_after, Some(S(300)));
    }

    fn held(cache_for: Option<Duration>) -> Arc<Held> {
        Arc::new(Held {
            cred: Credential {
                username: "u".into(),
                password: secrecy::SecretString::from("p".to_string()),
                lease: None,
                valid_for: cache_for,
                fetched_at: Instant::now(),
                path: "database/creds/r".into(),
                generation: 2,
            },
            token_generation: 1,
            in_use: AtomicUsize::new(0),
            refresh_after: None,
            cache_for,
            scram_keys: Arc::default(),
            lease: Mutex::new(LeaseClock {
                renewed_at: Instant::now(),
                duration: Duration::ZERO,
                at_max: false,
                gone: false,
            }),
        })
    }

    #[test]
    fn a_refreshed_credential_gets_its_own_lifetime_not_the_replaced_ones() {
        let fresh = held(Some(S(40)));
        // The replaced credential had half a second left; the new one must get its full 40 s.
        let left = LeaseExpiry.expire_after_update(
            &"d".to_string(),
            &fresh,
            Instant::now(),
            Some(Duration::from_millis(500)),
        );
        assert!(left.unwrap() > S(39), "{left:?}");
        let kv = held(None);
        assert_eq!(
            LeaseExpiry.expire_after_update(&"d".to_string(), &kv, Instant::now(), Some(S(1))),
            None
        );
    }

    #[test]
    fn static_role_is_refetched_after_rotation_and_kv_on_its_interval() {
        let st = schedule(&creds("static", ""), Some(S(90)), 0.97);
        assert_eq!(
            st,
            Schedule {
                refresh_after: Some(S(91)),
                cache_for: Some(S(90))
            }
        );
        let kv = schedule(&creds("kv", "refresh_interval = \"30s\""), None, 0.97);
        assert_eq!(
            kv,
            Schedule {
                refresh_after: Some(S(30)),
                cache_for: None
            }
        );
    }
}
