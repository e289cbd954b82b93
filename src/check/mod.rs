//! `dbward check`: everything production will do, done once, before the deploy. It logs in the
//! way the config says, asks Vault what the token may do on every path the config uses
//! (`sys/capabilities-self`), reads each credential, opens one upstream connection with it
//! (`SELECT 1`), and cleans up after itself (the test lease, then the check's own token).
//!
//! Each step is one [`report::Check`] with a verdict and, when it fails, a `fix` that names what
//! to change: the path, the missing capability, the token's policies, the role that issued it.
//! Nothing here ever puts a password, token or JWT into a check: messages are built from error
//! types that carry none, and from names (paths, roles, users, lease ids).
//!
//! `--diff-policy NAME` compares a policy stored in Vault with what the config needs instead
//! (see [`crate::policy::diff`]): the review tool for a path reorganization.
//!
//! This module owns the order of the steps; each step lives in its own file: [`health`] (Vault
//! and the clock), [`login`] (the login and the token), [`entry`] (one database entry's read and
//! leases), [`ttl`] (lease and token lifetimes), [`upstream`] (the `SELECT 1`), [`policy_diff`].

mod callers;
mod entry;
mod health;
mod hosts;
mod login;
mod policy_diff;
mod query;
mod report;
mod ttl;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;

use crate::config::{AuthMethod, Config, DatabaseConfig};
use crate::metrics::Metrics;
use crate::policy;
use crate::upstream::UpstreamSettings;
use crate::vault::error::VaultSetupError;
use crate::vault::{self, Auth, VaultClient, VaultToken};

pub use report::Report;
use report::{Check, Verdict};

/// Scope of the checks that concern Vault and the login rather than one database entry.
const VAULT_SCOPE: &str = "vault";

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
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Vault(#[from] VaultSetupError),
    /// An upstream's TLS files or server name; the text names the config key.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SettingsError),
}

/// Runs every check. Only setup problems are errors; everything else is in the report.
pub async fn run(config: &Config, opts: &Options) -> Result<Report, SetupError> {
    let mut r = run_steps(config, opts).await?;
    // Who may connect needs no server, so it is reported whatever Vault said; --diff-policy
    // compares policies only.
    if opts.diff_policy.is_none() {
        for db in &config.databases {
            r.push(callers::local_callers(db));
        }
    }
    Ok(r)
}

