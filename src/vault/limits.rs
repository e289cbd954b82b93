//! Bounds on what Vault may say about time. Every TTL, lease duration and time-to-rotation taken
//! from a Vault answer goes through [`ttl_secs`], so that no later arithmetic on the clock (expiry,
//! 2/3 renewal points, "granted + 1 s < asked") can overflow, whatever a broken or hostile Vault
//! sends (`"lease_duration": 18446744073709551615`). Ten years is far past any real Vault max TTL
//! (its default system max is 32 days), so the clamp never changes a real answer.

use std::time::Duration;

/// The longest TTL dbward believes.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// `secs` seconds, at most [`MAX_TTL`].
pub fn ttl_secs(secs: u64) -> Duration {
    Duration::from_secs(secs.min(MAX_TTL.as_secs()))
}

/// `at + d` on any clock with checked addition; saturates at `at + MAX_TTL` (and, should even that
/// not fit, at `at`) instead of panicking.
pub fn later<I>(at: I, d: Duration) -> I
where
    I: Copy + CheckedAdd,
{
    at.checked_add_duration(d)
        .or_else(|| at.checked_add_duration(MAX_TTL))
        .unwrap_or(at)
}

/// The two clocks dbward uses.
pub trait CheckedAdd: Sized {
    fn checked_add_duration(self, d: Duration) -> Option<Self>;
}

impl CheckedAdd for std::time::Instant {
    fn checked_add_duration(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

impl CheckedAdd for tokio::time::Instant {
    fn checked_add_duration(self, d: Duration) -> Option<Self> {
        self.checked_add(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_ttls_are_clamped_and_sums_do_not_overflow() {
        assert_eq!(ttl_secs(u64::MAX), MAX_TTL);
        assert_eq!(ttl_secs(3600), Duration::from_secs(3600));
        let now = std::time::Instant::now();
        assert_eq!(later(now, Duration::MAX), now + MAX_TTL);
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        let t = tokio::time::Instant::now();
        assert_eq!(later(t, Duration::MAX), t + MAX_TTL);
    }
}
