//! The configuration: the typed [`Config`] the daemon runs on, and [`Config::load`], which reads
//! the file ([`raw`]: its serde shape) and validates it ([`validate`]) before anything binds.
//! The types say what validation proved (an auth method with exactly its fields, parsed
//! addresses), so no later code checks again. Every error names the key path and the value,
//! so an operator can fix the file without reading the source.

mod allowlist;
mod raw;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ha;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub use allowlist::{Allowlist, Listed};

/// A configuration error: `key` is the path in the file (`databases[0].credentials.kind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() || self.key == "." {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Declares a string-valued enum whose parse error lists the accepted values, as
/// `unknown value "kvv", expected one of database, static, kv`.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(InvalidValue::Unknown {
                        value: other.to_string(),
                        expected: Self::ALL.join(", "),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidValue;
            fn try_from(s: String) -> Result<Self, InvalidValue> { s.parse() }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// Which upstream host a session may use, with libpq's `target_session_attrs` meaning.
    TargetSessionAttrs {
        Any => "any",
        ReadWrite => "read-write",
        ReadOnly => "read-only",
        Primary => "primary",
        Standby => "standby",
        PreferStandby => "prefer-standby",
    }
);

string_enum!(
    /// Host order of an upstream list, with libpq's `load_balance_hosts` meaning.
    LoadBalanceHosts {
        Disable => "disable",
        Random => "random",
    }
);

string_enum!(
    /// How a credential is obtained from Vault.
    CredentialKind {
        Database => "database",
        Static => "static",
        Kv => "kv",
    }
);

string_enum!(
    /// Vault auth methods.
    AuthMethod {
        Jwt => "jwt",
        Token => "token",
        Kubernetes => "kubernetes",
        Approle => "approle",
    }
);

string_enum!(
    /// Upstream TLS mode, with libpq's meaning.
    SslMode {
        Disable => "disable",
        Prefer => "prefer",
        Require => "require",
        VerifyCa => "verify-ca",
        VerifyFull => "verify-full",
    }
);

/// A value of the right type that the key does not accept; serde puts the text into the
/// config error, after the key path.
#[derive(Debug, thiserror::Error)]
pub enum InvalidValue {
    #[error("unknown value {value:?}, expected one of {expected}")]
    Unknown { value: String, expected: String },
    #[error("invalid duration {value:?} ({reason}); write it like \"10s\", \"500ms\" or \"5m\"")]
    Duration {
        value: String,
        reason: humantime::DurationError,
    },
    #[error("invalid mode {value:?}, expected octal permission bits such as \"0660\"")]
    Mode { value: String },
}

/// The whole file, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vault: VaultConfig,
    pub admin: AdminConfig,
    pub proxy: ProxyConfig,
    pub databases: Vec<DatabaseConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VaultConfig {
    /// `http://` or `https://` URL of Vault or OpenBao: the first of `addresses`.
    pub address: String,
    /// Every configured address (at least one, no trailing slash, no duplicates), tried in
    /// turn when a node cannot answer (`vault::ha`).
    pub addresses: Vec<String>,
    /// Where the Vault token and the held credentials are kept across restarts (`vault.state_file`).
    pub state_file: Option<PathBuf>,
    /// Sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// PEM bundle of CAs to trust for an https address; default: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Upper bound on any one Vault request.
    pub request_timeout: Duration,
    /// On a clean shutdown, revoke the leases dbward holds (their Postgres roles are dropped).
    pub revoke_on_shutdown: bool,
    pub auth: AuthConfig,
}

/// How dbward logs in to Vault.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    /// Where the method is mounted, without slashes around it (default: the method's name).
    pub mount: String,
    pub login: Login,
    /// How often the token is looked up (`auth/token/lookup-self`): a 403 means it was revoked,
    /// and every credential it obtained is dropped.
    pub token_check_interval: Duration,
}

/// An auth method with the fields it needs. Files are re-read at every login.
#[derive(Debug, Clone, PartialEq)]
pub enum Login {
    /// The workload JWT in `token_file`, for Vault role `role`.
    Jwt { role: String, token_file: PathBuf },
    /// A Kubernetes service-account token in `token_file`, for Vault role `role`.
    Kubernetes { role: String, token_file: PathBuf },
    /// A Vault token kept in `token_file` by something else.
    Token { token_file: PathBuf },
    Approle {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
    },
}

impl AuthConfig {
    pub fn method(&self) -> AuthMethod {
        match self.login {
            Login::Jwt { .. } => AuthMethod::Jwt,
            Login::Kubernetes { .. } => AuthMethod::Kubernetes,
            Login::Token { .. } => AuthMethod::Token,
            Login::Approle { .. } => AuthMethod::Approle,
        }
    }

