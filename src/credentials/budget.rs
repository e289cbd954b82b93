//! Limits on how fast one database entry makes new credentials, whatever asks for them: every
//! new dynamic credential is a Postgres role, and a crash loop, a retry loop or a hostile server
//! that turns each connection into a new role fills `pg_authid` and Vault's lease store.
//!
//! - the minting budget: at most `credentials.mint_budget` new dynamic credentials per lease
//!   period (the lease duration of the newest one). Beyond it the newest credential that is
//!   still valid is used again, logged once and counted in
//!   `dbward_credential_budget_exhausted_total`; when none is valid, a new one is made anyway,
//!   since the budget must never fail a client that Vault would serve;
//! - the replacement gap: a failure (28P01 from the server, say) drops a credential at most
//!   once per entry per [`REPLACEMENT_GAP`]; further failures within it keep the credential
//!   that replaced it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most one credential dropped for a failure per entry within this.
pub(crate) const REPLACEMENT_GAP: Duration = Duration::from_secs(10);

#[derive(Default)]
pub(crate) struct Budget {
    /// When the entry's recent new credentials were made (oldest first; at most the budget).
    minted: Mutex<VecDeque<Instant>>,
    /// When a failure last dropped the entry's credential.
    last_dropped: Mutex<Option<Instant>>,
    /// The exhausted budget has been logged (once per entry).
    warned: AtomicBool,
}

impl Budget {
    /// Whether a new credential may be made now: fewer than `limit` were made within `period`.
    pub(crate) fn may_mint(&self, now: Instant, limit: u32, period: Duration) -> bool {
        let minted = self.minted.lock().unwrap();
        let recent = minted
            .iter()
            .filter(|&&at| now.saturating_duration_since(at) < period)
            .count();
        recent < limit as usize
    }

    /// A new credential was made at `now`.
    pub(crate) fn minted(&self, now: Instant, limit: u32) {
        let mut minted = self.minted.lock().unwrap();
        minted.push_back(now);
        while minted.len() > limit as usize {
            minted.pop_front();
        }
    }

    /// True the first time the budget runs out (it is logged then, not on every refusal).
    pub(crate) fn first_exhaustion(&self) -> bool {
        !self.warned.swap(true, Ordering::SeqCst)
    }

    /// Whether a failure may drop the entry's credential now; if so, that is recorded.
    pub(crate) fn may_drop_after_failure(&self, now: Instant) -> bool {
        let mut last = self.last_dropped.lock().unwrap();
        if last.is_some_and(|at| now.saturating_duration_since(at) < REPLACEMENT_GAP) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn at_most_the_budget_per_lease_period_then_room_again() {
        let b = Budget::default();
        let period = S(30);
        for _ in 0..3 {
            assert!(b.may_mint(Instant::now(), 3, period));
            b.minted(Instant::now(), 3);
            tokio::time::advance(S(5)).await;
        }
        assert!(!b.may_mint(Instant::now(), 3, period), "a fourth within the period");
        // The first one leaves the window 30 s after it was made.
        tokio::time::advance(S(15)).await;
        assert!(b.may_mint(Instant::now(), 3, period));
        b.minted(Instant::now(), 3);
        assert!(!b.may_mint(Instant::now(), 3, period));
        assert!(b.first_exhaustion());
        assert!(!b.first_exhaustion(), "logged once");
    }

    #[tokio::test(start_paused = true)]
    async fn one_drop_per_gap_whatever_the_cause() {
        let b = Budget::default();
        assert!(b.may_drop_after_failure(Instant::now()));
        tokio::time::advance(S(9)).await;
        assert!(!b.may_drop_after_failure(Instant::now()));
        assert!(!b.may_drop_after_failure(Instant::now()));
        tokio::time::advance(S(1)).await;
        assert!(b.may_drop_after_failure(Instant::now()));
    }
}
