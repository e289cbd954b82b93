//! Tests of the upstream connection against in-process fake servers: TLS verification per
//! sslmode (rcgen CA and certificates, tokio-rustls server) and the authentication exchanges
//! (SCRAM with and without channel binding, MD5, cleartext, misbehaving servers).

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::pg::startup::{self as pgstartup, StartupPacket};

const PASSWORD: &str = "v-token-payments-Xy8kPq2";

// --- PKI ---

struct Pki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new(names: &[&str]) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: CAs sharing a name would fail with "bad signature" instead.
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("dbward test CA {n}"));
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        roots
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    fn end_point_hash(&self) -> Vec<u8> {
        Sha256::digest(&self.chain[0]).to_vec()
    }
}

fn settings(port: u16, sslmode: SslMode, roots: Option<RootCertStore>, name: &str) -> UpstreamSettings {
    UpstreamSettings {
        database: "payments".into(),
        host: "127.0.0.1".into(),
        port,
        sslmode,
        tls: (sslmode != SslMode::Disable).then(|| Arc::new(tls::build(sslmode, roots, None).unwrap())),
        server_name: ServerName::try_from(name.to_string()).unwrap(),
        connect_timeout: Duration::from_secs(10),
        allow_insecure_password: false,
    }
}

// --- fake server ---

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct FakeConn {
    io: Box<dyn Io>,
    first: StartupPacket,
    cert_hash: Option<Vec<u8>>,
}

async fn read_packet(io: &mut (impl AsyncRead + Unpin)) -> StartupPacket {
    pgstartup::read(io).await.map_err(|e| format!("{e:?}")).unwrap()
}

