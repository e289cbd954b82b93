//! The HTTP client for the Vault API (`/v1/...`): TLS with the configured CA or the system
//! roots, `X-Vault-Namespace`, a timeout on every request, and errors that keep Vault's status
//! and message.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::auth::JwtClaims;
use crate::config::VaultConfig;
use crate::metrics::Metrics;

/// Vault answers are small; anything larger is not a Vault answer.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A Vault API failure. Display texts name the operation and the path; none carries a secret.
/// Callers decide by variant: the texts are for people.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VaultError {
    /// Vault answered with an error status.
    #[error("{}", status_message(.op, .path, *.status, .errors))]
    Status {
        op: &'static str,
        path: String,
        status: u16,
        /// Vault's own messages, multierror wrapping removed.
        errors: Vec<String>,
    },
    /// Vault refused a jwt or kubernetes login. The claims are the JWT's as read on this host:
    /// the text shows them so they can be compared with the role's bindings.
    #[error("{}", jwt_login_message(.path, *.status, .errors, .role, .claims))]
    JwtLoginRefused {
        path: String,
        status: u16,
        /// Vault's own messages, as in [`VaultError::Status`].
        errors: Vec<String>,
        role: String,
        claims: Arc<JwtClaims>,
    },
    /// No TCP/TLS connection to Vault.
    #[error("Vault at {address} is unreachable ({op} {path}): {detail}")]
    Unreachable {
        op: &'static str,
        path: String,
        address: String,
        kind: TransportKind,
        /// The cause chain, for people.
        detail: String,
    },
    /// Vault accepted the connection but did not answer in time (hung, or frozen).
    #[error("Vault at {address} did not answer {op} of {path} within {after:?}")]
    Timeout {
        op: &'static str,
        path: String,
        address: String,
        after: Duration,
    },
    /// Vault answered 2xx with a body dbward cannot use.
    #[error("Vault answered {op} of {path} with an unusable response: {problem}")]
    Malformed {
        op: &'static str,
        path: String,
        problem: Malformed,
    },
    /// A problem on this host before any request (token file unreadable, JWT expired...).
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// What kind of transport failure kept dbward from Vault, read from the error chain's types.
/// DNS failures are [`TransportKind::Other`]: hyper-util's connect error type is private and
/// std reports a failed lookup with an unnamed error kind, so only their text would tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The TLS handshake failed (certificate, protocol, or a plain-HTTP server on https://).
    Tls,
    /// Nothing listens at the address.
    Refused,
    Other,
}

/// Why a 2xx answer is unusable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Malformed {
    #[error("not JSON ({0})")]
    NotJson(Arc<serde_json::Error>),
    #[error("no auth.client_token in the answer")]
    NoClientToken,
    #[error("no data in the answer")]
    NoData,
    #[error("no data.data: is this a KV v2 path, and does the secret have a current version (not deleted)?")]
    NoKvData,
    #[error("key {key:?} is not a non-empty string")]
    NotAString { key: String },
    /// Key names only: the values are secrets.
    #[error("the secret has no key {key:?} (keys present: {})", .present.join(", "))]
    MissingKey { key: String, present: Vec<String> },
}

/// Problems on this host, found before anything is sent to Vault. Texts name the config key and
/// the file, never the secret in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LocalError {
    #[error("vault.auth.{key} {}: cannot read: {source}", .path.display())]
    SecretFileUnreadable {
        key: &'static str,
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("vault.auth.{key} {}: the file is empty", .path.display())]
    SecretFileEmpty { key: &'static str, path: PathBuf },
    #[error("vault.auth.token_file {}: not a JWT ({source})", .file.display())]
    NotAJwt {
        file: PathBuf,
        source: jsonwebtoken::errors::Error,
    },
    #[error("vault.auth.token_file {}: cannot read the JWT's claims ({source})", .file.display())]
    UnreadableClaims {
        file: PathBuf,
        source: jsonwebtoken::errors::Error,
    },
    #[error(
        "vault.auth.token_file {}: the JWT expired at {} ({}); whatever writes this file (the projected service-account token, the identity agent) has stopped rotating it",
        .file.display(), rfc3339(*.exp), .claims.describe()
    )]
    JwtExpired {
        file: PathBuf,
        exp: u64,
        claims: Arc<JwtClaims>,
    },
    #[error(
        "vault.auth.token_file {}: the JWT is not valid before {} ({}); check this host's clock",
        .file.display(), rfc3339(*.nbf), .claims.describe()
    )]
    JwtNotYetValid {
        file: PathBuf,
        nbf: u64,
        claims: Arc<JwtClaims>,
    },
    #[error("the Vault token contains characters not allowed in an HTTP header")]
    TokenNotHeaderSafe,
    #[error("bad Vault request URL {url}: {source}")]
    BadRequestUrl { url: String, source: Arc<http::Error> },
    /// A request for a database entry a reload removed while it was in flight.
    #[error("database entry {database:?} was removed by a reload")]
    EntryRemoved { database: String },
}

