//! The login step: a failed login diagnosed from the error's variant (JWT times, the claims
//! against the role's bindings, an unknown role), and for a successful one what Vault says about
//! the token (policies with identity ones, TTL, renewability, max TTL).

use std::collections::HashMap;
use std::time::Duration;

use super::report::{fmt_duration, Check, Report, Verdict};
use super::ttl::{self, MaxTtl};
use super::{Run, VAULT_SCOPE};
use crate::config::AuthMethod;
use crate::policy::{Requirement, Rule};
use crate::vault::auth::{self, JwtClaims};
use crate::vault::client::string_list;
use crate::vault::error::LocalError;
use crate::vault::{VaultError, VaultToken};

/// What Vault says about the check's token.
pub(super) struct TokenInfo {
    pub(super) policies: Vec<String>,
    pub(super) ttl: Option<Duration>,
    pub(super) renewable: bool,
    pub(super) max_ttl: MaxTtl,
    pub(super) lookup_error: Option<VaultError>,
}

impl TokenInfo {
    pub(super) fn policies_text(&self) -> String {
        auth::policies_text(&self.policies)
    }

    /// The policies a fix should name: "default" is Vault's own, not where app paths go.
    pub(super) fn editable_policies(&self) -> String {
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

/// Path → what `sys/capabilities-self` says the token may do there, as a rule so that deny and
/// root are read the way a policy's rules are.
pub(super) type Capabilities = HashMap<String, Rule>;

/// Vault answers under `data` and, for compatibility, at the top level too.
fn capabilities_from(body: &serde_json::Value, paths: &[&str]) -> Capabilities {
    let mut out = HashMap::new();
    for p in paths {
        if let Some(c) = body["data"].get(*p).or_else(|| body.get(*p)) {
            out.insert(
                p.to_string(),
                Rule {
                    path: p.to_string(),
                    capabilities: string_list(c),
                },
            );
        }
    }
    out
}

/// What Vault itself said about a refused login, and the claims the JWT had (jwt/kubernetes).
fn refusal(e: &VaultError) -> Option<(String, Option<&JwtClaims>)> {
    match e {
        VaultError::Status {
            op: "login", errors, ..
        } => Some((errors.join("; ").to_lowercase(), None)),
        VaultError::JwtLoginRefused { errors, claims, .. } => Some((errors.join("; ").to_lowercase(), Some(&**claims))),
        _ => None,
    }
}

impl Run<'_> {
    /// A login that failed, with the diagnosis: JWT times, `aud`/`sub` against the role's bound
    /// claims, unknown role, or whatever Vault said.
    pub(super) fn login_failure(&self, e: &VaultError) -> Check {
        let (problem, diagnosis, fix) = diagnose(e, self.auth_mount(), &self.auth_role());
        Check::new(
            VAULT_SCOPE,
            "login",
            format!("login ({})", self.login),
            Verdict::Fail,
            format!("{diagnosis}: {e}"),
        )
        .fix(fix)
        .detail("problem", problem)
        .detail("issued_by", self.login.clone())
    }

    /// Policies (identity ones included), TTL and max TTL of the token. The max TTL is learned by
    /// asking for a very long renewal (see [`ttl::probe`]). The check's token is revoked at the
    /// end, so extending it costs nothing; a configured token (method `token`) is not the check's
    /// and is not renewed.
    pub(super) async fn token_info(&self, token: &VaultToken) -> TokenInfo {
        let mut info = TokenInfo {
            policies: token.policies.clone(),
            ttl: token.ttl,
            renewable: token.renewable,
            max_ttl: MaxTtl::Unknown,
            lookup_error: None,
        };
        let mut period = None;
        let mut explicit_max = None;
        match auth::lookup_self(&self.client, &token.token).await {
            Ok(l) => {
                // The login's order first (Vault sorts lookup's), then identity policies.
                for p in l.policies.into_iter().chain(l.identity_policies) {
                    if !info.policies.contains(&p) {
                        info.policies.push(p);
                    }
                }
                // The TTL the login granted reads better than what is left of it a moment later.
                if info.ttl.is_none() {
                    info.ttl = l.ttl;
                }
                info.renewable = l.renewable.unwrap_or(info.renewable);
                period = l.period;
                explicit_max = l.explicit_max_ttl;
            }
            Err(e) => info.lookup_error = Some(e),
        }
        info.max_ttl = if info.ttl.is_none() || period.is_some() {
            MaxTtl::Unlimited
        } else if !info.renewable {
            info.ttl.map(MaxTtl::Limited).unwrap_or(MaxTtl::Unknown)
        } else if self.config.vault.auth.method() == AuthMethod::Token {
            explicit_max.map(MaxTtl::Limited).unwrap_or(MaxTtl::Unknown)
        } else {
            let renewal = auth::renew_self(&self.client, &token.token, ttl::PROBE_INCREMENT).await;
            ttl::probe(renewal.map(|r| r.granted), token.obtained_at.elapsed())
        };
        info
    }

    /// The login line (policies, TTLs), and a warning when the token cannot look itself up.
    pub(super) fn token_checks(&self, r: &mut Report, info: &TokenInfo) {
        r.push(self.login_line(info));
        if let Some(w) = &info.lookup_error {
            r.push(
                Check::new(VAULT_SCOPE, "token_lookup", "token lookup (auth/token/lookup-self)", Verdict::Warn, format!("cannot look up the token: {w}"))
                    .fix("attach Vault's built-in \"default\" policy to the auth role (do not set token_no_default_policy): dbward renews its token with it"),
            );
        }
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

    /// `sys/capabilities-self` for every path the config uses. None (and a warning): Vault would
    /// not say, and the reads themselves will tell.
    pub(super) async fn capabilities(
        &self,
        r: &mut Report,
        token: &VaultToken,
        reqs: &[Requirement],
    ) -> Option<Capabilities> {
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        let answer = self
            .client
            .write(
                "capabilities",
                "sys/capabilities-self",
                Some(&token.token),
                &serde_json::json!({ "paths": paths }),
            )
            .await;
        match answer {
            Ok(resp) => Some(capabilities_from(&resp.body, &paths)),
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
        }
    }
}

/// Problem kind, diagnosis and fix for a failed login, decided by the error's variant.
fn diagnose(e: &VaultError, mount: &str, role_path: &str) -> (&'static str, String, String) {
    match (e, refusal(e)) {
        (VaultError::Local(LocalError::JwtExpired { file, .. }), _) => (
            "jwt_expired",
            "the workload JWT has expired".into(),
            format!("whatever writes {} (projected service-account token, identity agent) must keep rotating it; check that it runs", file.display()),
        ),
        (VaultError::Local(LocalError::JwtNotYetValid { .. }), _) => (
            "jwt_not_yet_valid",
            "the workload JWT is not valid yet".into(),
            "check this host's clock and the issuer's: the token's nbf is in the future".into(),
        ),
        (VaultError::Local(_), _) => ("local", "cannot log in".into(), "check the vault.auth files named above".into()),
        (_, Some((said, claims))) => {
            let aud = claims.map(|c| c.aud.join(",")).unwrap_or_default();
            let sub = claims.and_then(|c| c.sub.clone()).unwrap_or_default();
            refused_login(&said, e.status(), &aud, &sub, mount, role_path)
        }
        _ if e.is_unavailable() => ("unavailable", "Vault cannot be asked".into(), "check that Vault is up and reachable".into()),
        _ => ("error", "the login failed".into(), format!("check {role_path} and vault.auth")),
    }
}

/// Vault refused a login: what its message points at. Vault's messages are the only place the
/// reason is given, so they are read here; dbward's own additions are not part of them.
fn refused_login(
    said: &str,
    status: Option<u16>,
    aud: &str,
    sub: &str,
    mount: &str,
    role_path: &str,
) -> (&'static str, String, String) {
    if said.contains("audience") {
        (
            "aud_mismatch",
            format!("the JWT's aud ({aud}) is not one of the role's bound_audiences"),
            format!("add {aud:?} to bound_audiences of {role_path}, or have the workload token issued for the audience the role expects"),
        )
    } else if said.contains("subject") || said.contains("claim \"sub\"") {
        (
            "sub_mismatch",
            format!("the JWT's sub ({sub}) does not match the role's bound subject"),
            format!("set bound_subject (or bound_claims.sub) of {role_path} to {sub:?}, or run the workload as the identity the role is bound to"),
        )
    } else if said.contains("issuer") {
        (
            "iss_mismatch",
            "the JWT's iss is not the issuer the auth method is bound to".into(),
            format!("compare the JWT's iss with bound_issuer of auth/{mount}/config"),
        )
    } else if said.contains("does not match") && said.contains("claim") {
        (
            "claim_mismatch",
            "a claim of the JWT does not match the role's bound_claims".into(),
            format!("compare the JWT's claims with bound_claims of {role_path}"),
        )
    } else if said.contains("expired") || said.contains("not valid yet") {
        (
            "jwt_times",
            "Vault says the JWT is expired or not valid yet, although this host's clock says otherwise".into(),
            "compare this host's clock with Vault's and the issuer's (NTP)".into(),
        )
    } else if said.contains("could not be found") || said.contains("invalid role") {
        (
            "unknown_role",
            "the auth role does not exist".into(),
            format!("create {role_path}, or correct vault.auth.role / vault.auth.mount"),
        )
    } else if status == Some(403) {
        (
            "denied",
            "Vault refused the login".into(),
            "check the credentials in vault.auth and the auth role's bindings (bound CIDRs, secret_id)".into(),
        )
    } else if matches!(status, Some(429 | 500..=599)) {
        (
            "unavailable",
            "Vault cannot be asked".into(),
            "check that Vault is up and reachable".into(),
        )
    } else {
        (
            "error",
            "the login failed".into(),
            format!("check {role_path} and vault.auth"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn claims(aud: &str, sub: &str) -> Arc<JwtClaims> {
        Arc::new(JwtClaims {
            sub: Some(sub.into()),
            aud: vec![aud.into()],
            ..Default::default()
        })
    }

    fn refused(status: u16, said: &str, c: Arc<JwtClaims>) -> VaultError {
        VaultError::JwtLoginRefused {
            path: "auth/jwt/login".into(),
            status,
            errors: vec![said.into()],
            role: "payments".into(),
            claims: c,
        }
    }

    /// The problem comes from the variant and Vault's own message, never from the claims dbward
    /// shows next to it: a claim value naming another problem does not change the diagnosis.
    #[test]
    fn login_problems_come_from_the_variant_and_vaults_message() {
        let file = PathBuf::from("/run/token");
        let cases: Vec<(VaultError, &str)> = vec![
            (
                LocalError::JwtExpired {
                    file: file.clone(),
                    exp: 1,
                    claims: claims("vault", "a"),
                }
                .into(),
                "jwt_expired",
            ),
            (
                LocalError::JwtNotYetValid {
                    file: file.clone(),
                    nbf: 1,
                    claims: claims("vault", "a"),
                }
                .into(),
                "jwt_not_yet_valid",
            ),
            (
                LocalError::SecretFileEmpty {
                    key: "token_file",
                    path: file.clone(),
                }
                .into(),
                "local",
            ),
            (
                refused(
                    400,
                    "error validating claims: invalid audience (aud) claim",
                    claims("x", "a"),
                ),
                "aud_mismatch",
            ),
            (
                refused(
                    400,
                    "claim \"sub\" does not match any associated bound claim values",
                    claims("vault", "expired issuer audience"),
                ),
                "sub_mismatch",
            ),
            (
                refused(400, "role \"x\" could not be found", claims("vault", "a")),
                "unknown_role",
            ),
            (refused(403, "permission denied", claims("vault", "audience")), "denied"),
            (refused(503, "Vault is sealed", claims("vault", "a")), "unavailable"),
            (
                VaultError::Status {
                    op: "login",
                    path: "auth/approle/login".into(),
                    status: 400,
                    errors: vec!["invalid role or secret ID".into()],
                },
                "unknown_role",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(diagnose(&e, "jwt", "auth/jwt/role/x").0, want, "{e}");
        }
    }

    #[test]
    fn capabilities_allow_read_unless_denied() {
        let body = serde_json::json!({
            "data": {"a": ["read", "list"], "b": ["root"], "c": ["deny", "read"]},
            "d": ["list"],
        });
        let caps = capabilities_from(&body, &["a", "b", "c", "d", "e"]);
        assert!(caps["a"].allows("read"));
        assert!(caps["b"].allows("update"));
        assert!(!caps["c"].allows("read"));
        assert!(!caps["d"].allows("read"));
        assert!(!caps.contains_key("e"));
    }
}
