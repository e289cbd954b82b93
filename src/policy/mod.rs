//! What Vault access a configuration needs, as data (`requirements`) and as the HCL policy
//! `dbward policy` prints ([`render_hcl`]); and the other direction: reading a policy Vault has
//! (HCL or JSON, `parse_policy` in `read.rs`), matching its paths the way Vault does, and
//! comparing it with the config (`diff`, for `dbward check --diff-policy`).
//!
//! Secret paths are an API contract between the config and the policy. Generating the policy
//! from the config, and diffing a live policy against it, makes a path reorganization a reviewed
//! change instead of a `permission denied` at 3 AM.

use std::cmp::Ordering;
use std::fmt::Write as _;

use crate::config::{Config, CredentialKind, CredentialSource};

mod read;
pub(crate) use read::parse_policy;

/// Path dbward renews leases at.
pub(crate) const LEASE_RENEW_PATH: &str = "sys/leases/renew";
/// Path dbward revokes leases at.
pub(crate) const LEASE_REVOKE_PATH: &str = "sys/leases/revoke";
/// The token's own endpoints: renewal by the daemon, revocation by `dbward check` (its test
/// token), lookup by `dbward check` and the `token` auth method.
pub(crate) const RENEW_SELF_PATH: &str = "auth/token/renew-self";
pub(crate) const REVOKE_SELF_PATH: &str = "auth/token/revoke-self";
pub(crate) const LOOKUP_SELF_PATH: &str = "auth/token/lookup-self";

/// One capability the config needs on one path, and which database entries need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Requirement {
    pub path: String,
    pub capability: &'static str,
    /// Names of the database entries that need it, in config order.
    pub databases: Vec<String>,
    /// What it is for, for the policy comment.
    pub purpose: String,
    /// Vault's built-in `default` policy grants it (unless the auth role sets
    /// `token_no_default_policy`).
    pub default_policy: bool,
}

impl Requirement {
    /// Who needs it, for messages: the database entries, or dbward's own token.
    pub(crate) fn needed_by(&self) -> String {
        match self.databases.len() {
            0 => "dbward's Vault token".into(),
            1 => format!("database entry {}", entry_names(&self.databases)),
            _ => format!("database entries {}", entry_names(&self.databases)),
        }
    }
}

/// Every (path, capability) the config needs, secret paths first (in config order), then the
/// lease endpoints. Entries reading the same path share one requirement.
pub(crate) fn requirements(config: &Config) -> Vec<Requirement> {
    let mut out: Vec<Requirement> = Vec::new();
    for db in &config.databases {
        let c = &db.credentials;
        let path = c.vault_path();
        let purpose = match &c.source {
            CredentialSource::Database { role, .. } => format!("dynamic credentials of database role {role:?}"),
            CredentialSource::Static { role, .. } => format!("static credentials of database role {role:?}"),
            CredentialSource::Kv { .. } => "username and password from a KV v2 secret".to_string(),
        };
        match out.iter_mut().find(|r| r.path == path) {
            Some(r) => r.databases.push(db.name.clone()),
            None => out.push(Requirement {
                path,
                capability: "read",
                databases: vec![db.name.clone()],
                purpose,
                default_policy: false,
            }),
        }
    }
    // Only dynamic credentials carry leases; static and KV secrets have none to manage.
    let dynamic = || {
        config
            .databases
            .iter()
            .filter(|d| d.credentials.kind() == CredentialKind::Database)
    };
    let renewing: Vec<String> = dynamic()
        .filter(|d| d.credentials.renew_in_use)
        .map(|d| d.name.clone())
        .collect();
    let revoking: Vec<String> = dynamic()
        .filter(|d| d.credentials.revoke_unused || config.vault.revoke_on_shutdown)
        .map(|d| d.name.clone())
        .collect();
    if !renewing.is_empty() {
        out.push(Requirement {
            path: LEASE_RENEW_PATH.into(),
            capability: "update",
            databases: renewing,
            purpose: "renew leases that client connections still use (renew_in_use)".into(),
            default_policy: true,
        });
    }
    if !revoking.is_empty() {
        out.push(Requirement {
            path: LEASE_REVOKE_PATH.into(),
            capability: "update",
            databases: revoking,
            purpose: "revoke leases once replaced and unused, and at shutdown (revoke_unused, revoke_on_shutdown); \
                      Vault's default policy does not grant it"
                .into(),
            default_policy: false,
        });
    }
    for (path, capability, purpose) in [
        (
            RENEW_SELF_PATH,
            "update",
            "renew dbward's Vault token at 2/3 of its TTL",
        ),
        (
            REVOKE_SELF_PATH,
            "update",
            "revoke the test token at the end of `dbward check`",
        ),
        (
            LOOKUP_SELF_PATH,
            "read",
            "read the token's TTL and policies (`dbward check`, auth method token)",
        ),
    ] {
        out.push(Requirement {
            path: path.into(),
            capability,
            databases: Vec::new(),
            purpose: purpose.into(),
            default_policy: true,
        });
    }
    out
}