/// The Vault client cannot be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum VaultSetupError {
    /// `load_roots`' message, which names the file.
    #[error("vault.ca_file: {0}")]
    CaFile(String),
    #[error("vault: TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// `App::new` still reports start-up problems as text.
impl From<VaultSetupError> for String {
    fn from(e: VaultSetupError) -> String {
        e.to_string()
    }
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn jwt_login_message(path: &str, status: u16, errors: &[String], role: &str, claims: &JwtClaims) -> String {
    let mut all = errors.to_vec();
    all.push(format!(
        "the JWT has {}; compare with the bound claims of Vault role {role:?}",
        claims.describe()
    ));
    status_message("login", path, status, &all)
}

fn status_message(op: &str, path: &str, status: u16, errors: &[String]) -> String {
    let text = if errors.is_empty() {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error")
            .to_lowercase()
    } else {
        errors.join("; ")
    };
    match status {
        403 => format!("Vault denied {op} of {path} (403 {text})"),
        _ => format!("Vault {op} of {path} failed ({status} {text})"),
    }
}

impl VaultError {
    pub fn status(&self) -> Option<u16> {
        match self {
            VaultError::Status { status, .. } | VaultError::JwtLoginRefused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The login failed, or a problem on this host stopped it before anything was sent.
    pub fn is_login(&self) -> bool {
        matches!(
            self,
            VaultError::Status { op: "login", .. } | VaultError::JwtLoginRefused { .. } | VaultError::Local(_)
        )
    }

    pub fn is_denied(&self) -> bool {
        self.status() == Some(403)
    }

    /// Vault could not be asked at all (down, hanging, sealed, overloaded): a cached credential
    /// may still be used and the client's error is 08001.
    pub fn is_unavailable(&self) -> bool {
        match self {
            VaultError::Unreachable { .. } | VaultError::Timeout { .. } => true,
            _ => matches!(self.status(), Some(429 | 500..=599)),
        }
    }

    /// A short label for metrics: the status code or the failure class.
    pub fn label(&self) -> String {
        match self {
            VaultError::Status { status, .. } | VaultError::JwtLoginRefused { status, .. } => status.to_string(),
            VaultError::Unreachable { .. } => "unreachable".into(),
            VaultError::Timeout { .. } => "timeout".into(),
            VaultError::Malformed { .. } => "malformed".into(),
            VaultError::Local { .. } => "local".into(),
        }
    }
}

/// Vault's error body: `{"errors": ["1 error occurred:\n\t* permission denied\n\n"]}`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

/// Vault wraps multierrors as "1 error occurred:\n\t* permission denied\n\n"; keep the messages.
fn clean_errors(errors: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for e in errors {
        let lines: Vec<&str> = e
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .filter(|l| !(l.ends_with("occurred:") && l.contains("error")))
            .map(|l| l.trim_start_matches("* ").trim())
            .collect();
        if lines.is_empty() {
            continue;
        }
        out.push(lines.join("; "));
    }
    out
}

/// A successful response: the JSON body and the server's `Date` header (for clock-skew checks).
/// Every string in the body is wiped when the response is dropped: credentials and tokens pass
/// through it. Its Debug shows the status only.
pub struct VaultResponse {
    pub status: u16,
    pub body: serde_json::Value,
    pub date: Option<String>,
}

impl std::fmt::Debug for VaultResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultResponse")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Drop for VaultResponse {
    fn drop(&mut self) {
        fn wipe(v: &mut serde_json::Value) {
            use zeroize::Zeroize;
            match v {
                serde_json::Value::String(s) => s.zeroize(),
                serde_json::Value::Array(a) => a.iter_mut().for_each(wipe),
                serde_json::Value::Object(o) => o.values_mut().for_each(wipe),
                _ => {}
            }
        }
        wipe(&mut self.body);
    }
}

impl VaultResponse {
    pub fn str_field(&self, ptr: &str) -> Option<&str> {
        self.body.pointer(ptr).and_then(|v| v.as_str())
    }

