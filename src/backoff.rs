//! Exponential backoff with jitter for background Vault work: 1 s after the first failure,
//! doubling up to 5 minutes, each wait drawn between half and all of the step so that many
//! dbward instances recovering together do not hit Vault in step.

use std::time::Duration;

// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use rand::Rng;

pub(crate) const MIN: Duration = Duration::from_secs(1);
pub(crate) const MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    /// Whether the next attempt may happen now.
    pub(crate) fn ready(&self) -> bool {
        self.next.is_none_or(|n| Instant::now() >= n)
    }

    /// When the next attempt may happen (None: now). Background tasks sleep until then rather
    /// than asking `ready` on a tick.
    pub(crate) fn next_attempt(&self) -> Option<Instant> {
        self.next
    }

    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure; returns how long until the next attempt.
    pub(crate) fn failed(&mut self) -> Duration {
        let step = step(self.failures);
        self.failures = self.failures.saturating_add(1);
        let wait = step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        self.next = Some(Instant::now() + wait);
        wait
    }

    /// Records a failure because Vault's rate limit holds requests back for `hold`: the next
    /// attempt comes after the hold plus full jitter (anywhere in the backoff step), so that
    /// instances held back together do not all come back at the same instant.
    pub(crate) fn rate_limited(&mut self, hold: Duration) -> Duration {
        let step = step(self.failures);
        self.failures = self.failures.saturating_add(1);
        let wait = hold + step.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
        self.next = Some(Instant::now() + wait);
        wait
    }

    /// Records a failure, as [`Backoff::failed`] or, for a rate limit, [`Backoff::rate_limited`].
    pub(crate) fn failed_with(&mut self, e: &crate::vault::VaultError) -> Duration {
        match e.rate_limited_for() {
            Some(hold) => self.rate_limited(hold),
            None => self.failed(),
        }
    }

    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.next = None;
    }
}

/// The un-jittered wait after `failures` earlier failures.
pub(crate) fn step(failures: u32) -> Duration {
    MIN.saturating_mul(1u32 << failures.min(16)).min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_to_five_minutes() {
        assert_eq!(step(0), Duration::from_secs(1));
        assert_eq!(step(1), Duration::from_secs(2));
        assert_eq!(step(8), Duration::from_secs(256));
        assert_eq!(step(9), MAX);
        assert_eq!(step(40), MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_attempt_is_allowed_once_the_wait_has_passed() {
        let mut b = Backoff::default();
        b.failed();
        b.failed();
        let wait = b.failed();
        assert!(wait >= step(2) / 2 && wait <= step(2), "{wait:?}");
        tokio::time::advance(wait - Duration::from_millis(10)).await;
        assert!(!b.ready(), "ready before the wait is over");
        assert_eq!(b.next_attempt(), Some(Instant::now() + Duration::from_millis(10)));
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(b.ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_waits_out_the_hold_plus_jitter() {
        let mut b = Backoff::default();
        let hold = Duration::from_secs(3);
        for n in 0..5 {
            let w = b.rate_limited(hold);
            assert!(w >= hold && w <= hold + step(n), "{w:?} for failure {n}");
        }
    }

    #[test]
    fn waits_are_jittered_within_the_step_and_reset_on_success() {
        let mut b = Backoff::default();
        assert!(b.ready());
        for n in 0..12 {
            let w = b.failed();
            assert!(w >= step(n) / 2 && w <= step(n), "{w:?} for failure {n}");
            assert!(!b.ready());
        }
        b.succeeded();
        assert!(b.ready());
        assert_eq!(b.failures(), 0);
    }
}
