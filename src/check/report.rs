//! The report `dbward check` prints: one [`Check`] per step with its [`Verdict`], and the two
//! renderings of the whole [`Report`] (aligned text for people, one JSON document for machines).
//! Also the duration format every check message uses.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Verdict {
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
pub(crate) struct Check {
    /// `vault`, a database entry's name, or `policy NAME` (for `--diff-policy`).
    pub(crate) scope: String,
    /// Machine-readable kind: `vault`, `clock`, `login`, `read`, `leases`, `lease_ttl`,
    /// `token_ttl`, `upstream`, `revoke_lease`, `revoke_token`, `policy`...
    pub(crate) check: &'static str,
    /// What was checked, e.g. `read secret/data/apps/payments/db`.
    pub(crate) title: String,
    pub(crate) verdict: Verdict,
    pub(crate) message: String,
    /// What to change, for failures and warnings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fix: Option<String>,
    /// Structured facts for machines (path, missing capabilities, policies, SQLSTATE...).
    #[serde(flatten)]
    pub(crate) details: Map<String, Value>,
}

impl Check {
    pub(crate) fn new(
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

    pub(crate) fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    pub(crate) fn fix_opt(mut self, fix: Option<String>) -> Self {
        self.fix = fix;
        self
    }

    pub(crate) fn detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// All checks of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub(crate) config: String,
    pub(crate) vault: String,
    pub(crate) checks: Vec<Check>,
}

impl Report {
    pub(crate) fn push(&mut self, c: Check) {
        self.checks.push(c);
    }

    pub(crate) fn count(&self, v: Verdict) -> usize {
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

/// `32d`, `2h`, `29m 59s`: whole seconds, in the units Vault's TTLs are written in (humantime
/// would say "1month 1day 13h 26m 24s" for Vault's default 768h).
pub(crate) fn fmt_duration(d: Duration) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_vault_ttls() {
        assert_eq!(fmt_duration(Duration::from_secs(768 * 3600)), "32d");
        assert_eq!(fmt_duration(Duration::from_secs(1799)), "29m 59s");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
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
}
