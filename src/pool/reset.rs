//! The protocol work around a kept server connection: the reset query when a client leaves,
//! `SET application_name` for the next one, the greeting it gets (what a fresh connection would
//! have sent), and the Terminate that closes a connection for good. Every exchange runs under a
//! deadline and reads at most [`MAX_MESSAGE`] per message: a server that stalls or floods only
//! loses its connection.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upstream::UpstreamStream;

/// Messages larger than this in answer to the reset query or a SET end the connection.
const MAX_MESSAGE: usize = 1 << 20;

/// How long closing a connection may take.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a kept connection could not be readied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResetError {
    #[error("server connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server answered with an error (SQLSTATE {0})")]
    Server(String),
    #[error("the server is not idle after the query (status {0:?})")]
    NotIdle(char),
    #[error("a server message of {0} bytes")]
    TooLarge(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Runs one simple query and reads up to its ReadyForQuery, which must say idle. Notices,
/// ParameterStatus and notifications in between are dropped: the greeting the next client gets
/// is rebuilt from the connection's first one.
pub(crate) async fn simple_query(stream: &mut UpstreamStream, sql: &str, within: Duration) -> Result<(), ResetError> {
    tokio::time::timeout(within, simple_query_inner(stream, sql))
        .await
        .unwrap_or(Err(ResetError::Timeout(within)))
}

async fn simple_query_inner(stream: &mut UpstreamStream, sql: &str) -> Result<(), ResetError> {
    let mut q = BytesMut::with_capacity(sql.len() + 6);
    q.put_u8(b'Q');
    q.put_u32((sql.len() + 5) as u32);
    q.put_slice(sql.as_bytes());
    q.put_u8(0);
    stream.write_all(&q).await?;
    stream.flush().await?;
    let mut error = None;
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await?;
        let len = (u32::from_be_bytes(header[1..5].try_into().expect("4 bytes")) as usize).saturating_sub(4);
        if len > MAX_MESSAGE {
            return Err(ResetError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        match header[0] {
            b'E' if error.is_none() => error = Some(sqlstate_of(&body)),
            b'Z' => {
                if let Some(code) = error {
                    return Err(ResetError::Server(code));
                }
                return match body.first() {
                    Some(b'I') => Ok(()),
                    other => Err(ResetError::NotIdle(other.map(|b| *b as char).unwrap_or('?'))),
                };
            }
            _ => {}
        }
    }
}

/// The `C` field of an ErrorResponse body.
fn sqlstate_of(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_else(|| "?????".into())
}

/// `SET application_name` to the value of the new client (Postgres' default is empty).
pub(crate) fn set_application_name(value: &str) -> String {
    format!("SET application_name = '{}'", value.replace('\'', "''"))
}

/// The messages a fresh connection sent after AuthenticationOk, up to and including its first
/// ReadyForQuery: kept to greet later clients. None when the greeting does not end with an idle
/// ReadyForQuery (the server already sent more), so the connection is not kept.
pub(crate) fn keepable_greeting(greeting: &[u8]) -> Option<Bytes> {
    let mut at = 0;
    while at + 5 <= greeting.len() {
        let len = u32::from_be_bytes(greeting[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let end = at.checked_add(1 + len)?;
        if len < 4 || end > greeting.len() {
            return None;
        }
        if greeting[at] == b'Z' {
            let idle = len == 5 && greeting[at + 5] == b'I';
            return (idle && end == greeting.len()).then(|| Bytes::copy_from_slice(greeting));
        }
        at = end;
    }
    None
}

/// The kept greeting with `application_name` reported as the new client's value, as the server
/// reports it to a fresh connection.
pub(crate) fn greeting_for(kept: &[u8], application_name: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(kept.len() + application_name.len());
    let mut at = 0;
    while at + 5 <= kept.len() {
        let len = u32::from_be_bytes(kept[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let end = (at + 1 + len).min(kept.len());
        let msg = &kept[at..end];
        if msg[0] == b'S' && msg[5..].starts_with(b"application_name\0") {
            out.put_u8(b'S');
            out.put_u32((4 + 17 + application_name.len() + 1) as u32);
            out.put_slice(b"application_name\0");
            out.put_slice(application_name.as_bytes());
            out.put_u8(0);
        } else {
            out.put_slice(msg);
        }
        at = end;
    }
    out
}

/// The application_name a greeting reports ("" when it reports none).
pub(crate) fn reported_application_name(kept: &[u8]) -> String {
    let mut at = 0;
    while at + 5 <= kept.len() {
        let len = u32::from_be_bytes(kept[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        let end = (at + 1 + len).min(kept.len());
        if let Some(rest) = kept[at..end].strip_prefix(b"S").and_then(|m| m.get(4..)) {
            if let Some(v) = rest.strip_prefix(b"application_name\0") {
                let v = v.strip_suffix(b"\0").unwrap_or(v);
                return String::from_utf8_lossy(v).into_owned();
            }
        }
        at = end;
    }
    String::new()
}

/// Ends a server connection the way a client would: Terminate, then close; bounded in time.
pub(crate) async fn close(mut stream: UpstreamStream) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frame::msg;

    #[test]
    fn greeting_is_kept_only_when_it_ends_with_an_idle_ready_for_query() {
        let ps = msg(b'S', b"application_name\0first\0");
        let tz = msg(b'S', b"TimeZone\0UTC\0");
        let good = [ps.clone(), tz.clone(), msg(b'Z', b"I")].concat();
        assert!(keepable_greeting(&good).is_some());
        let more = [good.clone(), msg(b'N', b"x\0")].concat();
        assert!(keepable_greeting(&more).is_none(), "bytes after ReadyForQuery");
        assert!(keepable_greeting(&good[..good.len() - 1]).is_none(), "cut short");

        assert_eq!(reported_application_name(&good), "first");
        let next = greeting_for(&good, "second");
        assert_eq!(reported_application_name(&next), "second");
        assert_eq!(
            &next[..],
            &[msg(b'S', b"application_name\0second\0"), tz, msg(b'Z', b"I")].concat()[..]
        );
    }

    #[test]
    fn application_name_is_quoted() {
        assert_eq!(set_application_name("it's"), "SET application_name = 'it''s'");
    }
}