/// Accepts one connection; answers SSLRequest with 'S' (and a handshake) when `tls` is given,
/// else 'N'; returns after the first real packet.
async fn accept(listener: &TcpListener, tls: Option<&Pki>) -> FakeConn {
    let (mut tcp, _) = listener.accept().await.unwrap();
    let first = read_packet(&mut tcp).await;
    if first != StartupPacket::SslRequest {
        return FakeConn {
            io: Box::new(tcp),
            first,
            cert_hash: None,
        };
    }
    match tls {
        None => {
            tcp.write_all(b"N").await.unwrap();
            let first = read_packet(&mut tcp).await;
            FakeConn {
                io: Box::new(tcp),
                first,
                cert_hash: None,
            }
        }
        Some(pki) => {
            tcp.write_all(b"S").await.unwrap();
            let mut s = pki.acceptor().accept(tcp).await.unwrap();
            let first = read_packet(&mut s).await;
            FakeConn {
                io: Box::new(s),
                first,
                cert_hash: Some(pki.end_point_hash()),
            }
        }
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn auth_msg(code: i32, data: &[u8]) -> Vec<u8> {
    msg(b'R', &[&code.to_be_bytes()[..], data].concat())
}

fn error_msg(code: &str, message: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    crate::pg::PgError::fatal("28P01", message).encode(&mut b);
    let body = String::from_utf8_lossy(&b).replace("28P01", code);
    body.into_bytes()
}

fn greeting_msgs() -> Vec<u8> {
    [
        msg(b'S', b"server_version\x0016.4\x00"),
        msg(b'N', b"SNOTICE\x00C00000\x00Mwelcome\x00\x00"),
        msg(b'S', b"TimeZone\x00UTC\x00"),
        msg(b'Z', b"I"),
    ]
    .concat()
}

fn key_msg() -> Vec<u8> {
    msg(b'K', &[&4242i32.to_be_bytes()[..], &[1, 2, 3, 4]].concat())
}

impl FakeConn {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    async fn recv(&mut self) -> (u8, Vec<u8>) {
        let tag = self.io.read_u8().await.unwrap();
        let len = self.io.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        self.io.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    fn param(&self, name: &str) -> String {
        match &self.first {
            StartupPacket::Startup(m) => m.get(name).unwrap().to_string(),
            other => panic!("expected a StartupMessage, got {other:?}"),
        }
    }

    /// SCRAM server side; `early_ok` sends AuthenticationOk instead of SASLFinal.
    /// Returns the GS2 header the client used.
    async fn scram(&mut self, mechanisms: &[&str], password: &str, early_ok: bool) -> String {
        let list: Vec<u8> = mechanisms
            .iter()
            .flat_map(|m| [m.as_bytes(), b"\0"].concat())
            .chain([0])
            .collect();
        self.send(&auth_msg(10, &list)).await;
        let (tag, body) = self.recv().await;
        assert_eq!(tag, b'p');
        let nul = body.iter().position(|b| *b == 0).unwrap();
        let mechanism = std::str::from_utf8(&body[..nul]).unwrap().to_string();
        let client_first = String::from_utf8(body[nul + 5..].to_vec()).unwrap();
        let (header, bare) = if let Some(rest) = client_first.strip_prefix("p=tls-server-end-point,,") {
            ("p=tls-server-end-point,,", rest)
        } else {
            client_first.split_at(3)
        };
        assert_eq!(mechanism == "SCRAM-SHA-256-PLUS", header.starts_with('p'));
        let client_nonce = bare.strip_prefix("n=,r=").expect("empty SCRAM user name").to_string();

        let salt = b"0123456789abcdef";
        let iterations = 4096;
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let hmac = |key: &[u8], data: &[u8]| {
            let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
            m.update(data);
            m.finalize().into_bytes().to_vec()
        };
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key).to_vec();
        let server_key = hmac(&salted, b"Server Key");

        let server_first = format!("r={client_nonce}srvnonce,s={},i={iterations}", B64.encode(salt));
        self.send(&auth_msg(11, server_first.as_bytes())).await;
        let (tag, body) = self.recv().await;
        assert_eq!(tag, b'p');
        let client_final = String::from_utf8(body).unwrap();
        let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
        let mut cbind = header.as_bytes().to_vec();
        if header.starts_with('p') {
            cbind.extend_from_slice(self.cert_hash.as_ref().unwrap());
        }
        assert_eq!(
            without_proof,
            format!("c={},r={client_nonce}srvnonce", B64.encode(&cbind))
        );
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let recovered: Vec<u8> = B64
            .decode(proof)
            .unwrap()
            .iter()
            .zip(&signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if !early_ok && Sha256::digest(&recovered).to_vec() != stored_key {
            self.send(&error_msg(
                "28P01",
                "password authentication failed for user \"v-token-payments\"",
            ))
            .await;
            return header.to_string();
        }
        if !early_ok {
            let v = format!("v={}", B64.encode(hmac(&server_key, auth_message.as_bytes())));
            self.send(&auth_msg(12, v.as_bytes())).await;
        }
        self.send(&auth_msg(0, b"")).await;
        header.to_string()
    }

    async fn finish_startup(&mut self) {
        let mut out = greeting_msgs();
        // BackendKeyData goes between the parameters, as Postgres sends it.
        let at = msg(b'S', b"server_version\x0016.4\x00").len();
        out.splice(at..at, key_msg());
        self.send(&out).await;
    }
}

async fn listen() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

fn params() -> Vec<(String, String)> {
    vec![
        ("user".into(), "v-token-payments".into()),
        ("database".into(), "payments".into()),
        ("application_name".into(), "psql".into()),
    ]
}

fn password() -> SecretString {
    SecretString::from(PASSWORD)
}

// --- TLS verification ---

/// Runs `open` against a TLS server with `server_pki`'s certificate.
async fn tls_open(
    server_pki: &Pki,
    sslmode: SslMode,
    roots: Option<RootCertStore>,
    name: &str,
) -> Result<UpstreamStream, UpstreamError> {
    let (listener, port) = listen().await;
    let acceptor = server_pki.acceptor();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        assert_eq!(read_packet(&mut tcp).await, StartupPacket::SslRequest);
        tcp.write_all(b"S").await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let s = settings(port, sslmode, roots, name);
    let mut during = "";
    let result = open(&s, &mut during).await;
    server.await.unwrap();
    result
}

#[tokio::test]
async fn verify_full_accepts_right_ca_and_name() {
    let pki = Pki::new(&["db.internal"]);
    let s = tls_open(&pki, SslMode::VerifyFull, Some(pki.roots()), "db.internal")
        .await
        .unwrap();
    assert!(matches!(s, Either::Right(_)));
    assert!(server_certificate(&s).is_some());
    // Debug names the kind and the sockets, nothing of the TLS session.
    let debug = format!("{s:?}");
    assert!(
        debug.starts_with("Right(TlsStream") && debug.contains("ClientConnection"),
        "{debug}"
    );
}

#[tokio::test]
async fn verify_full_refuses_wrong_name() {
    let pki = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyFull, Some(pki.roots()), "other.internal")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("TLS to 127.0.0.1:"), "{text}");
    assert!(
        text.contains("certificate for other.internal not valid: not valid for other.internal"),
        "{text}"
    );
    assert!(text.contains("db.internal"), "{text}");
    assert_eq!(e.sqlstate(), "08001");
}

#[tokio::test]
async fn verify_full_refuses_unknown_ca() {
    let pki = Pki::new(&["db.internal"]);
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyFull, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("certificate for db.internal not valid: unknown issuer"),
        "{e}"
    );
}

