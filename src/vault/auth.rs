//! Logging in to Vault and holding the token: the auth methods (jwt, kubernetes, approle,
//! token), with the JWT sanity checks of [`super::jwt`] before sending it, and the single
//! current token that every credential read uses. Logins are serialized, so a burst of connections causes one login.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::client::{string_list, VaultClient};
use super::error::{LocalError, Malformed, VaultError};
pub use super::jwt::JwtClaims;
pub(crate) use super::jwt::{check_jwt_times, read_claims};
use crate::config::{AuthConfig, Login};

/// A Vault token and what Vault said about it. Debug never shows the token.
pub(crate) struct VaultToken {
    pub(crate) token: SecretString,
    pub(crate) policies: Vec<String>,
    /// None: the token does not expire (root, or a periodic token without TTL).
    pub(crate) ttl: Option<Duration>,
    /// The TTL the login granted; renewals ask for this much again.
    pub(crate) initial_ttl: Option<Duration>,
    pub(crate) renewable: bool,
    pub(crate) obtained_at: Instant,
    /// Login number since start: 1, 2, ... (for logs).
    pub(crate) generation: u64,
}

impl std::fmt::Debug for VaultToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultToken")
            .field("token", &"[REDACTED]")
            .field("policies", &self.policies)
            .field("ttl", &self.ttl)
            .field("initial_ttl", &self.initial_ttl)
            .field("renewable", &self.renewable)
            .field("generation", &self.generation)
            .finish()
    }
}

impl VaultToken {
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.ttl.map(|t| super::limits::later(self.obtained_at, t))
    }

    /// Time left before the token expires (None: never).
    pub(crate) fn remaining(&self, now: Instant) -> Option<Duration> {
        self.expires_at().map(|e| e.saturating_duration_since(now))
    }

    /// A token is used while more than a third of its life is left; after that a new login
    /// happens first, so leases are never obtained by a token about to die (leases die with it).
    pub(crate) fn usable(&self, now: Instant) -> bool {
        match (self.ttl, self.remaining(now)) {
            (Some(ttl), Some(left)) => left > ttl / 3 && left > Duration::from_secs(1),
            _ => true,
        }
    }

    pub(crate) fn policies_text(&self) -> String {
        policies_text(&self.policies)
    }
}

/// A token's policies as messages list them: `payments-db, default`, or `none`.
pub(crate) fn policies_text(policies: &[String]) -> String {
    if policies.is_empty() {
        "none".into()
    } else {
        policies.join(", ")
    }
}

/// How the config logs in, as messages name it: `jwt role payments-service at auth/jwt`,
/// `approle at auth/approle`, `the token in /etc/dbward/token`.
pub(crate) fn login_description(a: &AuthConfig) -> String {
    let mount = &a.mount;
    match &a.login {
        Login::Jwt { role, .. } | Login::Kubernetes { role, .. } => {
            format!("{} role {role} at auth/{mount}", a.method())
        }
        Login::Approle { .. } => format!("approle at auth/{mount}"),
        Login::Token { token_file } => format!("the token in {}", token_file.display()),
    }
}

