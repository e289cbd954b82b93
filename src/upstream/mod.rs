//! The upstream side: opening the connection to the real Postgres server (TCP, TLS per sslmode,
//! StartupMessage, authentication with the Vault-issued credential) up to its first
//! ReadyForQuery, and sending CancelRequests to it. After [`connect`] the session only relays
//! bytes over [`UpstreamStream`].

mod auth;
pub mod auth_policy;
pub(crate) mod hosts;
mod keepalive;
pub mod scram;
pub mod session_attrs;
pub(crate) mod survey;
pub(crate) mod tls;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::ServerName;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::config::{DatabaseConfig, SslMode, UpstreamHa};
use crate::pg::cancel::BackendKey;
use crate::pg::error::{sqlstate, PgError};
use crate::pg::startup::SSL_REQUEST_CODE;

/// Why an entry's upstream settings cannot be used; the texts name the config key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Tls(#[from] tls::ClientConfigError),
    #[error("{key}: {name:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName { key: String, name: String },
}

/// How to reach one database entry's upstream.
#[derive(Clone)]
pub struct UpstreamSettings {
    /// The config entry's name, for messages.
    pub database: String,
    pub host: String,
    pub port: u16,
    pub sslmode: SslMode,
    /// None for sslmode=disable.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The `sni` setting, or the host.
    pub server_name: ServerName<'static>,
    /// One deadline for resolving, connecting, the TLS handshake and authentication.
    pub connect_timeout: Duration,
    /// false: MD5 and cleartext passwords are sent only over verified TLS (verify-ca/verify-full).
    pub allow_insecure_password: bool,
    /// require_auth and channel_binding.
    pub auth_policy: auth_policy::AuthPolicy,
    /// Every configured host with its TLS name, in order; empty: just `host`/`port`/`server_name`.
    pub hosts: Vec<UpstreamHost>,
    pub ha: UpstreamHa,
}

/// One host of an upstream list.
#[derive(Debug, Clone)]
pub struct UpstreamHost {
    pub host: String,
    pub port: u16,
    /// The `sni` setting, or this host's name.
    pub server_name: ServerName<'static>,
}

impl UpstreamHost {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn addr(&self) -> String {
        crate::config::HostPort {
            host: self.host.clone(),
            port: self.port,
        }
        .to_string()
    }
}

impl fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ClientConfig's Debug would walk into the client certificate's key.
        f.debug_struct("UpstreamSettings")
            .field("database", &self.database)
            .field("addr", &self.addr())
            .field("sslmode", &self.sslmode)
            .field("tls", &self.tls.is_some())
            .field("server_name", &self.server_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("allow_insecure_password", &self.allow_insecure_password)
            .field("auth_policy", &self.auth_policy)
            .field("hosts", &self.hosts)
            .field("ha", &self.ha)
            .finish()
    }
}

impl UpstreamSettings {
    /// Builds settings (incl. reading ca_file / cert_file / key_file) from a validated config entry.
    /// Errors name the config key and the file, e.g.
    /// `databases[0].ca_file: cannot read "/x.pem": No such file or directory (os error 2)`.
    pub fn from_config(index: usize, db: &DatabaseConfig) -> Result<Self, SettingsError> {
        let (host, port) = (db.upstream.host.clone(), db.upstream.port);
        let name_for = |j: usize, host: &str| {
            let (name_key, name) = match &db.sni {
                Some(sni) => ("sni".to_string(), sni.clone()),
                None if db.upstream_hosts.len() > 1 => (format!("upstream[{j}]"), host.to_string()),
                None => ("upstream".to_string(), host.to_string()),
            };
            match ServerName::try_from(name.clone()) {
                Ok(n) => Ok(n),
                // The name only matters when there is TLS.
                Err(_) if db.sslmode == SslMode::Disable => Ok(ServerName::try_from("localhost").expect("valid name")),
                Err(_) => Err(SettingsError::ServerName {
                    key: format!("databases[{index}].{name_key}"),
                    name,
                }),
            }
        };
        let server_name = name_for(0, &host)?;
        let hosts = db
            .upstream_hosts
            .iter()
            .enumerate()
            .map(|(j, h)| {
                Ok(UpstreamHost {
                    host: h.host.clone(),
                    port: h.port,
                    server_name: name_for(j, &h.host)?,
                })
            })
            .collect::<Result<Vec<_>, SettingsError>>()?;
        Ok(UpstreamSettings {
            hosts,
            ha: db.ha.clone(),
            database: db.name.clone(),
            host,
            port,
            sslmode: db.sslmode,
            tls: tls::client_config(index, db)?,
            server_name,
            connect_timeout: db.connect_timeout,
            allow_insecure_password: db.allow_insecure_password,
            auth_policy: auth_policy::AuthPolicy {
                require_auth: db.require_auth.clone(),
                channel_binding: db.channel_binding,
            },
        })
    }