#[tokio::test]
async fn verify_ca_ignores_name_but_not_issuer() {
    let pki = Pki::new(&["db.internal"]);
    tls_open(&pki, SslMode::VerifyCa, Some(pki.roots()), "other.internal")
        .await
        .unwrap();
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyCa, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");
}

#[tokio::test]
async fn require_verifies_nothing_without_ca_file_but_the_chain_with_one() {
    let pki = Pki::new(&["db.internal"]);
    tls_open(&pki, SslMode::Require, None, "other.internal").await.unwrap();
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::Require, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");
}

/// Server answering the SSLRequest with `answer`, then closing after a moment.
async fn answer_ssl_request(
    answer: impl AsRef<[u8]> + Send + 'static,
    sslmode: SslMode,
) -> Result<UpstreamStream, UpstreamError> {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        assert_eq!(read_packet(&mut tcp).await, StartupPacket::SslRequest);
        tcp.write_all(answer.as_ref()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let s = settings(port, sslmode, None, "db.internal");
    let result = open(&s, &mut "").await;
    server.abort();
    result
}

#[tokio::test]
async fn server_without_tls() {
    let e = answer_ssl_request(b"N", SslMode::Require).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("server {} does not support TLS but sslmode=require", e_addr(&e))
    );
    assert!(matches!(
        answer_ssl_request(b"N", SslMode::Prefer).await.unwrap(),
        Either::Left(_)
    ));
    let e = answer_ssl_request(b"X", SslMode::Prefer).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Protocol(_)), "{e}");
}