fn read_secret_file(key: &'static str, path: &Path) -> Result<SecretString, LocalError> {
    let text = std::fs::read_to_string(path).map_err(|e| LocalError::SecretFileUnreadable {
        key,
        path: path.to_path_buf(),
        source: Arc::new(e),
    })?;
    let text = zeroize::Zeroizing::new(text);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(LocalError::SecretFileEmpty {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Logs in and holds the current token.
pub struct Auth {
    client: Arc<VaultClient>,
    cfg: AuthConfig,
    /// Serializes logins: concurrent callers wait for the one login in flight.
    login_lock: tokio::sync::Mutex<()>,
    current: Mutex<Option<Arc<VaultToken>>>,
    generation: Mutex<u64>,
    /// When the last login forced by a 403 happened: such logins are rate-limited so a broken
    /// policy never turns into a login loop.
    last_forced: Mutex<Option<Instant>>,
    /// When tokens of past logins end for good, by generation, once known: Vault capped a
    /// renewal (the max TTL is near), or the token was not renewable. Leases die with them.
    ends: Mutex<std::collections::BTreeMap<u64, Instant>>,
    /// Tokens replaced by a later login, until revoked.
    retired: super::retired::RetiredTokens,
}

/// Forced re-logins (after a 403) happen at most this often.
const FORCED_LOGIN_INTERVAL: Duration = Duration::from_secs(10);

impl Auth {
    pub(crate) fn new(client: Arc<VaultClient>, cfg: AuthConfig) -> Arc<Self> {
        Arc::new(Auth {
            client,
            login_lock: tokio::sync::Mutex::new(()),
            current: Mutex::new(None),
            generation: Mutex::new(0),
            last_forced: Mutex::new(None),
            ends: Mutex::default(),
            retired: super::retired::RetiredTokens::new(!matches!(cfg.login, Login::Token { .. })),
            cfg,
        })
    }

    /// Tokens replaced by a later login.
    pub(crate) fn retired(&self) -> &super::retired::RetiredTokens {
        &self.retired
    }

    /// [`login_description`] of this login.
    pub(crate) fn login_description(&self) -> String {
        login_description(&self.cfg)
    }

    /// The token as it is now, without logging in.
    pub(crate) fn current(&self) -> Option<Arc<VaultToken>> {
        self.current.lock().unwrap().clone()
    }

    /// A usable token: the current one, or a new login.
    pub(crate) async fn token(&self) -> Result<Arc<VaultToken>, VaultError> {
        if let Some(t) = self.current().filter(|t| t.usable(Instant::now())) {
            return Ok(t);
        }
        let _guard = self.login_lock.lock().await;
        // Another caller may have logged in while this one waited.
        if let Some(t) = self.current().filter(|t| t.usable(Instant::now())) {
            return Ok(t);
        }
        self.login_now().await
    }

    /// After Vault denied a request made with `used`: log in again once (a revoked token or
    /// changed role needs a new login; policies themselves apply per request). Returns None when
    /// a forced login happened recently: the caller reports the denial instead of looping.
    pub(crate) async fn relogin_after_denial(
        &self,
        used: &Arc<VaultToken>,
    ) -> Option<Result<Arc<VaultToken>, VaultError>> {
        let _guard = self.login_lock.lock().await;
        if let Some(cur) = self.current() {
            if !Arc::ptr_eq(&cur, used) {
                return Some(Ok(cur));
            }
        }
        {
            let mut last = self.last_forced.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < FORCED_LOGIN_INTERVAL) {
                return None;
            }
            *last = Some(Instant::now());
        }
        Some(self.login_now().await)
    }

    /// When the token of login `generation` ends for good, if known.
    pub(crate) fn token_end(&self, generation: u64) -> Option<Instant> {
        self.ends.lock().unwrap().get(&generation).copied()
    }

    fn ends_at(&self, generation: u64, at: Instant) {
        let mut ends = self.ends.lock().unwrap();
        ends.insert(generation, at);
        // Only recent logins can still own leases in use.
        while ends.len() > 64 {
            ends.pop_first();
        }
    }

    /// `vault.auth.token_check_interval`.
    pub(crate) fn check_interval(&self) -> Duration {
        self.cfg.token_check_interval
    }

    /// Vault says `revoked` no longer exists: stop using it (the next caller logs in). A token
    /// that already replaced it is kept.
    pub(crate) fn forget(&self, revoked: &Arc<VaultToken>) {
        let mut cur = self.current.lock().unwrap();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, revoked)) {
            *cur = None;
        }
    }

    /// The client, for requests made with this login's token.
    pub(crate) fn client(&self) -> &Arc<VaultClient> {
        &self.client
    }

    /// The generation of the current login (0 before the first).
    pub(crate) fn generation(&self) -> u64 {
        self.current().map(|t| t.generation).unwrap_or(0)
    }

    /// Keeps the token alive until `stop`: renews it (`renew-self`) once 2/3 of its TTL has
    /// passed, and logs in anew when it cannot be renewed or when Vault grants less than asked
    /// (the max TTL is near). A new login happens while the old token still has time left, so
    /// credentials can move to leases of the new token before the old token's leases die with it.
    pub(crate) async fn keep_alive(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = crate::backoff::Backoff::default();
        // The login generation whose denied renew-self was logged (logged once per token).
        let mut denied_renew_logged = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = &mut stop => return,
            }
            let Some(tok) = self.current() else { continue };
            let Some(ttl) = tok.ttl else { continue };
            if tok.obtained_at.elapsed() < ttl.saturating_mul(2) / 3 || !backoff.ready() {
                continue;
            }
            let ok = if tok.renewable {
                self.renew(&tok).await
            } else {
                self.ends_at(tok.generation, super::limits::later(tok.obtained_at, ttl));
                Err(NeedsLogin::NotRenewable)
            };
            let result = match ok {
                Ok(()) => Ok(()),
                Err(why) => {
                    if let NeedsLogin::Refused(e) = &why {
                        if e.is_denied() {
                            // Not retried: the new login below is the answer, and it happens once
                            // per token (at 2/3 of its TTL), never on a loop.
                            self.client.count_denied("", "renew-self");
                            if denied_renew_logged < tok.generation {
                                denied_renew_logged = tok.generation;
                                tracing::warn!(
                                    path = "auth/token/renew-self",
                                    capability = "update (missing)",
                                    error = %e,
                                    fix = "grant path \"auth/token/renew-self\" { capabilities = [\"update\"] } (Vault's default policy has it; the auth role may set token_no_default_policy)",
                                    "Vault denied renew-self of auth/token/renew-self: dbward logs in anew instead of renewing"
                                );
                            }
                        }
                    }
                    if !matches!(why, NeedsLogin::NotRenewable) {
                        tracing::info!(generation = tok.generation, reason = %why, "logging in to Vault anew");
                    }
                    let _guard = self.login_lock.lock().await;
                    match self.current() {
                        Some(cur) if !Arc::ptr_eq(&cur, &tok) => Ok(()),
                        _ => self.login_now().await.map(|_| ()),
                    }
                }
            };
            match result {
                Ok(()) => backoff.succeeded(),
                Err(e) => {
                    let wait = backoff.failed_with(&e);
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot keep the Vault token alive");
                }
            }
        }
    }

    /// Renews the token; the error says why a new login is needed instead.
    async fn renew(&self, tok: &Arc<VaultToken>) -> Result<(), NeedsLogin> {
        let asked = tok.initial_ttl.or(tok.ttl).unwrap_or_default();
        let started = Instant::now();
        let renewal = match renew_self(&self.client, &tok.token, asked).await {
            Ok(r) => r,
            Err(e) if e.is_unavailable() => return Err(NeedsLogin::Unavailable(e)),
            Err(e) => return Err(NeedsLogin::Refused(e)),
        };
        let granted = renewal.granted.unwrap_or_default();
        // Less than asked means the token's max TTL is near: leases it owns die with it.
        if granted.saturating_add(Duration::from_secs(1)) < asked {
            self.ends_at(tok.generation, super::limits::later(started, granted));
            return Err(NeedsLogin::Capped { granted, asked });
        }
        let renewed = Arc::new(VaultToken {
            token: tok.token.clone(),
            policies: tok.policies.clone(),
            ttl: Some(granted),
            initial_ttl: tok.initial_ttl,
            renewable: renewal.renewable.unwrap_or(tok.renewable),
            obtained_at: started,
            generation: tok.generation,
        });
        tracing::debug!(generation = tok.generation, ttl = ?granted, "renewed the Vault token");
        let mut cur = self.current.lock().unwrap();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, tok)) {
            *cur = Some(renewed);
        }
        Ok(())
    }

    /// Takes over a token that `lookup-self` just accepted (`vault.state_file`) as a new
    /// login generation, so nothing needs a new login for it.
    pub(crate) fn adopt(&self, token: SecretString, found: &TokenLookup) -> Arc<VaultToken> {
        let token = Arc::new(VaultToken {
            token,
            policies: found.policies.clone(),
            ttl: found.ttl,
            initial_ttl: found.ttl,
            renewable: found.renewable.unwrap_or(false),
            obtained_at: Instant::now(),
            generation: {
                let mut g = self.generation.lock().unwrap();
                *g += 1;
                *g
            },
        });
        *self.current.lock().unwrap() = Some(token.clone());
        token
    }

    async fn login_now(&self) -> Result<Arc<VaultToken>, VaultError> {
        let started = Instant::now();
        let mut token = self.login().await?;
        token.obtained_at = started;
        token.generation = {
            let mut g = self.generation.lock().unwrap();
            *g += 1;
            *g
        };
        tracing::info!(
            method = %self.cfg.method(),
            policies = %token.policies_text(),
            ttl = ?token.ttl,
            renewable = token.renewable,
            generation = token.generation,
            "logged in to Vault"
        );
        let token = Arc::new(token);
        let old = self.current.lock().unwrap().replace(token.clone());
        if let Some(old) = old {
            self.retired.push(old);
        }
        Ok(token)
    }

    async fn login(&self) -> Result<VaultToken, VaultError> {
        let path = format!("auth/{}/login", self.cfg.mount);
        match &self.cfg.login {
            Login::Jwt { role, token_file } | Login::Kubernetes { role, token_file } => {
                let file = token_file.as_path();
                let jwt = read_secret_file("token_file", file)?;
                let claims = read_claims(jwt.expose_secret(), file)?;
                check_jwt_times(&claims, file, SystemTime::now())?;
                let role = role.as_str();
                let body = JwtLogin {
                    role,
                    jwt: jwt.expose_secret(),
                };
                let resp = self.client.write("login", &path, None, &body).await.map_err(|e| {
                    tracing::warn!(role, claims = %claims.describe(), error = %e, "Vault login failed");
                    match e {
                        VaultError::Status {
                            path, status, errors, ..
                        } => VaultError::JwtLoginRefused {
                            path,
                            status,
                            errors,
                            role: role.to_string(),
                            claims: Arc::new(claims),
                        },
                        other => other,
                    }
                })?;
                token_from_auth(&resp.body, &path)
            }
            Login::Approle {
                role_id_file,
                secret_id_file,
            } => {
                let role_id = read_secret_file("role_id_file", role_id_file)?;
                let secret_id = read_secret_file("secret_id_file", secret_id_file)?;
                let body = AppRoleLogin {
                    role_id: role_id.expose_secret(),
                    secret_id: secret_id.expose_secret(),
                };
                let resp = self.client.write("login", &path, None, &body).await?;
                token_from_auth(&resp.body, &path)
            }
            Login::Token { token_file } => {
                let token = read_secret_file("token_file", token_file)?;
                let found = lookup_self(&self.client, &token).await?;
                Ok(VaultToken {
                    token,
                    policies: found.policies,
                    ttl: found.ttl,
                    initial_ttl: found.ttl,
                    renewable: found.renewable.unwrap_or(false),
                    obtained_at: Instant::now(),
                    generation: 0,
                })
            }
        }
    }
}