    /// `host:port`, with brackets around an IPv6 host.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The hosts to try, in the configured order.
    pub fn host_list(&self) -> Vec<UpstreamHost> {
        if self.hosts.is_empty() {
            vec![UpstreamHost {
                host: self.host.clone(),
                port: self.port,
                server_name: self.server_name.clone(),
            }]
        } else {
            self.hosts.clone()
        }
    }

    /// These settings narrowed to one resolved address of `host`, its TLS name kept.
    pub(crate) fn for_address(&self, host: &UpstreamHost, a: SocketAddr) -> UpstreamSettings {
        UpstreamSettings {
            host: a.ip().to_string(),
            port: a.port(),
            server_name: host.server_name.clone(),
            hosts: Vec::new(),
            ..self.clone()
        }
    }

    /// Whether a TLS connection made with these settings has had its certificate chain verified.
    fn verifies_certificate(&self) -> bool {
        matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The connection to the upstream: `Left` plain, `Right` TLS. Either delegates every poll; its
/// derived Debug shows the socket addresses and rustls' `ClientConnection`, whose Debug prints
/// nothing of the session (no keys, no traffic).
pub type UpstreamStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// DER of the server's end-entity certificate, when TLS is in use.
fn server_certificate(stream: &UpstreamStream) -> Option<&[u8]> {
    match stream {
        Either::Left(_) => None,
        Either::Right(s) => s.get_ref().1.peer_certificates()?.first().map(|c| c.as_ref()),
    }
}

/// An authenticated upstream connection, positioned just after its first ReadyForQuery.
pub struct Connected {
    pub stream: UpstreamStream,
    /// From BackendKeyData.
    pub key: Option<BackendKey>,
    pub backend_pid: Option<i32>,
    /// Raw bytes of every server message after AuthenticationOk up to and including the first
    /// ReadyForQuery, except BackendKeyData (the session substitutes its own key), plus the
    /// NoticeResponses sent during authentication. The session forwards these to the client
    /// verbatim. Should the server have sent anything after ReadyForQuery already, those bytes
    /// follow here too, so that nothing is lost to the relay.
    pub greeting: BytesMut,
    pub tls: bool,
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("backend_pid", &self.backend_pid)
            .field("key", &self.key)
            .field("greeting_len", &self.greeting.len())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// An ErrorResponse the server sent during startup or authentication.
#[derive(Debug, Clone)]
pub struct ServerError {
    /// The non-localized severity (V field) when present, else S.
    pub severity: String,
    pub code: String,
    pub message: String,
    /// The whole 'E' message, to forward to the client verbatim.
    pub raw: Bytes,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// Why the upstream connection could not be made. Never contains the password.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {host} (upstream {addr}): {source}")]
    Resolve {
        addr: String,
        host: String,
        source: io::Error,
    },
    #[error("cannot connect to {addr}{}: {source}", tried_suffix(addr, tried))]
    Connect {
        addr: String,
        tried: Vec<SocketAddr>,
        source: io::Error,
    },
    #[error("connecting to {addr} timed out after {} while {during}", humantime::format_duration(*after))]
    Timeout {
        addr: String,
        after: Duration,
        during: &'static str,
    },
    #[error("TLS to {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("server {addr} does not support TLS but sslmode={sslmode}")]
    TlsNotSupported { addr: String, sslmode: SslMode },
    /// The server answered the SSLRequest with something other than 'S' or 'N'. What it sent came
    /// before any encryption, so anyone on the path could have written it: it is neither shown
    /// to the client nor taken as a verdict on the credential (no password was sent yet).
    #[error("server at {addr} refused TLS (it answered the SSLRequest with {answer}, which is not trusted before encryption)")]
    TlsRefused { addr: String, answer: &'static str },
    #[error("the server refused the connection: {0}")]
    Server(ServerError),
    /// The message names the upstream address.
    #[error("{0}")]
    Auth(String),
    /// The message names the upstream address.
    #[error("{0}")]
    Protocol(String),
    /// I/O failure after the TCP connection was made; the message names the upstream address
    /// when it comes from [`connect`].
    #[error("{0}")]
    Io(io::Error),
    /// No host of the list could be used (or the one host was of the wrong kind).
    #[error(
        "no upstream host could be used (target_session_attrs={wanted}): {}",
        hosts::join(failures)
    )]
    NoHost {
        wanted: crate::config::TargetSessionAttrs,
        failures: Vec<hosts::HostFailure>,
    },
}

fn tried_suffix(addr: &str, tried: &[SocketAddr]) -> String {
    match tried {
        [one] if one.to_string() == addr => String::new(),
        [] => String::new(),
        many => {
            let list: Vec<String> = many.iter().map(|a| a.to_string()).collect();
            format!(" (tried {})", list.join(", "))
        }
    }
}

impl UpstreamError {
    /// The error to send a client. Server errors: None (the session forwards `raw` instead).
    pub fn to_pg_error(&self, database: &str) -> Option<PgError> {
        let message = format!("database \"{database}\": {self}");
        let (code, hint) = match self {
            UpstreamError::Server(_) => return None,
            UpstreamError::Resolve { .. } | UpstreamError::Connect { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "check the upstream host and port in dbward's configuration, and that the server is running and reachable from this host",
            ),
            UpstreamError::Timeout { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "check that the upstream is reachable from this host (firewalls, routes) and not overloaded, or raise connect_timeout",
            ),
            UpstreamError::Tls { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "check sslmode, ca_file, sni and cert_file/key_file for this database entry against the server's certificate",
            ),
            UpstreamError::TlsNotSupported { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "enable ssl on the server, or lower sslmode if an unencrypted connection is acceptable",
            ),
            UpstreamError::TlsRefused { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "check that the upstream address points at the PostgreSQL server itself (no other service or device in the path) and that the server accepts connections (its log says why it refused)",
            ),
            UpstreamError::Auth(_) => (
                sqlstate::CONNECTION_REJECTED,
                "check the server's authentication settings (pg_hba.conf, password_encryption) and dbward's sslmode for this database entry",
            ),
            UpstreamError::Protocol(_) => (
                sqlstate::PROTOCOL_VIOLATION,
                "check that the upstream address points at a PostgreSQL server (not another service or a proxy that alters the protocol)",
            ),
            UpstreamError::Io(_) => (
                sqlstate::CONNECTION_FAILURE,
                "check the server's log for why it closed the connection",
            ),
            UpstreamError::NoHost { .. } => (
                sqlstate::CONNECTION_FAILURE,
                "check that the upstream hosts are running and reachable, and that one of them is of the kind target_session_attrs asks for (after a failover, that a standby was promoted)",
            ),
        };
        Some(PgError::fatal(code, message).with_hint(hint))
    }

    /// True when the server said 28P01 (invalid_password).
    pub fn is_password_rejected(&self) -> bool {
        match self {
            UpstreamError::Server(e) => e.code == sqlstate::INVALID_PASSWORD,
            UpstreamError::NoHost { failures, .. } => failures
                .iter()
                .any(|f| matches!(&f.reason, hosts::HostReason::Failed(e) if e.is_password_rejected())),
            _ => false,
        }
    }

    /// The SQLSTATE class (first two characters) as a metric label: only `[0-9A-Z]{2}`, so a
    /// server cannot mint label values; anything else becomes `XX`.
    pub fn sqlstate_class(&self) -> String {
        sqlstate_class(self.sqlstate())
    }

    /// SQLSTATE for metrics: the server's code, or the one [`Self::to_pg_error`] uses.
    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Server(e) => &e.code,
            UpstreamError::Auth(_) => sqlstate::CONNECTION_REJECTED,
            UpstreamError::Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
            _ => sqlstate::CONNECTION_FAILURE,
        }
    }
}

