//! The configuration file: its schema (serde, unknown keys rejected), its defaults, and the
//! validation that runs before anything binds. Every error names the key path and the value, so
//! an operator can fix the file without reading the source.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

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
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown value {:?}, expected one of {}",
                        other,
                        Self::ALL.join(", ")
                    )),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> { s.parse() }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

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

/// A duration written as `"10s"`, `"500ms"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HumanDuration(pub Duration);

impl TryFrom<String> for HumanDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write it like \"10s\", \"500ms\" or \"5m\""))
    }
}

/// Unix permission bits written as an octal string, `"0660"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FileMode(pub u32);

impl TryFrom<String> for FileMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => Ok(FileMode(m)),
            _ => Err(format!(
                "invalid mode {s:?}, expected octal permission bits such as \"0660\""
            )),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vault: VaultConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    pub databases: Vec<DatabaseConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `http://` or `https://` URL of Vault or OpenBao.
    pub address: String,
    /// Sent as `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// PEM bundle of CAs to trust for an https address; default: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Upper bound on any one Vault request.
    #[serde(default = "default_vault_timeout")]
    pub request_timeout: HumanDuration,
    /// On a clean shutdown, revoke the leases dbward holds (their Postgres roles are dropped).
    #[serde(default = "default_true")]
    pub revoke_on_shutdown: bool,
    pub auth: AuthConfig,
}

fn default_true() -> bool {
    true
}

fn default_vault_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub method: AuthMethod,
    /// Where the method is mounted; default: the method's name.
    pub mount: Option<String>,
    /// The Vault role to log in as (jwt, kubernetes).
    pub role: Option<String>,
    /// jwt/kubernetes: the workload JWT; token: a file holding the Vault token. Re-read at every login.
    pub token_file: Option<PathBuf>,
    /// approle: files holding the role_id and secret_id.
    pub role_id_file: Option<PathBuf>,
    pub secret_id_file: Option<PathBuf>,
}