/// Login bodies borrow the secret: no owned copy is left behind to outlive the request.
#[derive(serde::Serialize)]
struct JwtLogin<'a> {
    role: &'a str,
    jwt: &'a str,
}

#[derive(serde::Serialize)]
struct AppRoleLogin<'a> {
    role_id: &'a str,
    secret_id: &'a str,
}

pub(crate) fn token_from_auth(body: &serde_json::Value, path: &str) -> Result<VaultToken, VaultError> {
    let auth = &body["auth"];
    let token = auth["client_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| VaultError::Malformed {
            op: "login",
            path: path.to_string(),
            problem: Malformed::NoClientToken,
        })?;
    let ttl = auth["lease_duration"]
        .as_u64()
        .filter(|t| *t > 0)
        .map(super::limits::ttl_secs);
    Ok(VaultToken {
        token: SecretString::from(token.to_string()),
        policies: string_list(&auth["policies"]),
        ttl,
        initial_ttl: ttl,
        renewable: auth["renewable"].as_bool().unwrap_or(false),
        obtained_at: Instant::now(),
        generation: 0,
    })
}

/// Why [`Auth::keep_alive`] logs in anew instead of renewing.
#[derive(Debug, thiserror::Error)]
enum NeedsLogin {
    #[error("the token is not renewable")]
    NotRenewable,
    #[error("renewal failed: {0}")]
    Unavailable(VaultError),
    #[error("Vault refused to renew the token: {0}")]
    Refused(VaultError),
    #[error("Vault renewed the token for {}s only (asked {}s): its max TTL is near", .granted.as_secs(), .asked.as_secs())]
    Capped { granted: Duration, asked: Duration },
}

