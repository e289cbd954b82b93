//! Lifetimes: how long a token or lease can live at most (learned by one probe, the same for
//! both), and what a lease's TTL means for the deploy — constant rotation, or leases dying with
//! a token whose max TTL is shorter than theirs.

use std::fmt;
use std::time::{Duration, Instant};

use super::entry::{Access, Entry};
use super::report::{fmt_duration, Check, Verdict};
use super::Run;
use crate::vault::{self, VaultError};

/// Replacing a credential more often than this is "constant rotation".
const MIN_ROTATION: Duration = Duration::from_secs(60);
/// Asking Vault to extend a token or lease by this much answers with its max TTL.
pub(super) const PROBE_INCREMENT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A token's (or lease's) max TTL, as far as Vault lets us find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MaxTtl {
    Limited(Duration),
    /// Periodic tokens and tokens without TTL can be renewed forever.
    Unlimited,
    Unknown,
}

impl MaxTtl {
    fn limited(self) -> Option<Duration> {
        match self {
            MaxTtl::Limited(d) => Some(d),
            _ => None,
        }
    }
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

/// The max TTL from a renewal by [`PROBE_INCREMENT`] of something `age` old (measured once the
/// answer is in): Vault caps the renewal and grants what is left. A failed renewal, or one without a duration, says nothing.
pub(super) fn probe(granted: Result<Option<Duration>, VaultError>, age: Duration) -> MaxTtl {
    match granted {
        Ok(Some(left)) => MaxTtl::Limited(max_ttl_from_remaining(left.as_secs(), age)),
        Ok(None) | Err(_) => MaxTtl::Unknown,
    }
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

/// The hard end of a session's credential, counted from its fetch: the earlier of the lease's
/// max TTL and the max TTL of the token that obtained it (the lease dies with the token), with
/// which of the two it is. None: neither is known to be limited.
pub(super) fn hard_end(lease_max: MaxTtl, token_max: MaxTtl) -> Option<(Duration, &'static str)> {
    match (lease_max.limited(), token_max.limited()) {
        (Some(l), Some(t)) if t < l => Some((t, "Vault token max TTL")),
        (Some(l), _) => Some((l, "lease max TTL")),
        (None, Some(t)) => Some((t, "Vault token max TTL")),
        (None, None) => None,
    }
}

impl Run<'_> {
    /// Lease max TTL against the token's max TTL and the rotation it implies.
    pub(super) async fn lease_ttl(
        &self,
        e: &Entry<'_>,
        access: &Access<'_>,
        lease: &vault::Lease,
        issued: Instant,
        can_renew: bool,
    ) -> Vec<Check> {
        // Without the right to renew (or for a lease that cannot be renewed) the max TTL is the
        // lease duration.
        let max = if lease.renewable && can_renew {
            let renewal =
                vault::secrets::renew_lease(&self.client, &access.token.token, &lease.id, PROBE_INCREMENT).await;
            probe(renewal, issued.elapsed())
        } else if !lease.renewable {
            MaxTtl::Limited(lease.duration)
        } else {
            MaxTtl::Unknown
        };
        let lifetimes = Lifetimes {
            lease,
            max,
            token_max: access.info.max_ttl,
            auth_role: self.auth_role(),
        };
        lifetimes.checks(e)
    }
}

/// What is known about one test lease's lifetime and the token that holds it.
struct Lifetimes<'a> {
    lease: &'a vault::Lease,
    /// The lease's max TTL.
    max: MaxTtl,
    token_max: MaxTtl,
    /// The auth role that issued the token, as a Vault path.
    auth_role: String,
}

