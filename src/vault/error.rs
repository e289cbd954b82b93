//! What can go wrong talking to Vault, as types: [`VaultError`] for a request (with the
//! transport failure's [`TransportKind`], Vault's status and messages, the JWT claims of a refused
//! login), [`LocalError`] for problems on this host before any request, [`VaultSetupError`] for
//! a client the config cannot build. Callers decide by variant; the texts are for people and
//! never carry a secret.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::StatusCode;
use serde::Deserialize;

use super::auth::JwtClaims;

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
    /// Vault's rate limit holds requests back (a 429, to this request or an earlier one); the
    /// request was not sent again. `retry_in` is what is left of the hold.
    #[error("Vault is rate-limiting dbward; retry in {} s ({op} {path})", retry_secs(*.retry_in))]
    RateLimited {
        op: &'static str,
        path: String,
        retry_in: Duration,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The TLS handshake failed (certificate, protocol, or a plain-HTTP server on https://).
    Tls,
    /// Nothing listens at the address.
    Refused,
    /// The host name in vault.address does not resolve.
    Dns,
    Other,
}

/// A failed name lookup, as the client's resolver reports it (same text as the lookup's error).
#[derive(Debug)]
pub(crate) struct DnsError(pub(crate) std::io::Error);

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DnsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
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
    /// vault.ca_file cannot be used; the text names the key and the file.
    #[error(transparent)]
    CaFile(#[from] crate::tls_files::PemError),
    #[error("vault.address: https without vault.ca_file needs the system CA store, but {0}; set vault.ca_file")]
    NoSystemRoots(#[from] crate::tls_files::NoSystemRoots),
    #[error("vault: TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// Whole seconds, rounded up: "retry in 0 s" would invite an immediate retry.
pub(crate) fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
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
    /// How long Vault's rate limit still holds requests back, when that is the failure.
    pub(crate) fn rate_limited_for(&self) -> Option<Duration> {
        match self {
            VaultError::RateLimited { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            VaultError::Status { status, .. } | VaultError::JwtLoginRefused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The login failed, or a problem on this host stopped it before anything was sent.
    pub(crate) fn is_login(&self) -> bool {
        matches!(
            self,
            VaultError::Status { op: "login", .. } | VaultError::JwtLoginRefused { .. } | VaultError::Local(_)
        )
    }

    pub(crate) fn is_denied(&self) -> bool {
        self.status() == Some(403)
    }

    /// Vault could not be asked at all (down, hanging, sealed, overloaded): a cached credential
    /// may still be used and the client's error is 08001.
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            VaultError::Unreachable { .. } | VaultError::Timeout { .. } | VaultError::RateLimited { .. } => true,
            _ => matches!(self.status(), Some(429 | 500..=599)),
        }
    }

    /// A short label for metrics: the status code or the failure class.
    pub(crate) fn label(&self) -> String {
        match self {
            VaultError::Status { status, .. } | VaultError::JwtLoginRefused { status, .. } => status.to_string(),
            VaultError::Unreachable { .. } => "unreachable".into(),
            VaultError::Timeout { .. } => "timeout".into(),
            VaultError::RateLimited { .. } => "429".into(),
            VaultError::Malformed { .. } => "malformed".into(),
            VaultError::Local { .. } => "local".into(),
        }
    }
}

/// Vault's error body: `{"errors": ["1 error occurred:\n\t* permission denied\n\n"]}`.
#[derive(Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub(super) errors: Vec<String>,
}

/// Vault wraps multierrors as "1 error occurred:\n\t* permission denied\n\n"; keep the messages.
pub(super) fn clean_errors(errors: Vec<String>) -> Vec<String> {
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

/// hyper's errors say "client error (Connect)"; the cause chain says what actually happened.
pub(super) fn describe_hyper_error(e: &(dyn std::error::Error + 'static)) -> String {
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
pub(super) fn transport_kind(e: &(dyn std::error::Error + 'static)) -> TransportKind {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return TransportKind::Tls;
        }
        if err.is::<DnsError>() {
            return TransportKind::Dns;
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
            (
                Box::new(Wrapped(
                    "client error (Connect)",
                    Box::new(Wrapped(
                        "dns error",
                        Box::new(DnsError(Error::other("failed to lookup address information"))),
                    )),
                )),
                TransportKind::Dns,
            ),
            // Words do not count: a message mentioning a certificate is not a TLS failure, nor
            // "dns error" a DNS failure when the resolver did not say so.
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
