//! A raw Postgres wire-protocol client for tests that must see (or send) exact bytes: encryption
//! negotiation, hand-made startup packets, cancel keys, message framing, and the differential
//! test. Also a small test PKI (rcgen) and rustls client configurations.
//!
//! Used by tests/protocol.rs and tests/compat.rs; nothing here knows about dbward.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single read in these helpers may wait before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub const SSL_REQUEST: u32 = 80877103;
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
pub const V3_0: u32 = 3 << 16;
pub const V3_2: u32 = (3 << 16) | 2;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One backend message.
#[derive(Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = if self.body.len() > 80 {
            format!(
                "{:?}...({} bytes)",
                String::from_utf8_lossy(&self.body[..80]),
                self.body.len()
            )
        } else {
            format!("{:?}", String::from_utf8_lossy(&self.body))
        };
        write!(f, "{}{}", self.tag as char, body)
    }
}

impl Msg {
    /// The message as it was on the wire.
    pub fn raw(&self) -> Vec<u8> {
        let mut v = vec![self.tag];
        v.extend_from_slice(&((self.body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(&self.body);
        v
    }

    /// Fields of an ErrorResponse or NoticeResponse, by type byte.
    pub fn fields(&self) -> BTreeMap<char, String> {
        assert!(matches!(self.tag, b'E' | b'N'), "not an error or notice: {self:?}");
        let mut out = BTreeMap::new();
        let mut rest = &self.body[..];
        while let Some((&t, tail)) = rest.split_first() {
            if t == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).expect("NUL-terminated field");
            out.insert(t as char, String::from_utf8_lossy(&tail[..end]).into_owned());
            rest = &tail[end + 1..];
        }
        out
    }

    /// SQLSTATE of an ErrorResponse.
    pub fn code(&self) -> String {
        self.fields().get(&'C').cloned().unwrap_or_default()
    }

    pub fn i32_at(&self, at: usize) -> i32 {
        i32::from_be_bytes(self.body[at..at + 4].try_into().unwrap())
    }
}

/// A connection speaking raw protocol.
pub struct Wire {
    pub io: Box<dyn Io>,
    buf: BytesMut,
}

impl Wire {
    pub async fn tcp(port: u16) -> Wire {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
        s.set_nodelay(true).unwrap();
        Wire::new(Box::new(s))
    }

    pub fn new(io: Box<dyn Io>) -> Wire {
        Wire {
            io,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write to server");
        self.io.flush().await.expect("flush to server");
    }

    /// Reads more bytes into the buffer; false at EOF (or a reset, which a refusing server
    /// may cause by closing with our data unread).
    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(READ_TIMEOUT, self.io.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
            Err(_) => panic!(
                "no data from the server within {READ_TIMEOUT:?} (buffered: {:?})",
                &self.buf[..]
            ),
        }
    }

    /// One byte (the answer to SSLRequest / GSSENCRequest); `None` at EOF.
    pub async fn recv_byte(&mut self) -> Option<u8> {
        if self.buf.is_empty() && !self.fill().await {
            return None;
        }
        Some(self.buf.get_u8())
    }

    /// The next whole message; `None` at EOF (panics on EOF inside a message).
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                assert!(len >= 4, "invalid message length {len}: the stream is out of step");
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            if !self.fill().await {
                assert!(self.buf.is_empty(), "EOF inside a message: {:?}", &self.buf[..]);
                return None;
            }
        }
    }

    /// The next message, which must exist.
    pub async fn expect(&mut self) -> Msg {
        self.recv().await.expect("server closed the connection")
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("EOF before ReadyForQuery; got {out:?}"));
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Messages up to the next ReadyForQuery or the end of the connection, whichever is first.
    pub async fn until_ready_or_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Everything until the server closes.
    pub async fn until_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }

    /// True when the server closes the connection without sending anything (within `wait`).
    pub async fn closes_silently(&mut self, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(wait, self.io.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => self.buf.is_empty(),
            Ok(Ok(_)) => false,
            Err(_) => panic!("connection still open after {wait:?}"),
        }
    }

    /// Sends SSLRequest, expects 'S' and does the TLS handshake.
    pub async fn start_tls(mut self, config: Arc<rustls::ClientConfig>, name: &str) -> Wire {
        self.send(&ssl_request()).await;
        assert_eq!(self.recv_byte().await, Some(b'S'), "SSLRequest not accepted");
        assert!(self.buf.is_empty());
        self.into_tls(config, name).await
    }

    /// TLS handshake right away (direct TLS).
    pub async fn into_tls(self, config: Arc<rustls::ClientConfig>, name: &str) -> Wire {
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from(name.to_string()).unwrap();
        let tls = connector.connect(name, self.io).await.expect("TLS handshake");
        Wire::new(Box::new(tls))
    }

    /// Sends a StartupMessage (no password: dbward's clients have none) and reads up to
    /// ReadyForQuery; returns every message after the startup packet.
    pub async fn startup(&mut self, version: u32, params: &[(&str, &str)]) -> Vec<Msg> {
        self.send(&startup(version, params)).await;
        self.until_ready().await
    }

    /// Authenticates as a password user (SCRAM-SHA-256, as the test cluster requires) and
    /// returns the raw bytes of everything the server sent after AuthenticationOk up to and
    /// including the first ReadyForQuery.
    pub async fn login_scram(&mut self, params: &[(&str, &str)], password: &str) -> Vec<Msg> {
        self.send(&startup(V3_0, params)).await;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.expect().await;
            assert_eq!(m.tag, b'R', "during authentication: {m:?}");
            match m.i32_at(0) {
                0 => break,
                10 => {
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let mut out = BytesMut::new();
                    postgres_protocol::message::frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .unwrap();
                    self.send(&out).await;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().unwrap();
                    s.update(&m.body[4..]).unwrap();
                    let mut out = BytesMut::new();
                    postgres_protocol::message::frontend::sasl_response(s.message(), &mut out).unwrap();
                    self.send(&out).await;
                }
                12 => scram.take().unwrap().finish(&m.body[4..]).unwrap(),
                other => panic!("unexpected authentication request {other}"),
            }
        }
        self.until_ready().await
    }

    /// Sends a simple Query and returns the messages up to ReadyForQuery.
    pub async fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql)).await;
        self.until_ready().await
    }

    /// Values of the first column of every DataRow in `msgs`, as text.
    pub fn first_column(msgs: &[Msg]) -> Vec<String> {
        msgs.iter()
            .filter(|m| m.tag == b'D')
            .map(|m| {
                let len = i32::from_be_bytes(m.body[2..6].try_into().unwrap());
                String::from_utf8_lossy(&m.body[6..6 + len as usize]).into_owned()
            })
            .collect()
    }
}

