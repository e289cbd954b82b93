//! What kind of server an authenticated upstream connection reached (primary or standby,
//! read-only or not, its version), and whether that meets the entry's `target_session_attrs`,
//! decided as libpq 14+ decides it: from the `default_transaction_read_only` and
//! `in_hot_standby` ParameterStatus messages of the greeting, or, from servers that do not
//! report them (before 14), with `SHOW transaction_read_only` /
//! `SELECT pg_catalog.pg_is_in_recovery()` on the connection before the client gets it.

use std::fmt;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{io_error, UpstreamError, UpstreamStream};
use crate::config::TargetSessionAttrs;

/// A server's answer of at most this many bytes to one probe query: a few short messages.
const PROBE_ANSWER_LIMIT: usize = 64 * 1024;

/// What a server said about itself; None: not reported (yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerRole {
    /// `server_version`, as reported.
    pub version: Option<String>,
    /// `default_transaction_read_only` (14+), or `transaction_read_only` from a query.
    pub read_only: Option<bool>,
    /// `in_hot_standby` (14+), or `pg_is_in_recovery()` from a query.
    pub hot_standby: Option<bool>,
}

impl ServerRole {
    /// Reads the ParameterStatus messages of a greeting (raw server messages, see
    /// [`super::Connected::greeting`]).
    pub fn from_greeting(greeting: &[u8]) -> ServerRole {
        let mut role = ServerRole::default();
        let mut buf = BytesMut::from(greeting);
        while let Ok(Some(msg)) = backend::Message::parse(&mut buf) {
            if let backend::Message::ParameterStatus(p) = msg {
                let (Ok(name), Ok(value)) = (p.name(), p.value()) else {
                    continue;
                };
                match name {
                    "server_version" => role.version = Some(value.to_string()),
                    "default_transaction_read_only" => role.read_only = Some(value == "on"),
                    "in_hot_standby" => role.hot_standby = Some(value == "on"),
                    _ => {}
                }
            }
        }
        role
    }

    /// Major version from `server_version` ("15.4 (Debian...)" is 15, "9.6.2" is 9).
    fn major(&self) -> Option<u32> {
        let v = self.version.as_deref()?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// Whether the server is read-only as libpq counts it: read-only by default or a standby.
    fn is_read_only(&self) -> bool {
        self.read_only == Some(true) || self.hot_standby == Some(true)
    }

    /// "primary" or "standby", when known.
    pub fn kind(&self) -> Option<&'static str> {
        self.hot_standby.map(|s| if s { "standby" } else { "primary" })
    }
}

impl fmt::Display for ServerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind().unwrap_or("unknown role"))?;
        if self.read_only == Some(true) && self.hot_standby != Some(true) {
            f.write_str(", read-only")?;
        }
        if let Some(v) = &self.version {
            write!(f, ", version {v}")?;
        }
        Ok(())
    }
}

/// Why a host did not meet target_session_attrs: libpq's reasons, with the role in brackets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("read-only ({})", if *.standby { "standby" } else { "default_transaction_read_only = on" })]
    ReadOnly { standby: bool },
    #[error("not read-only (primary)")]
    NotReadOnly,
    #[error("in hot standby (standby)")]
    HotStandby,
    #[error("not in hot standby (primary)")]
    NotHotStandby,
}

/// Which probe a check still needs because the server did not report the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    ReadOnly,
    Recovery,
}

/// Whether `role` meets `attrs`. `prefer-standby` is checked as `standby` here; the second pass
/// over the list (any host) is the caller's.
pub fn meets(attrs: TargetSessionAttrs, role: &ServerRole) -> Result<(), Mismatch> {
    match attrs {
        TargetSessionAttrs::Any => Ok(()),
        TargetSessionAttrs::ReadWrite if role.is_read_only() => Err(Mismatch::ReadOnly {
            standby: role.hot_standby == Some(true),
        }),
        TargetSessionAttrs::ReadOnly if !role.is_read_only() => Err(Mismatch::NotReadOnly),
        TargetSessionAttrs::ReadWrite | TargetSessionAttrs::ReadOnly => Ok(()),
        TargetSessionAttrs::Primary if role.hot_standby == Some(true) => Err(Mismatch::HotStandby),
        TargetSessionAttrs::Primary => Ok(()),
        TargetSessionAttrs::Standby | TargetSessionAttrs::PreferStandby if role.hot_standby != Some(true) => {
            Err(Mismatch::NotHotStandby)
        }
        TargetSessionAttrs::Standby | TargetSessionAttrs::PreferStandby => Ok(()),
    }
}

/// What `attrs` needs to know that the greeting did not say, as libpq decides it.
fn probe_needed(attrs: TargetSessionAttrs, role: &ServerRole) -> Option<Probe> {
    match attrs {
        TargetSessionAttrs::Any => None,
        TargetSessionAttrs::ReadWrite | TargetSessionAttrs::ReadOnly => {
            (role.read_only.is_none() || role.hot_standby.is_none()).then_some(Probe::ReadOnly)
        }
        // Before 9.0 there were no hot standbys.
        _ if role.major().is_some_and(|m| m < 9) => None,
        _ => role.hot_standby.is_none().then_some(Probe::Recovery),
    }
}

