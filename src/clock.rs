//! Wall-clock helpers shared by the modules that publish absolute times (Prometheus timestamps).
//! Deadlines inside the process use monotonic `Instant`s; only what leaves the process as a
//! date goes through here.

use std::time::SystemTime;

/// Seconds since the Unix epoch, as Prometheus timestamps are written; 0 if the clock is before
/// 1970.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