/// Connects to `port`, sends a 3.0 StartupMessage with `params` and reads until the server
/// closes; the first message must be a FATAL with SQLSTATE `code`. Returns its fields.
pub async fn refused_startup(port: u16, params: &[(&str, &str)], code: &str) -> BTreeMap<char, String> {
    let mut w = Wire::tcp(port).await;
    w.send(&startup(V3_0, params)).await;
    let msgs = w.until_eof().await;
    let f = msgs[0].fields();
    assert_eq!((f[&'S'].as_str(), f[&'C'].as_str()), ("FATAL", code), "{f:?}");
    f
}

/// The BackendKeyData in `msgs`: (pid, secret).
pub fn backend_key(msgs: &[Msg]) -> (i32, Vec<u8>) {
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    (k.i32_at(0), k.body[4..].to_vec())
}

/// The first ErrorResponse in `msgs`.
pub fn error_in(msgs: &[Msg]) -> Msg {
    msgs.iter()
        .find(|m| m.tag == b'E')
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorResponse in {msgs:?}"))
}

// --- frontend messages ---------------------------------------------------------------------------

fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = ((rest.len() + 8) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(rest);
    v
}

pub fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut rest = Vec::new();
    for (k, v) in params {
        rest.extend_from_slice(k.as_bytes());
        rest.push(0);
        rest.extend_from_slice(v.as_bytes());
        rest.push(0);
    }
    rest.push(0);
    packet(version, &rest)
}

pub fn ssl_request() -> Vec<u8> {
    packet(SSL_REQUEST, &[])
}

pub fn gssenc_request() -> Vec<u8> {
    packet(GSSENC_REQUEST, &[])
}

pub fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut rest = pid.to_be_bytes().to_vec();
    rest.extend_from_slice(secret);
    packet(CANCEL_REQUEST, &rest)
}

fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    typed(b'Q', &b)
}

/// Parse: statement name, SQL, parameter type OIDs.
pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_i16(types.len() as i16);
    for t in types {
        b.put_u32(*t);
    }
    typed(b'P', &b)
}

/// Bind: portal, statement, parameter formats, parameters (None = NULL), result formats.
pub fn bind(portal: &str, stmt: &str, formats: &[i16], params: &[Option<&[u8]>], results: &[i16]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.put_i16(formats.len() as i16);
    for f in formats {
        b.put_i16(*f);
    }
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.extend_from_slice(v);
            }
            None => b.put_i32(-1),
        }
    }
    b.put_i16(results.len() as i16);
    for f in results {
        b.put_i16(*f);
    }
    typed(b'B', &b)
}

/// Describe: b'S' (statement) or b'P' (portal).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    typed(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.put_i32(max_rows);
    typed(b'E', &b)
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    typed(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    typed(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    typed(b'H', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    typed(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    typed(b'c', &[])
}

pub fn copy_fail(why: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, why);
    typed(b'f', &b)
}

pub fn terminate() -> Vec<u8> {
    typed(b'X', &[])
}

/// Parses server messages from a byte string (for comparisons).
pub fn split_messages(mut bytes: &[u8]) -> Vec<Msg> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        out.push(Msg {
            tag: bytes[0],
            body: bytes[5..1 + len].to_vec(),
        });
        bytes = &bytes[1 + len..];
    }
    out
}

/// ErrorResponse field check helper: the error parses as postgres-protocol expects.
pub fn parses_as_error(m: &Msg) -> bool {
    let mut raw = BytesMut::from(&m.raw()[..]);
    match postgres_protocol::message::backend::Message::parse(&mut raw) {
        Ok(Some(postgres_protocol::message::backend::Message::ErrorResponse(body))) => body.fields().count().is_ok(),
        _ => false,
    }
}

// --- TLS -------------------------------------------------------------------------------------------

/// A CA and one server certificate it signed.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// `names`: DNS names and IP addresses for the server certificate.
    pub fn new(names: &[&str]) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: CAs sharing a name would fail with "bad signature" instead of
        // "unknown issuer".
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("dbward test CA {}", random_suffix()));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes ca.pem, cert.pem and key.pem (0600) into `dir`; returns their paths.
    pub fn write(&self, dir: &std::path::Path) -> (String, String, String) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let ca = dir.join("ca.pem");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&ca, &self.ca_pem).unwrap();
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
        (s(ca), s(cert), s(key))
    }

    /// A client configuration trusting this CA, offering `alpn` (none when empty).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }
}

fn random_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