/// Completes `role` for `attrs` (queries on servers before 14), then checks it. The outer
/// error is a connection failure, the inner one a host of the wrong kind.
pub(super) async fn check(
    attrs: TargetSessionAttrs,
    role: &mut ServerRole,
    stream: &mut UpstreamStream,
    addr: &str,
) -> Result<Result<(), Mismatch>, UpstreamError> {
    match probe_needed(attrs, role) {
        Some(Probe::ReadOnly) => {
            let on = probe_bool(stream, "SHOW transaction_read_only", addr).await?;
            // libpq reads only this one answer on older servers.
            role.read_only = Some(on);
            role.hot_standby.get_or_insert(false);
        }
        Some(Probe::Recovery) => {
            role.hot_standby = Some(probe_bool(stream, "SELECT pg_catalog.pg_is_in_recovery()", addr).await?);
        }
        None => {
            if role.hot_standby.is_none() && role.major().is_some_and(|m| m < 9) {
                role.hot_standby = Some(false);
            }
        }
    }
    Ok(meets(attrs, role))
}

/// Fills in everything `role` lacks (queries on servers before 14), for reports that show the
/// whole role rather than check one target.
pub(super) async fn complete(
    role: &mut ServerRole,
    stream: &mut UpstreamStream,
    addr: &str,
) -> Result<(), UpstreamError> {
    if probe_needed(TargetSessionAttrs::Standby, role).is_some() {
        role.hot_standby = Some(probe_bool(stream, "SELECT pg_catalog.pg_is_in_recovery()", addr).await?);
    }
    if role.read_only.is_none() {
        role.read_only = Some(probe_bool(stream, "SHOW transaction_read_only", addr).await?);
    }
    role.hot_standby.get_or_insert(false);
    Ok(())
}

/// Runs a one-row, one-column query whose answer is `on`/`off` or `t`/`f`, up to ReadyForQuery.
pub(super) async fn probe_bool(stream: &mut UpstreamStream, sql: &str, addr: &str) -> Result<bool, UpstreamError> {
    let during = "checking target_session_attrs";
    let protocol = |m: String| UpstreamError::Protocol(format!("upstream {addr}: {m} while {during}"));
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).map_err(|e| io_error(addr, during, e))?;
    stream.write_all(&out).await.map_err(|e| io_error(addr, during, e))?;
    stream.flush().await.map_err(|e| io_error(addr, during, e))?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut answer: Option<bool> = None;
    let mut failure: Option<String> = None;
    loop {
        while let Some(msg) = backend::Message::parse(&mut buf).map_err(|e| protocol(e.to_string()))? {
            match msg {
                backend::Message::DataRow(row) => {
                    let mut ranges = row.ranges();
                    if let Ok(Some(Some(r))) = ranges.next() {
                        let v = &row.buffer()[r];
                        answer = Some(matches!(v, b"on" | b"t" | b"true"));
                    }
                }
                backend::Message::ErrorResponse(body) => {
                    let mut fields = body.fields();
                    let mut text = String::new();
                    while let Ok(Some(f)) = fields.next() {
                        if f.type_() == b'M' {
                            text = String::from_utf8_lossy(f.value_bytes()).into_owned();
                        }
                    }
                    failure = Some(text);
                }
                backend::Message::ReadyForQuery(_) => {
                    return match (answer, failure) {
                        (_, Some(text)) => Err(protocol(format!("{sql:?} failed: {text}"))),
                        (Some(v), None) => Ok(v),
                        (None, None) => Err(protocol(format!("{sql:?} returned no row"))),
                    };
                }
                _ => {}
            }
        }
        if buf.len() > PROBE_ANSWER_LIMIT {
            return Err(protocol(format!(
                "the answer to {sql:?} exceeds {PROBE_ANSWER_LIMIT} bytes"
            )));
        }
        let n = stream.read_buf(&mut buf).await.map_err(|e| io_error(addr, during, e))?;
        if n == 0 {
            return Err(io_error(addr, during, std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(version: &str, read_only: Option<bool>, hot_standby: Option<bool>) -> ServerRole {
        ServerRole {
            version: Some(version.into()),
            read_only,
            hot_standby,
        }
    }

    #[test]
    fn libpq_decisions() {
        use TargetSessionAttrs::*;
        let primary = role("15.4", Some(false), Some(false));
        let standby = role("15.4", Some(false), Some(true));
        let ro_primary = role("15.4", Some(true), Some(false));
        assert_eq!(meets(ReadWrite, &primary), Ok(()));
        assert_eq!(meets(ReadWrite, &standby), Err(Mismatch::ReadOnly { standby: true }));
        assert_eq!(
            meets(ReadWrite, &ro_primary),
            Err(Mismatch::ReadOnly { standby: false })
        );
        assert_eq!(meets(ReadOnly, &ro_primary), Ok(()));
        assert_eq!(meets(ReadOnly, &primary), Err(Mismatch::NotReadOnly));
        assert_eq!(meets(Primary, &ro_primary), Ok(()));
        assert_eq!(meets(Primary, &standby), Err(Mismatch::HotStandby));
        assert_eq!(meets(Standby, &primary), Err(Mismatch::NotHotStandby));
        assert_eq!(meets(PreferStandby, &standby), Ok(()));
        assert_eq!(Mismatch::ReadOnly { standby: true }.to_string(), "read-only (standby)");
    }

    #[test]
    fn older_servers_need_a_query() {
        use TargetSessionAttrs::*;
        let old = role("13.2", None, None);
        assert_eq!(probe_needed(ReadWrite, &old), Some(Probe::ReadOnly));
        assert_eq!(probe_needed(Standby, &old), Some(Probe::Recovery));
        assert_eq!(probe_needed(Any, &old), None);
        assert_eq!(probe_needed(Primary, &role("8.4", None, None)), None);
        assert_eq!(probe_needed(ReadWrite, &role("15.1", Some(false), Some(false))), None);
    }
}
