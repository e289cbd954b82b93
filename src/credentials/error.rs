//! Why a database entry has no credential ([`CredentialError`]): the Vault error with what a
//! person needs beside it (the path, the token's policies, how dbward logs in). What a client is
//! told about it is the session's business (`session::refusal`).

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
