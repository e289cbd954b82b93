//! The client-facing side of the Postgres wire protocol that dbward itself speaks: startup
//! packets, TLS towards clients, error responses, and cancel keys. After authentication dbward
//! does not parse messages; the session relays bytes, only following where messages end.

pub mod cancel;
pub mod error;
pub mod frame;
pub mod startup;
pub(crate) mod tls;

pub use error::PgError;
