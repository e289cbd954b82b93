//! Vault/OpenBao over HTTP: the client (hyper + rustls), its errors, and the secret kinds.
//! Every failure keeps what Vault said (status and message) and which path it was about, because
//! "permission denied" without the path is the 3 AM page this project exists to prevent.

pub mod auth;
pub mod client;
pub(crate) mod cluster;
pub mod error;
#[cfg(test)]
mod failover_tests;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod ha;
pub mod jwt;
pub mod limits;
pub(crate) mod ratelimit;
mod retired;
pub mod secrets;

pub(crate) use auth::{Auth, VaultToken};
pub(crate) use client::VaultClient;
pub(crate) use error::VaultError;
pub(crate) use secrets::{Credential, Lease};
