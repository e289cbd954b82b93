//! The first packet a client sends: StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
//! These packets have no type byte, only a length, so they are parsed here rather than by
//! `postgres-protocol` (which parses the typed messages that follow).

use bytes::{BufMut, BytesMut};

use super::error::{sqlstate, PgError};

/// Startup packets larger than this are refused: a real one is a few hundred bytes.
pub(crate) const MAX_STARTUP_LEN: usize = 10_000;

pub(crate) const SSL_REQUEST_CODE: u32 = 80877103;
pub(crate) const GSSENC_REQUEST_CODE: u32 = 80877104;
pub(crate) const CANCEL_REQUEST_CODE: u32 = 80877102;

/// The newest protocol minor version dbward speaks to clients. 3.2 (Postgres 18) differs from
/// 3.0 only in the length of the cancel key, which dbward makes up itself, so a 3.2 client can
/// be served in front of any server.
pub const NEWEST_MINOR: u16 = 2;

/// Secret length of the cancel keys dbward hands to 3.2 clients (Postgres 18 uses 32 too); 3.0
/// clients expect exactly 4 bytes.
pub(crate) const LONG_SECRET_LEN: usize = 32;

/// A parsed startup-phase packet. Debug leaves out a cancel request's secret: it lets anyone
/// cancel that backend's queries.
#[derive(Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Startup(StartupMessage),
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
}

impl std::fmt::Debug for StartupPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupPacket::Startup(m) => f.debug_tuple("Startup").field(m).finish(),
            StartupPacket::SslRequest => f.write_str("SslRequest"),
            StartupPacket::GssEncRequest => f.write_str("GssEncRequest"),
            StartupPacket::Cancel { pid, .. } => f
                .debug_struct("Cancel")
                .field("pid", pid)
                .field("secret", &"[REDACTED]")
                .finish(),
        }
    }
}

/// A StartupMessage. Parameter values are not secret (libpq never sends a password here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in the client's order, `_pq_.*` protocol options excluded.
    pub params: Vec<(String, String)>,
    /// `_pq_.*` names the client asked for; dbward supports none of them.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The minor version the session runs with: the client's, capped at the newest we speak.
    pub(crate) fn effective_minor(&self) -> u16 {
        self.minor.min(NEWEST_MINOR)
    }

    /// Length of the cancel key secret this client expects in BackendKeyData.
    pub fn secret_len(&self) -> usize {
        if self.effective_minor() >= 2 {
            LONG_SECRET_LEN
        } else {
            4
        }
    }

    /// Whether the client must be sent NegotiateProtocolVersion before authentication.
    pub(crate) fn needs_negotiation(&self) -> bool {
        self.minor > NEWEST_MINOR || !self.protocol_options.is_empty()
    }

    /// NegotiateProtocolVersion ('v'): the version the session will use (never above what the
    /// client asked for), and every protocol option we do not know, which is all of them.
    pub fn negotiate_protocol_version(&self) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(b'v');
        let at = b.len();
        b.put_i32(0);
        b.put_i32(((3u32 << 16) | self.effective_minor() as u32) as i32);
        b.put_i32(self.protocol_options.len() as i32);
        for o in &self.protocol_options {
            b.put_slice(o.as_bytes());
            b.put_u8(0);
        }
        let len = (b.len() - at) as i32;
        b[at..at + 4].copy_from_slice(&len.to_be_bytes());
        b
    }
}

fn protocol_error(message: impl Into<String>) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message)
}

/// Parses the packet body (everything after the 4-byte length).
pub fn parse(body: &[u8]) -> Result<StartupPacket, PgError> {
    if body.len() < 4 {
        return Err(protocol_error("invalid startup packet: shorter than its protocol code"));
    }
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !rest.is_empty() => {
            Err(protocol_error("invalid startup packet: SSL/GSSENC request with a body"))
        }
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows secret keys of up to 256 bytes; 3.0 uses 4.
            if rest.len() < 8 || rest.len() > 4 + 256 {
                return Err(protocol_error("invalid cancel request length"));
            }
            let pid = i32::from_be_bytes(rest[..4].try_into().unwrap());
            Ok(StartupPacket::Cancel {
                pid,
                secret: rest[4..].to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(PgError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("unsupported frontend protocol {major}.{minor}: dbward supports 3.0 to 3.{NEWEST_MINOR}"),
                ));
            }
            parse_params(rest).map(|(params, protocol_options)| {
                StartupPacket::Startup(StartupMessage {
                    major,
                    minor,
                    params,
                    protocol_options,
                })
            })
        }
    }
}

