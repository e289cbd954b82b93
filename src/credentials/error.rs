//! Why a database entry has no credential ([`CredentialError`]), and what a client is told about
//! it. The conversion to a Postgres ErrorResponse lives here for now because it needs the whole
//! error (path, policies, login); it belongs with the client wire code once errors are typed.

use crate::pg::error::{sqlstate, PgError};
use crate::vault::VaultError;

/// Why no credential could be had for a database entry.
#[derive(Debug, Clone, thiserror::Error)]
#[error("database entry {database:?}: {error}")]
pub(crate) struct CredentialError {
    pub(crate) database: String,
    /// The Vault path the entry reads.
    pub(crate) path: String,
    pub(crate) error: VaultError,
    /// The policies of the token that was denied, when Vault denied.
    pub(crate) policies: Option<String>,
    /// Human description of how dbward logs in ("jwt role payments-service at auth/jwt").
    pub(crate) login: String,
}

impl CredentialError {
    /// What the client is told: what failed, and what to check.
    pub(crate) fn to_pg_error(&self) -> PgError {
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
