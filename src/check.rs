//! `dbward check`: everything production will do, done once, before the deploy. It logs in the
//! way the config says, asks Vault what the token may do on every path the config uses
//! (`sys/capabilities-self`), reads each credential, opens one upstream connection with it
//! (`SELECT 1`), and cleans up after itself (the test lease, then the check's own token).
//!
//! Each step is one [`Check`] with a verdict and, when it fails, a `fix` that names what to
//! change: the path, the missing capability, the token's policies, the role that issued it.
//! Nothing here ever puts a password, token or JWT into a check: messages are built from error
//! types that carry none, and from names (paths, roles, users, lease ids).
//!
//! `--diff-policy NAME` compares a policy stored in Vault with what the config needs instead
//! (see [`crate::policy::diff`]): the review tool for a path reorganization.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use secrecy::SecretString;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{AuthConfig, AuthMethod, Config, CredentialKind, DatabaseConfig};
use crate::metrics::Metrics;
use crate::policy::{self, Requirement};
use crate::upstream::{self, UpstreamError, UpstreamSettings, UpstreamStream};
use crate::vault::{self, Auth, Credential, VaultClient, VaultError, VaultToken};

/// Scope of the checks that concern Vault and the login rather than one database entry.
const VAULT_SCOPE: &str = "vault";
/// Clock differences above this are reported; above [`SKEW_FAIL`] they fail the check.
const SKEW_WARN: Duration = Duration::from_secs(10);
/// Vault's jwt auth method allows 60 s of clock skew by default; beyond that, JWT time checks on
/// this host and in Vault disagree.
const SKEW_FAIL: Duration = Duration::from_secs(60);
/// Replacing a credential more often than this is "constant rotation".
const MIN_ROTATION: Duration = Duration::from_secs(60);
/// Asking Vault to extend a token or lease by this much answers with its max TTL.
const PROBE_INCREMENT_SECS: u64 = 10 * 365 * 24 * 3600;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    /// Works now, but something will hurt later (exit 0 unless `--strict`).
    Warn,
    Fail,
    /// Not tried, because an earlier step failed.
    Skip,
}

