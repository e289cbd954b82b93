//! The pure timing of the lifecycle: when a credential is replaced and how long the cache hands
//! it out ([`schedule`]), when an entry's task must act next ([`next_refresh`]), and what is due
//! for a held lease ([`next_lease_action`]). No I/O and no clock reads: every function takes
//! `now`, so the background tasks sleep exactly until the earliest answer and the rules are
//! unit-tested with paused time.

use std::time::Duration;

use tokio::time::Instant;

use super::Held;
use crate::config::{CredentialKind, CredentialsConfig};

/// A credential is never replaced sooner than this after it was fetched, whatever Vault's TTL:
/// a lease shorter than `expiry_margin` would otherwise make the refresh a busy loop on Vault.
pub(crate) const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// A deadline that has passed without the state changing (the cache drops entries on its own
/// clock, which can lag ours by a hair) is looked at again this much later, not in a busy loop.
pub(crate) const RECHECK: Duration = Duration::from_millis(50);

/// When a credential is replaced in the background and how long the cache may hand it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub(crate) refresh_after: Option<Duration>,
    pub(crate) cache_for: Option<Duration>,
}

/// The schedule of a credential valid for `valid_for` (None: no lease). `jitter` (0.95 to 1)
/// spreads the refreshes of many dbward instances.
pub(crate) fn schedule(cfg: &CredentialsConfig, valid_for: Option<Duration>, jitter: f64) -> Schedule {
    match (cfg.kind(), valid_for) {
        // KV secrets have no lease: re-read on the interval, handed out until replaced.
        (CredentialKind::Kv, _) | (_, None) => Schedule {
            refresh_after: Some(cfg.refresh_interval),
            cache_for: None,
        },
        // The password changes at rotation: fetched again just after; until then it is valid
        // (a login refused right at the rotation fetches the new one).
        (CredentialKind::Static, Some(v)) => Schedule {
            refresh_after: Some(v.saturating_add(Duration::from_secs(1))),
            cache_for: Some(v),
        },
        // Replaced at refresh_fraction, and always before the cache drops it (expiry_margin
        // before the lease ends), so no client waits for Vault once the first credential is in.
        (CredentialKind::Database, Some(v)) => {
            let cache_for = v.saturating_sub(cfg.expiry_margin);
            let latest = cache_for.saturating_sub(Duration::from_millis(500));
            Schedule {
                refresh_after: Some(v.mul_f64(cfg.refresh_fraction * jitter).min(latest)),
                cache_for: Some(cache_for),
            }
        }
    }
}

/// What a background task does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Replace the credential now, for this reason.
    Now(&'static str),
    /// Nothing is due before this time (None: nothing until woken).
    At(Option<Instant>),
}

/// When a database entry's credential must be replaced. `cached` is what the cache hands out,
/// `token_generation` the newest Vault login, `retry_at` the end of the backoff after failed
/// refreshes (a due refresh waits for it; a refresh that is not due ignores it).
pub(crate) fn next_refresh(
    kind: CredentialKind,
    cached: Option<&Held>,
    token_generation: u64,
    retry_at: Option<Instant>,
    now: Instant,
) -> Next {
    let due = match cached {
        None => Next::Now("no valid credential is cached"),
        // Leases die with the token that obtained them: move to the new token while the old
        // one still lives. Static and KV secrets do not belong to a token.
        Some(cur) if kind == CredentialKind::Database && cur.token_generation < token_generation => {
            Next::Now("the Vault token that owns its lease was replaced")
        }
        Some(cur) => match cur.refresh_at() {
            Some(at) if at <= now => Next::Now(match kind {
                CredentialKind::Kv => "refresh_interval passed",
                CredentialKind::Static => "the static role's password rotated",
                CredentialKind::Database => "refresh_fraction of the lease passed",
            }),
            // The cache dropping it (a static role at rotation) is a reason to look again.
            refresh_at => Next::At(earliest(refresh_at, cur.cache_until())),
        },
    };
    match (due, retry_at) {
        (Next::Now(_), Some(retry)) if retry > now => Next::At(Some(retry)),
        (due, _) => due,
    }
}