fn e_addr(e: &UpstreamError) -> String {
    match e {
        UpstreamError::TlsNotSupported { addr, .. } => addr.clone(),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn bytes_after_ssl_accept_are_refused() {
    let e = answer_ssl_request(b"S\x16\x03\x01injected", SslMode::Require)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CVE-2021-3935"), "{e}");
    assert_eq!(e.sqlstate(), "08P01");
}

#[tokio::test]
async fn error_instead_of_ssl_answer_is_a_server_error() {
    let e = answer_ssl_request(
        msg(b'E', b"SFATAL\x00C53300\x00Mtoo many clients\x00\x00"),
        SslMode::Require,
    )
    .await
    .unwrap_err();
    match e {
        UpstreamError::Server(s) => {
            assert_eq!(s.code, "53300");
            assert_eq!(s.message, "too many clients");
        }
        other => panic!("{other}"),
    }
}

// --- authentication ---

#[tokio::test]
async fn scram_over_plain_connection() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        assert_eq!(c.param("user"), "v-token-payments");
        assert_eq!(c.param("application_name"), "psql");
        let header = c.scram(&["SCRAM-SHA-256"], PASSWORD, false).await;
        assert_eq!(header, "n,,");
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let connected = connect(&s, &params(), &password()).await.unwrap();
    let _c = server.await.unwrap();
    assert!(!connected.tls);
    assert_eq!(connected.backend_pid, Some(4242));
    assert_eq!(connected.key.as_ref().unwrap().secret, vec![1, 2, 3, 4]);
    assert_eq!(
        &connected.greeting[..],
        &greeting_msgs()[..],
        "greeting without BackendKeyData"
    );
    assert!(!format!("{connected:?}").contains("[1, 2, 3, 4]"));
}

/// A SCRAM login to a TLS server offering `mechanisms`; returns the GS2 header the client
/// sent and whether the connection is TLS.
async fn scram_over_tls(mechanisms: &'static [&'static str], sslmode: SslMode, verify: bool) -> (String, bool) {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        let header = c.scram(mechanisms, PASSWORD, false).await;
        c.finish_startup().await;
        (header, c)
    });
    let s = settings(port, sslmode, verify.then(|| pki.roots()), "db.internal");
    let connected = connect(&s, &params(), &password()).await.unwrap();
    let (header, _c) = server.await.unwrap();
    (header, connected.tls)
}

#[tokio::test]
async fn scram_plus_over_tls() {
    let (header, tls) = scram_over_tls(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], SslMode::VerifyFull, true).await;
    assert_eq!(header, "p=tls-server-end-point,,");
    assert!(tls);
}

#[tokio::test]
async fn scram_over_tls_without_plus_says_y() {
    let (header, tls) = scram_over_tls(&["SCRAM-SHA-256"], SslMode::Require, false).await;
    assert_eq!(header, "y,,");
    assert!(tls);
}

#[tokio::test]
async fn authentication_ok_before_scram_final_is_refused() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        // A server that does not know the password cannot produce SASLFinal; it skips to Ok.
        c.scram(&["SCRAM-SHA-256"], "not-the-password", true).await;
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(matches!(e, UpstreamError::Auth(_)), "{e}");
    assert!(e.to_string().contains("before proving it knows the password"), "{e}");
    let pg = e.to_pg_error("payments").unwrap();
    assert_eq!(pg.code, "08004");
    assert!(
        pg.message.contains("\"payments\"") && pg.message.contains("127.0.0.1:"),
        "{pg}"
    );
    assert!(!e.to_string().contains(PASSWORD));
}

#[tokio::test]
async fn wrong_password_is_forwarded_verbatim() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.scram(&["SCRAM-SHA-256"], "the-rotated-password", false).await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(e.is_password_rejected(), "{e}");
    assert_eq!(e.sqlstate(), "28P01");
    assert!(e.to_pg_error("payments").is_none());
    let UpstreamError::Server(se) = &e else { panic!("{e}") };
    assert_eq!(
        &se.raw[..],
        &error_msg("28P01", "password authentication failed for user \"v-token-payments\"")[..]
    );
    assert_eq!(se.severity, "FATAL");
}

