//! Vault's rate limit as this instance knows it. A 429 (a `sys/quotas/rate-limit` quota) holds
//! back every request of the instance, not only the one that got it, for as long as Vault says
//! (`Retry-After`, else `X-Ratelimit-Reset`, capped at [`MAX_HOLD`]): asking again before then
//! only earns another 429 and keeps the quota exhausted for the rest of the fleet. Requests made
//! meanwhile fail at once with [`super::VaultError::RateLimited`], which tells the caller when
//! to retry; background loops add full jitter to that (see `Backoff::rate_limited`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;

/// The longest dbward holds back for one 429, whatever Vault asks.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(60);
/// The hold when a 429 carries no header (`enable_rate_limit_response_headers` is off).
pub(crate) const DEFAULT_HOLD: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(crate) struct RateLimit {
    until: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// How long requests are still held back, if they are.
    pub(crate) fn held(&self, now: Instant) -> Option<Duration> {
        let until = (*self.until.lock().unwrap())?;
        (until > now).then(|| until - now)
    }

    /// Records a 429; returns how long requests are held back from now.
    pub(crate) fn limited(&self, headers: &HeaderMap, now: Instant, wall: SystemTime) -> Duration {
        let hold = retry_after(headers, wall).unwrap_or(DEFAULT_HOLD).min(MAX_HOLD);
        let mut until = self.until.lock().unwrap();
        let new = now + hold;
        if until.is_none_or(|u| u < new) {
            *until = Some(new);
        }
        until.map_or(hold, |u| u - now)
    }
}

/// What the answer says about when to come back: `Retry-After` (seconds or an HTTP date), else
/// `X-Ratelimit-Reset` (seconds, a Unix time, or an HTTP date).
fn retry_after(headers: &HeaderMap, wall: SystemTime) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    header("retry-after")
        .and_then(|v| parse(v, wall))
        .or_else(|| header("x-ratelimit-reset").and_then(|v| parse(v, wall)))
}

fn parse(v: &str, wall: SystemTime) -> Option<Duration> {
    if let Ok(n) = v.parse::<u64>() {
        // A number this large is a point in time, not a wait.
        let unix_now = wall.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        return Some(if n > 1_000_000_000 {
            Duration::from_secs(n.saturating_sub(unix_now))
        } else {
            Duration::from_secs(n)
        });
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(wall).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_hold_follows_the_headers_capped_at_a_minute() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        assert_eq!(retry_after(&headers(&[("retry-after", "7")]), wall), Some(s(7)));
        assert_eq!(retry_after(&headers(&[("x-ratelimit-reset", "3")]), wall), Some(s(3)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2"), ("x-ratelimit-reset", "9")]), wall),
            Some(s(2))
        );
        let date = httpdate::fmt_http_date(wall + s(5));
        assert_eq!(retry_after(&headers(&[("retry-after", &date)]), wall), Some(s(5)));
        assert_eq!(
            retry_after(&headers(&[("x-ratelimit-reset", "1800000004")]), wall),
            Some(s(4))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), wall), None);

        let r = RateLimit::default();
        let now = Instant::now();
        assert_eq!(r.held(now), None);
        assert_eq!(r.limited(&headers(&[("retry-after", "3600")]), now, wall), MAX_HOLD);
        assert_eq!(r.held(now), Some(MAX_HOLD));
        // A shorter hold does not shorten the one already running.
        assert_eq!(r.limited(&HeaderMap::new(), now, wall), MAX_HOLD);
        assert_eq!(r.held(now + MAX_HOLD), None);
    }
}