/// See [`UpstreamError::sqlstate_class`].
pub(crate) fn sqlstate_class(code: &str) -> String {
    match code.as_bytes() {
        [a, b, ..] if [a, b].iter().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()) => {
            format!("{}{}", *a as char, *b as char)
        }
        _ => "XX".to_string(),
    }
}

/// Adds the upstream address and what was going on to an I/O error.
fn io_error(addr: &str, during: &str, e: io::Error) -> UpstreamError {
    let message = match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            format!("upstream {addr} closed the connection while {during}")
        }
        _ => format!("connection to upstream {addr} failed while {during}: {e}"),
    };
    UpstreamError::Io(io::Error::new(e.kind(), message))
}

/// Opens an authenticated connection: TCP, TLS per sslmode, StartupMessage with `params`
/// (which include "user" and "database"), authentication, and everything up to the first
/// ReadyForQuery. The whole of it runs under `connect_timeout`.
pub async fn connect(
    settings: &UpstreamSettings,
    params: &[(String, String)],
    password: &SecretString,
) -> Result<Connected, UpstreamError> {
    connect_with_keys(settings, params, password, &Arc::default()).await
}

/// [`connect`] with the credential's SCRAM key cache, so that PBKDF2 runs once per credential
/// rather than once per connection.
pub async fn connect_with_keys(
    settings: &UpstreamSettings,
    params: &[(String, String)],
    password: &SecretString,
    keys: &Arc<scram::KeyCache>,
) -> Result<Connected, UpstreamError> {
    let mut during = "resolving the host name";
    let result = tokio::time::timeout(
        settings.connect_timeout,
        connect_inner(settings, params, password, keys, &mut during),
    )
    .await;
    result.unwrap_or_else(|_| {
        Err(UpstreamError::Timeout {
            addr: settings.addr(),
            after: settings.connect_timeout,
            during,
        })
    })
}

