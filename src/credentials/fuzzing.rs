//! The timing computations the store runs on a freshly read credential, gathered for the
//! `vault_response` fuzz target ([`crate::vault::fuzzing`]): whatever Vault answered, none of
//! them may panic.

use tokio::time::Instant;

use super::schedule::{next_refresh, retire_at, schedule, LeaseClock};
use super::Held;
use crate::config::CredentialsConfig;
use crate::vault::Credential;

/// Schedules `cred` as the store would, then asks every question the lifecycle asks of it.
pub(crate) fn run_timings(cfg: &CredentialsConfig, cred: Credential, token_generation: u64, jitter: f64) {
    let when = schedule(cfg, cred.valid_for, jitter);
    let held = Held::new(cred, token_generation, when);
    let now = Instant::now();
    let _ = held.refresh_at();
    let _ = held.cache_until();
    let _ = next_refresh(cfg.kind(), Some(&held), token_generation + 1, None, now);
    let _ = next_refresh(cfg.kind(), Some(&held), token_generation, Some(now), now);
    if let Some(lease) = &held.cred.lease {
        let clock = LeaseClock::new(held.fetched_at(), lease.duration);
        let end = clock.end();
        assert!(end >= held.fetched_at());
        assert!(clock.renew_at() <= end);
        assert!(retire_at(held.fetched_at(), end) <= end);
        held.limit(end, super::EndBy::LeaseMaxTtl);
    }
}