/// `"payments"` or `"payments", "orders"`: database entry names for messages.
pub(crate) fn entry_names(names: &[String]) -> String {
    names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
}

/// The minimal policy for `config`: one `path` block per requirement, each with a comment naming
/// the database entries it serves. `source` names the config file in the header comment.
pub fn render_hcl(config: &Config, source: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Vault/OpenBao policy for dbward, generated by `dbward policy --config {source}`."
    );
    out.push_str(
        "# Paths marked \"(in Vault's default policy)\" are granted by Vault's built-in \"default\" policy as\n\
         # long as it is attached to the auth role (no token_no_default_policy); they are listed so that this\n\
         # policy is complete on its own. sys/leases/revoke is not in the default policy.\n",
    );
    for r in requirements(config) {
        let default = if r.default_policy {
            " (in Vault's default policy)"
        } else {
            ""
        };
        let _ = write!(
            out,
            "\n# {}: {}{default}\npath {} {{\n  capabilities = [\"{}\"]\n}}\n",
            r.needed_by(),
            r.purpose,
            hcl_string(&r.path),
            r.capability
        );
    }
    out
}

/// An HCL string literal.
fn hcl_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Reading policies: read.rs.
// ---------------------------------------------------------------------------------------------

/// One `path` block of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub path: String,
    pub capabilities: Vec<String>,
}

impl Rule {
    /// Whether the rule allows `capability` (`deny` wins over everything, `root` allows all).
    pub fn allows(&self, capability: &str) -> bool {
        !self.capabilities.iter().any(|c| c == "deny")
            && self.capabilities.iter().any(|c| c == capability || c == "root")
    }
}

// ---------------------------------------------------------------------------------------------
// Matching paths as Vault does.
// ---------------------------------------------------------------------------------------------

/// Whether policy path `rule` covers request path `path`: exact, `*` at the end (prefix), `+`
/// for exactly one path segment.
pub(crate) fn path_matches(rule: &str, path: &str) -> bool {
    let (base, glob) = match rule.strip_suffix('*') {
        Some(b) => (b, true),
        None => (rule, false),
    };
    if !base.contains('+') {
        return if glob { path.starts_with(base) } else { path == base };
    }
    let rs: Vec<&str> = base.split('/').collect();
    let ps: Vec<&str> = path.split('/').collect();
    if ps.len() < rs.len() || (!glob && ps.len() != rs.len()) {
        return false;
    }
    for (i, (r, p)) in rs.iter().zip(&ps).enumerate() {
        let last = i == rs.len() - 1;
        let ok = if *r == "+" {
            true
        } else if last && glob {
            p.starts_with(r)
        } else {
            r == p
        };
        if !ok {
            return false;
        }
    }
    // A glob ending mid-path ("a/b*") matches further segments; one ending in a full segment
    // ("a/+" + "*" would be "a/+*") is covered by starts_with on the last segment above.
    true
}