impl AuthConfig {
    pub fn mount(&self) -> &str {
        self.mount.as_deref().unwrap_or(self.method.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the /metrics, /healthz, /readyz server; absent: no admin server.
    pub listen: Option<String>,
    /// The admin server tells which databases and Vault paths exist and why they fail: a
    /// non-loopback address must be asked for.
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long a client may take to send its startup packet.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout: HumanDuration,
    /// How long open sessions may run on after SIGTERM before they are closed with 57P01.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// A Vault error is remembered this long, so a broken policy does not turn every client
    /// connection into a Vault request; short, so a fixed policy is picked up at once.
    #[serde(default = "default_error_cache")]
    pub vault_error_cache: HumanDuration,
    /// Runtime worker threads. A sidecar relaying small queries does best with few: each
    /// extra worker adds cross-thread wake-ups (benches/README.md). Applies at start.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

fn default_worker_threads() -> usize {
    2
}

fn default_startup_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_error_cache() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            startup_timeout: default_startup_timeout(),
            shutdown_grace: default_shutdown_grace(),
            vault_error_cache: default_error_cache(),
            worker_threads: default_worker_threads(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The entry's name: used in logs, metrics and client errors.
    pub name: String,
    /// TCP addresses (`127.0.0.1:6432`) and/or Unix socket paths (`/run/dbward/.s.PGSQL.6432`).
    pub listen: Vec<String>,
    /// `host:port` of the Postgres server.
    pub upstream: String,
    /// Force the upstream database name; default: what the client asked for.
    pub dbname: Option<String>,
    #[serde(default = "default_sslmode")]
    pub sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full; default: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for servers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// TLS server name to send and verify; default: the upstream host.
    pub sni: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Anyone who can reach a listener gets the database role: non-loopback TCP listeners must
    /// be asked for explicitly.
    #[serde(default)]
    pub allow_remote_clients: bool,
    /// Permission bits of Unix socket listeners.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: FileMode,
    /// Client connections above this are refused with 53300.
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Allow MD5 and cleartext password authentication upstream without verified TLS
    /// (verify-ca/verify-full). Off: such a server is refused rather than sent a password it
    /// could replay.
    #[serde(default)]
    pub allow_insecure_password: bool,
    /// Relay `replication=` startups (physical/logical replication clients).
    #[serde(default)]
    pub allow_replication: bool,
    /// Terminate TLS from clients (answer SSLRequest with 'S'); absent: clients get 'N'.
    pub client_tls: Option<ClientTlsConfig>,
    pub credentials: CredentialsConfig,
}

/// The certificate dbward presents to its own clients.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_sslmode() -> SslMode {
    SslMode::VerifyFull
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_socket_mode() -> FileMode {
    FileMode(0o660)
}
fn default_max_clients() -> usize {
    1000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub kind: CredentialKind,
    /// Secrets engine mount for `database` and `static`; default `database`.
    pub mount: Option<String>,
    /// The Vault database role (dynamic or static).
    pub role: Option<String>,
    /// KV v2: the API path exactly as a policy names it (`secret/data/apps/payments/db`).
    pub path: Option<String>,
    #[serde(default = "default_username_key")]
    pub username_key: String,
    #[serde(default = "default_password_key")]
    pub password_key: String,
    /// KV secrets carry no lease: re-read them this often.
    #[serde(default = "default_kv_refresh")]
    pub refresh_interval: HumanDuration,
    /// A credential is treated as expired this long before its lease ends.
    #[serde(default = "default_expiry_margin")]
    pub expiry_margin: HumanDuration,
    /// A dynamic credential is replaced in the background once this fraction of its lease has
    /// passed (a little jitter is added so many dbward instances do not all ask at once).
    #[serde(default = "default_refresh_fraction")]
    pub refresh_fraction: f64,
    /// Renew a replaced lease while client connections still use it, up to its max TTL.
    #[serde(default = "default_true")]
    pub renew_in_use: bool,
    /// Revoke a replaced lease once no client connection uses it.
    #[serde(default = "default_true")]
    pub revoke_unused: bool,
}

fn default_refresh_fraction() -> f64 {
    2.0 / 3.0
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_kv_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_expiry_margin() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

impl CredentialsConfig {
    /// The Vault API path (without `/v1/`) this entry reads; the same string a policy names.
    pub fn vault_path(&self) -> String {
        let mount = self.mount.as_deref().unwrap_or("database").trim_matches('/');
        match self.kind {
            CredentialKind::Database => format!("{mount}/creds/{}", self.role.as_deref().unwrap_or("")),
            CredentialKind::Static => {
                format!("{mount}/static-creds/{}", self.role.as_deref().unwrap_or(""))
            }
            CredentialKind::Kv => self.path.as_deref().unwrap_or("").trim_matches('/').to_string(),
        }
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

/// Parses a TCP listen address; `localhost:PORT` means the IPv4 loopback.
fn parse_tcp_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

impl DatabaseConfig {
    pub fn listen_addrs(&self) -> Vec<ListenAddr> {
        self.listen
            .iter()
            .filter_map(|l| {
                if l.starts_with('/') {
                    Some(ListenAddr::Unix(PathBuf::from(l)))
                } else {
                    parse_tcp_addr(l).map(ListenAddr::Tcp)
                }
            })
            .collect()
    }

    /// Host and port of the upstream (validated at load).
    pub fn upstream_host_port(&self) -> (String, u16) {
        split_host_port(&self.upstream).expect("validated at load")
    }
}

/// `host:port`, `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return None;
    }
    Some((host.to_string(), port))
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
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let mut message = inner.message().to_string();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                message.push_str(&format!(" (line {line})"));
            }
            err(path, message)
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let v = &self.vault;
        if !(v.address.starts_with("http://") || v.address.starts_with("https://")) {
            return Err(err(
                "vault.address",
                format!("{:?} must start with http:// or https://", v.address),
            ));
        }
        if v.request_timeout.0.is_zero() {
            return Err(err("vault.request_timeout", "must be greater than zero"));
        }
        self.validate_auth()?;
        if let Some(listen) = &self.admin.listen {
            match parse_tcp_addr(listen) {
                None => {
                    return Err(err(
                        "admin.listen",
                        format!("{listen:?} is not an address like \"127.0.0.1:9187\""),
                    ))
                }
                Some(a) if !a.ip().is_loopback() && !self.admin.allow_remote => {
                    return Err(err(
                        "admin.listen",
                        format!("{listen:?} is not a loopback address; set admin.allow_remote = true to expose metrics and readiness details beyond this host"),
                    ))
                }
                Some(_) => {}
            }
        }
        if !(1..=256).contains(&self.proxy.worker_threads) {
            return Err(err(
                "proxy.worker_threads",
                format!("{} is out of range: use 1 to 256", self.proxy.worker_threads),
            ));
        }
        if self.databases.is_empty() {
            return Err(err("databases", "at least one [[databases]] entry is required"));
        }
        let mut names = std::collections::HashSet::new();
        let mut listens = std::collections::HashMap::new();
        for (i, db) in self.databases.iter().enumerate() {
            let key = |k: &str| format!("databases[{i}].{k}");
            if db.name.is_empty() || !db.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(err(
                    key("name"),
                    format!(
                        "{:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                        db.name
                    ),
                ));
            }
            if !names.insert(db.name.clone()) {
                return Err(err(
                    key("name"),
                    format!("{:?} is used by another database entry", db.name),
                ));
            }
            if db.listen.is_empty() {
                return Err(err(key("listen"), "at least one address or socket path is required"));
            }
            for (j, l) in db.listen.iter().enumerate() {
                let lkey = format!("databases[{i}].listen[{j}]");
                if l.starts_with('/') {
                    // A socket path is a file name; sun_path holds 108 bytes.
                    if l.len() > 100 {
                        return Err(err(lkey, format!("{l:?} is too long for a Unix socket path")));
                    }
                } else {
                    let Some(addr) = parse_tcp_addr(l) else {
                        return Err(err(
                            lkey,
                            format!("{l:?} is neither an address like \"127.0.0.1:6432\" nor an absolute socket path"),
                        ));
                    };
                    if !addr.ip().is_loopback() && !db.allow_remote_clients {
                        return Err(err(
                            lkey,
                            format!(
                                "{l:?} is not a loopback address: anyone who reaches it gets the database role; \
                                 set databases[{i}].allow_remote_clients = true if that is intended"
                            ),
                        ));
                    }
                }
                if let Some(other) = listens.insert(l.clone(), db.name.clone()) {
                    return Err(err(lkey, format!("{l:?} is also a listener of database {other:?}")));
                }
            }
            if split_host_port(&db.upstream).is_none() {
                return Err(err(
                    key("upstream"),
                    format!("{:?} is not host:port (e.g. \"db.internal:5432\")", db.upstream),
                ));
            }
            if db.connect_timeout.0.is_zero() {
                return Err(err(key("connect_timeout"), "must be greater than zero"));
            }
            if db.max_client_connections == 0 {
                return Err(err(key("max_client_connections"), "must be at least 1"));
            }
            for (k, p) in [
                ("ca_file", &db.ca_file),
                ("cert_file", &db.cert_file),
                ("key_file", &db.key_file),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        return Err(err(
                            key(k),
                            format!("{:?} does not exist or is not a file", p.display().to_string()),
                        ));
                    }
                }
            }
            if let Some(t) = &db.client_tls {
                for (k, p) in [("cert_file", &t.cert_file), ("key_file", &t.key_file)] {
                    if !p.is_file() {
                        return Err(err(
                            key(&format!("client_tls.{k}")),
                            format!("{:?} does not exist or is not a file", p.display().to_string()),
                        ));
                    }
                }
            }
            if db.cert_file.is_some() != db.key_file.is_some() {
                return Err(err(
                    key("cert_file"),
                    "cert_file and key_file go together: set both or neither",
                ));
            }
            if db.sslmode == SslMode::Disable && (db.ca_file.is_some() || db.cert_file.is_some()) {
                return Err(err(
                    key("sslmode"),
                    "\"disable\" but ca_file/cert_file are set; use \"verify-full\" or remove them",
                ));
            }
            self.validate_credentials(i, &db.credentials)?;
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.vault.auth;
        let need = |field: &str, v: bool| {
            if v {
                Ok(())
            } else {
                Err(err(
                    format!("vault.auth.{field}"),
                    format!("is required for method = \"{}\"", a.method),
                ))
            }
        };
        match a.method {
            AuthMethod::Jwt | AuthMethod::Kubernetes => {
                need("role", a.role.as_deref().is_some_and(|r| !r.is_empty()))?;
                need("token_file", a.token_file.is_some())?;
            }
            AuthMethod::Token => need("token_file", a.token_file.is_some())?,
            AuthMethod::Approle => {
                need("role_id_file", a.role_id_file.is_some())?;
                need("secret_id_file", a.secret_id_file.is_some())?;
            }
        }
        if let Some(m) = &a.mount {
            if m.is_empty() || m.contains("..") {
                return Err(err("vault.auth.mount", format!("{m:?} is not a mount path")));
            }
        }
        Ok(())
    }

