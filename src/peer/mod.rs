//! Who is on the other end of a client connection, and whether that local caller may use the
//! entry: the uid behind a Unix socket ([`unix`], `SO_PEERCRED`) or behind a loopback TCP
//! connection ([`tcp`]: the owner of the peer's socket, asked of the kernel), the caller's groups
//! from the user database ([`account`]), and the entry's `allowed_users`/`allowed_groups`
//! decision ([`admission`]). Without an allowlist nothing is looked up.
//!
//! The lookup runs when the connection is accepted, while the peer's socket surely exists; the
//! refusal is sent later, after the startup packet, where a Postgres client reads errors.

mod account;
mod admission;
pub(crate) mod tcp;
mod unix;

use std::io;
use std::net::SocketAddr;

pub(crate) use admission::{check, Admission, Refused};

/// What an entry without an allowlist allows, in the start-up warning and `dbward check`.
pub(crate) const OPEN_ENTRY_RISK: &str = "any local user can connect as the Vault-issued role";

/// Warns once per entry that admits every local caller.
pub(crate) fn warn_open_entries(config: &crate::config::Config) {
    for db in config.databases.iter().filter(|d| d.allowed.is_none()) {
        tracing::warn!(
            database = %db.name,
            "database entry has no allowed_users or allowed_groups: {OPEN_ENTRY_RISK}; list who may connect"
        );
    }
}

/// Why the caller's uid could not be found. Any of these refuses a caller of an entry with an
/// allowlist: an unknown caller is not an allowed one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("SO_PEERCRED on the Unix socket failed: {0}")]
    PeerCred(#[source] io::Error),
    #[error("the TCP connection's addresses are unknown: {0}")]
    Addresses(#[source] io::Error),
    #[error("the caller's address {peer} is not on this host; allowed_users/allowed_groups can only tell local callers apart")]
    NotLocal { peer: SocketAddr },
    #[error("no local socket {peer} -> {local} was found (sock_diag: {diag}; /proc/net: {proc})")]
    NotFound {
        peer: SocketAddr,
        local: SocketAddr,
        diag: String,
        proc: String,
    },
}