    pub fn u64_field(&self, ptr: &str) -> Option<u64> {
        self.body.pointer(ptr).and_then(|v| v.as_u64())
    }
}

/// The strings of a JSON array (policies, capabilities); anything else is no strings.
pub(crate) fn string_list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

pub struct VaultClient {
    address: String,
    namespace: Option<String>,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Loads PEM certificates into a root store; the error names the file.
pub fn load_roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
        }
        None => {
            // Unreadable system certificates are skipped: one bad file must not stop start-up.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

impl VaultClient {
    /// Builds the client; errors name the config key.
    pub fn new(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, VaultSetupError> {
        let roots = load_roots(cfg.ca_file.as_deref()).map_err(VaultSetupError::CaFile)?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Arc::new(VaultClient {
            address: cfg.address.trim_end_matches('/').to_string(),
            namespace: cfg.namespace.clone(),
            timeout: cfg.request_timeout.0,
            http,
            metrics,
        }))
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// `GET /v1/<path>`.
    pub async fn read(&self, token: &SecretString, path: &str) -> Result<VaultResponse, VaultError> {
        self.call("read", Method::GET, path, Some(token), None).await
    }

    /// A request with a JSON body. `op` names the operation in errors ("login", "renew", ...).
    pub async fn write(
        &self,
        op: &'static str,
        path: &str,
        token: Option<&SecretString>,
        body: &(impl serde::Serialize + ?Sized),
    ) -> Result<VaultResponse, VaultError> {
        // Login bodies carry the JWT or secret_id: they are serialized from borrowed fields
        // straight into a buffer that is wiped after sending.
        let bytes = zeroize::Zeroizing::new(serde_json::to_vec(body).expect("request bodies serialize"));
        self.call(op, Method::PUT, path, token, Some(Bytes::copy_from_slice(&bytes)))
            .await
    }

    /// A request with no body other than GET (e.g. `sys/health`), without a token.
    pub async fn get_unauthenticated(&self, op: &'static str, path: &str) -> Result<VaultResponse, VaultError> {
        self.call(op, Method::GET, path, None, None).await
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<VaultResponse, VaultError> {
        let started = std::time::Instant::now();
        let result = self.call_inner(op, method, path, token, body).await;
        let status = match &result {
            Ok(r) => r.status.to_string(),
            Err(e) => e.label(),
        };
        self.metrics
            .vault_requests_total
            .with_label_values(&[op, &status])
            .inc();
        self.metrics
            .vault_request_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn call_inner(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<VaultResponse, VaultError> {
        let path = path.trim_start_matches('/');
        let url = format!("{}/v1/{}", self.address, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            let mut v = http::HeaderValue::from_str(t.expose_secret()).map_err(|_| LocalError::TokenNotHeaderSafe)?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| LocalError::BadRequestUrl {
                url: url.clone(),
                source: Arc::new(e),
            })?;

        let unreachable = |e: &(dyn std::error::Error + 'static), detail: String| VaultError::Unreachable {
            op,
            path: path.to_string(),
            address: self.address.clone(),
            kind: transport_kind(e),
            detail,
        };
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(&e, describe_hyper_error(&e)))?;
            let status = resp.status().as_u16();
            let date = resp
                .headers()
                .get(header::DATE)
                .and_then(|d| d.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(&*e, format!("reading the response failed: {e}")))?
                .to_bytes();
            Ok::<_, VaultError>((status, date, body))
        };
        let (status, date, body) =
            tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| VaultError::Timeout {
                    op,
                    path: path.to_string(),
                    address: self.address.clone(),
                    after: self.timeout,
                })??;

        // The body may hold a password or token: the raw bytes are wiped once parsed.
        let body = zeroize::Zeroizing::new(Vec::<u8>::from(body));
        if !(200..300).contains(&status) {
            let errors = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| clean_errors(b.errors))
                .unwrap_or_default();
            return Err(VaultError::Status {
                op,
                path: path.to_string(),
                status,
                errors,
            });
        }
        let body = if body.is_empty() || status == 204 {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| VaultError::Malformed {
                op,
                path: path.to_string(),
                problem: Malformed::NotJson(Arc::new(e)),
            })?
        };
        Ok(VaultResponse { status, body, date })
    }
}

/// hyper's errors say "client error (Connect)"; the cause chain says what actually happened.
fn describe_hyper_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p: &String| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    // The outermost "client error (Connect)" adds nothing when there is a cause.
    if parts.len() > 1 {
        parts.remove(0);
    }
    parts.join(": ")
}

/// Classifies by the types in the chain. io::Error hides what it wraps from `source()` (it
/// returns the wrapped error's source), so its payload is looked at too: that is where
/// hyper-rustls puts the rustls error.
fn transport_kind(e: &(dyn std::error::Error + 'static)) -> TransportKind {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return TransportKind::Tls;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return TransportKind::Refused;
            }
            if let Some(inner) = io.get_ref() {
                let kind = transport_kind(inner);
                if kind != TransportKind::Other {
                    return kind;
                }
            }
        }
        cur = err.source();
    }
    TransportKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, AuthMethod, HumanDuration};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg(address: String, timeout: Duration) -> VaultConfig {
        VaultConfig {
            address,
            namespace: Some("team-a".into()),
            ca_file: None,
            request_timeout: HumanDuration(timeout),
            revoke_on_shutdown: true,
            auth: AuthConfig {
                method: AuthMethod::Token,
                mount: None,
                role: None,
                token_file: Some("/dev/null".into()),
                role_id_file: None,
                secret_id_file: None,
            },
        }
    }

    /// A one-shot HTTP server answering `response` to whatever it gets; returns what it received.
    async fn fake_vault(status: &'static str, body: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(response.as_bytes()).await.unwrap();
            s.shutdown().await.ok();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (addr, h)
    }

    #[test]
    fn multierror_text_is_cleaned() {
        assert_eq!(
            clean_errors(vec!["1 error occurred:\n\t* permission denied\n\n".into()]),
            vec!["permission denied"]
        );
        let e = VaultError::Status {
            op: "read",
            path: "secret/data/apps/payments/db-v2".into(),
            status: 403,
            errors: vec!["permission denied".into()],
        };
        assert_eq!(
            e.to_string(),
            "Vault denied read of secret/data/apps/payments/db-v2 (403 permission denied)"
        );
    }

    #[tokio::test]
    async fn denied_read_keeps_status_path_and_message_and_sends_namespace() {
        let (addr, got) = fake_vault(
            "403 Forbidden",
            r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#,
        )
        .await;
        let c = VaultClient::new(&cfg(addr, Duration::from_secs(5)), Arc::default()).unwrap();
        let err = c
            .read(&SecretString::from("s.secret-token"), "database/creds/payments")
            .await
            .unwrap_err();
        assert!(err.is_denied());
        assert_eq!(
            err.to_string(),
            "Vault denied read of database/creds/payments (403 permission denied)"
        );
        let req = got.await.unwrap().to_lowercase();
        assert!(req.starts_with("get /v1/database/creds/payments "), "{req}");
        assert!(req.contains("x-vault-namespace: team-a"), "{req}");
        assert!(!format!("{err:?}").contains("s.secret-token"));
    }

    #[tokio::test]
    async fn malformed_body_is_reported_not_panicked() {
        let (addr, _got) = fake_vault("200 OK", "{not json").await;
        let c = VaultClient::new(&cfg(addr, Duration::from_secs(5)), Arc::default()).unwrap();
        let err = c.read(&SecretString::from("t"), "secret/data/x").await.unwrap_err();
        assert!(matches!(err, VaultError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("secret/data/x"));
    }

    #[tokio::test]
    async fn hanging_vault_times_out_with_the_path() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let c = VaultClient::new(&cfg(addr, Duration::from_millis(200)), Arc::default()).unwrap();
        let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
        assert!(matches!(err, VaultError::Timeout { .. }), "{err:?}");
        assert!(err.is_unavailable());
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = VaultClient::new(
            &cfg(format!("http://127.0.0.1:{port}"), Duration::from_secs(5)),
            Arc::default(),
        )
        .unwrap();
        let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
        assert!(
            matches!(
                err,
                VaultError::Unreachable {
                    kind: TransportKind::Refused,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("refused"), "{err}");
    }

    /// Stands in for hyper's and hyper-util's error types, which cannot be built outside them:
    /// a message and a boxed cause.
    #[derive(Debug)]
    struct Wrapped(&'static str, Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.1)
        }
    }

    #[test]
    fn transport_failures_are_classified_by_type_not_text() {
        use std::io::{Error, ErrorKind};
        let tls = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let cases: Vec<(Box<dyn std::error::Error + Send + Sync>, TransportKind)> = vec![
            // hyper-rustls: the handshake's rustls error inside an io::Error, boxed by hyper-util.
            (
                Box::new(Wrapped(
                    "client error (Connect)",
                    Box::new(Error::new(ErrorKind::InvalidData, tls())),
                )),
                TransportKind::Tls,
            ),
            (
                Box::new(Wrapped(
                    "client error (Connect)",
                    Box::new(Error::new(
                        ErrorKind::InvalidData,
                        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                    )),
                )),
                TransportKind::Tls,
            ),
            (Box::new(tls()), TransportKind::Tls),
            (
                Box::new(Wrapped(
                    "client error (Connect)",
                    Box::new(Wrapped(
                        "tcp connect error",
                        Box::new(Error::from(ErrorKind::ConnectionRefused)),
                    )),
                )),
                TransportKind::Refused,
            ),
            // Words do not count: a message mentioning a certificate is not a TLS failure.
            (
                Box::new(Wrapped(
                    "dns error",
                    Box::new(Error::other("failed to lookup address certificate.example")),
                )),
                TransportKind::Other,
            ),
            (Box::new(Error::from(ErrorKind::ConnectionReset)), TransportKind::Other),
        ];
        for (e, want) in cases {
            assert_eq!(transport_kind(&*e), want, "{e}: {e:?}");
        }
    }
}
