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
use crate::pg::frame::msg;
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
        auth_policy: Default::default(),
        hosts: Vec::new(),
        ha: Default::default(),
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

mod auth;
mod connect;
mod hosts;
mod sslmode;
