//! A narrow public door for the `vault_response` fuzz target: one Vault answer (status and
//! body bytes) goes through the same parsing dbward applies to login, lookup-self, renew-self and
//! secret reads, and then through the token and lease time computations. Nothing here is used by
//! the daemon itself; it exists so that the parsers can stay `pub(crate)`.

use std::time::{Duration, Instant};

use super::client::{parse_body, VaultResponse};
use super::{auth, limits, secrets};
use crate::config::{CredentialSource, CredentialsConfig};

/// Feeds one answer to every parser. Panics only when dbward would: that is the bug to find.
pub fn vault_response(status: u16, body: &[u8]) {
    let parsed = match parse_body("read", "database/creds/payments", status, body) {
        Ok(v) => v,
        Err(e) => {
            // Error texts are built from Vault's messages: building them must not panic either.
            let _ = e.to_string();
            return;
        }
    };
    let resp = VaultResponse {
        status,
        body: parsed,
        date: None,
    };
    let now = Instant::now();

    if let Ok(token) = auth::token_from_auth(&resp.body, "auth/jwt/login") {
        let _ = token.expires_at();
        let _ = token.remaining(now);
        let _ = token.usable(now);
        let _ = token.usable(limits::later(now, limits::MAX_TTL));
        let _ = format!("{token:?}");
        if let Some(ttl) = token.ttl {
            assert!(ttl <= limits::MAX_TTL);
        }
    }

    let lookup = auth::lookup_from(&resp);
    for d in [lookup.ttl, lookup.period, lookup.explicit_max_ttl]
        .into_iter()
        .flatten()
    {
        assert!(d <= limits::MAX_TTL);
    }

    let renewal = auth::renewal_from(&resp);
    if let Some(granted) = renewal.granted {
        assert!(granted <= limits::MAX_TTL);
        let _ = granted.saturating_add(Duration::from_secs(1)) < granted;
    }

    for (generation, source) in sources().into_iter().enumerate() {
        let cfg = credentials_config(source);
        let Ok(cred) = secrets::credential_from(&cfg, cfg.vault_path(), now, &resp) else {
            continue;
        };
        let _ = cred.expires_at();
        let _ = format!("{cred:?}");
        crate::credentials::fuzzing::run_timings(&cfg, cred, generation as u64 + 1, 0.95);
    }
}

fn sources() -> [CredentialSource; 3] {
    [
        CredentialSource::Database {
            mount: "database".into(),
            role: "payments".into(),
        },
        CredentialSource::Static {
            mount: "database".into(),
            role: "payments-static".into(),
        },
        CredentialSource::Kv {
            path: "secret/data/apps/payments/db".into(),
            username_key: "username".into(),
            password_key: "password".into(),
        },
    ]
}

fn credentials_config(source: CredentialSource) -> CredentialsConfig {
    CredentialsConfig {
        source,
        refresh_interval: Duration::from_secs(300),
        expiry_margin: Duration::from_secs(5),
        refresh_fraction: 0.66,
        renew_in_use: true,
        revoke_unused: true,
        retire_margin: None,
        mint_budget: 3,
    }
}

#[cfg(test)]
mod tests {
    /// The checked-in seeds include the answers that used to panic (a `lease_duration` or `ttl`
    /// of u64::MAX); the fuzz target starts from them in CI, this runs them with the unit tests.
    #[test]
    fn seeds_run_without_panicking() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/vault_response");
        let mut ran = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let (status, body) = match &data[..] {
                [0, 0, rest @ ..] => (200, rest),
                [_, _, rest @ ..] => (403, rest),
                other => (200, other),
            };
            super::vault_response(status, body);
            ran += 1;
        }
        assert!(ran >= 5, "seeds missing from {dir}");
    }
}
