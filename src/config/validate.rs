//! From the file's shape ([`raw`]) to the typed [`Config`]: every check that runs before
//! anything binds, each failure naming the key path and the value. A check either rejects the
//! file or leaves its result in the types (parsed addresses, an auth method with its fields).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw;
use super::{
    err, AdminConfig, AuthConfig, AuthMethod, ClientCert, Config, ConfigError, CredentialKind, CredentialSource,
    CredentialsConfig, DatabaseConfig, HostPort, Keepalive, ListenAddr, Login, ProxyConfig, SslMode, UpstreamHa,
    VaultConfig,
};
use crate::upstream::auth_policy::{ChannelBindingMode, RequireAuth};

/// Parses a TCP listen address; `localhost:PORT` means the IPv4 loopback.
fn parse_tcp_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

pub(super) fn config(raw: raw::Config) -> Result<Config, ConfigError> {
    let vault = vault(raw.vault)?;
    let admin = admin(raw.admin)?;
    let proxy = proxy(raw.proxy)?;
    if raw.databases.is_empty() {
        return Err(err("databases", "at least one [[databases]] entry is required"));
    }
    let mut names = HashSet::new();
    let mut listens = HashMap::new();
    let databases = raw
        .databases
        .into_iter()
        .enumerate()
        .map(|(i, db)| database(i, db, &mut names, &mut listens))
        .collect::<Result<_, _>>()?;
    Ok(Config {
        vault,
        admin,
        proxy,
        databases,
    })
}

fn vault(v: raw::VaultConfig) -> Result<VaultConfig, ConfigError> {
    let one = matches!(v.address, raw::Addresses::One(_));
    let addresses = vault_addresses(v.address)?;
    for (i, address) in addresses.iter().enumerate() {
        let key = if one {
            "vault.address".to_string()
        } else {
            format!("vault.address[{i}]")
        };
        insecure_http(&key, address, v.allow_insecure_http)?;
    }
    if v.request_timeout.0.is_zero() {
        return Err(err("vault.request_timeout", "must be greater than zero"));
    }
    Ok(VaultConfig {
        address: addresses[0].clone(),
        addresses,
        state_file: v.state_file,
        namespace: v.namespace,
        ca_file: v.ca_file,
        request_timeout: v.request_timeout.0,
        revoke_on_shutdown: v.revoke_on_shutdown,
        auth: auth(v.auth)?,
    })
}