impl Held {
    /// When the credential was fetched, on tokio's clock.
    pub(crate) fn fetched_at(&self) -> Instant {
        Instant::from_std(self.cred.fetched_at)
    }

    /// When it is due for replacement in the background.
    pub(crate) fn refresh_at(&self) -> Option<Instant> {
        let after = self.schedule.refresh_after?;
        Some(crate::vault::limits::later(
            self.fetched_at(),
            after.max(MIN_REFRESH_GAP),
        ))
    }

    /// When the cache stops handing it out (None: until replaced).
    pub(crate) fn cache_until(&self) -> Option<Instant> {
        self.schedule
            .cache_for
            .map(|d| crate::vault::limits::later(self.fetched_at(), d))
    }
}

/// When a lease was last extended and for how long: the renewal clock of a held lease, distinct
/// from the [`crate::vault::Lease`] Vault granted at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseClock {
    pub(crate) renewed_at: Instant,
    pub(crate) duration: Duration,
    /// Vault granted less than asked: the max TTL is reached, renewing further is pointless.
    pub(crate) at_max: bool,
}

impl LeaseClock {
    pub(crate) fn new(renewed_at: Instant, duration: Duration) -> Self {
        LeaseClock {
            renewed_at,
            duration,
            at_max: false,
        }
    }

    /// When Vault will consider the lease over (renewals included).
    pub(crate) fn end(&self) -> Instant {
        crate::vault::limits::later(self.renewed_at, self.duration)
    }

    /// Renewed at 2/3 of each grant, like the token.
    pub(crate) fn renew_at(&self) -> Instant {
        crate::vault::limits::later(self.renewed_at, self.duration.saturating_mul(2) / 3)
    }
}

/// What a held lease is to its database entry right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseRole {
    /// The cache hands its credential out, until this time (None: until replaced).
    Current { until: Option<Instant> },
    /// Replaced (or dropped by the cache); this many sessions still use it.
    Replaced { in_use: usize },
}

/// Everything the lease decision depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseView {
    pub(crate) clock: LeaseClock,
    pub(crate) role: LeaseRole,
    /// Vault said the lease can be renewed.
    pub(crate) renewable: bool,
    pub(crate) renew_in_use: bool,
    pub(crate) revoke_unused: bool,
    /// The end of the backoff after a failed renewal or revocation.
    pub(crate) retry_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseAction {
    /// Stop tracking it: it expired, or is not ours to revoke.
    Forget,
    Revoke,
    Renew,
    /// Nothing is due before this time (None: nothing until woken).
    Wait(Option<Instant>),
}

/// What is due for one held lease: the current credential's lease is left alone (it is replaced
/// before it matters); a replaced one is renewed while sessions use it, up to the max TTL, and
/// revoked once none does.
pub(crate) fn next_lease_action(v: &LeaseView, now: Instant) -> LeaseAction {
    let end = v.clock.end();
    if end <= now {
        return LeaseAction::Forget;
    }
    let after_backoff = |action| match v.retry_at {
        Some(retry) if retry > now => LeaseAction::Wait(Some(retry.min(end))),
        _ => action,
    };
    match v.role {
        LeaseRole::Current { until } => LeaseAction::Wait(earliest(until, Some(end))),
        LeaseRole::Replaced { in_use: 0 } if v.revoke_unused => after_backoff(LeaseAction::Revoke),
        LeaseRole::Replaced { in_use: 0 } => LeaseAction::Forget,
        LeaseRole::Replaced { .. } if v.renew_in_use && v.renewable && !v.clock.at_max => {
            let at = v.clock.renew_at();
            if at <= now {
                after_backoff(LeaseAction::Renew)
            } else {
                LeaseAction::Wait(Some(at))
            }
        }
        // In use but not renewed: kept until it ends or its last session does.
        LeaseRole::Replaced { .. } => LeaseAction::Wait(Some(end)),
    }
}

/// At most this long before its credential's hard end a session is retired.
pub(crate) const MAX_RETIRE_MARGIN: Duration = Duration::from_secs(300);