    fn validate_credentials(&self, i: usize, c: &CredentialsConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("databases[{i}].credentials.{k}");
        let valid_segment = |s: &str| {
            !s.is_empty()
                && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
                && !s.contains(|ch: char| ch.is_whitespace() || ch == '?' || ch == '#')
        };
        match c.kind {
            CredentialKind::Database | CredentialKind::Static => {
                match c.role.as_deref() {
                    Some(r) if valid_segment(r) && !r.contains('/') => {}
                    Some(r) => return Err(err(key("role"), format!("{r:?} is not a Vault role name"))),
                    None => return Err(err(key("role"), format!("is required for kind = \"{}\"", c.kind))),
                }
                if c.path.is_some() {
                    return Err(err(
                        key("path"),
                        format!(
                            "is only for kind = \"kv\"; kind = \"{}\" reads <mount>/.../<role>",
                            c.kind
                        ),
                    ));
                }
                if let Some(m) = &c.mount {
                    if !valid_segment(m.trim_matches('/')) {
                        return Err(err(key("mount"), format!("{m:?} is not a mount path")));
                    }
                }
            }
            CredentialKind::Kv => {
                match c.path.as_deref() {
                    Some(p) if valid_segment(p.trim_matches('/')) => {
                        let p = p.trim_matches('/');
                        if !p.contains("/data/") {
                            return Err(err(
                                key("path"),
                                format!("{p:?} is not a KV v2 API path: write it as a policy names it, with /data/ after the mount (e.g. \"secret/data/apps/payments/db\")"),
                            ));
                        }
                    }
                    Some(p) => return Err(err(key("path"), format!("{p:?} is not a Vault path"))),
                    None => return Err(err(key("path"), "is required for kind = \"kv\"")),
                }
                if c.role.is_some() {
                    return Err(err(key("role"), "is not used with kind = \"kv\"; remove it"));
                }
            }
        }
        if !(c.refresh_fraction > 0.05 && c.refresh_fraction < 0.95) {
            return Err(err(
                key("refresh_fraction"),
                format!(
                    "{} is out of range: use a fraction between 0.05 and 0.95 (default 0.667)",
                    c.refresh_fraction
                ),
            ));
        }
        if c.refresh_interval.0 < Duration::from_secs(1) {
            return Err(err(key("refresh_interval"), "must be at least 1s"));
        }
        if c.username_key.is_empty() {
            return Err(err(key("username_key"), "must not be empty"));
        }
        if c.password_key.is_empty() {
            return Err(err(key("password_key"), "must not be empty"));
        }
        Ok(())
    }
}

