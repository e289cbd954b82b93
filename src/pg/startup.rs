//! The first packet a client sends: StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
//! These packets have no type byte, only a length, so they are parsed here rather than by
//! `postgres-protocol` (which parses the typed messages that follow).
//!
//! What is accepted and refused, and how, follows Postgres 15's `ProcessStartupPacket`
//! (postmaster.c): where Postgres logs a COMMERROR and closes without a word, the error here is
//! [`StartupError::Silent`]; where it sends a FATAL, [`StartupError::Refuse`]. tests/conformance.rs
//! compares the two servers byte sequence by byte sequence.

use bytes::{BufMut, BytesMut};

use super::error::{sqlstate, PgError};

/// Startup packets larger than this (length word included) are closed on: a real one is a few
/// hundred bytes. Postgres allows 10000 bytes after the length word.
pub(crate) const MAX_STARTUP_LEN: usize = 10_004;

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

/// Why a startup-phase packet ends the connection. `reason` labels the log line and
/// `dbward_client_startup_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupError {
    /// Postgres logs these (COMMERROR) and closes without sending anything: so does dbward.
    Silent { reason: &'static str, detail: String },
    /// Tell the client (FATAL) and close.
    Refuse { reason: &'static str, error: Box<PgError> },
}

impl StartupError {
    pub fn reason(&self) -> &'static str {
        match self {
            StartupError::Silent { reason, .. } | StartupError::Refuse { reason, .. } => reason,
        }
    }
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Silent { detail, .. } => f.write_str(detail),
            StartupError::Refuse { error, .. } => write!(f, "{error}"),
        }
    }
}

fn silent(reason: &'static str, detail: impl Into<String>) -> StartupError {
    StartupError::Silent {
        reason,
        detail: detail.into(),
    }
}

fn layout_error(message: &str) -> StartupError {
    StartupError::Refuse {
        reason: "invalid_packet",
        error: Box::new(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("invalid startup packet layout: {message}"),
        )),
    }
}

/// The FATAL for a protocol version outside 3.x, in the format that version reads (Postgres sets
/// the frontend protocol before checking it, so a 2.x client gets protocol-2 text; version 0.0
/// counts as unset, and gets an ErrorResponse, as tests/conformance.rs shows). Also what a
/// repeated SSLRequest or GSSENCRequest gets: once answered, its code is read as a version.
pub(crate) fn unsupported_version(code: u32) -> StartupError {
    let (major, minor) = (code >> 16, code & 0xffff);
    let e = PgError::fatal(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{NEWEST_MINOR}"),
    );
    StartupError::Refuse {
        reason: "unsupported_protocol",
        error: Box::new(if major < 3 && code != 0 { e.in_protocol2() } else { e }),
    }
}

