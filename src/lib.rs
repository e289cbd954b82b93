//! dbward: a local Postgres endpoint that logs in to Vault/OpenBao with the workload's identity,
//! fetches short-lived database credentials and opens the upstream connection itself.
//!
//! The binary (`main.rs`) only parses the command line; everything else lives here so that tests
//! can drive it. State is passed down explicitly: the daemon's parts are built in [`app::App`],
//! and each listener, session and the admin server gets only the parts it uses; there are no
//! global statics. Modules are public only where the binary, the tests or the fuzz targets use
//! them, so that the compiler reports what nothing uses.

mod admin;
mod admin_limits;
pub mod app;
mod backoff;
pub mod check;
mod clock;
pub mod config;
mod credentials;
mod entry;
mod listener;
pub mod metrics;
mod peer;
pub mod pg;
pub mod policy;
mod pool;
mod session;
mod shutdown;
pub mod systemd;
mod tls_files;
pub mod upstream;
pub mod vault;
