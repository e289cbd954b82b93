//! `vault.state_file`: the Vault token and every entry's current dynamic credential kept across
//! restarts, so a crash loop (`kill -9`, OOM, a bad deploy restarting every few seconds) does
//! not cost a login and a new Postgres role per start. The file holds secrets: it is written
//! atomically (a temporary file with mode 0600, fsync, rename) and belongs on tmpfs
//! (`/run/dbward/state` in the systemd unit, an `emptyDir` with `medium: Memory` in Kubernetes)
//! so it never reaches persistent disk.
//!
//! At start ([`CredentialStore::restore_state`]) nothing in the file is trusted: the token is
//! reused only if `auth/token/lookup-self` accepts it, a credential only if `sys/leases/lookup`
//! says its lease is alive (and its entry still reads the same path). Anything else is dropped,
//! and its lease revoked when Vault lets us. While running ([`CredentialStore::keep_state`]) the
//! file is rewritten after each new login or credential.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::CredentialStore;
use crate::config::CredentialKind;
use crate::shutdown::Shutdown;
use crate::vault::{self, Credential, Lease};

const VERSION: u32 = 1;
/// Changes are written together: a login followed by credential reads is one write.
const SETTLE: Duration = Duration::from_millis(200);

/// The file's content. No Debug: it holds the token and passwords; wiped on drop.
#[derive(Serialize, Deserialize, Default)]
struct Saved {
    version: u32,
    token: Option<String>,
    credentials: Vec<SavedCredential>,
}

#[derive(Serialize, Deserialize)]
struct SavedCredential {
    database: String,
    path: String,
    lease_id: String,
    username: String,
    password: String,
    renewable: bool,
}

impl Drop for Saved {
    fn drop(&mut self) {
        if let Some(t) = &mut self.token {
            t.zeroize();
        }
        for c in &mut self.credentials {
            c.password.zeroize();
            c.lease_id.zeroize();
        }
    }
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("vault.state_file {}: cannot read: {source}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("vault.state_file {}: not a dbward state file ({problem})", .path.display())]
    Malformed { path: PathBuf, problem: String },
    #[error("vault.state_file {}: cannot write: {source}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

fn read(path: &Path) -> Result<Option<Saved>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => zeroize::Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // serde_json's error texts name positions, never the content.
    let saved: Saved = serde_json::from_slice(&text).map_err(|e| StateError::Malformed {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    if saved.version != VERSION {
        return Err(StateError::Malformed {
            path: path.to_path_buf(),
            problem: format!("version {} (this dbward writes {VERSION})", saved.version),
        });
    }
    Ok(Some(saved))
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    // An older file of that name may have had another mode.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl CredentialStore {
    /// What the file should hold now: the current token and each entry's current leased
    /// credential.
    async fn saved_state(&self) -> Saved {
        let mut saved = Saved {
            version: VERSION,
            token: self.auth.current().map(|t| t.token.expose_secret().to_string()),
            credentials: Vec::new(),
        };
        let names: Vec<String> = self.entries.read().unwrap().keys().cloned().collect();
        for database in names {
            let Some(held) = self.cache.get(&database).await else {
                continue;
            };
            let Some(lease) = &held.cred.lease else { continue };
            saved.credentials.push(SavedCredential {
                database,
                path: held.cred.path.clone(),
                lease_id: lease.id.clone(),
                username: held.cred.username.clone(),
                password: held.cred.password.expose_secret().to_string(),
                renewable: lease.renewable,
            });
        }
        saved
    }

    /// Rewrites the state file after every new login or credential, until `stop`.
    pub(crate) async fn keep_state(self: Arc<Self>, path: PathBuf, stop: Shutdown) {
        loop {
            tokio::select! {
                _ = self.state_changed.notified() => {}
                _ = stop.stopping() => return,
            }
            tokio::time::sleep(SETTLE).await;
            let saved = self.saved_state().await;
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&saved).expect("the state serializes"));
            let path = path.clone();
            match tokio::task::spawn_blocking(move || write_atomically(&path, &bytes)).await {
                Ok(Ok(())) => tracing::debug!(credentials = saved.credentials.len(), "state file written"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the state file could not be written; a restart will log in and fetch anew")
                }
                Err(e) => tracing::warn!(error = %e, "writing the state file failed"),
            }
        }
    }

    /// Takes over what the state file holds and Vault still accepts (see the module docs).
    /// Never fails: whatever cannot be reused is fetched anew by the lifecycle.
    pub(crate) async fn restore_state(&self, path: &Path) {
        let saved = match read(path) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the state file; dbward logs in and fetches anew");
                let _ = std::fs::remove_file(path);
                return;
            }
        };
        let reused_token = match &saved.token {
            Some(t) => {
                let secret = SecretString::from(t.clone());
                match vault::auth::lookup_self(&self.vault, &secret).await {
                    Ok(found) => {
                        let tok = self.auth.adopt(secret, &found);
                        tracing::info!(generation = tok.generation, ttl = ?tok.ttl, "reusing the Vault token from the state file");
                        self.note_token(&tok);
                        Some(tok)
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "the Vault token in the state file is not accepted any more; logging in anew");
                        None
                    }
                }
            }
            None => None,
        };
        let (token, token_generation) = match &reused_token {
            Some(t) => (t.clone(), t.generation),
            None => match self.auth.token().await {
                // Leases of the old token die with it: 0 marks them as a previous login's.
                Ok(t) => (t, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot log in to check the credentials in the state file; they are left to expire");
                    return;
                }
            },
        };
        for c in &saved.credentials {
            let entry = self
                .entry(&c.database)
                .filter(|e| e.cfg.kind() == CredentialKind::Database && e.cfg.vault_path() == c.path);
            let body = serde_json::json!({ "lease_id": c.lease_id });
            let alive = match &entry {
                Some(_) => match self
                    .vault
                    .write("lookup", "sys/leases/lookup", Some(&token.token), &body)
                    .await
                {
                    Ok(r) => r.u64_field("/data/ttl").map(Duration::from_secs),
                    Err(e) => {
                        tracing::info!(database = %c.database, username = %c.username, error = %e, "a credential in the state file is not alive any more");
                        None
                    }
                },
                None => None,
            };
            let margin = entry.as_ref().map_or(Duration::ZERO, |e| e.cfg.expiry_margin);
            match (entry, alive) {
                (Some(entry), Some(ttl)) if ttl > margin + Duration::from_secs(1) => {
                    let cred = Credential {
                        username: c.username.clone(),
                        password: SecretString::from(c.password.clone()),
                        lease: Some(Lease {
                            id: c.lease_id.clone(),
                            duration: ttl,
                            renewable: c.renewable,
                        }),
                        valid_for: Some(ttl),
                        fetched_at: std::time::Instant::now(),
                        path: c.path.clone(),
                        generation: 0,
                    };
                    let held = self.adopt_credential(&c.database, &entry, cred, token_generation);
                    tracing::info!(database = %c.database, username = %c.username, valid_for = ?ttl, "reusing a credential from the state file");
                    self.cache.insert(c.database.clone(), held).await;
                }
                _ => {
                    // Dropped: revoked if Vault lets this token, else left to expire.
                    let _ = vault::secrets::revoke_lease(&self.vault, &token.token, &c.lease_id).await;
                }
            }
        }
        self.state_changed.notify_one();
    }
}