async fn run_steps(config: &Config, opts: &Options) -> Result<Report, SetupError> {
    let client = VaultClient::new(&config.vault, Arc::new(Metrics::new()))?;
    let mut upstreams = Vec::new();
    for (i, db) in config.databases.iter().enumerate() {
        upstreams.push(UpstreamSettings::from_config(i, db)?);
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
        login: vault::auth::login_description(&config.vault.auth),
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
    run.token_checks(&mut r, &info);
    let reqs = policy::requirements(config);
    let caps = run.capabilities(&mut r, &token, &reqs).await;
    if let Some(caps) = &caps {
        for c in token_endpoints(&reqs, caps, &info) {
            r.push(c);
        }
    }
    let access = entry::Access {
        token: &token,
        info: &info,
        reqs: &reqs,
        caps: caps.as_ref(),
    };
    for (index, db) in config.databases.iter().enumerate() {
        let e = entry::Entry {
            index,
            db,
            upstream: &upstreams[index],
        };
        run.database(&mut r, &e, &access).await;
    }
    if config.vault.auth.method() != AuthMethod::Token {
        r.push(run.revoke_token(&token).await);
    }
    Ok(r)
}

/// The token's own endpoints (`auth/token/renew-self`, `revoke-self`, `lookup-self`): what
/// Vault's default policy grants. One line when all are granted, a warning per missing one.
fn token_endpoints(reqs: &[policy::Requirement], caps: &login::Capabilities, info: &login::TokenInfo) -> Vec<Check> {
    let token_reqs: Vec<&policy::Requirement> = reqs.iter().filter(|q| q.databases.is_empty()).collect();
    let lacks = |q: &policy::Requirement| caps.get(&q.path).is_some_and(|rule| !rule.allows(q.capability));
    let title = |paths: &[&policy::Requirement]| {
        let names: Vec<&str> = paths.iter().map(|q| q.path.as_str()).collect();
        format!("token ({})", names.join(", "))
    };
    let missing: Vec<&&policy::Requirement> = token_reqs.iter().filter(|q| lacks(q)).collect();
    if missing.is_empty() {
        return vec![Check::new(
            VAULT_SCOPE,
            "token_capabilities",
            title(&token_reqs),
            Verdict::Pass,
            "granted",
        )];
    }
    missing
        .into_iter()
        .map(|q| {
            let consequence = match q.path.as_str() {
                policy::RENEW_SELF_PATH => "dbward cannot renew its token and logs in anew at 2/3 of every token TTL",
                policy::REVOKE_SELF_PATH => "`dbward check` cannot revoke its test token; it expires at its TTL",
                _ => "`dbward check` cannot read the token's TTL and max TTL, and auth method token cannot log in",
            };
            Check::new(
                VAULT_SCOPE,
                "token_capabilities",
                format!("{} {}", q.capability, q.path),
                Verdict::Warn,
                format!(
                    "missing capability {:?} (token policies: {}): {consequence}",
                    q.capability,
                    info.policies_text()
                ),
            )
            .fix(format!(
                "attach Vault's built-in \"default\" policy to the auth role (unset token_no_default_policy), or add path {:?} {{ capabilities = [{:?}] }} to {}",
                q.path,
                q.capability,
                info.editable_policies()
            ))
            .detail("path", q.path.clone())
            .detail("missing", vec![q.capability])
        })
        .collect()
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

/// What every step needs: the config, the command line, the Vault client.
struct Run<'a> {
    config: &'a Config,
    opts: &'a Options,
    client: Arc<VaultClient>,
    /// [`vault::auth::login_description`] of the config.
    login: String,
}

impl Run<'_> {
    fn config_file(&self) -> String {
        self.opts.config_path.display().to_string()
    }

    /// The auth method's mount, as Vault paths spell it (`jwt`, `k8s/prod`).
    fn auth_mount(&self) -> &str {
        &self.config.vault.auth.mount
    }

    /// The auth role that issues the token, as a Vault path fixes can name.
    fn auth_role(&self) -> String {
        // Only jwt and kubernetes logins have a role; the fixes that name it are about them.
        let role = self.config.vault.auth.role().unwrap_or("");
        format!("auth/{}/role/{role}", self.auth_mount())
    }

    /// The check's own token, and with it any lease it still holds.
    async fn revoke_token(&self, token: &VaultToken) -> Check {
        let title = "cleanup: revoke the check's Vault token";
        match vault::auth::revoke_self(&self.client, &token.token).await {
            Ok(()) => Check::new(VAULT_SCOPE, "revoke_token", title, Verdict::Pass, "revoked"),
            Err(e) => Check::new(VAULT_SCOPE, "revoke_token", title, Verdict::Warn, format!("not revoked: {e}"))
                .fix("the token expires at the end of its TTL; attach Vault's \"default\" policy to allow auth/token/revoke-self"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Rule;

    #[test]
    fn token_endpoints_warn_per_missing_capability_naming_the_default_policy() {
        let config = Config::parse(
            r#"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "jwt"
role = "payments-service"
token_file = "/tmp/jwt"
[[databases]]
name = "payments"
listen = ["127.0.0.1:6432"]
upstream = "db:5432"
[databases.credentials]
kind = "database"
role = "payments"
"#,
        )
        .unwrap();
        let reqs = policy::requirements(&config);
        let info = login::TokenInfo {
            policies: vec!["payments".into()],
            ttl: None,
            renewable: true,
            max_ttl: ttl::MaxTtl::Unknown,
            lookup_error: None,
        };
        let caps = |renew: &str| -> login::Capabilities {
            [
                (policy::RENEW_SELF_PATH, renew),
                (policy::REVOKE_SELF_PATH, "update"),
                (policy::LOOKUP_SELF_PATH, "read"),
            ]
            .into_iter()
            .map(|(p, c)| {
                (
                    p.to_string(),
                    Rule {
                        path: p.to_string(),
                        capabilities: vec![c.to_string()],
                    },
                )
            })
            .collect()
        };
        let all = token_endpoints(&reqs, &caps("update"), &info);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].verdict, Verdict::Pass);
        let missing = token_endpoints(&reqs, &caps("deny"), &info);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].verdict, Verdict::Warn);
        assert_eq!(missing[0].title, "update auth/token/renew-self");
        let fix = missing[0].fix.as_deref().unwrap();
        assert!(
            fix.contains("\"default\" policy") && fix.contains("token_no_default_policy"),
            "{fix}"
        );
    }
}