#[tokio::test]
async fn md5_needs_verified_tls_or_explicit_permission() {
    async fn run(allow: bool) -> Result<Connected, UpstreamError> {
        let (listener, port) = listen().await;
        let server = tokio::spawn(async move {
            let mut c = accept(&listener, None).await;
            c.send(&auth_msg(5, &[1, 2, 3, 4])).await;
            let (tag, body) = c.recv().await;
            assert_eq!(tag, b'p');
            let expected =
                postgres_protocol::authentication::md5_hash(b"v-token-payments", PASSWORD.as_bytes(), [1, 2, 3, 4]);
            assert_eq!(body, [expected.as_bytes(), b"\0"].concat());
            c.send(&auth_msg(0, b"")).await;
            c.finish_startup().await;
            c
        });
        let mut s = settings(port, SslMode::Disable, None, "db.internal");
        s.allow_insecure_password = allow;
        let r = connect(&s, &params(), &password()).await;
        if allow {
            server.await.unwrap();
        }
        r
    }
    let e = run(false).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("MD5") && text.contains("unencrypted") && text.contains("allow_insecure_password"),
        "{text}"
    );
    assert!(text.contains("verify-full"), "{text}");
    assert_eq!(e.sqlstate(), "08004");
    run(true).await.unwrap();
}

#[tokio::test]
async fn cleartext_over_verified_tls() {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        c.send(&auth_msg(3, b"")).await;
        let (tag, body) = c.recv().await;
        assert_eq!((tag, body), (b'p', format!("{PASSWORD}\0").into_bytes()));
        c.send(&auth_msg(0, b"")).await;
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::VerifyFull, Some(pki.roots()), "db.internal");
    connect(&s, &params(), &password()).await.unwrap();
    server.await.unwrap();

    // The same over unverified TLS is refused.
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        c.send(&auth_msg(3, b"")).await;
        c
    });
    let s = settings(port, SslMode::Require, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(
        e.to_string()
            .contains("cleartext password over TLS without certificate verification"),
        "{e}"
    );
}

/// A server that sends `messages` after the startup packet.
async fn scripted(messages: Vec<u8>) -> UpstreamError {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.send(&messages).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.abort();
    e
}

#[tokio::test]
async fn unsupported_methods_are_named() {
    let e = scripted(auth_msg(10, b"SCRAM-SHA-1\0OAUTHBEARER\0\0")).await;
    assert!(e.to_string().contains("[SCRAM-SHA-1, OAUTHBEARER]"), "{e}");
    assert_eq!(e.sqlstate(), "08004");
    let e = scripted(auth_msg(7, b"")).await;
    assert!(e.to_string().contains("GSSAPI"), "{e}");
    let e = scripted(auth_msg(42, b"")).await;
    assert!(e.to_string().contains("authentication method 42"), "{e}");
}

#[tokio::test]
async fn protocol_violations() {
    let e = scripted(msg(b'Z', b"I")).await;
    assert!(matches!(e, UpstreamError::Protocol(_)), "{e}");
    assert!(e.to_string().contains("unexpected message type 'Z'"), "{e}");
    let e = scripted(b"R\x7f\xff\xff\xff".to_vec()).await;
    assert!(e.to_string().contains("invalid length"), "{e}");
    assert_eq!(e.to_pg_error("payments").unwrap().code, "08P01");
    let e = scripted(auth_msg(12, b"v=AAAA")).await;
    assert!(e.to_string().contains("SASLFinal without SASL"), "{e}");
}

#[tokio::test]
async fn server_error_after_authentication() {
    let e = scripted(
        [
            auth_msg(0, b""),
            msg(b'S', b"a\0b\0"),
            error_msg("3D000", "database \"nope\" does not exist"),
        ]
        .concat(),
    )
    .await;
    assert_eq!(e.sqlstate(), "3D000");
    assert!(!e.is_password_rejected());
    assert!(e.to_pg_error("payments").is_none());
}

#[tokio::test]
async fn eof_during_startup_names_the_upstream() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        drop(accept(&listener, None).await);
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.await.unwrap();
    assert!(
        e.to_string()
            .contains(&format!("upstream 127.0.0.1:{port} closed the connection")),
        "{e}"
    );
}

// --- connecting ---