/// What `auth/token/lookup-self` says about a token. Only names and numbers are taken from the
/// answer: it also holds the token.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenLookup {
    /// In Vault's order (sorted), without identity policies.
    pub(crate) policies: Vec<String>,
    /// Policies from the token's identity entity and groups.
    pub(crate) identity_policies: Vec<String>,
    /// What is left of the TTL; None: the token does not expire.
    pub(crate) ttl: Option<Duration>,
    pub(crate) renewable: Option<bool>,
    /// Set for periodic tokens, which can be renewed forever.
    pub(crate) period: Option<Duration>,
    pub(crate) explicit_max_ttl: Option<Duration>,
}

/// `auth/token/lookup-self`.
pub(crate) async fn lookup_self(client: &VaultClient, token: &SecretString) -> Result<TokenLookup, VaultError> {
    let resp = client.read(token, "auth/token/lookup-self").await?;
    Ok(lookup_from(&resp))
}

/// What a lookup-self answer says (split from [`lookup_self`] for the fuzz target).
pub(crate) fn lookup_from(resp: &super::client::VaultResponse) -> TokenLookup {
    let data = &resp.body["data"];
    let secs = |key: &str| data[key].as_u64().filter(|t| *t > 0).map(super::limits::ttl_secs);
    TokenLookup {
        policies: string_list(&data["policies"]),
        identity_policies: string_list(&data["identity_policies"]),
        ttl: secs("ttl"),
        renewable: data["renewable"].as_bool(),
        period: secs("period"),
        explicit_max_ttl: secs("explicit_max_ttl"),
    }
}

