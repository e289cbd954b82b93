//! Errors dbward sends to clients as Postgres ErrorResponse messages. Each one carries a SQLSTATE
//! a driver can act on and a message that says what failed and what to check.

use bytes::{BufMut, BytesMut};
use std::fmt;

/// SQLSTATE codes dbward uses for its own failures.
pub(crate) mod sqlstate {
    /// Vault or the upstream could not be reached / did not answer.
    pub(crate) const CONNECTION_FAILURE: &str = "08001";
    /// The upstream rejected the connection for a reason other than the password.
    pub(crate) const CONNECTION_REJECTED: &str = "08004";
    /// Malformed or unexpected protocol input.
    pub(crate) const PROTOCOL_VIOLATION: &str = "08P01";
    /// Vault refused the credential read (policy): the client is not authorized.
    pub(crate) const INVALID_AUTHORIZATION: &str = "28000";
    /// The upstream refused the password.
    pub(crate) const INVALID_PASSWORD: &str = "28P01";
    /// Too many client connections for this database entry.
    pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
    /// dbward is shutting down.
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
    /// A startup parameter with a value Postgres would refuse (`replication=maybe`).
    pub(crate) const INVALID_PARAMETER_VALUE: &str = "22023";
    /// Feature the client asked for that dbward does not offer.
    pub(crate) const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// An error to report to a client. Never put a secret in any field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Sent in the protocol-2 format (to a client whose StartupMessage asked for 2.x or older).
    pub protocol2: bool,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "FATAL",
            code,
            message: message.into(),
            detail: None,
            hint: None,
            protocol2: false,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes the ErrorResponse ('E') message.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(b'E');
        let len_at = buf.len();
        buf.put_i32(0);
        let mut field = |tag: u8, value: &str| {
            buf.put_u8(tag);
            // A NUL inside a field would end it early and desynchronize the client.
            buf.put_slice(value.replace('\0', " ").as_bytes());
            buf.put_u8(0);
        };
        field(b'S', self.severity);
        field(b'V', self.severity);
        field(b'C', self.code);
        field(b'M', &self.message);
        if let Some(d) = &self.detail {
            field(b'D', d);
        }
        if let Some(h) = &self.hint {
            field(b'H', h);
        }
        buf.put_u8(0);
        let len = (buf.len() - len_at) as i32;
        buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// For a client that asked for protocol 2.x or older: what Postgres sends such a client.
    pub fn in_protocol2(mut self) -> Self {
        self.protocol2 = true;
        self
    }

    /// The error as the client reads it: an ErrorResponse, or for a protocol-2 client 'E' and a
    /// NUL-terminated "SEVERITY:  message\n" (no length word, no fields), as Postgres sends it.
    pub fn to_bytes(&self) -> BytesMut {
        let mut b = BytesMut::new();
        if self.protocol2 {
            b.put_u8(b'E');
            let text = format!("{}:  {}\n", self.severity, self.message);
            b.put_slice(text.replace('\0', " ").as_bytes());
            b.put_u8(0);
        } else {
            self.encode(&mut b);
        }
        b
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {}

#[cfg(test)]
mod tests {
    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn encoded_error_parses_as_postgres_error_response() {
        let e = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "Vault denied read of secret/data/x (403 permission denied)",
        )
        .with_hint("check the policy");
        let mut buf = e.to_bytes();
        match Message::parse(&mut buf).unwrap().unwrap() {
            Message::ErrorResponse(body) => {
                let fields: Vec<(u8, String)> = body
                    .fields()
                    .map(|f| Ok((f.type_(), String::from_utf8_lossy(f.value_bytes()).into_owned())))
                    .collect()
                    .unwrap();
                assert!(fields.contains(&(b'C', "28000".into())));
                assert!(fields.contains(&(b'S', "FATAL".into())));
                assert!(fields.contains(&(b'H', "check the policy".into())));
            }
            _ => panic!("not an ErrorResponse"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn protocol2_errors_are_text_as_postgres_sends_them() {
        let e = PgError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, "unsupported frontend protocol 2.0").in_protocol2();
        assert_eq!(&e.to_bytes()[..], b"EFATAL:  unsupported frontend protocol 2.0\n\0");
    }
}