/// Parses the packet body (everything after the 4-byte length).
pub fn parse(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(silent("invalid_length", "invalid length of startup packet"));
    }
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    let rest = &body[4..];
    match code {
        // Postgres reads the whole packet and looks only at the code: a body is ignored.
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            // A CancelRequest is never answered; one too short to hold a key cancels nothing.
            if rest.len() < 8 {
                return Err(silent(
                    "invalid_cancel",
                    format!("cancel request of {} bytes holds no key", body.len() + 4),
                ));
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
                return Err(unsupported_version(code));
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

/// Postgres's rules: name/value pairs up to an empty name, which must be the last byte; a name
/// given twice keeps its place and takes the later value (Postgres applies both, in order);
/// `replication` must be a boolean or `database`. Bytes that are not UTF-8 are replaced.
fn parse_params(mut rest: &[u8]) -> Result<Params, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut options = Vec::new();
    loop {
        let Some(nul) = rest.iter().position(|b| *b == 0) else {
            return Err(layout_error("expected terminator as last byte"));
        };
        if nul == 0 {
            if rest.len() != 1 {
                return Err(layout_error("expected terminator as last byte"));
            }
            break;
        }
        let name = String::from_utf8_lossy(&rest[..nul]).into_owned();
        rest = &rest[nul + 1..];
        let Some(vnul) = rest.iter().position(|b| *b == 0) else {
            return Err(layout_error("expected terminator as last byte"));
        };
        let value = String::from_utf8_lossy(&rest[..vnul]).into_owned();
        rest = &rest[vnul + 1..];
        if name == "replication" && value != "database" && pg_bool(&value).is_none() {
            return Err(StartupError::Refuse {
                reason: "invalid_parameter",
                error: Box::new(
                    PgError::fatal(
                        sqlstate::INVALID_PARAMETER_VALUE,
                        format!("invalid value for parameter \"replication\": \"{value}\""),
                    )
                    .with_hint("Valid values are: \"false\", 0, \"true\", 1, \"database\"."),
                ),
            });
        }
        if name.starts_with("_pq_.") {
            options.push(name);
        } else if let Some(slot) = params.iter_mut().find(|(k, _)| *k == name) {
            slot.1 = value;
        } else {
            params.push((name, value));
        }
    }
    Ok((params, options))
}

/// Postgres's `parse_bool`: true/false, yes/no, on/off, 1/0, any case, and unambiguous prefixes.
fn pg_bool(v: &str) -> Option<bool> {
    let l = v.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| l.len() >= min && word.starts_with(l.as_str());
    match l.as_bytes().first()? {
        b't' if prefix_of("true", 1) => Some(true),
        b'f' if prefix_of("false", 1) => Some(false),
        b'y' if prefix_of("yes", 1) => Some(true),
        b'n' if prefix_of("no", 1) => Some(false),
        b'o' if prefix_of("on", 2) => Some(true),
        b'o' if prefix_of("off", 2) => Some(false),
        b'1' if l.len() == 1 => Some(true),
        b'0' if l.len() == 1 => Some(false),
        _ => None,
    }
}

impl StartupMessage {
    /// The FATAL Postgres sends when the StartupMessage names no user (or an empty one): after
    /// NegotiateProtocolVersion, if that is due.
    pub(crate) fn missing_user(&self) -> Option<PgError> {
        self.get("user").is_none_or(str::is_empty).then(|| {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            )
        })
    }

    /// The `replication` value when it asks for a replication connection.
    pub(crate) fn replication(&self) -> Option<&str> {
        self.get("replication")
            .filter(|v| *v == "database" || pg_bool(v) == Some(true))
    }
}

/// Why reading a startup packet stopped.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The client closed before sending anything: not worth a log line above debug.
    Closed,
    Io(std::io::Error),
    Startup(StartupError),
}

