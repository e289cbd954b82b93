//! What a client is told, as an ErrorResponse, when its session cannot start for want of a
//! credential. The decision is made on the error's variant, never on its text.

use crate::credentials::CredentialError;
use crate::pg::error::{sqlstate, PgError};

/// What a client is told when its entry has no credential: what failed, what to check, and a
/// SQLSTATE decided by the Vault error's variant (denied read or failed login: 28000; Vault
/// unavailable: 08001).
pub(super) fn credential_refusal(c: &CredentialError) -> PgError {
    let e = &c.error;
    let is_login = e.is_login();
    if e.is_denied() && !is_login {
        let policies = c.policies.as_deref().unwrap_or("unknown");
        return PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("dbward: {e}"))
            .with_detail(format!(
                "database entry {:?} reads {} as {}; the token's policies are: {policies}",
                c.database, c.path, c.login
            ))
            .with_hint(format!(
                "grant the \"read\" capability on {} in one of those policies (`dbward policy` prints what this config needs), or fix the path in the config",
                c.path
            ));
    }
    if is_login {
        return PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("dbward: {e}"))
            .with_detail(format!(
                "database entry {:?} could not log in to Vault as {}",
                c.database, c.login
            ))
            .with_hint("check the auth role's bound claims and the workload token file");
    }
    if let Some(left) = e.rate_limited_for() {
        return PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "dbward: Vault is rate-limiting dbward; retry in {} s",
                crate::vault::error::retry_secs(left)
            ),
        )
        .with_detail(format!(
            "database entry {:?} has no credential for {} yet, and Vault answered 429 (its rate-limit quota is spent): {e}",
            c.database, c.path
        ))
        .with_hint("dbward retries by itself once the limit allows; check the Vault rate-limit quotas (sys/quotas/rate-limit) if this persists");
    }
    if e.is_unavailable() {
        return PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("dbward: {e}"))
            .with_detail(format!(
                "database entry {:?} has no valid cached credential for {} and Vault cannot be asked",
                c.database, c.path
            ))
            .with_hint("check that Vault is up, unsealed and reachable from this host");
    }
    let code = match e.status() {
        Some(400..=499) => sqlstate::INVALID_AUTHORIZATION,
        _ => sqlstate::CONNECTION_FAILURE,
    };
    PgError::fatal(code, format!("dbward: {e}")).with_detail(format!(
        "database entry {:?} reads {} as {}",
        c.database, c.path, c.login
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::error::LocalError;
    use crate::vault::VaultError;

    fn refused(error: VaultError) -> PgError {
        credential_refusal(&CredentialError {
            database: "payments".into(),
            path: "database/creds/payments".into(),
            error,
            policies: Some("default, payments".into()),
            login: "jwt role payments-service at auth/jwt".into(),
        })
    }

    fn status(op: &'static str, status: u16) -> VaultError {
        VaultError::Status {
            op,
            path: "database/creds/payments".into(),
            status,
            errors: vec!["permission denied".into()],
        }
    }

    #[test]
    fn the_sqlstate_and_the_hint_follow_the_vault_error() {
        let denied = refused(status("read", 403));
        assert_eq!(denied.code, "28000");
        let detail = denied.detail.unwrap();
        assert!(
            detail.contains("reads database/creds/payments") && detail.contains("default, payments"),
            "{detail}"
        );
        assert!(denied
            .hint
            .unwrap()
            .contains("\"read\" capability on database/creds/payments"));

        let login = refused(status("login", 403));
        assert_eq!(login.code, "28000");
        assert!(login
            .detail
            .unwrap()
            .contains("could not log in to Vault as jwt role payments-service"));

        let local = refused(
            LocalError::EntryRemoved {
                database: "payments".into(),
            }
            .into(),
        );
        assert_eq!(local.code, "28000", "a problem on this host is a login problem");

        let down = refused(VaultError::Timeout {
            op: "read",
            path: "database/creds/payments".into(),
            address: "http://127.0.0.1:8200".into(),
            after: std::time::Duration::from_secs(10),
        });
        assert_eq!(down.code, "08001");
        assert!(down.hint.unwrap().contains("Vault is up, unsealed and reachable"));
        assert_eq!(refused(status("read", 503)).code, "08001", "sealed or standby Vault");

        assert_eq!(refused(status("read", 404)).code, "28000");
        assert_eq!(refused(status("read", 500)).code, "08001");

        let limited = refused(VaultError::RateLimited {
            op: "read",
            path: "database/creds/payments".into(),
            retry_in: std::time::Duration::from_millis(2500),
        });
        assert_eq!(limited.code, "08001");
        assert_eq!(limited.message, "dbward: Vault is rate-limiting dbward; retry in 3 s");
    }
}