impl Verdict {
    fn marker(self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `vault`, a database entry's name, or `policy NAME` (for `--diff-policy`).
    pub scope: String,
    /// Machine-readable kind: `vault`, `clock`, `login`, `read`, `leases`, `lease_ttl`,
    /// `token_ttl`, `upstream`, `revoke_lease`, `revoke_token`, `policy`...
    pub check: &'static str,
    /// What was checked, e.g. `read secret/data/apps/payments/db`.
    pub title: String,
    pub verdict: Verdict,
    pub message: String,
    /// What to change, for failures and warnings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Structured facts for machines (path, missing capabilities, policies, SQLSTATE...).
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl Check {
    fn new(
        scope: &str,
        check: &'static str,
        title: impl Into<String>,
        verdict: Verdict,
        message: impl Into<String>,
    ) -> Self {
        Check {
            scope: scope.to_string(),
            check,
            title: title.into(),
            verdict,
            message: message.into(),
            fix: None,
            details: Map::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    fn fix_opt(mut self, fix: Option<String>) -> Self {
        self.fix = fix;
        self
    }

    fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// All checks of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: String,
    pub vault: String,
    pub checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    pub fn count(&self, v: Verdict) -> usize {
        self.checks.iter().filter(|c| c.verdict == v).count()
    }

    /// No failure (and, when `strict`, no warning either).
    pub fn ok(&self, strict: bool) -> bool {
        self.count(Verdict::Fail) == 0 && !(strict && self.count(Verdict::Warn) > 0)
    }

    /// One line per check, `fix:` lines indented below, and a summary.
    pub fn render_text(&self, strict: bool) -> String {
        let width = self.checks.iter().map(|c| c.scope.chars().count()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4} {:<width$}  {}: {}\n",
                c.verdict.marker(),
                c.scope,
                c.title,
                c.message
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("     {:<width$}  fix: {fix}\n", ""));
            }
        }
        let (fail, warn, pass, skip) = (
            self.count(Verdict::Fail),
            self.count(Verdict::Warn),
            self.count(Verdict::Pass),
            self.count(Verdict::Skip),
        );
        let mut parts = vec![format!("{pass} passed")];
        if fail > 0 {
            parts.insert(0, format!("{fail} failed"));
        }
        if warn > 0 {
            parts.push(format!("{warn} warning{}", if warn == 1 { "" } else { "s" }));
        }
        if skip > 0 {
            parts.push(format!("{skip} skipped"));
        }
        let verdict = if self.ok(strict) {
            "dbward check passed"
        } else if fail == 0 {
            "dbward check failed (--strict: warnings count)"
        } else {
            "dbward check FAILED: fix the above before deploying"
        };
        out.push_str(&format!("\n{verdict} ({}; {})\n", parts.join(", "), self.config));
        out
    }

    /// One JSON document with every check.
    pub fn to_json(&self, strict: bool) -> Value {
        json!({
            "ok": self.ok(strict),
            "config": self.config,
            "vault": self.vault,
            "summary": {
                "pass": self.count(Verdict::Pass),
                "warn": self.count(Verdict::Warn),
                "fail": self.count(Verdict::Fail),
                "skip": self.count(Verdict::Skip),
            },
            "checks": self.checks,
        })
    }
}

/// What the command line adds to the config.
#[derive(Default)]
pub struct Options {
    /// The config file, as given (named in fixes: `dbward policy --config FILE`).
    pub config_path: PathBuf,
    /// Database to connect to for entries without `dbname` (default `postgres`).
    pub dbname: Option<String>,
    /// Compare this Vault policy with the config instead of running the live checks.
    pub diff_policy: Option<String>,
    /// Token that may read `sys/policies/acl/NAME` for `--diff-policy` (from `VAULT_TOKEN` /
    /// `BAO_TOKEN`); without it the check logs in as the config says and uses that token.
    pub policy_reader_token: Option<SecretString>,
}

/// The setup could not even start: an unreadable CA file or key named by the config. The
/// command exits with the config error code.
#[derive(Debug)]
pub struct SetupError(pub String);

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs every check. Only setup problems are errors; everything else is in the report.
pub async fn run(config: &Config, opts: &Options) -> Result<Report, SetupError> {
    let client = VaultClient::new(&config.vault, Arc::new(Metrics::new())).map_err(SetupError)?;
    let mut upstreams = Vec::new();
    for (i, db) in config.databases.iter().enumerate() {
        upstreams.push(UpstreamSettings::from_config(i, db).map_err(SetupError)?);
    }
    let mut r = Report {
        config: opts.config_path.display().to_string(),
        vault: client.address().to_string(),
        checks: vec![],
    };
    let run = Run {
        config,
        opts,
        client,
        login: describe_login(&config.vault.auth),
    };

    if !run.vault_health(&mut r).await {
        for db in &config.databases {
            r.push(skipped(db, "Vault cannot be asked"));
        }
        return Ok(r);
    }
    if let Some(name) = &opts.diff_policy {
        run.diff_policy(&mut r, name).await;
        return Ok(r);
    }

    let auth = Auth::new(run.client.clone(), config.vault.auth.clone());
    let token = match auth.token().await {
        Ok(t) => t,
        Err(e) => {
            r.push(run.login_failure(&e));
            for db in &config.databases {
                r.push(skipped(db, "no Vault token"));
            }
            return Ok(r);
        }
    };
    let info = run.token_info(&token).await;
    r.push(run.login_line(&info));
    if let Some(w) = &info.lookup_error {
        r.push(
            Check::new(VAULT_SCOPE, "token_lookup", "token lookup (auth/token/lookup-self)", Verdict::Warn, w.clone())
                .fix("attach Vault's built-in \"default\" policy to the auth role (do not set token_no_default_policy): dbward renews its token with it"),
        );
    }

    let reqs = policy::requirements(config);
    let caps = match run.capabilities(&token, &reqs).await {
        Ok(c) => Some(c),
        Err(e) => {
            r.push(Check::new(
                VAULT_SCOPE,
                "capabilities",
                "capabilities (sys/capabilities-self)",
                Verdict::Warn,
                format!("cannot ask Vault what the token may do ({e}); reading the paths directly instead"),
            ));
            None
        }
    };
    for (i, db) in config.databases.iter().enumerate() {
        run.database(&mut r, i, db, &upstreams[i], &token, &info, &reqs, caps.as_ref())
            .await;
    }
    if config.vault.auth.method != AuthMethod::Token {
        r.push(run.revoke_token(&token).await);
    }
    Ok(r)
}

fn skipped(db: &DatabaseConfig, why: &str) -> Check {
    Check::new(
        &db.name,
        "read",
        format!("read {}", db.credentials.vault_path()),
        Verdict::Skip,
        format!("not checked ({why})"),
    )
}

/// How the config logs in, as messages name it: `jwt role payments-service at auth/jwt`.
pub fn describe_login(a: &AuthConfig) -> String {
    let mount = a.mount().trim_matches('/');
    match a.method {
        AuthMethod::Jwt | AuthMethod::Kubernetes => {
            format!("{} role {} at auth/{mount}", a.method, a.role.as_deref().unwrap_or(""))
        }
        AuthMethod::Approle => format!("approle at auth/{mount}"),
        AuthMethod::Token => format!(
            "the token in {}",
            a.token_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// `32d`, `2h`, `29m 59s`: whole seconds, in the units Vault's TTLs are written in (humantime
/// would say "1month 1day 13h 26m 24s" for Vault's default 768h).
fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let parts = [
        (s / 86400, "d"),
        (s / 3600 % 24, "h"),
        (s / 60 % 60, "m"),
        (s % 60, "s"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Vault answers a renewal by a huge increment with what is left of the max TTL, in whole
/// seconds rounded down; adding the age back gives the configured max TTL. Ages are measured
/// from just before the request, so the sum is off by up to a second: long TTLs (configured in
/// minutes) are rounded to the minute, short ones to the second.
fn max_ttl_from_remaining(left_secs: u64, age: Duration) -> Duration {
    let total = left_secs as f64 + age.as_secs_f64();
    if total >= 600.0 {
        Duration::from_secs(((total / 60.0).round() * 60.0) as u64)
    } else {
        Duration::from_secs(total.round() as u64)
    }
}

/// A token's (or lease's) max TTL, as far as Vault lets us find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MaxTtl {
    Limited(Duration),
    /// Periodic tokens and tokens without TTL can be renewed forever.
    Unlimited,
    Unknown,
}

impl fmt::Display for MaxTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxTtl::Limited(d) => f.write_str(&fmt_duration(*d)),
            MaxTtl::Unlimited => f.write_str("none (periodic)"),
            MaxTtl::Unknown => f.write_str("unknown"),
        }
    }
}

/// What Vault says about the check's token.
struct TokenInfo {
    policies: Vec<String>,
    ttl: Option<Duration>,
    renewable: bool,
    max_ttl: MaxTtl,
    lookup_error: Option<String>,
}

impl TokenInfo {
    fn policies_text(&self) -> String {
        if self.policies.is_empty() {
            "none".into()
        } else {
            self.policies.join(", ")
        }
    }

    /// The policies a fix should name: "default" is Vault's own, not where app paths go.
    fn editable_policies(&self) -> String {
        let own: Vec<&str> = self
            .policies
            .iter()
            .map(String::as_str)
            .filter(|p| *p != "default")
            .collect();
        if own.is_empty() {
            "a policy attached to the auth role".into()
        } else {
            format!("one of the token's policies ({})", own.join(", "))
        }
    }
}

struct Run<'a> {
    config: &'a Config,
    opts: &'a Options,
    client: Arc<VaultClient>,
    /// [`describe_login`] of the config.
    login: String,
}

impl Run<'_> {
    fn config_file(&self) -> String {
        self.opts.config_path.display().to_string()
    }