/// Parameters in order, and the `_pq_.*` option names.
type Params = (Vec<(String, String)>, Vec<String>);

fn parse_params(mut rest: &[u8]) -> Result<Params, PgError> {
    let mut params = Vec::new();
    let mut options = Vec::new();
    loop {
        let Some(nul) = rest.iter().position(|b| *b == 0) else {
            return Err(protocol_error("invalid startup packet: missing terminator"));
        };
        if nul == 0 {
            if rest.len() != 1 {
                return Err(protocol_error("invalid startup packet: bytes after the terminator"));
            }
            break;
        }
        let name = std::str::from_utf8(&rest[..nul])
            .map_err(|_| protocol_error("invalid startup packet: parameter name is not UTF-8"))?
            .to_string();
        rest = &rest[nul + 1..];
        let Some(vnul) = rest.iter().position(|b| *b == 0) else {
            return Err(protocol_error(format!(
                "invalid startup packet: no value for parameter {name:?}"
            )));
        };
        let value = String::from_utf8_lossy(&rest[..vnul]).into_owned();
        rest = &rest[vnul + 1..];
        if name.starts_with("_pq_.") {
            options.push(name);
        } else if params.iter().any(|(k, _): &(String, String)| *k == name) {
            return Err(protocol_error(format!(
                "invalid startup packet: parameter {name:?} given twice"
            )));
        } else {
            params.push((name, value));
        }
    }
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        ));
    }
    Ok((params, options))
}

/// Why reading a startup packet stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The client closed before sending anything: not worth a log line above debug.
    Closed,
    Io(std::io::Error),
    /// Tell the client and close.
    Protocol(PgError),
}

/// Takes one whole packet off the front of `buf` and parses it; `Ok(None)` while more bytes are
/// needed. Anything after the packet stays in `buf`.
pub fn take_packet(buf: &mut BytesMut) -> Result<Option<StartupPacket>, PgError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(protocol_error(format!(
            "invalid startup packet length {len} (allowed 8 to {MAX_STARTUP_LEN} bytes)"
        )));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    parse(&packet[4..]).map(Some)
}

/// Reads one length-prefixed startup packet and parses it: how the fake servers of the upstream
/// tests read dbward's StartupMessage (the session itself reads through its own buffer).
#[cfg(test)]
pub(crate) async fn read<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ReadError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ReadError::Protocol(protocol_error(format!(
            "invalid startup packet length {len} (allowed 8 to {MAX_STARTUP_LEN} bytes)"
        ))));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await.map_err(ReadError::Io)?;
    parse(&body).map_err(ReadError::Protocol)
}