/// Vault's order among matching rules (higher is more specific): exact beats glob; then the
/// first `+`/`*` later wins, no trailing `*` wins, fewer `+` segments win, longer wins,
/// lexicographically larger wins.
fn specificity(a: &str, b: &str) -> Ordering {
    let exact = |p: &str| !p.contains('+') && !p.ends_with('*');
    match (exact(a), exact(b)) {
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    let first_wild = |p: &str| p.find(['+', '*']).unwrap_or(p.len());
    first_wild(a)
        .cmp(&first_wild(b))
        .then_with(|| b.ends_with('*').cmp(&a.ends_with('*')))
        .then_with(|| {
            let plus = |p: &str| p.split('/').filter(|s| *s == "+").count();
            plus(b).cmp(&plus(a))
        })
        .then_with(|| a.len().cmp(&b.len()))
        .then_with(|| a.cmp(b))
}

/// The rule Vault applies to `path`: the most specific matching one.
pub(crate) fn best_rule<'a>(rules: &'a [Rule], path: &str) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|r| path_matches(&r.path, path))
        .max_by(|a, b| specificity(&a.path, &b.path))
}

/// A live policy compared with what a config needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Diff {
    /// Requirements the policy satisfies, with the policy path that grants each.
    pub granted: Vec<(Requirement, String)>,
    /// Requirements the policy does not satisfy, with the policy path that applies (and lacks
    /// the capability or denies it), if any.
    pub missing: Vec<(Requirement, Option<String>)>,
    /// Requirements the policy does not satisfy but Vault's default policy does.
    pub from_default: Vec<Requirement>,
    /// Policy paths that apply to nothing the config reads.
    pub unused: Vec<Rule>,
}

