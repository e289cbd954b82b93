//! dbward: a local Postgres endpoint that logs in to Vault/OpenBao with the workload's identity,
//! fetches short-lived database credentials and opens the upstream connection itself.
//!
//! The binary (`main.rs`) only parses the command line; everything else lives here so that tests
//! can drive it. State is passed down explicitly: the daemon's parts are built in [`app::App`], and each
//! listener, session and the admin server gets only the parts it uses; there are no global statics.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod check;
pub mod clock;
pub mod config;
pub mod credentials;
mod entry;
pub mod listener;
pub mod metrics;
pub mod pg;
pub mod policy;
pub mod session;
pub mod shutdown;
pub mod systemd;
pub(crate) mod tls_files;
pub mod upstream;
pub mod vault;