    /// The Vault role logged in as (jwt, kubernetes).
    pub fn role(&self) -> Option<&str> {
        match &self.login {
            Login::Jwt { role, .. } | Login::Kubernetes { role, .. } => Some(role),
            Login::Token { .. } | Login::Approle { .. } => None,
        }
    }

    /// The file holding the JWT (jwt, kubernetes) or the Vault token (token).
    pub fn token_file(&self) -> Option<&Path> {
        match &self.login {
            Login::Jwt { token_file, .. } | Login::Kubernetes { token_file, .. } | Login::Token { token_file } => {
                Some(token_file)
            }
            Login::Approle { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminConfig {
    /// The /metrics, /healthz, /readyz server's address (loopback unless `allow_remote`).
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// How long a client may take to send its startup packet.
    pub startup_timeout: Duration,
    /// How long open sessions may run on after SIGTERM before they are closed with 57P01.
    pub shutdown_grace: Duration,
    /// A Vault error is remembered this long, so a broken policy does not turn every client
    /// connection into a Vault request; short, so a fixed policy is picked up at once.
    pub vault_error_cache: Duration,
    /// Runtime threads (1 to 256): one is a single event loop, more a work-stealing runtime.
    /// Applies at start.
    pub worker_threads: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let raw = raw::ProxyConfig::default();
        ProxyConfig {
            startup_timeout: raw.startup_timeout.0,
            shutdown_grace: raw.shutdown_grace.0,
            vault_error_cache: raw.vault_error_cache.0,
            worker_threads: raw.worker_threads,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    /// The entry's name: used in logs, metrics and client errors.
    pub name: String,
    /// TCP addresses (loopback unless `allow_remote_clients`) and Unix socket paths.
    pub listen: Vec<ListenAddr>,
    /// The Postgres server.
    pub upstream: HostPort,
    /// Force the upstream database name; default: what the client asked for.
    pub dbname: Option<String>,
    pub sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full; default: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for servers that require one (both or neither).
    pub client_cert: Option<ClientCert>,
    /// TLS server name to send and verify; default: the upstream host.
    pub sni: Option<String>,
    pub connect_timeout: Duration,
    /// Permission bits of Unix socket listeners.
    pub socket_mode: u32,
    /// Client connections above this are refused with 53300.
    pub max_client_connections: usize,
    /// Allow MD5 and cleartext password authentication upstream without verified TLS.
    pub allow_insecure_password: bool,
    /// libpq's require_auth: which authentication the server must (or must not) ask for.
    pub require_auth: crate::upstream::auth_policy::RequireAuth,
    /// libpq's channel_binding.
    pub channel_binding: crate::upstream::auth_policy::ChannelBindingMode,
    /// Relay `replication=` startups (physical/logical replication clients).
    pub allow_replication: bool,
    /// Terminate TLS from clients (answer SSLRequest with 'S'); absent: clients get 'N'.
    pub client_tls: Option<ClientTlsConfig>,
    /// The local callers admitted (`allowed_users`, `allowed_groups`); None: every local caller.
    pub allowed: Option<Allowlist>,
    pub credentials: CredentialsConfig,
    /// Every upstream host in the configured order (never empty); `upstream` is the first.
    pub upstream_hosts: Vec<HostPort>,
    /// Host choice, keepalive and role rechecks for the upstream list.
    pub ha: UpstreamHa,
    /// Reuse of idle upstream connections; None: every client gets a new one.
    pub pool: Option<PoolConfig>,
}

/// How a session picks among several upstream hosts and notices that one went away.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHa {
    pub target_session_attrs: TargetSessionAttrs,
    pub load_balance_hosts: LoadBalanceHosts,
    /// TCP keepalive on upstream sockets; None: off (`keepalives = false`).
    pub keepalive: Option<Keepalive>,
    /// How often a session's host is checked against `target_session_attrs`; None: never.
    pub recheck_interval: Option<Duration>,
}

/// TCP keepalive timing, as libpq's keepalives_idle / keepalives_interval / keepalives_count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl Default for UpstreamHa {
    fn default() -> Self {
        UpstreamHa {
            target_session_attrs: TargetSessionAttrs::Any,
            load_balance_hosts: LoadBalanceHosts::Disable,
            keepalive: Some(Keepalive {
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(2),
                count: 3,
            }),
            recheck_interval: None,
        }
    }
}

/// `[databases.pool]`, validated: at least one idle connection, a non-zero idle timeout and a
/// reset query that fits in one simple Query message.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Idle server connections kept per entry.
    pub max_idle: usize,
    /// An idle connection unused this long is closed.
    pub idle_timeout: Duration,
    /// Run before a connection is kept, so nothing of one client's session reaches the next.
    pub reset_query: String,
}

/// The certificate and key dbward presents to the upstream server.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The certificate dbward presents to its own clients.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Where a credential comes from and how it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialsConfig {
    pub source: CredentialSource,
    /// A secret without a lease (KV) is re-read this often.
    pub refresh_interval: Duration,
    /// A credential is treated as expired this long before its lease ends.
    pub expiry_margin: Duration,
    /// A dynamic credential is replaced once this fraction (0.05 to 0.95) of its lease passed.
    pub refresh_fraction: f64,
    /// Renew a replaced lease while client connections still use it, up to its max TTL.
    pub renew_in_use: bool,
    /// Revoke a replaced lease once no client connection uses it.
    pub revoke_unused: bool,
    /// Retire a session this long before its credential's hard end; None: 10 % of the
    /// credential's life, at most 5 minutes.
    pub retire_margin: Option<Duration>,
    /// At most this many new dynamic credentials per lease period (`credentials::budget`);
    /// beyond it the newest valid credential is reused.
    pub mint_budget: u32,
}

/// A Vault secret, with exactly what reading it takes.
#[derive(Debug, Clone, PartialEq)]
pub enum CredentialSource {
    /// Dynamic credentials: `<mount>/creds/<role>`.
    Database { mount: String, role: String },
    /// A static role: `<mount>/static-creds/<role>`.
    Static { mount: String, role: String },
    /// A KV v2 secret at its API path (`secret/data/apps/payments/db`), with the keys that hold
    /// the username and the password.
    Kv {
        path: String,
        username_key: String,
        password_key: String,
    },
}

impl CredentialSource {
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialSource::Database { .. } => CredentialKind::Database,
            CredentialSource::Static { .. } => CredentialKind::Static,
            CredentialSource::Kv { .. } => CredentialKind::Kv,
        }
    }

    /// The Vault database role (dynamic or static).
    pub fn role(&self) -> Option<&str> {
        match self {
            CredentialSource::Database { role, .. } | CredentialSource::Static { role, .. } => Some(role),
            CredentialSource::Kv { .. } => None,
        }
    }

    /// The database secrets engine's mount (dynamic or static).
    pub fn mount(&self) -> Option<&str> {
        match self {
            CredentialSource::Database { mount, .. } | CredentialSource::Static { mount, .. } => Some(mount),
            CredentialSource::Kv { .. } => None,
        }
    }

    /// The Vault API path (without `/v1/`) this entry reads; the same string a policy names.
    pub fn vault_path(&self) -> String {
        match self {
            CredentialSource::Database { mount, role } => format!("{mount}/creds/{role}"),
            CredentialSource::Static { mount, role } => format!("{mount}/static-creds/{role}"),
            CredentialSource::Kv { path, .. } => path.clone(),
        }
    }
}