/// What a renewal granted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Renewal {
    /// The new TTL; Vault caps it at what is left of the max TTL. None: the answer had none.
    pub(crate) granted: Option<Duration>,
    pub(crate) renewable: Option<bool>,
}

/// `auth/token/renew-self` by `increment`.
pub(crate) async fn renew_self(
    client: &VaultClient,
    token: &SecretString,
    increment: Duration,
) -> Result<Renewal, VaultError> {
    let body = json!({ "increment": increment.as_secs() });
    let resp = client
        .write("renew-self", "auth/token/renew-self", Some(token), &body)
        .await?;
    Ok(renewal_from(&resp))
}

/// What a renew-self answer granted (split from [`renew_self`] for the fuzz target).
pub(crate) fn renewal_from(resp: &super::client::VaultResponse) -> Renewal {
    Renewal {
        granted: resp.u64_field("/auth/lease_duration").map(super::limits::ttl_secs),
        renewable: resp.body["auth"]["renewable"].as_bool(),
    }
}

/// `auth/token/revoke-self`: the token, and every lease it obtained, are gone.
pub(crate) async fn revoke_self(client: &VaultClient, token: &SecretString) -> Result<(), VaultError> {
    client
        .write("revoke-self", "auth/token/revoke-self", Some(token), &json!({}))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn jwt(claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(b"test-only");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    #[test]
    fn expired_jwt_is_refused_with_time_and_claims() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let t = jwt(json!({"sub": "system:serviceaccount:payments", "aud": "vault", "exp": now - 10}));
        let file = Path::new("/var/run/secrets/dbward/token");
        let claims = read_claims(&t, file).unwrap();
        assert_eq!(claims.aud, vec!["vault"]);
        let e = check_jwt_times(&claims, file, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("vault.auth.token_file /var/run/secrets/dbward/token: the JWT expired at "),
            "{e}"
        );
        assert!(e.contains("sub=system:serviceaccount:payments, aud=vault"), "{e}");
        assert!(!e.contains(&t), "the token itself must not be in the message");
    }

    #[test]
    fn valid_jwt_passes_and_garbage_is_named() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let t = jwt(json!({"sub": "a", "aud": ["vault", "x"], "exp": now + 600}));
        let file = Path::new("/tmp/t");
        let c = read_claims(&t, file).unwrap();
        check_jwt_times(&c, file, SystemTime::now()).unwrap();
        let e = read_claims("not-a-jwt", file).unwrap_err().to_string();
        assert!(e.contains("/tmp/t: not a JWT"), "{e}");
    }

    /// The one description check and the client's error details both use.
    #[test]
    fn login_is_described_by_method() {
        let cfg = |mount: &str, login| AuthConfig {
            mount: mount.to_string(),
            login,
            token_check_interval: Duration::from_secs(60),
        };
        let token_file = std::path::PathBuf::from("/run/dbward/token");
        let role = || "payments".to_string();
        let cases = [
            (
                cfg(
                    "jwt",
                    Login::Jwt {
                        role: role(),
                        token_file: token_file.clone(),
                    },
                ),
                "jwt role payments at auth/jwt",
            ),
            (
                cfg(
                    "k8s/prod",
                    Login::Kubernetes {
                        role: role(),
                        token_file: token_file.clone(),
                    },
                ),
                "kubernetes role payments at auth/k8s/prod",
            ),
            (
                cfg(
                    "approle",
                    Login::Approle {
                        role_id_file: "/r".into(),
                        secret_id_file: "/s".into(),
                    },
                ),
                "approle at auth/approle",
            ),
            (
                cfg("token", Login::Token { token_file }),
                "the token in /run/dbward/token",
            ),
        ];
        for (c, want) in cases {
            assert_eq!(login_description(&c), want);
        }
        assert_eq!(policies_text(&[]), "none");
        assert_eq!(policies_text(&["a".into(), "default".into()]), "a, default");
    }

    #[test]
    fn renewal_refusals_say_why_a_login_follows() {
        let capped = NeedsLogin::Capped {
            granted: Duration::from_secs(20),
            asked: Duration::from_secs(30),
        };
        assert_eq!(
            capped.to_string(),
            "Vault renewed the token for 20s only (asked 30s): its max TTL is near"
        );
        let denied = VaultError::Status {
            op: "renew-self",
            path: "auth/token/renew-self".into(),
            status: 403,
            errors: vec!["permission denied".into()],
        };
        assert_eq!(
            NeedsLogin::Refused(denied).to_string(),
            "Vault refused to renew the token: Vault denied renew-self of auth/token/renew-self (403 permission denied)"
        );
    }

    #[test]
    fn token_is_replaced_with_a_third_of_its_life_left() {
        let t = VaultToken {
            token: SecretString::from("s.x".to_string()),
            policies: vec!["default".into()],
            ttl: Some(Duration::from_secs(30)),
            initial_ttl: Some(Duration::from_secs(30)),
            renewable: true,
            obtained_at: Instant::now(),
            generation: 1,
        };
        assert!(t.usable(t.obtained_at + Duration::from_secs(19)));
        assert!(!t.usable(t.obtained_at + Duration::from_secs(21)));
        assert!(!format!("{t:?}").contains("s.x"));
    }
}