    /// `sys/health` (reachable, initialized, unsealed) and the clock against its `Date`.
    async fn vault_health(&self, r: &mut Report) -> bool {
        let title = format!("vault at {}", self.client.address());
        let wall = SystemTime::now();
        let started = Instant::now();
        let result = self
            .client
            .get_unauthenticated("health", "sys/health?standbyok=true&perfstandbyok=true")
            .await;
        let local_mid = wall + started.elapsed() / 2;
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                r.push(self.health_failure(&title, &e));
                return false;
            }
        };
        let version = resp.str_field("/version").unwrap_or("unknown version");
        r.push(
            Check::new(
                VAULT_SCOPE,
                "vault",
                title,
                Verdict::Pass,
                format!("reachable, version {version}, unsealed"),
            )
            .detail("version", version),
        );
        let server = resp
            .date
            .as_deref()
            .and_then(parse_http_date)
            // The Date header has whole seconds: the server's clock was somewhere in that second.
            .map(|t| t + Duration::from_millis(500))
            .or_else(|| {
                resp.u64_field("/server_time_utc")
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(500))
            });
        if let Some(server) = server {
            r.push(clock_check(local_mid, server));
        }
        true
    }

    fn health_failure(&self, title: &str, e: &VaultError) -> Check {
        let addr = self.client.address();
        let (message, fix) = match e {
            VaultError::Status { status: 503, .. } => (
                "Vault is sealed (sys/health answered 503)".to_string(),
                "unseal it (`bao operator unseal` / `vault operator unseal`), or point vault.address at an unsealed node".to_string(),
            ),
            VaultError::Status { status: 501, .. } => (
                "Vault is not initialized (sys/health answered 501)".to_string(),
                "initialize it, or point vault.address at the right server".to_string(),
            ),
            VaultError::Unreachable { detail, .. } if is_tls_error(detail) => (
                format!("TLS to {addr} failed: {detail}"),
                "vault.ca_file must hold the CA that signed Vault's certificate (default: the system roots), and the host in vault.address must be one of the certificate's names; an http:// Vault needs an http:// address".to_string(),
            ),
            VaultError::Unreachable { detail, .. } => (
                format!("unreachable: {detail}"),
                "check vault.address, that Vault is running, and that this host can reach it (DNS, firewall, proxy)".to_string(),
            ),
            VaultError::Timeout { after, .. } => (
                format!("no answer within {}", fmt_duration(*after)),
                "check that Vault is up and not overloaded, and that nothing between drops the traffic; or raise vault.request_timeout".to_string(),
            ),
            other => (other.to_string(), "check vault.address".to_string()),
        };
        let kind = match e {
            VaultError::Status { status: 503, .. } => "sealed",
            VaultError::Status { status: 501, .. } => "uninitialized",
            VaultError::Unreachable { detail, .. } if is_tls_error(detail) => "tls",
            VaultError::Unreachable { .. } => "unreachable",
            VaultError::Timeout { .. } => "timeout",
            _ => "error",
        };
        Check::new(VAULT_SCOPE, "vault", title, Verdict::Fail, message)
            .fix(fix)
            .detail("problem", kind)
    }

    /// A login that failed, with the diagnosis: JWT times, `aud`/`sub` against the role's bound
    /// claims, unknown role, or whatever Vault said.
    fn login_failure(&self, e: &VaultError) -> Check {
        let a = &self.config.vault.auth;
        let role = a.role.as_deref().unwrap_or("");
        let mount = a.mount().trim_matches('/');
        let role_path = format!("auth/{mount}/role/{role}");
        let claims = a.token_file.as_deref().and_then(|f| {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(f).ok()?);
            vault::auth::read_claims(text.trim(), f).ok()
        });
        let aud = claims.as_ref().map(|c| c.aud.join(",")).unwrap_or_default();
        let sub = claims.as_ref().and_then(|c| c.sub.clone()).unwrap_or_default();
        let file = a
            .token_file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let text = e.to_string();
        // What Vault itself said, without the claims dbward appends (a claim value could
        // contain any word).
        let lower = match e {
            VaultError::Status { errors, .. } => errors
                .iter()
                .filter(|m| !m.starts_with("the JWT has"))
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
        .to_lowercase();
        let (problem, diagnosis, fix): (&str, String, String) = match e {
            VaultError::Local { .. } if lower.contains("expired at") => (
                "jwt_expired",
                "the workload JWT has expired".into(),
                format!("whatever writes {file} (projected service-account token, identity agent) must keep rotating it; check that it runs"),
            ),
            VaultError::Local { .. } if lower.contains("not valid before") => (
                "jwt_not_yet_valid",
                "the workload JWT is not valid yet".into(),
                "check this host's clock and the issuer's: the token's nbf is in the future".into(),
            ),
            VaultError::Local { .. } => ("local", "cannot log in".into(), "check the vault.auth files named above".into()),
            VaultError::Status { op: "login", .. } if lower.contains("audience") => (
                "aud_mismatch",
                format!("the JWT's aud ({aud}) is not one of the role's bound_audiences"),
                format!("add {aud:?} to bound_audiences of {role_path}, or have the workload token issued for the audience the role expects"),
            ),
            VaultError::Status { op: "login", .. }
                if lower.contains("subject") || lower.contains("claim \"sub\"") =>
            (
                "sub_mismatch",
                format!("the JWT's sub ({sub}) does not match the role's bound subject"),
                format!("set bound_subject (or bound_claims.sub) of {role_path} to {sub:?}, or run the workload as the identity the role is bound to"),
            ),
            VaultError::Status { op: "login", .. } if lower.contains("issuer") => (
                "iss_mismatch",
                "the JWT's iss is not the issuer the auth method is bound to".into(),
                format!("compare the JWT's iss with bound_issuer of auth/{mount}/config"),
            ),
            VaultError::Status { op: "login", .. } if lower.contains("does not match") && lower.contains("claim") => (
                "claim_mismatch",
                "a claim of the JWT does not match the role's bound_claims".into(),
                format!("compare the JWT's claims with bound_claims of {role_path}"),
            ),
            VaultError::Status { op: "login", .. } if lower.contains("expired") || lower.contains("not valid yet") => (
                "jwt_times",
                "Vault says the JWT is expired or not valid yet, although this host's clock says otherwise".into(),
                "compare this host's clock with Vault's and the issuer's (NTP)".into(),
            ),
            VaultError::Status { op: "login", .. } if lower.contains("could not be found") || lower.contains("invalid role") => (
                "unknown_role",
                "the auth role does not exist".into(),
                format!("create {role_path}, or correct vault.auth.role / vault.auth.mount"),
            ),
            VaultError::Status { op: "login", status: 403, .. } => (
                "denied",
                "Vault refused the login".into(),
                "check the credentials in vault.auth and the auth role's bindings (bound CIDRs, secret_id)".into(),
            ),
            _ if e.is_unavailable() => ("unavailable", "Vault cannot be asked".into(), "check that Vault is up and reachable".into()),
            _ => ("error", "the login failed".into(), format!("check {role_path} and vault.auth")),
        };
        Check::new(
            VAULT_SCOPE,
            "login",
            format!("login ({})", self.login),
            Verdict::Fail,
            format!("{diagnosis}: {text}"),
        )
        .fix(fix)
        .detail("problem", problem)
        .detail("issued_by", self.login.clone())
    }

    /// Policies (identity ones included), TTL and max TTL of the token. The max TTL is learned by
    /// asking for a very long renewal: Vault caps it and answers with what is left. The check's
    /// token is revoked at the end, so extending it costs nothing; a configured token (method
    /// `token`) is not the check's and is not renewed.
    async fn token_info(&self, token: &VaultToken) -> TokenInfo {
        let mut info = TokenInfo {
            policies: token.policies.clone(),
            ttl: token.ttl,
            renewable: token.renewable,
            max_ttl: MaxTtl::Unknown,
            lookup_error: None,
        };
        let mut period = 0;
        let mut explicit_max = 0;
        match self.client.read(&token.token, "auth/token/lookup-self").await {
            Ok(resp) => {
                // Only names and numbers are taken from the answer: it also holds the token.
                let data = &resp.body["data"];
                // The login's order first (Vault sorts lookup's), then identity policies.
                for p in string_list(&data["policies"])
                    .into_iter()
                    .chain(string_list(&data["identity_policies"]))
                {
                    if !info.policies.contains(&p) {
                        info.policies.push(p);
                    }
                }
                // The TTL the login granted reads better than what is left of it a moment later.
                if info.ttl.is_none() {
                    info.ttl = data["ttl"].as_u64().filter(|t| *t > 0).map(Duration::from_secs);
                }
                info.renewable = data["renewable"].as_bool().unwrap_or(info.renewable);
                period = data["period"].as_u64().unwrap_or(0);
                explicit_max = data["explicit_max_ttl"].as_u64().unwrap_or(0);
            }
            Err(e) => info.lookup_error = Some(format!("cannot look up the token: {e}")),
        }
        info.max_ttl = if info.ttl.is_none() || period > 0 {
            MaxTtl::Unlimited
        } else if !info.renewable {
            info.ttl.map(MaxTtl::Limited).unwrap_or(MaxTtl::Unknown)
        } else if self.config.vault.auth.method == AuthMethod::Token {
            if explicit_max > 0 {
                MaxTtl::Limited(Duration::from_secs(explicit_max))
            } else {
                MaxTtl::Unknown
            }
        } else {
            let body = json!({ "increment": PROBE_INCREMENT_SECS });
            match self
                .client
                .write("renew-self", "auth/token/renew-self", Some(&token.token), &body)
                .await
            {
                Ok(resp) => resp
                    .u64_field("/auth/lease_duration")
                    .map(|left| MaxTtl::Limited(max_ttl_from_remaining(left, token.obtained_at.elapsed())))
                    .unwrap_or(MaxTtl::Unknown),
                Err(_) => MaxTtl::Unknown,
            }
        };
        info
    }

    fn login_line(&self, info: &TokenInfo) -> Check {
        let ttl = info.ttl.map(fmt_duration).unwrap_or_else(|| "none".into());
        let renewable = if info.renewable { "renewable" } else { "not renewable" };
        let mut c = Check::new(
            VAULT_SCOPE,
            "login",
            format!("login ({})", self.login),
            Verdict::Pass,
            format!(
                "policies {}; token TTL {ttl} ({renewable}), max TTL {}",
                info.policies_text(),
                info.max_ttl
            ),
        )
        .detail("policies", info.policies.clone())
        .detail("issued_by", self.login.clone());
        if let Some(t) = info.ttl {
            c = c.detail("token_ttl_seconds", t.as_secs());
        }
        if let MaxTtl::Limited(m) = info.max_ttl {
            c = c.detail("token_max_ttl_seconds", m.as_secs());
        }
        c
    }

    /// `sys/capabilities-self` for every path the config uses: path → capabilities.
    async fn capabilities(
        &self,
        token: &VaultToken,
        reqs: &[Requirement],
    ) -> Result<std::collections::HashMap<String, Vec<String>>, VaultError> {
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        let resp = self
            .client
            .write(
                "capabilities",
                "sys/capabilities-self",
                Some(&token.token),
                &json!({ "paths": paths }),
            )
            .await?;
        let mut out = std::collections::HashMap::new();
        for p in paths {
            // Vault answers under data and, for compatibility, at the top level too.
            let caps = resp.body["data"].get(p).or_else(|| resp.body.get(p));
            if let Some(c) = caps {
                out.insert(p.to_string(), string_list(c));
            }
        }
        Ok(out)
    }

    /// Everything about one database entry: read, lease capabilities, lease TTLs, upstream,
    /// revocation of the test lease.
    #[allow(clippy::too_many_arguments)]
    async fn database(
        &self,
        r: &mut Report,
        index: usize,
        db: &DatabaseConfig,
        upstream: &UpstreamSettings,
        token: &VaultToken,
        info: &TokenInfo,
        reqs: &[Requirement],
        caps: Option<&std::collections::HashMap<String, Vec<String>>>,
    ) {
        let path = db.credentials.vault_path();
        let upstream_title = format!("upstream {}", upstream.addr());
        let missing_read = caps.and_then(|c| c.get(&path)).is_some_and(|c| !allows(c, "read"));
        let cred = if missing_read {
            r.push(self.missing_capability(index, db, &path, "read", info, None));
            None
        } else {
            match vault::secrets::fetch(&self.client, &token.token, &db.credentials).await {
                Ok(c) => {
                    r.push(read_ok(db, &c));
                    Some(c)
                }
                Err(e) if e.is_denied() => {
                    r.push(self.missing_capability(index, db, &path, "read", info, Some(&e)));
                    None
                }
                Err(e) => {
                    r.push(self.read_failure(index, db, &e));
                    None
                }
            }
        };

        // The lease endpoints: needed by this entry even when its read failed.
        let lease_reqs: Vec<&Requirement> = reqs
            .iter()
            .filter(|q| q.path.starts_with("sys/leases/") && q.databases.contains(&db.name))
            .collect();
        let mut can_renew = false;
        let mut can_revoke = false;
        if !lease_reqs.is_empty() {
            let title = format!(
                "leases ({})",
                lease_reqs
                    .iter()
                    .map(|q| q.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let missing: Vec<&&Requirement> = lease_reqs
                .iter()
                .filter(|q| {
                    caps.and_then(|c| c.get(&q.path))
                        .is_some_and(|c| !allows(c, q.capability))
                })
                .collect();
            can_renew = lease_reqs.iter().any(|q| q.path == policy::LEASE_RENEW_PATH)
                && !missing.iter().any(|q| q.path == policy::LEASE_RENEW_PATH);
            can_revoke = !missing.iter().any(|q| q.path == policy::LEASE_REVOKE_PATH);
            if missing.is_empty() {
                let (verdict, how) = if caps.is_some() {
                    (Verdict::Pass, "\"update\" granted")
                } else {
                    (Verdict::Skip, "not verified (capabilities unknown)")
                };
                r.push(Check::new(&db.name, "leases", title, verdict, how));
            } else {
                for q in missing {
                    let alternative = if q.path == policy::LEASE_RENEW_PATH {
                        format!("databases[{index}].credentials.renew_in_use = false")
                    } else {
                        format!(
                            "databases[{index}].credentials.revoke_unused = false and vault.revoke_on_shutdown = false"
                        )
                    };
                    r.push(
                        self.missing_capability(index, db, &q.path, q.capability, info, None)
                            .fix(format!(
                                "add path {:?} {{ capabilities = [\"update\"] }} to {}, or set {alternative}; `dbward policy --config {}` prints the policy this config needs",
                                q.path,
                                info.editable_policies(),
                                self.config_file()
                            )),
                    );
                }
            }
        }

        let Some(cred) = cred else {
            r.push(Check::new(
                &db.name,
                "upstream",
                upstream_title,
                Verdict::Skip,
                "not tried (no credential)",
            ));
            return;
        };
        r.push(self.upstream(index, db, upstream, &cred).await);
        if let Some(lease) = &cred.lease {
            for c in self.lease_ttl(db, token, info, lease, cred.fetched_at, can_renew).await {
                r.push(c);
            }
            r.push(self.revoke_lease(db, token, lease, can_revoke).await);
        }
    }

    /// The token may not do `capability` on `path`.
    fn missing_capability(
        &self,
        index: usize,
        db: &DatabaseConfig,
        path: &str,
        capability: &str,
        info: &TokenInfo,
        denied: Option<&VaultError>,
    ) -> Check {
        let key = match db.credentials.kind {
            CredentialKind::Kv => format!("databases[{index}].credentials.path"),
            _ => format!("databases[{index}].credentials.role (or .mount)"),
        };
        let verb = if capability == "read" {
            format!("read {path}")
        } else {
            format!("{capability} {path}")
        };
        let mut message = format!(
            "missing capability {capability:?} (token policies: {}; issued by {})",
            info.policies_text(),
            self.login
        );
        if let Some(e) = denied {
            message.push_str(&format!("; {e}"));
        }
        Check::new(&db.name, if path.starts_with("sys/leases/") { "leases" } else { "read" }, verb, Verdict::Fail, message)
            .fix(format!(
                "add path {path:?} {{ capabilities = [{capability:?}] }} to {}, or correct {key} if the config is what is wrong; `dbward policy --config {}` prints the policy this config needs",
                info.editable_policies(),
                self.config_file()
            ))
            .detail("path", path)
            .detail("missing", vec![capability])
            .detail("policies", info.policies.clone())
            .detail("issued_by", self.login.clone())
    }

    fn read_failure(&self, index: usize, db: &DatabaseConfig, e: &VaultError) -> Check {
        let c = &db.credentials;
        let path = c.vault_path();
        let lower = e.to_string().to_lowercase();
        let role = c.role.as_deref().unwrap_or("");
        let mount = c.mount.as_deref().unwrap_or("database").trim_matches('/');
        let fix = match (e, c.kind) {
            (VaultError::Status { status: 404, .. }, CredentialKind::Kv) => Some(format!(
                "no secret at {path}: write it there, or correct databases[{index}].credentials.path (the KV v2 API path, with /data/ after the mount)"
            )),
            (VaultError::Status { status: 404, .. }, _) => Some(format!(
                "nothing answers at {path}: is a database secrets engine mounted at {mount}/ (databases[{index}].credentials.mount)?"
            )),
            (VaultError::Status { .. }, _) if lower.contains("unknown role") || lower.contains("not found") => Some(format!(
                "create Vault role {role:?} ({mount}/{}roles/{role}), or correct databases[{index}].credentials.role",
                if c.kind == CredentialKind::Static { "static-" } else { "" }
            )),
            (VaultError::Malformed { .. }, CredentialKind::Kv) if lower.contains("no key") => Some(format!(
                "set databases[{index}].credentials.username_key / password_key to the secret's keys, or add the keys to the secret"
            )),
            (VaultError::Malformed { .. }, CredentialKind::Kv) => {
                Some(format!("check that {path} is a KV v2 secret with a current (not deleted) version"))
            }
            _ if e.is_unavailable() => Some("check that Vault is up, unsealed and reachable".into()),
            _ => None,
        };
        Check::new(&db.name, "read", format!("read {path}"), Verdict::Fail, e.to_string())
            .fix_opt(fix)
            .detail("path", path)
            .detail("issued_by", self.login.clone())
    }

    /// One upstream connection with the credential, and `SELECT 1` on it.
    async fn upstream(
        &self,
        index: usize,
        db: &DatabaseConfig,
        settings: &UpstreamSettings,
        cred: &Credential,
    ) -> Check {
        let (dbname, note) = match (&db.dbname, &self.opts.dbname) {
            (Some(d), _) => (d.clone(), String::new()),
            (None, Some(d)) => (d.clone(), " (--dbname)".to_string()),
            (None, None) => (
                "postgres".to_string(),
                " (no dbname in the config; --dbname chooses another)".to_string(),
            ),
        };
        let title = format!("upstream {} database {dbname:?}{note}", settings.addr());
        let params = vec![
            ("user".to_string(), cred.username.clone()),
            ("database".to_string(), dbname.clone()),
            ("application_name".to_string(), "dbward check".to_string()),
        ];
        let fail = |message: String| {
            Check::new(&db.name, "upstream", title.clone(), Verdict::Fail, message)
                .detail("user", cred.username.clone())
        };
        match upstream::connect(settings, &params, &cred.password).await {
            Ok(mut conn) => {
                let tls = if conn.tls { "TLS" } else { "no TLS" };
                match tokio::time::timeout(settings.connect_timeout, select_one(&mut conn.stream)).await {
                    Ok(Ok(())) => Check::new(
                        &db.name,
                        "upstream",
                        title.clone(),
                        Verdict::Pass,
                        format!("SELECT 1 ok as {} ({tls})", cred.username),
                    )
                    .detail("user", cred.username.clone())
                    .detail("tls", conn.tls),
                    Ok(Err(e)) => fail(e).fix("the login works; see the server's message about the query"),
                    Err(_) => fail(format!(
                        "SELECT 1 got no answer within {}",
                        fmt_duration(settings.connect_timeout)
                    ))
                    .fix("check the server's load and log"),
                }
            }
            Err(e) => {
                let (message, fix) = self.upstream_error(index, db, &dbname, cred, &e);
                fail(message).fix(fix).detail("sqlstate", e.sqlstate())
            }
        }
    }

    /// Message and fix for an upstream connection failure.
    fn upstream_error(
        &self,
        index: usize,
        db: &DatabaseConfig,
        dbname: &str,
        cred: &Credential,
        e: &UpstreamError,
    ) -> (String, String) {
        let c = &db.credentials;
        let role = c.role.as_deref().unwrap_or("");
        let mount = c.mount.as_deref().unwrap_or("database").trim_matches('/');
        match e {
            UpstreamError::Server(se) if se.code == "28P01" => (
                format!("the server refused the credential Vault issued ({se})"),
                match c.kind {
                    CredentialKind::Database => format!(
                        "the Postgres role Vault created for {mount}/roles/{role} cannot log in: check its creation_statements (LOGIN, PASSWORD, VALID UNTIL) and that the database connection in Vault points at this server"
                    ),
                    CredentialKind::Static => format!(
                        "Vault's password for static role {role:?} is not the role's password on this server: rotate it (`bao write -f {mount}/rotate-role/{role}`), and make sure nothing else changes it"
                    ),
                    CredentialKind::Kv => format!(
                        "the KV secret at {} does not hold {}'s current password: update the secret (or the role's password)",
                        c.vault_path(),
                        cred.username
                    ),
                },
            ),
            UpstreamError::Server(se) if se.code == "3D000" => (
                format!("the server has no database {dbname:?} ({se})"),
                if db.dbname.is_some() {
                    format!("correct databases[{index}].dbname, or create the database")
                } else {
                    "this entry has no dbname (clients choose): pass --dbname with a database a client would use".to_string()
                },
            ),
            UpstreamError::Server(se) if se.code == "28000" => (
                format!("the server refused the connection ({se})"),
                format!("allow user {} (or its group) from this host in pg_hba.conf", cred.username),
            ),
            UpstreamError::Server(se) if se.code == "42501" => (
                format!("the server refused the connection ({se})"),
                format!("GRANT CONNECT ON DATABASE {dbname} to the role Vault's credentials belong to"),
            ),
            UpstreamError::Server(se) => (format!("the server refused the connection ({se})"), "see the server's message".to_string()),
            other => {
                let fix = other.to_pg_error(&db.name).and_then(|p| p.hint).unwrap_or_else(|| "see the message".into());
                (other.to_string(), fix)
            }
        }
    }

    /// Lease max TTL against the token's max TTL and the rotation it implies.
    async fn lease_ttl(
        &self,
        db: &DatabaseConfig,
        token: &VaultToken,
        info: &TokenInfo,
        lease: &vault::Lease,
        issued: std::time::Instant,
        can_renew: bool,
    ) -> Vec<Check> {
        let c = &db.credentials;
        let role = c.role.as_deref().unwrap_or("");
        let mount = c.mount.as_deref().unwrap_or("database").trim_matches('/');
        let role_path = format!("{mount}/roles/{role}");
        // Renewing by a huge increment answers with the lease's max TTL. Without the right to
        // renew (or for a lease that cannot be renewed) the max TTL is the lease duration.
        let max = if lease.renewable && can_renew {
            let body = json!({ "lease_id": lease.id, "increment": PROBE_INCREMENT_SECS });
            match self
                .client
                .write("renew", policy::LEASE_RENEW_PATH, Some(&token.token), &body)
                .await
            {
                Ok(resp) => resp
                    .u64_field("/lease_duration")
                    .map(|left| MaxTtl::Limited(max_ttl_from_remaining(left, issued.elapsed())))
                    .unwrap_or(MaxTtl::Unknown),
                Err(_) => MaxTtl::Unknown,
            }
        } else if !lease.renewable {
            MaxTtl::Limited(lease.duration)
        } else {
            MaxTtl::Unknown
        };
        let title = "lease TTL";
        let mut out = Vec::new();
        let base = |verdict, message: String| {
            let mut ch = Check::new(&db.name, "lease_ttl", title, verdict, message)
                .detail("lease_ttl_seconds", lease.duration.as_secs());
            if let MaxTtl::Limited(m) = max {
                ch = ch.detail("lease_max_ttl_seconds", m.as_secs());
            }
            ch
        };
        let max_d = match max {
            MaxTtl::Limited(m) => Some(m),
            _ => None,
        };
        let effective = max_d.map_or(lease.duration, |m| m.min(lease.duration));
        let rotation = effective.mul_f64(c.refresh_fraction);
        if rotation < MIN_ROTATION {
            out.push(
                base(
                    Verdict::Warn,
                    format!(
                        "lease TTL {}, max TTL {max}: dbward would replace the credential every ~{}s (refresh_fraction {:.2}), a new Postgres role each time",
                        fmt_duration(lease.duration),
                        rotation.as_secs(),
                        c.refresh_fraction
                    ),
                )
                .fix(format!("raise default_ttl and max_ttl of Vault role {role_path} (e.g. 1h and 24h)")),
            );
        }
        if let (Some(lease_max), MaxTtl::Limited(token_max)) = (max_d, info.max_ttl) {
            // A second of slack: both were measured a moment apart.
            if token_max + Duration::from_secs(1) < lease_max {
                let a = &self.config.vault.auth;
                let auth_role = format!(
                    "auth/{}/role/{}",
                    a.mount().trim_matches('/'),
                    a.role.as_deref().unwrap_or("")
                );
                out.push(
                    Check::new(
                        &db.name,
                        "token_ttl",
                        "token max TTL vs lease max TTL",
                        Verdict::Warn,
                        format!(
                            "the token's max TTL ({}) is shorter than the lease max TTL ({}): leases die with the token that obtained them, so a connection's credential is revoked after {} at most",
                            fmt_duration(token_max),
                            fmt_duration(lease_max),
                            fmt_duration(token_max)
                        ),
                    )
                    .fix(format!(
                        "raise token_max_ttl of {auth_role} to at least {}, or lower max_ttl of {role_path} to {}",
                        fmt_duration(lease_max),
                        fmt_duration(token_max)
                    ))
                    .detail("token_max_ttl_seconds", token_max.as_secs())
                    .detail("lease_max_ttl_seconds", lease_max.as_secs()),
                );
            }
        }
        if out.is_empty() {
            let token_max = match info.max_ttl {
                MaxTtl::Limited(_) | MaxTtl::Unlimited => {
                    format!("; the token's max TTL is {}", info.max_ttl)
                }
                MaxTtl::Unknown => String::new(),
            };
            out.push(base(
                Verdict::Pass,
                format!("{}, max TTL {max}{token_max}", fmt_duration(lease.duration)),
            ));
        }
        out
    }

    async fn revoke_lease(&self, db: &DatabaseConfig, token: &VaultToken, lease: &vault::Lease, needed: bool) -> Check {
        let title = format!("cleanup: revoke test lease {}", lease.id);
        let body = json!({ "lease_id": lease.id });
        match self
            .client
            .write("revoke", policy::LEASE_REVOKE_PATH, Some(&token.token), &body)
            .await
        {
            Ok(_) => Check::new(&db.name, "revoke_lease", title, Verdict::Pass, "revoked")
                .detail("lease_id", lease.id.clone()),
            Err(e) => {
                let verdict = if needed { Verdict::Fail } else { Verdict::Warn };
                Check::new(&db.name, "revoke_lease", title, verdict, format!("not revoked: {e}"))
                    .fix(format!(
                        "dbward revokes leases at sys/leases/revoke: grant \"update\" on it; this lease goes with the check's token, or revoke it by hand: `bao lease revoke {}`",
                        lease.id
                    ))
                    .detail("lease_id", lease.id.clone())
            }
        }
    }

    /// The check's own token, and with it any lease it still holds.
    async fn revoke_token(&self, token: &VaultToken) -> Check {
        let title = "cleanup: revoke the check's Vault token";
        match self.client.write("revoke-self", "auth/token/revoke-self", Some(&token.token), &json!({})).await {
            Ok(_) => Check::new(VAULT_SCOPE, "revoke_token", title, Verdict::Pass, "revoked"),
            Err(e) => Check::new(VAULT_SCOPE, "revoke_token", title, Verdict::Warn, format!("not revoked: {e}"))
                .fix("the token expires at the end of its TTL; attach Vault's \"default\" policy to allow auth/token/revoke-self"),
        }
    }

    /// `--diff-policy NAME`: the policy stored in Vault against the config's requirements.
    async fn diff_policy(&self, r: &mut Report, name: &str) {
        let scope = format!("policy {name}");
        // A token that may read policies, else the workload's own login.
        let (token, own) = match &self.opts.policy_reader_token {
            Some(t) => (t.clone(), None),
            None => {
                let auth = Auth::new(self.client.clone(), self.config.vault.auth.clone());
                match auth.token().await {
                    Ok(t) => (t.token.clone(), Some(t)),
                    Err(e) => {
                        r.push(self.login_failure(&e));
                        return;
                    }
                }
            }
        };
        let path = format!("sys/policies/acl/{name}");
        let result = self.client.read(&token, &path).await;
        if let Some(t) = &own {
            if self.config.vault.auth.method != AuthMethod::Token {
                r.push(self.revoke_token(t).await);
            }
        }
        let text = match result {
            Ok(resp) => resp.str_field("/data/policy").map(str::to_string),
            Err(e) => {
                let fix = match e.status() {
                    Some(404) => format!("no policy named {name:?}: check the name (`bao policy list`)"),
                    Some(403) => format!(
                        "reading a policy needs \"read\" on {path}: set VAULT_TOKEN (or BAO_TOKEN) to a token that may read it"
                    ),
                    _ => "check that Vault is reachable".into(),
                };
                r.push(Check::new(&scope, "policy", format!("read {path}"), Verdict::Fail, e.to_string()).fix(fix));
                return;
            }
        };
        let Some(text) = text else {
            r.push(Check::new(
                &scope,
                "policy",
                format!("read {path}"),
                Verdict::Fail,
                "the answer holds no data.policy",
            ));
            return;
        };
        let rules = match policy::parse_policy(&text) {
            Ok(rules) => rules,
            Err(e) => {
                r.push(Check::new(
                    &scope,
                    "policy",
                    format!("parse {path}"),
                    Verdict::Fail,
                    format!("cannot read the policy: {e}"),
                ));
                return;
            }
        };
        let d = policy::diff(self.config, &rules);
        for (req, by) in &d.granted {
            r.push(
                Check::new(
                    &scope,
                    "policy",
                    format!("{} {}", req.capability, req.path),
                    Verdict::Pass,
                    format!(
                        "granted by path {by:?} (needed by {})",
                        policy::entry_names(&req.databases)
                    ),
                )
                .detail("path", req.path.clone())
                .detail("granted_by", by.clone()),
            );
        }
        for (req, by) in &d.missing {
            let why = match by {
                Some(b) => {
                    let caps = rules
                        .iter()
                        .find(|x| &x.path == b)
                        .map(|x| x.capabilities.join(", "))
                        .unwrap_or_default();
                    format!("missing: path {b:?} applies but grants only [{caps}]")
                }
                None => "missing: no path in the policy covers it".to_string(),
            };
            r.push(
                Check::new(
                    &scope,
                    "policy_missing",
                    format!("{} {}", req.capability, req.path),
                    Verdict::Fail,
                    format!(
                        "{why} (needed by {}: {})",
                        policy::entry_names(&req.databases),
                        req.purpose
                    ),
                )
                .fix(format!(
                    "add path {:?} {{ capabilities = [{:?}] }} to policy {name:?}",
                    req.path, req.capability
                ))
                .detail("path", req.path.clone())
                .detail("missing", vec![req.capability]),
            );
        }
        for rule in &d.unused {
            r.push(
                Check::new(
                    &scope,
                    "policy_unused",
                    format!("path {:?}", rule.path),
                    Verdict::Warn,
                    format!(
                        "not used by this config (capabilities [{}])",
                        rule.capabilities.join(", ")
                    ),
                )
                .fix("remove it once no deployed config reads it (a path this config moved away from?)")
                .detail("path", rule.path.clone()),
            );
        }
    }
}

fn read_ok(db: &DatabaseConfig, c: &Credential) -> Check {
    let mut message = format!("ok, user {}", c.username);
    match (&c.lease, db.credentials.kind) {
        (Some(l), _) => message.push_str(&format!(
            ", lease {} ({})",
            fmt_duration(l.duration),
            if l.renewable { "renewable" } else { "not renewable" }
        )),
        (None, CredentialKind::Static) => {
            if let Some(v) = c.valid_for {
                message.push_str(&format!(", password rotates in {}", fmt_duration(v)));
            }
        }
        _ => {}
    }
    Check::new(&db.name, "read", format!("read {}", c.path), Verdict::Pass, message)
        .detail("path", c.path.clone())
        .detail("user", c.username.clone())
}

fn allows(caps: &[String], capability: &str) -> bool {
    !caps.iter().any(|c| c == "deny") && caps.iter().any(|c| c == capability || c == "root")
}

fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// hyper-rustls' errors for certificate and handshake problems.
fn is_tls_error(detail: &str) -> bool {
    let d = detail.to_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "invalidcontenttype",
        "unknownissuer",
        "ssl",
    ]
    .iter()
    .any(|w| d.contains(w))
}