/// True for addresses only this host can reach.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// Resolves the admin listen address.
pub fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Some(a) = parse_tcp_addr(addr) {
        return Ok(a);
    }
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to nothing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "jwt"
role = "payments-service"
token_file = "/var/run/secrets/dbward/token"

[[databases]]
name = "payments"
listen = ["127.0.0.1:6432", "/run/dbward/.s.PGSQL.6432"]
upstream = "db.internal:5432"
[databases.credentials]
kind = "database"
role = "payments"
"#;

    #[test]
    fn good_config_gets_defaults() {
        let c = Config::parse(GOOD).unwrap();
        let db = &c.databases[0];
        assert_eq!(db.sslmode, SslMode::VerifyFull);
        assert_eq!(db.credentials.vault_path(), "database/creds/payments");
        assert_eq!(db.socket_mode, FileMode(0o660));
        assert_eq!(c.vault.auth.mount(), "jwt");
        assert_eq!(db.listen_addrs().len(), 2);
        assert_eq!(db.upstream_host_port(), ("db.internal".to_string(), 5432));
    }

    #[test]
    fn unknown_enum_value_names_key_and_choices() {
        let bad = GOOD.replace("kind = \"database\"", "kind = \"kvv\"");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[0].credentials.kind: unknown value \"kvv\", expected one of database, static, kv"),
            "{e}"
        );
        assert!(e.contains("line 14"), "{e}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_path() {
        let bad = GOOD.replace("role = \"payments\"", "role = \"payments\"\nrenew = true");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[0].credentials.renew: unknown field `renew`, expected one of `kind`"),
            "{e}"
        );
    }

    #[test]
    fn remote_listener_needs_opt_in() {
        let bad = GOOD.replace("127.0.0.1:6432", "0.0.0.0:6432");
        let e = Config::parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[0].listen[0]: \"0.0.0.0:6432\" is not a loopback address"),
            "{e}"
        );
        let ok = bad.replace("upstream =", "allow_remote_clients = true\nupstream =");
        Config::parse(&ok).unwrap();
    }

    #[test]
    fn kv_path_must_be_the_api_path() {
        let kv = GOOD.replace(
            "kind = \"database\"\nrole = \"payments\"",
            "kind = \"kv\"\npath = \"secret/apps/payments/db\"",
        );
        let e = Config::parse(&kv).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[0].credentials.path: \"secret/apps/payments/db\" is not a KV v2 API path"),
            "{e}"
        );
        let fixed = kv.replace("secret/apps", "secret/data/apps");
        let c = Config::parse(&fixed).unwrap();
        assert_eq!(c.databases[0].credentials.vault_path(), "secret/data/apps/payments/db");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let cases = [
            ("upstream = \"db.internal:5432\"", "upstream = \"db.internal\"", "databases[0].upstream: \"db.internal\" is not host:port"),
            ("method = \"jwt\"", "method = \"ldap\"", "vault.auth.method: unknown value \"ldap\""),
            ("role = \"payments-service\"\n", "", "vault.auth.role: is required for method = \"jwt\""),
            ("address = \"http://127.0.0.1:8200\"", "address = \"127.0.0.1:8200\"", "vault.address: \"127.0.0.1:8200\" must start with http://"),
            ("name = \"payments\"", "name = \"payments\"\nconnect_timeout = \"soon\"", "databases[0].connect_timeout: invalid duration \"soon\""),
            ("name = \"payments\"", "name = \"payments\"\nsslmode = \"allow\"", "databases[0].sslmode: unknown value \"allow\", expected one of disable, prefer, require, verify-ca, verify-full"),
        ];
        for (from, to, want) in cases {
            let e = Config::parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.starts_with(want), "want {want:?}, got {e:?}");
        }
    }

    #[test]
    fn duplicate_names_and_listeners_are_rejected() {
        let two = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[databases]]").unwrap()..]);
        let e = Config::parse(&two).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[1].name: \"payments\" is used by another"),
            "{e}"
        );
        let two = two
            .replacen("name = \"payments\"\nlisten", "name = \"orders\"\nlisten", 2)
            .replacen("name = \"orders\"", "name = \"payments\"", 1);
        let e = Config::parse(&two).unwrap_err().to_string();
        assert!(
            e.starts_with("databases[1].listen[0]: \"127.0.0.1:6432\" is also a listener of database \"payments\""),
            "{e}"
        );
    }
}