async fn connect_inner(
    settings: &UpstreamSettings,
    params: &[(String, String)],
    password: &SecretString,
    keys: &Arc<scram::KeyCache>,
    during: &mut &'static str,
) -> Result<Connected, UpstreamError> {
    let addr = settings.addr();
    let mut stream = open(settings, during).await?;
    let tls = matches!(stream, Either::Right(_));

    *during = "sending the startup message";
    let startup = crate::pg::startup::encode_startup(params);
    stream
        .write_all(&startup)
        .await
        .map_err(|e| io_error(&addr, during, e))?;
    stream.flush().await.map_err(|e| io_error(&addr, during, e))?;

    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let ctx = auth::Context {
        addr: &addr,
        database: &settings.database,
        user,
        password,
        keys,
        tls,
        tls_verified: tls && settings.verifies_certificate(),
        allow_insecure_password: settings.allow_insecure_password,
        certificate_hash: server_certificate(&stream).and_then(tls::certificate_hash),
        policy: &settings.auth_policy,
    };
    let outcome = auth::startup(&mut stream, &ctx, during).await?;
    tracing::debug!(
        database = %settings.database,
        upstream = %addr,
        tls,
        backend_pid = ?outcome.key.as_ref().map(|k| k.pid),
        "upstream connection ready"
    );
    Ok(Connected {
        stream,
        backend_pid: outcome.key.as_ref().map(|k| k.pid),
        key: outcome.key,
        greeting: outcome.greeting,
        tls,
    })
}

/// Sends a CancelRequest for `key` over a new connection (TLS per settings, as libpq does) and
/// waits for the server to close it, which it does once the request has been handled.
pub async fn cancel(settings: &UpstreamSettings, key: &BackendKey) -> Result<(), UpstreamError> {
    let mut during = "resolving the host name";
    match tokio::time::timeout(settings.connect_timeout, cancel_inner(settings, key, &mut during)).await {
        Ok(result) => result,
        // The request went out; only the server's close was slow.
        Err(_) if during == WAITING_FOR_CLOSE => Ok(()),
        Err(_) => Err(UpstreamError::Timeout {
            addr: settings.addr(),
            after: settings.connect_timeout,
            during,
        }),
    }
}

const WAITING_FOR_CLOSE: &str = "waiting for the server to close the cancel connection";

