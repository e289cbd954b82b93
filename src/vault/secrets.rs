//! The three secret kinds a database entry can use, and the credential they yield: dynamic
//! (`<mount>/creds/<role>`, with a lease), static (`<mount>/static-creds/<role>`, with the time
//! to the next rotation) and KV v2 (`<mount>/data/<path>`, no lease).

use std::time::{Duration, Instant};

use secrecy::SecretString;

use super::client::{VaultClient, VaultResponse};
use super::error::{Malformed, VaultError};
use crate::config::{CredentialKind, CredentialSource, CredentialsConfig};

/// A Vault lease on a dynamic credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: String,
    pub(crate) duration: Duration,
    pub(crate) renewable: bool,
}

/// A database login from Vault. Debug shows the user and lease, never the password.
pub struct Credential {
    pub(crate) username: String,
    pub(crate) password: SecretString,
    pub(crate) lease: Option<Lease>,
    /// How long Vault says it stays valid (lease duration, or a static role's time to rotation);
    /// None for KV secrets, which carry no lease.
    pub(crate) valid_for: Option<Duration>,
    pub(crate) fetched_at: Instant,
    /// The Vault path it came from, exactly as a policy names it.
    pub(crate) path: String,
    /// Numbered per database entry: 1 for the first credential, 2 after the first refresh...
    pub(crate) generation: u64,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &"[REDACTED]")
            .field("lease", &self.lease)
            .field("valid_for", &self.valid_for)
            .field("path", &self.path)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Credential {
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.valid_for.map(|d| super::limits::later(self.fetched_at, d))
    }
}

/// Reads one credential. `token` must be a usable Vault token.
pub(crate) async fn fetch(
    client: &VaultClient,
    token: &SecretString,
    cfg: &CredentialsConfig,
) -> Result<Credential, VaultError> {
    let path = cfg.vault_path();
    let fetched_at = Instant::now();
    let resp = client.read(token, &path).await?;
    credential_from(cfg, path, fetched_at, &resp)
}

/// The credential in a read's answer (split from [`fetch`] so the fuzz target can run it).
pub(crate) fn credential_from(
    cfg: &CredentialsConfig,
    path: String,
    fetched_at: Instant,
    resp: &VaultResponse,
) -> Result<Credential, VaultError> {
    let malformed = |problem: Malformed| VaultError::Malformed {
        op: "read",
        path: path.clone(),
        problem,
    };
    let (data, user_key, pass_key) = match &cfg.source {
        CredentialSource::Kv {
            username_key,
            password_key,
            ..
        } => (
            resp.body
                .pointer("/data/data")
                .ok_or_else(|| malformed(Malformed::NoKvData))?,
            username_key.as_str(),
            password_key.as_str(),
        ),
        _ => (
            resp.body.get("data").ok_or_else(|| malformed(Malformed::NoData))?,
            "username",
            "password",
        ),
    };
    let field = |key: &str| -> Result<String, VaultError> {
        match data.get(key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(malformed(Malformed::NotAString { key: key.to_string() })),
            None => Err(malformed(Malformed::MissingKey {
                key: key.to_string(),
                // Key names only: the values are secrets.
                present: data
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default(),
            })),
        }
    };
    let username = field(user_key)?;
    let password = SecretString::from(field(pass_key)?);
    let (lease, valid_for) = lease_of(cfg.kind(), resp);
    Ok(Credential {
        username,
        password,
        lease,
        valid_for,
        fetched_at,
        path,
        generation: 0,
    })
}

/// `sys/leases/renew` of `lease_id` by `increment`: the duration Vault granted (capped at what is
/// left of the lease's max TTL), None when the answer has none.
pub(crate) async fn renew_lease(
    client: &VaultClient,
    token: &SecretString,
    lease_id: &str,
    increment: Duration,
) -> Result<Option<Duration>, VaultError> {
    let body = serde_json::json!({ "lease_id": lease_id, "increment": increment.as_secs() });
    let resp = client.write("renew", "sys/leases/renew", Some(token), &body).await?;
    Ok(resp.u64_field("/lease_duration").map(super::limits::ttl_secs))
}

/// `sys/leases/revoke` of `lease_id`: Vault drops the database role it created.
pub(crate) async fn revoke_lease(client: &VaultClient, token: &SecretString, lease_id: &str) -> Result<(), VaultError> {
    let body = serde_json::json!({ "lease_id": lease_id });
    client
        .write("revoke", "sys/leases/revoke", Some(token), &body)
        .await
        .map(drop)
}

fn lease_of(kind: CredentialKind, resp: &VaultResponse) -> (Option<Lease>, Option<Duration>) {
    match kind {
        CredentialKind::Database => {
            let duration = super::limits::ttl_secs(resp.u64_field("/lease_duration").unwrap_or(0));
            let lease = resp.str_field("/lease_id").filter(|id| !id.is_empty()).map(|id| Lease {
                id: id.to_string(),
                duration,
                renewable: resp.body["renewable"].as_bool().unwrap_or(false),
            });
            (lease, (!duration.is_zero()).then_some(duration))
        }
        // A static role's password is valid until Vault rotates it, `ttl` seconds from now.
        // At the very moment of rotation Vault may say 0: look again a second later.
        CredentialKind::Static => (
            None,
            Some(super::limits::ttl_secs(resp.u64_field("/data/ttl").unwrap_or(0).max(1))),
        ),
        CredentialKind::Kv => (None, None),
    }
}
