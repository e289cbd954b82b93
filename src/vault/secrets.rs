//! The three secret kinds a database entry can use, and the credential they yield: dynamic
//! (`<mount>/creds/<role>`, with a lease), static (`<mount>/static-creds/<role>`, with the time
//! to the next rotation) and KV v2 (`<mount>/data/<path>`, no lease).

use std::time::{Duration, Instant};

use secrecy::SecretString;

use super::client::{VaultClient, VaultError, VaultResponse};
use crate::config::{CredentialKind, CredentialsConfig};

/// A Vault lease on a dynamic credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    pub duration: Duration,
    pub renewable: bool,
}

/// A database login from Vault. Debug shows the user and lease, never the password.
pub struct Credential {
    pub username: String,
    pub password: SecretString,
    pub lease: Option<Lease>,
    /// How long Vault says it stays valid (lease duration, or a static role's time to rotation);
    /// None for KV secrets, which carry no lease.
    pub valid_for: Option<Duration>,
    pub fetched_at: Instant,
    /// The Vault path it came from, exactly as a policy names it.
    pub path: String,
    /// Numbered per database entry: 1 for the first credential, 2 after the first refresh...
    pub generation: u64,
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
    pub fn expires_at(&self) -> Option<Instant> {
        self.valid_for.map(|d| self.fetched_at + d)
    }
}

/// Reads one credential. `token` must be a usable Vault token.
pub async fn fetch(
    client: &VaultClient,
    token: &SecretString,
    cfg: &CredentialsConfig,
) -> Result<Credential, VaultError> {
    let path = cfg.vault_path();
    let fetched_at = Instant::now();
    let resp = client.read(token, &path).await?;
    let malformed = |detail: String| VaultError::Malformed {
        op: "read",
        path: path.clone(),
        detail,
    };
    let (data, user_key, pass_key) = match cfg.kind {
        CredentialKind::Kv => (
            resp.body.pointer("/data/data").ok_or_else(|| {
                malformed(
                    "no data.data: is this a KV v2 path, and does the secret have a current version (not deleted)?"
                        .into(),
                )
            })?,
            cfg.username_key.as_str(),
            cfg.password_key.as_str(),
        ),
        _ => (
            resp.body
                .get("data")
                .ok_or_else(|| malformed("no data in the answer".into()))?,
            "username",
            "password",
        ),
    };
    let field = |key: &str| -> Result<String, VaultError> {
        match data.get(key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(malformed(format!("key {key:?} is not a non-empty string"))),
            None => {
                // Key names only: the values are secrets.
                let keys: Vec<&str> = data
                    .as_object()
                    .map(|o| o.keys().map(|k| k.as_str()).collect())
                    .unwrap_or_default();
                Err(malformed(format!(
                    "the secret has no key {key:?} (keys present: {})",
                    keys.join(", ")
                )))
            }
        }
    };
    let username = field(user_key)?;
    let password = SecretString::from(field(pass_key)?);
    let (lease, valid_for) = lease_of(cfg.kind, &resp);
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

fn lease_of(kind: CredentialKind, resp: &VaultResponse) -> (Option<Lease>, Option<Duration>) {
    match kind {
        CredentialKind::Database => {
            let duration = Duration::from_secs(resp.u64_field("/lease_duration").unwrap_or(0));
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
            Some(Duration::from_secs(resp.u64_field("/data/ttl").unwrap_or(0).max(1))),
        ),
        CredentialKind::Kv => (None, None),
    }
}