/// Encodes a StartupMessage for protocol 3.0 with the given parameters (used upstream).
pub fn encode_startup(params: &[(String, String)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(196608);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One packet off the front of `bytes`, as the session takes it from its read buffer.
    fn take(bytes: &[u8]) -> Result<Option<StartupPacket>, PgError> {
        take_packet(&mut BytesMut::from(bytes))
    }

    fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((rest.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[tokio::test]
    async fn parses_startup_message_params_in_order() {
        let bytes = packet(196608, b"user\0app\0database\0payments\0application_name\0psql\0\0");
        let p = take(&bytes).unwrap().unwrap();
        let StartupPacket::Startup(m) = p else { panic!() };
        assert_eq!(m.get("database"), Some("payments"));
        assert_eq!(m.params[2], ("application_name".into(), "psql".into()));
        assert!(!m.needs_negotiation());
    }

    #[tokio::test]
    async fn ssl_gss_cancel() {
        assert_eq!(
            take(&packet(SSL_REQUEST_CODE, b"")).unwrap().unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(
            take(&packet(GSSENC_REQUEST_CODE, b"")).unwrap().unwrap(),
            StartupPacket::GssEncRequest
        );
        let c = take(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]))
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            StartupPacket::Cancel {
                pid: 7,
                secret: vec![1, 2, 3, 4]
            }
        );
        assert!(
            !format!("{c:?}").contains("[1, 2, 3, 4]"),
            "the cancel secret is not in Debug output"
        );
    }

    #[tokio::test]
    async fn oversized_and_truncated_packets_are_protocol_errors() {
        let mut huge = (20_000u32).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        match take(&huge) {
            Err(e) => assert_eq!(e.code, "08P01"),
            other => panic!("{other:?}"),
        }
        let unterminated = packet(196608, b"user\0app");
        match take(&unterminated) {
            Err(e) => {
                assert!(e.message.contains("missing terminator") || e.message.contains("no value"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(take(b""), Ok(None)), "nothing yet: more bytes are needed");
    }

    #[test]
    fn newer_minor_and_pq_options_get_negotiation() {
        let body = [&(3u32 << 16 | 9999).to_be_bytes()[..], b"user\0u\0_pq_.bogus\0x\0\0"].concat();
        let StartupPacket::Startup(m) = parse(&body).unwrap() else {
            panic!()
        };
        assert!(m.needs_negotiation());
        assert_eq!(m.protocol_options, vec!["_pq_.bogus".to_string()]);
        let v = m.negotiate_protocol_version();
        assert_eq!(v[0], b'v');
        assert_eq!(&v[1..5], &((v.len() - 1) as i32).to_be_bytes());
        assert_eq!(
            &v[5..9],
            &((3i32 << 16) | 2).to_be_bytes(),
            "the newest version we speak"
        );
        assert_eq!(&v[9..13], &1i32.to_be_bytes());
        assert_eq!(&v[13..], b"_pq_.bogus\0");
        assert_eq!(m.secret_len(), LONG_SECRET_LEN);
    }

    #[test]
    fn negotiation_never_offers_more_than_the_client_asked() {
        let body = [&196608u32.to_be_bytes()[..], b"user\0u\0_pq_.a\0x\0_pq_.b\0y\0\0"].concat();
        let StartupPacket::Startup(m) = parse(&body).unwrap() else {
            panic!()
        };
        let v = m.negotiate_protocol_version();
        assert_eq!(&v[5..9], &196608i32.to_be_bytes());
        assert_eq!(&v[9..13], &2i32.to_be_bytes());
        assert_eq!(&v[13..], b"_pq_.a\0_pq_.b\0");
        assert_eq!(m.secret_len(), 4);

        for (minor, negotiate, secret) in [(0, false, 4), (1, false, 4), (2, false, 32), (3, true, 32)] {
            let body = [&((3u32 << 16) | minor).to_be_bytes()[..], b"user\0u\0\0"].concat();
            let StartupPacket::Startup(m) = parse(&body).unwrap() else {
                panic!()
            };
            assert_eq!(
                (m.needs_negotiation(), m.secret_len()),
                (negotiate, secret),
                "3.{minor}"
            );
        }
    }

    #[test]
    fn take_packet_leaves_what_follows() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&packet(SSL_REQUEST_CODE, b""));
        buf.extend_from_slice(b"\x16\x03");
        assert_eq!(take_packet(&mut buf).unwrap(), Some(StartupPacket::SslRequest));
        assert_eq!(&buf[..], b"\x16\x03");

        let whole = packet(196608, b"user\0u\0\0");
        let mut buf = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(take_packet(&mut buf).unwrap(), None);
        buf.extend_from_slice(&whole[whole.len() - 1..]);
        assert!(matches!(
            take_packet(&mut buf).unwrap(),
            Some(StartupPacket::Startup(_))
        ));
        assert!(buf.is_empty());

        let mut bad = BytesMut::from(&[0u8, 0, 0, 3][..]);
        assert_eq!(take_packet(&mut bad).unwrap_err().code, "08P01");
    }

    #[test]
    fn other_major_versions_are_refused() {
        let e = parse(&[&(2u32 << 16).to_be_bytes()[..], b"user\0u\0\0"].concat()).unwrap_err();
        assert_eq!(e.code, "0A000");
    }

    #[test]
    fn missing_user_is_28000() {
        let e = parse(&[&196608u32.to_be_bytes()[..], b"database\0d\0\0"].concat()).unwrap_err();
        assert_eq!(e.code, "28000");
    }
}
