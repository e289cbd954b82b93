//! The first step of `dbward check`: is Vault there at all (`sys/health`: reachable,
//! initialized, unsealed), and does this host's clock agree with Vault's (its `Date` header).
//! A failure here stops the run, so its fix must name the likely cause.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::report::{fmt_duration, Check, Report, Verdict};
use super::{Run, VAULT_SCOPE};
use crate::vault::error::TransportKind;
use crate::vault::VaultError;

/// Clock differences above this are reported; above [`SKEW_FAIL`] they fail the check.
const SKEW_WARN: Duration = Duration::from_secs(10);
/// Vault's jwt auth method allows 60 s of clock skew by default; beyond that, JWT time checks on
/// this host and in Vault disagree.
const SKEW_FAIL: Duration = Duration::from_secs(60);

impl Run<'_> {
    /// `sys/health` (reachable, initialized, unsealed) and the clock against its `Date`.
    pub(super) async fn vault_health(&self, r: &mut Report) -> bool {
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
            .and_then(|d| httpdate::parse_http_date(d).ok())
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
        let (kind, message, fix) = match e {
            VaultError::Status { status: 503, .. } => (
                "sealed",
                "Vault is sealed (sys/health answered 503)".to_string(),
                "unseal it (`bao operator unseal` / `vault operator unseal`), or point vault.address at an unsealed node".to_string(),
            ),
            VaultError::Status { status: 501, .. } => (
                "uninitialized",
                "Vault is not initialized (sys/health answered 501)".to_string(),
                "initialize it, or point vault.address at the right server".to_string(),
            ),
            VaultError::Unreachable {
                kind: TransportKind::Tls,
                detail,
                ..
            } => (
                "tls",
                format!("TLS to {addr} failed: {detail}"),
                "vault.ca_file must hold the CA that signed Vault's certificate (default: the system roots), and the host in vault.address must be one of the certificate's names; an http:// Vault needs an http:// address".to_string(),
            ),
            VaultError::Unreachable { detail, .. } => (
                "unreachable",
                format!("unreachable: {detail}"),
                "check vault.address, that Vault is running, and that this host can reach it (DNS, firewall, proxy)".to_string(),
            ),
            VaultError::Timeout { after, .. } => (
                "timeout",
                format!("no answer within {}", fmt_duration(*after)),
                "check that Vault is up and not overloaded, and that nothing between drops the traffic; or raise vault.request_timeout".to_string(),
            ),
            other => ("error", other.to_string(), "check vault.address".to_string()),
        };
        Check::new(VAULT_SCOPE, "vault", title, Verdict::Fail, message)
            .fix(fix)
            .detail("problem", kind)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The Date header is read by `httpdate`; these are the forms Vault sends and must refuse.
    #[test]
    fn http_dates_parse() {
        let t = httpdate::parse_http_date("Thu, 26 Nov 2026 01:18:08 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1_795_655_888);
        assert!(httpdate::parse_http_date("Thu, 26 Nov 2026 01:18:08 CET").is_err());
        assert!(httpdate::parse_http_date("yesterday").is_err());
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
}