/// When a session on a credential fetched at `fetched_at` that ends for good at `end` is
/// retired (at its next transaction boundary): 10 % of the credential's life before the end,
/// at most [`MAX_RETIRE_MARGIN`].
pub(crate) fn retire_at(fetched_at: Instant, end: Instant) -> Instant {
    let life = end.saturating_duration_since(fetched_at);
    end - (life / 10).min(MAX_RETIRE_MARGIN)
}

/// The earlier of two optional deadlines (None: never).
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When a task that found nothing due sleeps until: `next`, but never in the past.
pub(crate) fn wake_at(next: Option<Instant>, now: Instant) -> Option<Instant> {
    next.map(|t| t.max(now + RECHECK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Backoff;
    use crate::credentials::test_support::{creds, held};

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn sessions_are_retired_a_tenth_of_the_credential_life_before_its_end_at_most_five_minutes() {
        let t0 = Instant::now();
        assert_eq!(retire_at(t0, t0 + S(16)), t0 + MS(14_400));
        assert_eq!(retire_at(t0, t0 + S(7200)), t0 + S(6900));
        assert_eq!(retire_at(t0 + S(5), t0), t0, "an end in the past: at once");
    }

    #[test]
    fn dynamic_lease_is_replaced_at_two_thirds_and_before_the_cache_drops_it() {
        let hour = schedule(&creds("database", ""), Some(S(3600)), 1.0);
        assert_eq!(hour.refresh_after, Some(S(2400)));
        assert_eq!(hour.cache_for, Some(S(3598)));
        let jittered = schedule(&creds("database", ""), Some(S(3600)), 0.95);
        assert_eq!(jittered.refresh_after, Some(S(2280)));
        // A 6 s lease with the 2 s margin: 2/3 would be 4 s, when the cache drops it; refresh
        // earlier so that a client never finds the cache empty.
        let short = schedule(&creds("database", ""), Some(S(6)), 1.0);
        assert_eq!(short.cache_for, Some(S(4)));
        assert_eq!(short.refresh_after, Some(MS(3500)));
        let half = schedule(&creds("database", "refresh_fraction = 0.5"), Some(S(600)), 1.0);
        assert_eq!(half.refresh_after, Some(S(300)));
    }

    #[test]
    fn static_role_is_refetched_after_rotation_and_kv_on_its_interval() {
        let st = schedule(&creds("static", ""), Some(S(90)), 0.97);
        assert_eq!(
            st,
            Schedule {
                refresh_after: Some(S(91)),
                cache_for: Some(S(90))
            }
        );
        let kv = schedule(&creds("kv", "refresh_interval = \"30s\""), None, 0.97);
        assert_eq!(
            kv,
            Schedule {
                refresh_after: Some(S(30)),
                cache_for: None
            }
        );
    }

    fn dynamic(valid_for: Duration, token_generation: u64) -> std::sync::Arc<Held> {
        held(schedule(&creds("database", ""), Some(valid_for), 1.0), token_generation)
    }

    #[tokio::test(start_paused = true)]
    async fn a_dynamic_credential_sleeps_until_its_refresh_and_is_due_then() {
        let cur = dynamic(S(6), 1);
        let start = Instant::now();
        let next = next_refresh(CredentialKind::Database, Some(&cur), 1, None, start);
        assert_eq!(next, Next::At(Some(start + MS(3500))));
        tokio::time::advance(MS(3499)).await;
        assert!(matches!(
            next_refresh(CredentialKind::Database, Some(&cur), 1, None, Instant::now()),
            Next::At(_)
        ));
        tokio::time::advance(MS(1)).await;
        assert_eq!(
            next_refresh(CredentialKind::Database, Some(&cur), 1, None, Instant::now()),
            Next::Now("refresh_fraction of the lease passed")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_vault_login_makes_dynamic_credentials_due_but_not_static_or_kv_ones() {
        let now = Instant::now();
        let cur = dynamic(S(3600), 1);
        assert_eq!(
            next_refresh(CredentialKind::Database, Some(&cur), 2, None, now),
            Next::Now("the Vault token that owns its lease was replaced")
        );
        let st = held(schedule(&creds("static", ""), Some(S(90)), 1.0), 1);
        assert_eq!(
            next_refresh(CredentialKind::Static, Some(&st), 2, None, now),
            // Looked at again when the cache drops it at rotation, before the 91 s refresh.
            Next::At(Some(now + S(90)))
        );
        let kv = held(schedule(&creds("kv", ""), None, 1.0), 1);
        assert!(matches!(
            next_refresh(CredentialKind::Kv, Some(&kv), 2, None, now),
            Next::At(Some(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_waits_for_the_backoff_and_only_when_due() {
        let mut backoff = Backoff::default();
        let wait = backoff.failed();
        let now = Instant::now();
        let retry = backoff.next_attempt();
        assert_eq!(retry, Some(now + wait));
        // Nothing cached (warm start with Vault down): the retry waits for the backoff.
        assert_eq!(
            next_refresh(CredentialKind::Database, None, 0, retry, now),
            Next::At(retry)
        );
        tokio::time::advance(wait).await;
        assert_eq!(
            next_refresh(CredentialKind::Database, None, 0, retry, Instant::now()),
            Next::Now("no valid credential is cached")
        );
        // A credential that is not due yet is not held up by an old backoff either.
        let cur = dynamic(S(600), 1);
        let now = Instant::now();
        assert_eq!(
            next_refresh(CredentialKind::Database, Some(&cur), 1, Some(now + S(30)), now),
            Next::At(Some(now + S(400)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_shorter_than_the_margin_is_not_refreshed_in_a_busy_loop() {
        let cur = dynamic(S(1), 1);
        let now = Instant::now();
        assert_eq!(cur.schedule.refresh_after, Some(Duration::ZERO));
        assert_eq!(
            next_refresh(CredentialKind::Database, Some(&cur), 1, None, now),
            Next::At(Some(now))
        );
        // The cache already dropped it (cache_for 0): the task looks again a little later.
        assert_eq!(wake_at(Some(now), now), Some(now + RECHECK));
        assert_eq!(cur.refresh_at(), Some(now + MIN_REFRESH_GAP));
    }

    fn lease(role: LeaseRole, now: Instant) -> LeaseView {
        LeaseView {
            clock: LeaseClock::new(now, S(6)),
            role,
            renewable: true,
            renew_in_use: true,
            revoke_unused: true,
            retry_at: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_current_lease_is_left_alone_until_the_cache_drops_it() {
        let now = Instant::now();
        let v = lease(
            LeaseRole::Current {
                until: Some(now + S(4)),
            },
            now,
        );
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(now + S(4))));
        tokio::time::advance(S(6)).await;
        assert_eq!(next_lease_action(&v, Instant::now()), LeaseAction::Forget);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_lease_in_use_is_renewed_at_two_thirds_until_the_max_ttl() {
        let now = Instant::now();
        let mut v = lease(LeaseRole::Replaced { in_use: 2 }, now);
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(now + S(4))));
        tokio::time::advance(S(4)).await;
        let now = Instant::now();
        assert_eq!(next_lease_action(&v, now), LeaseAction::Renew);
        // A failed renewal waits for its backoff, but never past the lease's end.
        v.retry_at = Some(now + S(10));
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(v.clock.end())));
        v.retry_at = None;
        // Vault granted less than asked: kept, not renewed, until it ends.
        v.clock = LeaseClock {
            at_max: true,
            ..LeaseClock::new(now, S(3))
        };
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(now + S(3))));
        v.renew_in_use = false;
        v.clock.at_max = false;
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(now + S(3))));
        tokio::time::advance(S(3)).await;
        assert_eq!(next_lease_action(&v, Instant::now()), LeaseAction::Forget);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_lease_nobody_uses_is_revoked_after_any_backoff() {
        let now = Instant::now();
        let mut v = lease(LeaseRole::Replaced { in_use: 0 }, now);
        assert_eq!(next_lease_action(&v, now), LeaseAction::Revoke);
        v.retry_at = Some(now + S(2));
        assert_eq!(next_lease_action(&v, now), LeaseAction::Wait(Some(now + S(2))));
        tokio::time::advance(S(2)).await;
        assert_eq!(next_lease_action(&v, Instant::now()), LeaseAction::Revoke);
        v.revoke_unused = false;
        assert_eq!(next_lease_action(&v, Instant::now()), LeaseAction::Forget);
    }
}
