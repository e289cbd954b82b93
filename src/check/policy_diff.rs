//! `dbward check --diff-policy NAME`: the policy stored in Vault against what the config needs
//! ([`policy::diff`]), one check per requirement granted or missing and per rule left unused.

use super::report::{Check, Report, Verdict};
use super::Run;
use crate::config::AuthMethod;
use crate::policy;
use crate::vault::Auth;

impl Run<'_> {
    /// `--diff-policy NAME`: the policy stored in Vault against the config's requirements.
    pub(super) async fn diff_policy(&self, r: &mut Report, name: &str) {
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
            if self.config.vault.auth.method() != AuthMethod::Token {
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
        push_diff(r, &scope, name, &rules, &policy::diff(self.config, &rules));
    }
}

fn push_diff(r: &mut Report, scope: &str, name: &str, rules: &[policy::Rule], d: &policy::Diff) {
    for (req, by) in &d.granted {
        r.push(
            Check::new(
                scope,
                "policy",
                format!("{} {}", req.capability, req.path),
                Verdict::Pass,
                format!("granted by path {by:?} (needed by {})", req.needed_by()),
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
                scope,
                "policy_missing",
                format!("{} {}", req.capability, req.path),
                Verdict::Fail,
                format!("{why} (needed by {}: {})", req.needed_by(), req.purpose),
            )
            .fix(format!(
                "add path {:?} {{ capabilities = [{:?}] }} to policy {name:?}",
                req.path, req.capability
            ))
            .detail("path", req.path.clone())
            .detail("missing", vec![req.capability]),
        );
    }
    for req in &d.from_default {
        r.push(
            Check::new(
                scope,
                "policy",
                format!("{} {}", req.capability, req.path),
                Verdict::Pass,
                format!(
                    "not in this policy; Vault's default policy grants it (needed by {}: {}): keep \"default\" attached to the auth role",
                    req.needed_by(),
                    req.purpose
                ),
            )
            .detail("path", req.path.clone())
            .detail("granted_by", "default"),
        );
    }
    for rule in &d.unused {
        r.push(
            Check::new(
                scope,
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