impl Lifetimes<'_> {
    /// Warnings for constant rotation and for leases outliving their token; else one pass.
    fn checks(&self, e: &Entry<'_>) -> Vec<Check> {
        let (db, lease, max) = (e.db, self.lease, self.max);
        let c = &db.credentials;
        let role_path = format!("{}/roles/{}", e.secrets_mount(), e.role());
        let base = |verdict, message: String| {
            let mut ch = Check::new(&db.name, "lease_ttl", "lease TTL", verdict, message)
                .detail("lease_ttl_seconds", lease.duration.as_secs());
            if let MaxTtl::Limited(m) = max {
                ch = ch.detail("lease_max_ttl_seconds", m.as_secs());
            }
            ch
        };
        let mut out = Vec::new();
        let effective = max.limited().map_or(lease.duration, |m| m.min(lease.duration));
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
        out.extend(self.token_dies_first(&db.name, &role_path));
        let passed = out.is_empty();
        out.push(self.hard_end_check(&db.name));
        if passed {
            let token_max = match self.token_max {
                MaxTtl::Limited(_) | MaxTtl::Unlimited => format!("; the token's max TTL is {}", self.token_max),
                MaxTtl::Unknown => String::new(),
            };
            out.push(base(
                Verdict::Pass,
                format!("{}, max TTL {max}{token_max}", fmt_duration(lease.duration)),
            ));
        }
        out
    }

    /// What a session started now can count on: its credential ends, at the latest, at the
    /// earlier of the lease max TTL and the token max TTL (measured on the check's fresh token;
    /// the daemon's token may be older, so this is an upper bound).
    fn hard_end_check(&self, scope: &str) -> Check {
        let title = "hard end of a new session's credential";
        match hard_end(self.max, self.token_max) {
            Some((end, by)) => Check::new(
                scope,
                "hard_end",
                title,
                Verdict::Pass,
                format!(
                    "{} at most ({by}; lease max TTL {}, token max TTL {}): Postgres ends a session still using the credential then",
                    fmt_duration(end),
                    self.max,
                    self.token_max
                ),
            )
            .detail("hard_end_seconds", end.as_secs())
            .detail("limited_by", by),
            None => Check::new(
                scope,
                "hard_end",
                title,
                Verdict::Pass,
                format!(
                    "not limited as far as Vault said (lease max TTL {}, token max TTL {})",
                    self.max, self.token_max
                ),
            ),
        }
    }

    /// Leases die with the token that obtained them: a token max TTL shorter than the lease's
    /// cuts every credential short.
    fn token_dies_first(&self, scope: &str, role_path: &str) -> Option<Check> {
        let (Some(lease_max), MaxTtl::Limited(token_max)) = (self.max.limited(), self.token_max) else {
            return None;
        };
        // A second of slack: both were measured a moment apart.
        if token_max + Duration::from_secs(1) >= lease_max {
            return None;
        }
        Some(
            Check::new(
                scope,
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
                "raise token_max_ttl of {} to at least {}, or lower max_ttl of {role_path} to {}",
                self.auth_role,
                fmt_duration(lease_max),
                fmt_duration(token_max)
            ))
            .detail("token_max_ttl_seconds", token_max.as_secs())
            .detail("lease_max_ttl_seconds", lease_max.as_secs()),
        )
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
    fn the_hard_end_is_the_earlier_of_lease_and_token_max_ttl() {
        let secs = Duration::from_secs;
        let (l, t) = (MaxTtl::Limited(secs(18)), MaxTtl::Limited(secs(16)));
        assert_eq!(hard_end(l, t), Some((secs(16), "Vault token max TTL")));
        assert_eq!(hard_end(t, l), Some((secs(16), "lease max TTL")));
        assert_eq!(hard_end(l, MaxTtl::Unlimited), Some((secs(18), "lease max TTL")));
        assert_eq!(hard_end(MaxTtl::Unknown, t), Some((secs(16), "Vault token max TTL")));
        assert_eq!(hard_end(MaxTtl::Unknown, MaxTtl::Unlimited), None);
    }

    #[test]
    fn a_failed_or_empty_probe_says_unknown() {
        let secs = Duration::from_secs;
        assert_eq!(probe(Ok(Some(secs(1799))), secs(1)), MaxTtl::Limited(secs(1800)));
        assert_eq!(probe(Ok(None), secs(1)), MaxTtl::Unknown);
        let denied = VaultError::Status {
            op: "renew",
            path: "sys/leases/renew".into(),
            status: 403,
            errors: vec![],
        };
        assert_eq!(probe(Err(denied), secs(1)), MaxTtl::Unknown);
    }
}