/// Takes one whole packet off the front of `buf` and parses it; `Ok(None)` while more bytes are
/// needed. Anything after the packet stays in `buf`.
pub fn take_packet(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(silent(
            "invalid_length",
            format!("invalid length of startup packet: {len} (allowed 8 to {MAX_STARTUP_LEN} bytes)"),
        ));
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
        return Err(ReadError::Startup(silent("invalid_length", format!("length {len}"))));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await.map_err(ReadError::Io)?;
    parse(&body).map_err(ReadError::Startup)
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
    fn take(bytes: &[u8]) -> Result<Option<StartupPacket>, StartupError> {
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

    fn refused(r: Result<Option<StartupPacket>, StartupError>) -> PgError {
        match r {
            Err(StartupError::Refuse { error, .. }) => *error,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_lengths_close_silently_and_bad_layouts_are_refused() {
        // As Postgres: a length outside 8..=10004 is logged, not answered.
        for len in [0u32, 4, 7, 10_005, 20_000, 0x7fff_ffff, u32::MAX] {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 16]);
            assert!(
                matches!(
                    take(&bytes),
                    Err(StartupError::Silent {
                        reason: "invalid_length",
                        ..
                    })
                ),
                "{len}"
            );
        }
        let largest = packet(
            196608,
            &[b"user\0u\0a\0".as_slice(), &[b'x'; 10_004 - 8 - 11], b"\0\0"].concat(),
        );
        assert_eq!(largest.len(), MAX_STARTUP_LEN);
        assert!(matches!(take(&largest), Ok(Some(StartupPacket::Startup(_)))));

        for body in [
            &b"user\0app"[..],
            b"user\0",
            b"user\0u\0",
            b"",
            b"\0user\0u\0\0",
            b"user\0u\0\0x",
        ] {
            let e = refused(take(&packet(196608, body)));
            assert_eq!(e.code, "08P01", "{body:?}");
            assert!(e.message.contains("invalid startup packet layout"), "{e:?}");
        }
        assert!(matches!(take(b""), Ok(None)), "nothing yet: more bytes are needed");
    }

    #[test]
    fn repeated_names_take_the_later_value_in_place() {
        let StartupPacket::Startup(m) =
            parse(&[&196608u32.to_be_bytes()[..], b"user\0a\0x\0one\0user\0b\0\0"].concat()).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.params, vec![("user".into(), "b".into()), ("x".into(), "one".into())]);
    }

    #[test]
    fn ssl_and_gss_requests_ignore_a_body_and_short_cancels_are_silent() {
        assert_eq!(
            parse(&[&SSL_REQUEST_CODE.to_be_bytes()[..], b"xyz"].concat()),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse(&[&GSSENC_REQUEST_CODE.to_be_bytes()[..], b"x"].concat()),
            Ok(StartupPacket::GssEncRequest)
        );
        for rest in [&b""[..], b"\0\0\0\x01", b"\0\0\0\x01\0\0\0"] {
            let r = parse(&[&CANCEL_REQUEST_CODE.to_be_bytes()[..], rest].concat());
            assert!(matches!(r, Err(StartupError::Silent { .. })), "{rest:?}");
        }
    }

    #[test]
    fn replication_values_follow_postgres_parse_bool() {
        for (v, on) in [
            ("database", true),
            ("true", true),
            ("T", true),
            ("yes", true),
            ("on", true),
            ("1", true),
            ("off", false),
            ("of", false),
            ("0", false),
            ("f", false),
            ("no", false),
        ] {
            let body = [
                &196608u32.to_be_bytes()[..],
                format!("user\0u\0replication\0{v}\0\0").as_bytes(),
            ]
            .concat();
            let StartupPacket::Startup(m) = parse(&body).unwrap() else {
                panic!()
            };
            assert_eq!(m.replication().is_some(), on, "{v}");
        }
        for v in ["maybe", "o", "", "10", "Database"] {
            let body = [
                &196608u32.to_be_bytes()[..],
                format!("user\0u\0replication\0{v}\0\0").as_bytes(),
            ]
            .concat();
            match parse(&body) {
                Err(StartupError::Refuse { error, .. }) => assert_eq!(error.code, "22023", "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
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
        assert_eq!(take_packet(&mut bad).unwrap_err().reason(), "invalid_length");
    }

    #[test]
    fn other_major_versions_are_refused_in_their_own_format() {
        for (code, protocol2) in [
            (0u32, false),
            (1, true),
            (1 << 16, true),
            (2 << 16, true),
            (4 << 16, false),
            (1234 << 16, false),
        ] {
            let body = [&code.to_be_bytes()[..], b"user\0u\0\0"].concat();
            let e = refused(parse(&body).map(Some));
            assert_eq!((e.code, e.protocol2), ("0A000", protocol2), "{code:#x}");
        }
    }

    #[test]
    fn missing_or_empty_user_is_28000() {
        for params in [&b"database\0d\0\0"[..], b"user\0\0\0", b"\0"] {
            let StartupPacket::Startup(m) = parse(&[&196608u32.to_be_bytes()[..], params].concat()).unwrap() else {
                panic!()
            };
            assert_eq!(m.missing_user().map(|e| e.code), Some("28000"), "{params:?}");
        }
    }
}