async fn cancel_inner(
    settings: &UpstreamSettings,
    key: &BackendKey,
    during: &mut &'static str,
) -> Result<(), UpstreamError> {
    let addr = settings.addr();
    let mut stream = open(settings, during).await?;
    *during = "sending the cancel request";
    stream
        .write_all(&key.cancel_request())
        .await
        .map_err(|e| io_error(&addr, during, e))?;
    stream.flush().await.map_err(|e| io_error(&addr, during, e))?;
    *during = WAITING_FOR_CLOSE;
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// TCP connection plus TLS negotiation per sslmode.
/// Resolves the upstream host (at every connection: DNS may have moved it) and connects to the
/// first address that accepts.
async fn connect_tcp(
    settings: &UpstreamSettings,
    addr: &str,
    during: &mut &'static str,
) -> Result<TcpStream, UpstreamError> {
    *during = "resolving the host name";
    let resolve_error = |source| UpstreamError::Resolve {
        addr: addr.to_string(),
        host: settings.host.clone(),
        source,
    };
    let candidates: Vec<SocketAddr> = tokio::net::lookup_host((settings.host.as_str(), settings.port))
        .await
        .map_err(resolve_error)?
        .collect();
    if candidates.is_empty() {
        return Err(resolve_error(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses found",
        )));
    }

    *during = "connecting";
    let mut tcp = None;
    let mut last_error = None;
    for candidate in &candidates {
        match TcpStream::connect(candidate).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => {
                tracing::debug!(upstream = %addr, address = %candidate, error = %e, "upstream address failed");
                last_error = Some(e);
            }
        }
    }
    let Some(tcp) = tcp else {
        return Err(UpstreamError::Connect {
            addr: addr.to_string(),
            tried: candidates,
            source: last_error.expect("at least one address was tried"),
        });
    };
    // Postgres messages are small and latency-bound.
    tcp.set_nodelay(true)
        .map_err(|e| io_error(addr, "setting TCP_NODELAY", e))?;
    if let Some(k) = &settings.ha.keepalive {
        keepalive::apply(&tcp, k).map_err(|e| io_error(addr, "setting TCP keepalive", e))?;
    }
    Ok(tcp)
}

async fn open(settings: &UpstreamSettings, during: &mut &'static str) -> Result<UpstreamStream, UpstreamError> {
    let addr = settings.addr();
    let mut tcp = connect_tcp(settings, &addr, during).await?;
    if settings.sslmode == SslMode::Disable {
        return Ok(Either::Left(tcp));
    }
    let Some(config) = settings.tls.clone() else {
        return Err(UpstreamError::Tls {
            addr,
            reason: format!("sslmode={} but no TLS configuration was built", settings.sslmode),
        });
    };

    *during = "negotiating TLS";
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&request).await.map_err(|e| io_error(&addr, during, e))?;
    // Exactly one byte: whatever follows 'S' belongs to the TLS handshake.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| io_error(&addr, during, e))?;
    match answer[0] {
        b'S' => {}
        b'N' if settings.sslmode == SslMode::Prefer => return Ok(Either::Left(tcp)),
        b'N' => return Err(UpstreamError::TlsNotSupported { addr, sslmode: settings.sslmode }),
        // CVE-2024-10977: an ErrorResponse here is unauthenticated; libpq no longer shows it as
        // the server's, and it says nothing about the credential. Its code goes to the log only.
        b'E' => {
            let said = auth::error_after_ssl_request(&mut tcp, &addr).await;
            tracing::warn!(
                upstream = %addr,
                sqlstate = %said.sqlstate_class(),
                "upstream answered the SSLRequest with an error before TLS; not relayed, credential kept"
            );
            return Err(UpstreamError::TlsRefused {
                addr,
                answer: "an ErrorResponse",
            });
        }
        _ if settings.sslmode != SslMode::Prefer => {
            return Err(UpstreamError::TlsRefused {
                addr,
                answer: "an unknown byte",
            })
        }
        other => {
            return Err(UpstreamError::Protocol(format!(
                "upstream {addr} answered the SSLRequest with byte 0x{other:02x} instead of 'S' or 'N'; is it a PostgreSQL server?"
            )))
        }
    }
    // CVE-2021-3935: data the server sent after 'S' but before the handshake is unencrypted and
    // could have been injected. The client speaks first in TLS, so a real server sends nothing.
    let mut extra = [0u8; 1];
    match tcp.try_read(&mut extra) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(0) => return Err(io_error(&addr, during, io::ErrorKind::UnexpectedEof.into())),
        Ok(_) => {
            return Err(UpstreamError::Protocol(format!(
                "upstream {addr} sent unencrypted data after accepting TLS (possible man-in-the-middle, CVE-2021-3935)"
            )))
        }
        Err(e) => return Err(io_error(&addr, during, e)),
    }

    *during = "in the TLS handshake";
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(settings.server_name.clone(), tcp).await {
        Ok(s) => Ok(Either::Right(Box::new(s))),
        Err(e) => Err(UpstreamError::Tls {
            addr,
            reason: tls::describe_error(&e, &settings.server_name),
        }),
    }
}

#[cfg(test)]
mod tests;
