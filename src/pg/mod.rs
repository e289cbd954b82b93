//! The client-facing side of the Postgres wire protocol that dbward itself speaks: startup
//! packets, error responses, and cancel keys. After authentication dbward does not parse
//! messages; the session relays bytes.

pub mod cancel;
pub mod error;
pub mod startup;

pub use error::PgError;
