//! The credential cache: one entry per database, kept for as long as Vault says it is valid
//! (minus a margin), shared by all connections, fetched once however many connections ask at
//! the same moment. Vault errors are remembered briefly, so a broken policy costs Vault one
//! request per few seconds rather than one per connection, and a fixed policy is seen at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use moka::future::Cache;
use moka::Expiry;

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
        let is_login = matches!(e, VaultError::Status { op: "login", .. }) || matches!(e, VaultError::Local { .. });
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
                .with_detail(format!("database entry {:?} could not log in to Vault as {}", self.database, self.login))
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
        PgError::fatal(code, format!("dbward: {e}"))
            .with_detail(format!("database entry {:?} reads {} as {}", self.database, self.path, self.login))
    }
}

/// Per-entry expiry: a credential leaves the cache `expiry_margin` before Vault's validity
/// ends; a KV secret (no lease) after its re-read interval.
struct LeaseExpiry {
    policy: HashMap<String, (CredentialKind, Duration, Duration)>,
}

impl LeaseExpiry {
    fn lifetime(&self, key: &str, cred: &Credential) -> Duration {
        let Some((kind, margin, refresh)) = self.policy.get(key) else {
            return Duration::ZERO;
        };
        match (kind, cred.valid_for) {
            (CredentialKind::Kv, _) => *refresh,
            (_, Some(valid)) => valid.saturating_sub(*margin),
            // A dynamic or static credential without a TTL: treat like KV rather than forever.
            (_, None) => *refresh,
        }
    }
}

impl Expiry<String, Arc<Credential>> for LeaseExpiry {
    fn expire_after_create(&self, key: &String, value: &Arc<Credential>, _created_at: Instant) -> Option<Duration> {
        Some(self.lifetime(key, value))
    }
}

struct Entry {
    cfg: CredentialsConfig,
    generation: Mutex<u64>,
}

/// The cache of credentials for every database entry.
pub struct CredentialStore {
    vault: Arc<VaultClient>,
    auth: Arc<Auth>,
    entries: HashMap<String, Entry>,
    cache: Cache<String, Arc<Credential>>,
    recent_errors: Mutex<HashMap<String, (Instant, CredentialError)>>,
    error_ttl: Duration,
    metrics: Arc<Metrics>,
}

impl CredentialStore {
    pub fn new(
        vault: Arc<VaultClient>,
        auth: Arc<Auth>,
        databases: impl IntoIterator<Item = (String, CredentialsConfig)>,
        error_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let entries: HashMap<String, Entry> = databases
            .into_iter()
            .map(|(name, cfg)| (name, Entry { cfg, generation: Mutex::new(0) }))
            .collect();
        let policy = entries
            .iter()
            .map(|(name, e)| (name.clone(), (e.cfg.kind, e.cfg.expiry_margin.0, e.cfg.refresh_interval.0)))
            .collect();
        let cache = Cache::builder().expire_after(LeaseExpiry { policy }).build();
        Arc::new(CredentialStore {
            vault,
            auth,
            entries,
            cache,
            recent_errors: Mutex::new(HashMap::new()),
            error_ttl,
            metrics,
        })
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The cached credential, or one fetched now (one fetch however many callers wait).
    pub async fn get(&self, database: &str) -> Result<Arc<Credential>, CredentialError> {
        if let Some(c) = self.cache.get(database).await {
            self.metrics.credential_cache_total.with_label_values(&[database, "hit"]).inc();
            return Ok(c);
        }
        self.metrics.credential_cache_total.with_label_values(&[database, "miss"]).inc();
        if let Some((at, e)) = self.recent_errors.lock().unwrap().get(database) {
            if at.elapsed() < self.error_ttl {
                return Err(e.clone());
            }
        }
        let result = self
            .cache
            .try_get_with(database.to_string(), async { self.fetch(database).await.map(Arc::new) })
            .await;
        match result {
            Ok(c) => {
                self.recent_errors.lock().unwrap().remove(database);
                Ok(c)
            }
            Err(e) => {
                let e = CredentialError::clone(&e);
                self.recent_errors.lock().unwrap().insert(database.to_string(), (Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Drops a credential the upstream refused, unless a newer one already replaced it.
    pub async fn invalidate(&self, database: &str, generation: u64) {
        if let Some(c) = self.cache.get(database).await {
            if c.generation == generation {
                self.cache.invalidate(database).await;
            }
        }
    }

    pub fn login_description(&self) -> String {
        let a = self.auth.config();
        match &a.role {
            Some(role) => format!("{} role {role} at auth/{}", a.method, a.mount()),
            None => format!("{} auth at auth/{}", a.method, a.mount()),
        }
    }

    async fn fetch(&self, database: &str) -> Result<Credential, CredentialError> {
        let entry = self.entries.get(database).expect("database entries are fixed at start");
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
                                .map_err(|e| wrap(e, Some(new.policies_text())))
                        }
                        Some(Err(login_err)) => Err(wrap(login_err, None)),
                        None => Err(wrap(e, Some(token.policies_text()))),
                    }
                }
                other => other.map_err(|e| wrap(e, Some(token.policies_text()))),
            }
        }
        .await;
        match result {
            Ok(mut cred) => {
                cred.generation = {
                    let mut g = entry.generation.lock().unwrap();
                    *g += 1;
                    *g
                };
                self.metrics.credential_fetch_total.with_label_values(&[database, "ok"]).inc();
                let expiry = cred.valid_for.map(|v| unix_now() + v.as_secs_f64()).unwrap_or(0.0);
                self.metrics.credential_expiry_timestamp_seconds.with_label_values(&[database]).set(expiry);
                tracing::info!(
                    database,
                    path = %cred.path,
                    username = %cred.username,
                    lease = cred.lease.as_ref().map(|l| l.id.as_str()).unwrap_or("-"),
                    valid_for = ?cred.valid_for,
                    generation = cred.generation,
                    "fetched credential from Vault"
                );
                Ok(cred)
            }
            Err(e) => {
                self.metrics.credential_fetch_total.with_label_values(&[database, "error"]).inc();
                if e.error.is_denied() {
                    self.metrics.vault_denied_total.with_label_values(&[database]).inc();
                }
                tracing::warn!(database, path = %e.path, policies = e.policies.as_deref().unwrap_or("-"), error = %e.error, "credential fetch failed");
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
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
