//! The file's shape as serde reads it: every key, its default, unknown keys rejected. What is
//! read here is not yet checked; [`super::validate`] turns it into the typed [`super::Config`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{AuthMethod, ClientTlsConfig, CredentialKind, InvalidValue, LoadBalanceHosts, SslMode, TargetSessionAttrs};

/// A duration written as `"10s"`, `"500ms"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct HumanDuration(pub(super) Duration);

impl TryFrom<String> for HumanDuration {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        humantime::parse_duration(&value)
            .map(HumanDuration)
            .map_err(|reason| InvalidValue::Duration { value, reason })
    }
}

/// Unix permission bits written as an octal string, `"0660"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct FileMode(pub(super) u32);

impl TryFrom<String> for FileMode {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, InvalidValue> {
        match u32::from_str_radix(value.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => Ok(FileMode(m)),
            _ => Err(InvalidValue::Mode { value }),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Config {
    pub(super) vault: VaultConfig,
    #[serde(default)]
    pub(super) admin: AdminConfig,
    #[serde(default)]
    pub(super) proxy: ProxyConfig,
    pub(super) databases: Vec<DatabaseConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VaultConfig {
    /// `http://` or `https://` URL of Vault or OpenBao, or a list of them (the nodes of an HA
    /// cluster, tried in turn).
    pub(super) address: Addresses,
    /// Sent as `X-Vault-Namespace`.
    pub(super) namespace: Option<String>,
    /// PEM bundle of CAs to trust for an https address; default: the system roots.
    pub(super) ca_file: Option<PathBuf>,
    /// Upper bound on any one Vault request.
    #[serde(default = "default_vault_timeout")]
    pub(super) request_timeout: HumanDuration,
    /// On a clean shutdown, revoke the leases dbward holds (their Postgres roles are dropped).
    #[serde(default = "default_true")]
    pub(super) revoke_on_shutdown: bool,
    /// Permit an `http://` address to a host that is not loopback: the token, the JWT and every
    /// database password would cross the network in cleartext.
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
    pub(super) auth: AuthConfig,
    /// Where the Vault token and the held credentials are kept across restarts (tmpfs).
    pub(super) state_file: Option<PathBuf>,
}

/// `vault.address`: one URL or a list.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Addresses {
    One(String),
    Many(Vec<String>),
}

// By hand rather than `#[serde(untagged)]`, whose error ("data did not match any variant")
// does not say what is expected.
impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL like \"https://vault:8200\" or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Addresses, E> {
                Ok(Addresses::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Addresses, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    out.push(a);
                }
                Ok(Addresses::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_true() -> bool {
    true
}

fn default_vault_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthConfig {
    pub(super) method: AuthMethod,
    /// Where the method is mounted; default: the method's name.
    pub(super) mount: Option<String>,
    /// The Vault role to log in as (jwt, kubernetes).
    pub(super) role: Option<String>,
    /// jwt/kubernetes: the workload JWT; token: a file holding the Vault token. Re-read at every login.
    pub(super) token_file: Option<PathBuf>,
    /// approle: files holding the role_id and secret_id.
    pub(super) role_id_file: Option<PathBuf>,
    pub(super) secret_id_file: Option<PathBuf>,
    /// How often the token is looked up (`lookup-self`) to notice that it was revoked.
    #[serde(default = "default_token_check_interval")]
    pub(super) token_check_interval: HumanDuration,
}

fn default_token_check_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminConfig {
    /// Address of the /metrics, /healthz, /readyz server; absent: no admin server.
    pub(super) listen: Option<String>,
    /// The admin server tells which databases and Vault paths exist and why they fail: a
    /// non-loopback address must be asked for.
    #[serde(default)]
    pub(super) allow_remote: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyConfig {
    /// How long a client may take to send its startup packet.
    #[serde(default = "default_startup_timeout")]
    pub(super) startup_timeout: HumanDuration,
    /// How long open sessions may run on after SIGTERM before they are closed with 57P01.
    #[serde(default = "default_shutdown_grace")]
    pub(super) shutdown_grace: HumanDuration,
    /// A Vault error is remembered this long, so a broken policy does not turn every client
    /// connection into a Vault request; short, so a fixed policy is picked up at once.
    #[serde(default = "default_error_cache")]
    pub(super) vault_error_cache: HumanDuration,
    /// Runtime threads. One (the default) is a single event loop, as PgBouncer's; more are a
    /// work-stealing runtime, which adds cross-thread wake-ups to every relayed transaction
    /// (benches/README.md) and pays off only when the clients need more than one core. Applies
    /// at start.
    #[serde(default = "default_worker_threads")]
    pub(super) worker_threads: usize,
}

fn default_worker_threads() -> usize {
    1
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
pub(super) struct DatabaseConfig {
    /// The entry's name: used in logs, metrics and client errors.
    pub(super) name: String,
    /// TCP addresses (`127.0.0.1:6432`) and/or Unix socket paths (`/run/dbward/.s.PGSQL.6432`).
    pub(super) listen: Vec<String>,
    /// `host:port` of the Postgres server, or a list of them.
    pub(super) upstream: Upstreams,
    /// Force the upstream database name; default: what the client asked for.
    pub(super) dbname: Option<String>,
    #[serde(default = "default_sslmode")]
    pub(super) sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full; default: the system roots.
    pub(super) ca_file: Option<PathBuf>,
    /// Client certificate and key for servers that require one.
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    /// TLS server name to send and verify; default: the upstream host.
    pub(super) sni: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub(super) connect_timeout: HumanDuration,
    /// Anyone who can reach a listener gets the database role: non-loopback TCP listeners must
    /// be asked for explicitly.
    #[serde(default)]
    pub(super) allow_remote_clients: bool,
    /// Permission bits of Unix socket listeners.
    #[serde(default = "default_socket_mode")]
    pub(super) socket_mode: FileMode,
    /// Client connections above this are refused with 53300.
    #[serde(default = "default_max_clients")]
    pub(super) max_client_connections: usize,
    /// Allow MD5 and cleartext password authentication upstream without verified TLS
    /// (verify-ca/verify-full). Off: such a server is refused rather than sent a password it
    /// could replay.
    #[serde(default)]
    pub(super) allow_insecure_password: bool,
    /// libpq's require_auth (`"scram-sha-256"`, `"!password,!md5"`, `"none"`...); default: unset.
    #[serde(default)]
    pub(super) require_auth: String,
    /// libpq's channel_binding: disable, prefer (default), require.
    pub(super) channel_binding: Option<String>,
    /// Relay `replication=` startups (physical/logical replication clients).
    #[serde(default)]
    pub(super) allow_replication: bool,
    /// Terminate TLS from clients (answer SSLRequest with 'S'); absent: clients get 'N'.
    pub(super) client_tls: Option<ClientTlsConfig>,
    /// Local callers (user names or uids) admitted to this entry; with `allowed_groups`, absent
    /// both: every local caller.
    pub(super) allowed_users: Option<Vec<String>>,
    /// Local groups (names or gids) whose members are admitted to this entry.
    pub(super) allowed_groups: Option<Vec<String>>,
    pub(super) credentials: CredentialsConfig,
    /// libpq's target_session_attrs.
    #[serde(default = "default_target_session_attrs")]
    pub(super) target_session_attrs: TargetSessionAttrs,
    /// libpq's load_balance_hosts.
    #[serde(default = "default_load_balance_hosts")]
    pub(super) load_balance_hosts: LoadBalanceHosts,
    /// libpq's keepalives, keepalives_idle, keepalives_interval, keepalives_count.
    #[serde(default = "default_true")]
    pub(super) keepalives: bool,
    #[serde(default = "default_keepalives_idle")]
    pub(super) keepalives_idle: HumanDuration,
    #[serde(default = "default_keepalives_interval")]
    pub(super) keepalives_interval: HumanDuration,
    #[serde(default = "default_keepalives_count")]
    pub(super) keepalives_count: u32,
    /// Off when absent.
    pub(super) recheck_interval: Option<HumanDuration>,
    /// Opt-in reuse of idle upstream connections (`[databases.pool]`); absent: off.
    pub(super) pool: Option<PoolConfig>,
}

/// `upstream = "pg:5432"` or `upstream = ["pg-a:5432", "pg-b:5432"]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a \"host:port\" string or a list of them")]
pub(super) enum Upstreams {
    One(String),
    Many(Vec<String>),
}

impl Upstreams {
    pub(super) fn list(&self) -> Vec<&str> {
        match self {
            Upstreams::One(s) => vec![s.as_str()],
            Upstreams::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

fn default_target_session_attrs() -> TargetSessionAttrs {
    TargetSessionAttrs::Any
}
fn default_load_balance_hosts() -> LoadBalanceHosts {
    LoadBalanceHosts::Disable
}
fn default_keepalives_idle() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_keepalives_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_keepalives_count() -> u32 {
    3
}

/// `[databases.pool]`: keep server connections of ended sessions for the next client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PoolConfig {
    #[serde(default = "default_pool_max_idle")]
    pub(super) max_idle: usize,
    #[serde(default = "default_pool_idle_timeout")]
    pub(super) idle_timeout: HumanDuration,
    #[serde(default = "default_pool_reset_query")]
    pub(super) reset_query: String,
}

fn default_pool_max_idle() -> usize {
    16
}
fn default_pool_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_pool_reset_query() -> String {
    "DISCARD ALL".into()
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
pub(super) struct CredentialsConfig {
    pub(super) kind: CredentialKind,
    /// Secrets engine mount for `database` and `static`; default `database`.
    pub(super) mount: Option<String>,
    /// The Vault database role (dynamic or static).
    pub(super) role: Option<String>,
    /// KV v2: the API path exactly as a policy names it (`secret/data/apps/payments/db`).
    pub(super) path: Option<String>,
    #[serde(default = "default_username_key")]
    pub(super) username_key: String,
    #[serde(default = "default_password_key")]
    pub(super) password_key: String,
    /// KV secrets carry no lease: re-read them this often.
    #[serde(default = "default_kv_refresh")]
    pub(super) refresh_interval: HumanDuration,
    /// A credential is treated as expired this long before its lease ends.
    #[serde(default = "default_expiry_margin")]
    pub(super) expiry_margin: HumanDuration,
    /// A dynamic credential is replaced in the background once this fraction of its lease has
    /// passed (a little jitter is added so many dbward instances do not all ask at once).
    #[serde(default = "default_refresh_fraction")]
    pub(super) refresh_fraction: f64,
    /// Renew a replaced lease while client connections still use it, up to its max TTL.
    #[serde(default = "default_true")]
    pub(super) renew_in_use: bool,
    /// Revoke a replaced lease once no client connection uses it.
    #[serde(default = "default_true")]
    pub(super) revoke_unused: bool,
    /// Retire a session this long before its credential's hard end (default: 10 % of the
    /// credential's life, at most 5 minutes).
    pub(super) retire_margin: Option<HumanDuration>,
    /// At most this many new dynamic credentials per lease period.
    #[serde(default = "default_mint_budget")]
    pub(super) mint_budget: u32,
}

fn default_mint_budget() -> u32 {
    3
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