pub(crate) fn diff(config: &Config, rules: &[Rule]) -> Diff {
    let mut d = Diff::default();
    let mut used = vec![false; rules.len()];
    for req in requirements(config) {
        let best = best_rule(rules, &req.path);
        if let Some(b) = best {
            if let Some(i) = rules.iter().position(|r| std::ptr::eq(r, b)) {
                used[i] = true;
            }
        }
        match best {
            Some(b) if b.allows(req.capability) => d.granted.push((req, b.path.clone())),
            // An explicit deny in this policy wins over the default policy's grant.
            None if req.default_policy => d.from_default.push(req),
            other => d.missing.push((req, other.map(|b| b.path.clone()))),
        }
    }
    d.unused = rules
        .iter()
        .zip(used)
        .filter(|(_, u)| !u)
        .map(|(r, _)| r.clone())
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
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

[[databases]]
name = "reports"
listen = ["127.0.0.1:6433"]
upstream = "db:5432"
[databases.credentials]
kind = "kv"
path = "secret/data/apps/payments/db-v2"
{extra}
"#
        );
        Config::parse(&text).unwrap()
    }

    #[test]
    fn rendered_policy_has_one_block_per_path_with_its_entries() {
        let hcl = render_hcl(&config(""), "dbward.toml");
        assert!(hcl.contains("# database entry \"payments\": dynamic credentials of database role \"payments\"\npath \"database/creds/payments\" {\n  capabilities = [\"read\"]\n}\n"), "{hcl}");
        assert!(hcl.contains("# database entry \"reports\": username and password from a KV v2 secret\npath \"secret/data/apps/payments/db-v2\" {"), "{hcl}");
        assert!(
            hcl.contains("path \"sys/leases/renew\" {\n  capabilities = [\"update\"]\n}"),
            "{hcl}"
        );
        assert!(
            hcl.contains("path \"sys/leases/revoke\" {\n  capabilities = [\"update\"]\n}"),
            "{hcl}"
        );
        assert!(
            hcl.contains("# dbward's Vault token: renew dbward's Vault token at 2/3 of its TTL (in Vault's default policy)\npath \"auth/token/renew-self\" {\n  capabilities = [\"update\"]\n}"),
            "{hcl}"
        );
        assert!(
            hcl.contains("path \"auth/token/revoke-self\" {\n  capabilities = [\"update\"]\n}"),
            "{hcl}"
        );
        assert!(
            hcl.contains("path \"auth/token/lookup-self\" {\n  capabilities = [\"read\"]\n}"),
            "{hcl}"
        );
        assert!(
            hcl.contains("renew_in_use) (in Vault's default policy)\npath \"sys/leases/renew\""),
            "{hcl}"
        );
        assert!(
            !hcl.contains("revoke_on_shutdown); Vault's default policy does not grant it (in"),
            "{hcl}"
        );
        assert_eq!(hcl.matches("path \"").count(), 7, "{hcl}");
        // It reads back as what it says.
        let rules = parse_policy(&hcl).unwrap();
        let d = diff(&config(""), &rules);
        assert!(d.missing.is_empty() && d.unused.is_empty(), "{d:?}");
    }

    #[test]
    fn lease_paths_only_when_leases_are_managed() {
        let mut c = config("");
        c.databases[0].credentials.renew_in_use = false;
        c.databases[0].credentials.revoke_unused = false;
        c.vault.revoke_on_shutdown = false;
        let paths: Vec<String> = requirements(&c).into_iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            vec![
                "database/creds/payments",
                "secret/data/apps/payments/db-v2",
                RENEW_SELF_PATH,
                REVOKE_SELF_PATH,
                LOOKUP_SELF_PATH
            ]
        );
        c.vault.revoke_on_shutdown = true;
        let paths: Vec<String> = requirements(&c).into_iter().map(|r| r.path).collect();
        assert_eq!(paths[2], LEASE_REVOKE_PATH);
    }

    #[test]
    fn paths_match_like_vault() {
        assert!(path_matches("secret/data/a", "secret/data/a"));
        assert!(!path_matches("secret/data/a", "secret/data/ab"));
        assert!(path_matches("secret/data/a*", "secret/data/ab/c"));
        assert!(path_matches("database/creds/+", "database/creds/payments"));
        assert!(!path_matches("database/creds/+", "database/creds/payments/x"));
        assert!(path_matches("secret/+/apps/*", "secret/data/apps/payments/db"));
        assert!(!path_matches("secret/+/apps/*", "secret/data/other/payments"));
    }

    #[test]
    fn the_most_specific_rule_applies() {
        let rules = parse_policy(
            r#"
            path "secret/*" { capabilities = ["read"] }
            path "secret/data/apps/*" { capabilities = ["deny"] }
            path "secret/data/apps/payments/db" { capabilities = ["read"] }
            path "secret/+/apps/payments/*" { capabilities = ["update"] }
            "#,
        )
        .unwrap();
        assert_eq!(
            best_rule(&rules, "secret/data/apps/payments/db").unwrap().path,
            "secret/data/apps/payments/db"
        );
        assert_eq!(
            best_rule(&rules, "secret/data/apps/payments/db-v2").unwrap().path,
            "secret/data/apps/*"
        );
        assert_eq!(best_rule(&rules, "secret/other").unwrap().path, "secret/*");
        assert!(best_rule(&rules, "database/creds/x").is_none());
    }

    #[test]
    fn diff_names_missing_and_unused_paths() {
        let rules = parse_policy(
            r#"
            path "database/creds/payments" { capabilities = ["read"] }
            path "secret/data/apps/payments/db" { capabilities = ["read"] }
            path "sys/leases/renew" { capabilities = ["update"] }
            path "sys/leases/revoke" { capabilities = ["read"] }
            "#,
        )
        .unwrap();
        let d = diff(&config(""), &rules);
        let missing: Vec<(&str, Option<&str>)> = d
            .missing
            .iter()
            .map(|(r, by)| (r.path.as_str(), by.as_deref()))
            .collect();
        assert_eq!(
            missing,
            vec![
                ("secret/data/apps/payments/db-v2", None),
                (LEASE_REVOKE_PATH, Some(LEASE_REVOKE_PATH))
            ]
        );
        assert_eq!(d.unused.len(), 1);
        assert_eq!(d.unused[0].path, "secret/data/apps/payments/db");
        assert_eq!(d.granted.len(), 2);
        // The token's own paths come with Vault's default policy; this one need not list them.
        let from_default: Vec<&str> = d.from_default.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(from_default, vec![RENEW_SELF_PATH, REVOKE_SELF_PATH, LOOKUP_SELF_PATH]);
    }
}