#[tokio::test]
async fn timeout_names_addr_duration_and_stage() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let c = accept(&listener, None).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(c);
    });
    let mut s = settings(port, SslMode::Disable, None, "db.internal");
    s.connect_timeout = Duration::from_millis(200);
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.abort();
    assert_eq!(
        e.to_string(),
        format!("connecting to 127.0.0.1:{port} timed out after 200ms while authenticating")
    );
    let pg = e.to_pg_error("payments").unwrap();
    assert_eq!((pg.severity, pg.code), ("FATAL", "08001"));
    assert!(pg.hint.unwrap().contains("connect_timeout"));
}

#[tokio::test]
async fn refused_connection() {
    let (listener, port) = listen().await;
    drop(listener);
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Connect { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
        "{e}"
    );
    let pg = e.to_pg_error("payments").unwrap();
    assert!(
        pg.message
            .starts_with(&format!("database \"payments\": cannot connect to 127.0.0.1:{port}")),
        "{pg}"
    );
}

#[tokio::test]
async fn cancel_goes_over_tls_when_configured() {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move { accept(&listener, Some(&server_pki)).await.first });
    let s = settings(port, SslMode::VerifyFull, Some(pki.roots()), "db.internal");
    let key = BackendKey {
        pid: 4242,
        secret: vec![9, 8, 7, 6],
    };
    cancel(&s, &key).await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        StartupPacket::Cancel {
            pid: 4242,
            secret: vec![9, 8, 7, 6]
        }
    );

    // prefer against a server without TLS: plain.
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move { accept(&listener, None).await.first });
    let s = settings(port, SslMode::Prefer, None, "db.internal");
    cancel(&s, &key).await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        StartupPacket::Cancel {
            pid: 4242,
            secret: vec![9, 8, 7, 6]
        }
    );
}

// --- settings ---

fn config_with(extra: &str) -> crate::config::Config {
    crate::config::test_config(extra, "kind = \"database\"\nrole = \"payments\"")
}

#[test]
fn settings_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["db.internal"]);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let c = config_with(&format!(
        "ca_file = {:?}\nsni = \"pg.example\"\nconnect_timeout = \"3s\"",
        ca.display().to_string()
    ));
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert_eq!(s.addr(), "db.internal:5432");
    assert_eq!(s.sslmode, SslMode::VerifyFull);
    assert!(s.tls.is_some());
    assert_eq!(s.server_name, ServerName::try_from("pg.example").unwrap());
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert!(!s.allow_insecure_password);
    assert!(!format!("{s:?}").contains("BEGIN"));

    let c = config_with("sslmode = \"disable\"");
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert!(s.tls.is_none());

    let mut c = config_with("");
    c.databases[0].upstream = crate::config::HostPort::parse("[::1]:5433").unwrap();
    c.databases[0].ca_file = Some(ca.clone());
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert_eq!(s.addr(), "[::1]:5433");
}

#[test]
fn settings_errors_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let mut c = config_with(&format!("ca_file = {:?}", not_pem.display().to_string()));
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "databases[0].ca_file: {:?} contains no PEM certificate",
            not_pem.display().to_string()
        )
    );

    c.databases[0].ca_file = Some("/nonexistent/x.pem".into());
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].ca_file: cannot read \"/nonexistent/x.pem\": No such file"),
        "{e}"
    );

    let pki = Pki::new(&["db.internal"]);
    let cert = dir.path().join("client.pem");
    std::fs::write(&cert, &pki.ca_pem).unwrap();
    c.databases[0].ca_file = None;
    c.databases[0].sslmode = SslMode::Require;
    c.databases[0].client_cert = Some(crate::config::ClientCert {
        cert_file: cert.clone(),
        key_file: cert.clone(),
    });
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].key_file: ") && e.contains("no PEM private key"),
        "{e}"
    );

    c.databases[0].client_cert = None;
    c.databases[0].sni = Some("not a name!".into());
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].sni: \"not a name!\" is not a valid TLS server name"),
        "{e}"
    );
}