impl CredentialsConfig {
    pub fn kind(&self) -> CredentialKind {
        self.source.kind()
    }

    pub fn vault_path(&self) -> String {
        self.source.vault_path()
    }
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A server's `host:port` (`[v6]:port` for an IPv6 literal); the host is a name or an address,
/// resolved when connecting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// `host:port` or `[v6]:port`, port not 0, host without spaces or slashes.
    pub fn parse(s: &str) -> Option<HostPort> {
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return None;
        }
        Some(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("", format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let raw: raw::Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_string();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                message.push_str(&format!(" (line {line})"));
            }
            err(path, message)
        })?;
        validate::config(raw)
    }
}

/// A valid config for unit tests: a token login and one `[[databases]]` entry, "payments" on
/// 127.0.0.1:6432 in front of db.internal:5432, with `entry` (TOML lines) added to the entry and
/// `credentials` as its `[databases.credentials]` table.
#[cfg(test)]
pub(crate) fn test_config(entry: &str, credentials: &str) -> Config {
    let text = format!(
        "[vault]\naddress = \"http://127.0.0.1:8200\"\n[vault.auth]\nmethod = \"token\"\n\
         token_file = \"/nonexistent/token\"\n\n[[databases]]\nname = \"payments\"\n\
         listen = [\"127.0.0.1:6432\"]\nupstream = \"db.internal:5432\"\n{entry}\n\
         [databases.credentials]\n{credentials}\n"
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}