/// The host's clock against Vault's.
fn clock_check(local: SystemTime, server: SystemTime) -> Check {
    let (ahead, skew) = match local.duration_since(server) {
        Ok(d) => (true, d),
        Err(e) => (false, e.duration()),
    };
    let secs = skew.as_secs();
    let direction = if ahead { "ahead of" } else { "behind" };
    let verdict = if skew > SKEW_FAIL {
        Verdict::Fail
    } else if skew > SKEW_WARN {
        Verdict::Warn
    } else {
        Verdict::Pass
    };
    let signed = if ahead { secs as i64 } else { -(secs as i64) };
    let c = if verdict == Verdict::Pass {
        Check::new(
            VAULT_SCOPE,
            "clock",
            "clock",
            Verdict::Pass,
            format!("this host and Vault agree within {}s", secs.max(1)),
        )
    } else {
        Check::new(VAULT_SCOPE, "clock", "clock", verdict, format!("this host's clock is {secs}s {direction} Vault's (from its Date header)"))
            .fix("synchronize the clocks (NTP/chrony): dbward checks the workload JWT's exp and nbf with this host's clock, Vault with its own (60s leeway)")
    };
    c.detail("skew_seconds", signed)
}

/// An HTTP `Date` (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut it = s.split_whitespace();
    let _weekday = it.next()?;
    let day: u32 = it.next()?.parse().ok()?;
    let month_name = it.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? + 1;
    let year: u32 = it.next()?.parse().ok()?;
    let time = it.next()?;
    if it.next()? != "GMT" {
        return None;
    }
    humantime::parse_rfc3339(&format!("{year:04}-{month:02}-{day:02}T{time}Z")).ok()
}