/// `http://` only to a loopback host unless asked for: over the network the login, the token
/// and every credential would be readable and replaceable by anyone on the path.
fn insecure_http(key: &str, address: &str, allowed: bool) -> Result<(), ConfigError> {
    let Some(rest) = address.strip_prefix("http://") else {
        return Ok(());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.rsplit_once('@') {
        Some((_, h)) => h,
        None => authority,
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback || allowed {
        return Ok(());
    }
    Err(err(
        key,
        format!(
            "{:?} is http:// to a host that is not loopback: the Vault token and every database password would cross the network in cleartext; use https://, or set vault.allow_insecure_http = true if that is intended",
            address
        ),
    ))
}

/// `vault.address` as a list: each an http(s) URL; a list names the failing element's index.
fn vault_addresses(a: raw::Addresses) -> Result<Vec<String>, ConfigError> {
    let (list, one) = match a {
        raw::Addresses::One(s) => (vec![s], true),
        raw::Addresses::Many(l) => (l, false),
    };
    if list.is_empty() {
        return Err(err(
            "vault.address",
            "the list is empty: name at least one Vault address",
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for (i, address) in list.into_iter().enumerate() {
        let key = if one {
            "vault.address".to_string()
        } else {
            format!("vault.address[{i}]")
        };
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(err(key, format!("{address:?} must start with http:// or https://")));
        }
        let trimmed = address.trim_end_matches('/').to_string();
        if out.contains(&trimmed) {
            return Err(err(key, format!("{address:?} is listed twice")));
        }
        out.push(trimmed);
    }
    Ok(out)
}

fn auth(a: raw::AuthConfig) -> Result<AuthConfig, ConfigError> {
    let method = a.method;
    let need = |field: &str, v: Option<PathBuf>| {
        v.ok_or_else(|| {
            err(
                format!("vault.auth.{field}"),
                format!("is required for method = \"{method}\""),
            )
        })
    };
    let role = || match a.role.clone() {
        Some(r) if !r.is_empty() => Ok(r),
        _ => Err(err("vault.auth.role", format!("is required for method = \"{method}\""))),
    };
    let login = match method {
        AuthMethod::Jwt => Login::Jwt {
            role: role()?,
            token_file: need("token_file", a.token_file)?,
        },
        AuthMethod::Kubernetes => Login::Kubernetes {
            role: role()?,
            token_file: need("token_file", a.token_file)?,
        },
        AuthMethod::Token => Login::Token {
            token_file: need("token_file", a.token_file)?,
        },
        AuthMethod::Approle => Login::Approle {
            role_id_file: need("role_id_file", a.role_id_file)?,
            secret_id_file: need("secret_id_file", a.secret_id_file)?,
        },
    };
    let mount = match a.mount {
        Some(m) if m.is_empty() || m.contains("..") => {
            return Err(err("vault.auth.mount", format!("{m:?} is not a mount path")))
        }
        Some(m) => m.trim_matches('/').to_string(),
        None => method.as_str().to_string(),
    };
    if a.token_check_interval.0 < Duration::from_secs(1) {
        return Err(err("vault.auth.token_check_interval", "must be at least 1s"));
    }
    Ok(AuthConfig {
        mount,
        login,
        token_check_interval: a.token_check_interval.0,
    })
}

fn admin(a: raw::AdminConfig) -> Result<AdminConfig, ConfigError> {
    let Some(listen) = a.listen else {
        return Ok(AdminConfig { listen: None });
    };
    match parse_tcp_addr(&listen) {
        None => Err(err(
            "admin.listen",
            format!("{listen:?} is not an address like \"127.0.0.1:9187\""),
        )),
        Some(addr) if !addr.ip().is_loopback() && !a.allow_remote => Err(err(
            "admin.listen",
            format!("{listen:?} is not a loopback address; set admin.allow_remote = true to expose metrics and readiness details beyond this host"),
        )),
        Some(addr) => Ok(AdminConfig { listen: Some(addr) }),
    }
}

fn proxy(p: raw::ProxyConfig) -> Result<ProxyConfig, ConfigError> {
    if !(1..=256).contains(&p.worker_threads) {
        return Err(err(
            "proxy.worker_threads",
            format!("{} is out of range: use 1 to 256", p.worker_threads),
        ));
    }
    Ok(ProxyConfig {
        startup_timeout: p.startup_timeout.0,
        shutdown_grace: p.shutdown_grace.0,
        vault_error_cache: p.vault_error_cache.0,
        worker_threads: p.worker_threads,
    })
}

fn database(
    i: usize,
    db: raw::DatabaseConfig,
    names: &mut HashSet<String>,
    listens: &mut HashMap<String, String>,
) -> Result<DatabaseConfig, ConfigError> {
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
    let listen = listen_addrs(i, &db, listens)?;
    let upstream_hosts = upstream_hosts(i, &db.upstream)?;
    let upstream = upstream_hosts[0].clone();
    let ha = upstream_ha(i, &db)?;
    if db.connect_timeout.0.is_zero() {
        return Err(err(key("connect_timeout"), "must be greater than zero"));
    }
    if db.max_client_connections == 0 {
        return Err(err(key("max_client_connections"), "must be at least 1"));
    }
    let client_cert = tls_files(i, &db)?;
    if db.sslmode == SslMode::VerifyCa && db.ca_file.is_none() {
        return Err(err(
            key("ca_file"),
            "is required with sslmode = \"verify-ca\": without it any certificate from a public CA for any name would be trusted, and with it cleartext and MD5 passwords; set ca_file to the CA that signs the server's certificate, or use \"verify-full\"",
        ));
    }
    let allowed = super::allowlist::allowlist(i, db.allowed_users.clone(), db.allowed_groups.clone())?;
    let (require_auth, channel_binding) = auth_policy(i, &db)?;
    let pool = pool(i, db.pool)?;
    Ok(DatabaseConfig {
        allowed,
        credentials: credentials(i, db.credentials)?,
        name: db.name,
        listen,
        upstream,
        dbname: db.dbname,
        sslmode: db.sslmode,
        ca_file: db.ca_file,
        client_cert,
        sni: db.sni,
        connect_timeout: db.connect_timeout.0,
        socket_mode: db.socket_mode.0,
        max_client_connections: db.max_client_connections,
        allow_insecure_password: db.allow_insecure_password,
        require_auth,
        channel_binding,
        allow_replication: db.allow_replication,
        client_tls: db.client_tls,
        upstream_hosts,
        ha,
        pool,
    })
}

/// `upstream`: one `host:port` or a non-empty list of them.
fn upstream_hosts(i: usize, raw: &raw::Upstreams) -> Result<Vec<HostPort>, ConfigError> {
    let list = raw.list();
    if list.is_empty() {
        return Err(err(
            format!("databases[{i}].upstream"),
            "the list needs at least one host:port",
        ));
    }
    let many = matches!(raw, raw::Upstreams::Many(_));
    list.iter()
        .enumerate()
        .map(|(j, s)| {
            let k = if many {
                format!("databases[{i}].upstream[{j}]")
            } else {
                format!("databases[{i}].upstream")
            };
            HostPort::parse(s).ok_or_else(|| err(k, format!("{s:?} is not host:port (e.g. \"db.internal:5432\")")))
        })
        .collect()
}

/// target_session_attrs, load_balance_hosts, keepalives*, recheck_interval.
fn upstream_ha(i: usize, db: &raw::DatabaseConfig) -> Result<UpstreamHa, ConfigError> {
    let key = |k: &str| format!("databases[{i}].{k}");
    let keepalive = if db.keepalives {
        for (k, d) in [
            ("keepalives_idle", db.keepalives_idle),
            ("keepalives_interval", db.keepalives_interval),
        ] {
            if d.0 < Duration::from_secs(1) {
                return Err(err(
                    key(k),
                    format!("{d:?} is below the 1s the kernel counts in", d = d.0),
                ));
            }
        }
        if db.keepalives_count == 0 {
            return Err(err(key("keepalives_count"), "must be at least 1"));
        }
        Some(Keepalive {
            idle: db.keepalives_idle.0,
            interval: db.keepalives_interval.0,
            count: db.keepalives_count,
        })
    } else {
        None
    };
    let recheck_interval = match db.recheck_interval {
        Some(d) if d.0 < Duration::from_secs(1) => {
            return Err(err(
                key("recheck_interval"),
                format!("{:?} is below the 1s minimum", d.0),
            ))
        }
        d => d.map(|d| d.0),
    };
    Ok(UpstreamHa {
        target_session_attrs: db.target_session_attrs,
        load_balance_hosts: db.load_balance_hosts,
        keepalive,
        recheck_interval,
    })
}

/// A database entry's listeners: absolute Unix socket paths and TCP addresses, loopback unless
/// the entry allows remote clients, none shared with another entry.
fn listen_addrs(
    i: usize,
    db: &raw::DatabaseConfig,
    listens: &mut HashMap<String, String>,
) -> Result<Vec<ListenAddr>, ConfigError> {
    let key = |k: &str| format!("databases[{i}].{k}");
    if db.listen.is_empty() {
        return Err(err(key("listen"), "at least one address or socket path is required"));
    }
    let mut listen = Vec::with_capacity(db.listen.len());
    for (j, l) in db.listen.iter().enumerate() {
        let lkey = format!("databases[{i}].listen[{j}]");
        if l.starts_with('/') {
            // A socket path is a file name; sun_path holds 108 bytes.
            if l.len() > 100 {
                return Err(err(lkey, format!("{l:?} is too long for a Unix socket path")));
            }
            listen.push(ListenAddr::Unix(PathBuf::from(l)));
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
            listen.push(ListenAddr::Tcp(addr));
        }
        if let Some(other) = listens.insert(l.clone(), db.name.clone()) {
            return Err(err(lkey, format!("{l:?} is also a listener of database {other:?}")));
        }
    }
    Ok(listen)
}

/// The entry's TLS files exist (their contents are read when the entry is built), and the
/// client certificate comes with its key.
fn tls_files(i: usize, db: &raw::DatabaseConfig) -> Result<Option<ClientCert>, ConfigError> {
    let key = |k: &str| format!("databases[{i}].{k}");
    let must_exist = |k: String, p: &PathBuf| {
        if p.is_file() {
            Ok(())
        } else {
            Err(err(
                k,
                format!("{:?} does not exist or is not a file", p.display().to_string()),
            ))
        }
    };
    for (k, p) in [
        ("ca_file", &db.ca_file),
        ("cert_file", &db.cert_file),
        ("key_file", &db.key_file),
    ] {
        if let Some(p) = p {
            must_exist(key(k), p)?;
        }
    }
    if let Some(t) = &db.client_tls {
        must_exist(key("client_tls.cert_file"), &t.cert_file)?;
        must_exist(key("client_tls.key_file"), &t.key_file)?;
    }
    let client_cert = match (db.cert_file.clone(), db.key_file.clone()) {
        (Some(cert_file), Some(key_file)) => Some(ClientCert { cert_file, key_file }),
        (None, None) => None,
        _ => {
            return Err(err(
                key("cert_file"),
                "cert_file and key_file go together: set both or neither",
            ))
        }
    };
    if db.sslmode == SslMode::Disable && (db.ca_file.is_some() || client_cert.is_some()) {
        return Err(err(
            key("sslmode"),
            "\"disable\" but ca_file/cert_file are set; use \"verify-full\" or remove them",
        ));
    }
    Ok(client_cert)
}

/// require_auth and channel_binding, with libpq's syntax and meaning.
fn auth_policy(i: usize, db: &raw::DatabaseConfig) -> Result<(RequireAuth, ChannelBindingMode), ConfigError> {
    let key = |k: &str| format!("databases[{i}].{k}");
    let require_auth = RequireAuth::parse(&db.require_auth).map_err(|e| err(key("require_auth"), e))?;
    let channel_binding = match db.channel_binding.as_deref() {
        None | Some("prefer") => ChannelBindingMode::Prefer,
        Some("disable") => ChannelBindingMode::Disable,
        Some("require") => ChannelBindingMode::Require,
        Some(other) => {
            return Err(err(
                key("channel_binding"),
                format!("unknown value {other:?}, expected one of disable, prefer, require"),
            ))
        }
    };
    if channel_binding == ChannelBindingMode::Require && db.sslmode == SslMode::Disable {
        return Err(err(
            key("channel_binding"),
            "\"require\" needs TLS, but sslmode is \"disable\"; use sslmode = \"verify-full\"",
        ));
    }
    Ok((require_auth, channel_binding))
}

/// A Vault path segment list: no empty, `.` or `..` segment, no whitespace, `?` or `#`.
fn valid_segments(s: &str) -> bool {
    !s.is_empty()
        && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        && !s.contains(|ch: char| ch.is_whitespace() || ch == '?' || ch == '#')
}

fn credentials(i: usize, c: raw::CredentialsConfig) -> Result<CredentialsConfig, ConfigError> {
    let key = |k: &str| format!("databases[{i}].credentials.{k}");
    let source = match c.kind {
        CredentialKind::Database | CredentialKind::Static => {
            let role = match c.role {
                Some(r) if valid_segments(&r) && !r.contains('/') => r,
                Some(r) => return Err(err(key("role"), format!("{r:?} is not a Vault role name"))),
                None => return Err(err(key("role"), format!("is required for kind = \"{}\"", c.kind))),
            };
            if c.path.is_some() {
                return Err(err(
                    key("path"),
                    format!(
                        "is only for kind = \"kv\"; kind = \"{}\" reads <mount>/.../<role>",
                        c.kind
                    ),
                ));
            }
            let mount = match c.mount {
                Some(m) if !valid_segments(m.trim_matches('/')) => {
                    return Err(err(key("mount"), format!("{m:?} is not a mount path")))
                }
                Some(m) => m.trim_matches('/').to_string(),
                None => "database".to_string(),
            };
            if c.kind == CredentialKind::Database {
                CredentialSource::Database { mount, role }
            } else {
                CredentialSource::Static { mount, role }
            }
        }
        CredentialKind::Kv => {
            let path = match c.path {
                Some(p) if valid_segments(p.trim_matches('/')) => {
                    let p = p.trim_matches('/');
                    if !p.contains("/data/") {
                        return Err(err(
                            key("path"),
                            format!("{p:?} is not a KV v2 API path: write it as a policy names it, with /data/ after the mount (e.g. \"secret/data/apps/payments/db\")"),
                        ));
                    }
                    p.to_string()
                }
                Some(p) => return Err(err(key("path"), format!("{p:?} is not a Vault path"))),
                None => return Err(err(key("path"), "is required for kind = \"kv\"")),
            };
            if c.role.is_some() {
                return Err(err(key("role"), "is not used with kind = \"kv\"; remove it"));
            }
            CredentialSource::Kv {
                path,
                username_key: c.username_key.clone(),
                password_key: c.password_key.clone(),
            }
        }
    };
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
    if c.mint_budget < 2 {
        return Err(err(
            key("mint_budget"),
            format!(
                "{} is too small: a credential is replaced ahead of its expiry, so at least 2 per lease period are needed (default 3)",
                c.mint_budget
            ),
        ));
    }
    if c.username_key.is_empty() {
        return Err(err(key("username_key"), "must not be empty"));
    }
    if c.password_key.is_empty() {
        return Err(err(key("password_key"), "must not be empty"));
    }
    Ok(CredentialsConfig {
        source,
        refresh_interval: c.refresh_interval.0,
        expiry_margin: c.expiry_margin.0,
        refresh_fraction: c.refresh_fraction,
        renew_in_use: c.renew_in_use,
        revoke_unused: c.revoke_unused,
        retire_margin: c.retire_margin.map(|m| m.0),
        mint_budget: c.mint_budget,
    })
}

/// `databases[i].pool`: the numbers must allow reuse, the reset query must be sendable.
fn pool(i: usize, p: Option<raw::PoolConfig>) -> Result<Option<super::PoolConfig>, ConfigError> {
    let Some(p) = p else { return Ok(None) };
    let key = |k: &str| format!("databases[{i}].pool.{k}");
    if p.max_idle == 0 {
        return Err(err(
            key("max_idle"),
            "must be at least 1 (leave out [databases.pool] to turn reuse off)",
        ));
    }
    if p.idle_timeout.0.is_zero() {
        return Err(err(key("idle_timeout"), "must be greater than zero"));
    }
    if p.reset_query.trim().is_empty() || p.reset_query.contains('\0') {
        return Err(err(
            key("reset_query"),
            format!("{:?} must be a non-empty SQL string without NUL bytes", p.reset_query),
        ));
    }
    Ok(Some(super::PoolConfig {
        max_idle: p.max_idle,
        idle_timeout: p.idle_timeout.0,
        reset_query: p.reset_query,
    }))
}
