//! Fixtures for the credentials unit tests: entry configs, credentials fetched "now" on
//! tokio's clock (so tests can pause it), and a store whose Vault logins fail at once.

use std::sync::Arc;
use std::time::Duration;

use super::{CredentialStore, Held, Schedule};
use crate::config::{Config, CredentialsConfig};
use crate::metrics::Metrics;
use crate::vault::{Auth, Credential, Lease, VaultClient};

pub(crate) fn creds(kind: &str, extra: &str) -> CredentialsConfig {
    let what = if kind == "kv" {
        "path = \"secret/data/a/db\""
    } else {
        "role = \"r\""
    };
    crate::config::test_config("", &format!("kind = \"{kind}\"\n{what}\n{extra}"))
        .databases
        .remove(0)
        .credentials
}

/// A credential fetched now (on tokio's clock, which tests may pause).
pub(crate) fn held(schedule: Schedule, token_generation: u64) -> Arc<Held> {
    Arc::new(Held::new(credential(schedule, None), token_generation, schedule))
}

/// A dynamic credential with lease `id`, fetched now.
pub(crate) fn leased(schedule: Schedule, id: &str) -> Arc<Held> {
    let lease = Lease {
        id: id.into(),
        duration: schedule.cache_for.unwrap_or_default(),
        renewable: true,
    };
    Arc::new(Held::new(credential(schedule, Some(lease)), 1, schedule))
}

/// A dynamic credential with lease `id` and the entry's credential number `generation`.
pub(crate) fn leased_as(schedule: Schedule, id: &str, generation: u64) -> Arc<Held> {
    let lease = Lease {
        id: id.into(),
        duration: schedule.cache_for.unwrap_or_default(),
        renewable: true,
    };
    let mut cred = credential(schedule, Some(lease));
    cred.generation = generation;
    Arc::new(Held::new(cred, 1, schedule))
}

fn credential(schedule: Schedule, lease: Option<Lease>) -> Credential {
    Credential {
        username: "u".into(),
        password: secrecy::SecretString::from("p".to_string()),
        lease,
        valid_for: schedule.cache_for,
        fetched_at: tokio::time::Instant::now().into_std(),
        path: "database/creds/r".into(),
        generation: 2,
    }
}

/// A store with one entry "d", whose Vault logins fail at once: the token file is missing.
pub(crate) fn store(cfg: CredentialsConfig) -> Arc<CredentialStore> {
    let config = Config::parse(
        "[vault]\naddress = \"http://127.0.0.1:1\"\n[vault.auth]\nmethod = \"token\"\n\
         token_file = \"/nonexistent/dbward-test-token\"\n\
         [[databases]]\nname = \"d\"\nlisten = [\"127.0.0.1:1\"]\nupstream = \"h:5432\"\n\
         [databases.credentials]\nkind = \"kv\"\npath = \"secret/data/a/db\"\n",
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let vault = VaultClient::new(&config.vault, metrics.clone()).unwrap();
    let auth = Auth::new(vault.clone(), config.vault.auth.clone());
    CredentialStore::new(vault, auth, [("d".to_string(), cfg)], Duration::from_secs(2), metrics)
}