/// Sends `SELECT 1` and reads up to ReadyForQuery; then says goodbye (Terminate).
async fn select_one(stream: &mut UpstreamStream) -> Result<(), String> {
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).map_err(|e| e.to_string())?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("sending SELECT 1 failed: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("sending SELECT 1 failed: {e}"))?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut error = None;
    loop {
        while let Some(msg) = backend::Message::parse(&mut buf).map_err(|e| format!("bad answer to SELECT 1: {e}"))? {
            match msg {
                backend::Message::ErrorResponse(body) => {
                    let mut fields = body.fields();
                    let (mut code, mut message) = (String::new(), String::new());
                    while let Ok(Some(f)) = fields.next() {
                        match f.type_() {
                            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            _ => {}
                        }
                    }
                    error = Some(format!("SELECT 1 failed: {code} {message}"));
                }
                backend::Message::ReadyForQuery(_) => {
                    let mut bye = BytesMut::new();
                    frontend::terminate(&mut bye);
                    let _ = stream.write_all(&bye).await;
                    let _ = stream.shutdown().await;
                    return error.map_or(Ok(()), Err);
                }
                _ => {}
            }
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("reading the answer to SELECT 1 failed: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection during SELECT 1".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_ttl_is_what_is_left_plus_the_age() {
        let ms = Duration::from_millis;
        // 2h lease, read 1.3 s after it was issued: Vault says 7198.
        assert_eq!(max_ttl_from_remaining(7198, ms(1300)), Duration::from_secs(7200));
        assert_eq!(max_ttl_from_remaining(7199, ms(900)), Duration::from_secs(7200));
        assert_eq!(max_ttl_from_remaining(1799, ms(20)), Duration::from_secs(1800));
        assert_eq!(max_ttl_from_remaining(16, ms(1700)), Duration::from_secs(18));
    }

    #[test]
    fn durations_read_like_vault_ttls() {
        assert_eq!(fmt_duration(Duration::from_secs(768 * 3600)), "32d");
        assert_eq!(fmt_duration(Duration::from_secs(1799)), "29m 59s");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Thu, 26 Nov 2026 01:18:08 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1_795_655_888);
        assert!(parse_http_date("Thu, 26 Nov 2026 01:18:08 CET").is_none());
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn clock_skew_is_graded() {
        let now = SystemTime::now();
        assert_eq!(clock_check(now, now + Duration::from_secs(2)).verdict, Verdict::Pass);
        let warn = clock_check(now + Duration::from_secs(30), now);
        assert_eq!(warn.verdict, Verdict::Warn);
        assert!(warn.message.contains("30s ahead of Vault's"), "{}", warn.message);
        let fail = clock_check(now, now + Duration::from_secs(600));
        assert_eq!(fail.verdict, Verdict::Fail);
        assert!(fail.message.contains("600s behind"), "{}", fail.message);
        assert_eq!(fail.details["skew_seconds"], -600);
    }

    #[test]
    fn capabilities_allow_read_unless_denied() {
        let caps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(allows(&caps(&["read", "list"]), "read"));
        assert!(allows(&caps(&["root"]), "update"));
        assert!(!allows(&caps(&["deny"]), "read"));
        assert!(!allows(&caps(&["list"]), "read"));
    }

    #[test]
    fn text_report_has_markers_fixes_and_summary() {
        let mut r = Report {
            config: "dbward.toml".into(),
            vault: "http://v".into(),
            checks: vec![],
        };
        r.push(Check::new(
            "vault",
            "vault",
            "vault http://v",
            Verdict::Pass,
            "reachable",
        ));
        r.push(
            Check::new(
                "payments",
                "read",
                "read secret/data/x",
                Verdict::Fail,
                "missing capability \"read\"",
            )
            .fix("add it"),
        );
        let text = r.render_text(false);
        assert!(text.contains("ok   vault     vault http://v: reachable\n"), "{text}");
        assert!(
            text.contains("FAIL payments  read secret/data/x: missing capability \"read\"\n"),
            "{text}"
        );
        assert!(text.contains("\n               fix: add it\n"), "{text}");
        assert!(text.contains("1 failed, 1 passed"), "{text}");
        assert!(!r.ok(false));
        let j = r.to_json(false);
        assert_eq!(j["ok"], false);
        assert_eq!(j["checks"][1]["verdict"], "fail");
        assert_eq!(j["checks"][1]["fix"], "add it");
    }

    #[test]
    fn tls_errors_are_recognized() {
        assert!(is_tls_error("invalid peer certificate: UnknownIssuer"));
        assert!(is_tls_error("received corrupt message of type InvalidContentType"));
        assert!(!is_tls_error("tcp connect error: Connection refused (os error 111)"));
    }
}
