//! The relay thread's scheduling policy while a session streams in bulk (COPY, large results).
//!
//! Between two reads the relay sleeps, and every send of the backend wakes it. On Linux's
//! normal policy a thread that wakes from a short sleep preempts the one running where it
//! lands, so while a COPY streams dbward keeps cutting into the backend producing the rows and
//! into the client consuming them: with three busy processes on two cores, psql was
//! preempted 900-1,500 times per 400 MB COPY through dbward against 50-90 through PgBouncer
//! (`benches/README.md`). While at least one session streams, the runtime thread runs as
//! `SCHED_BATCH`: same share of the CPU and same niceness, but no preemption on wake-up, so
//! the three run in longer stretches. A stream is a relay buffer grown to its maximum (eight
//! full reads in a row, about 255 KiB); it ends when the server is idle again or a read comes
//! back short. No single transaction's latency is at stake then: the session is moving bytes
//! as fast as both ends allow, and between streams the thread is back on the normal policy.
//!
//! Only on a current-thread runtime (dbward's default, `proxy.worker_threads = 1`), where every
//! session runs on the one thread whose policy changes; on a multi-thread runtime a session
//! moves between workers and the change could stay with a thread it left, so it is not made.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The sessions streaming on the runtime thread, shared by all of them.
#[derive(Debug)]
pub(crate) struct Streaming {
    /// Off on a multi-thread runtime, and after the kernel refused a change.
    enabled: AtomicBool,
    streams: AtomicUsize,
}

impl Streaming {
    /// For the runtime the caller runs on.
    pub(crate) fn for_current_runtime() -> Arc<Self> {
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        Arc::new(Streaming {
            enabled: AtomicBool::new(current_thread && cfg!(target_os = "linux")),
            streams: AtomicUsize::new(0),
        })
    }

    /// True while the runtime thread runs as `SCHED_BATCH` for a stream.
    #[cfg(test)]
    fn batch(&self) -> bool {
        self.enabled.load(Ordering::Relaxed) && self.streams.load(Ordering::Relaxed) > 0
    }

    fn set_policy(&self, batch: bool) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = set_thread_policy(batch) {
            // A sandbox that forbids sched_setscheduler (a seccomp profile): stay as is.
            tracing::debug!(error = %e, "relay: cannot change the thread's scheduling policy; streams run on the normal one");
            self.enabled.store(false, Ordering::Relaxed);
        }
    }
}

/// One direction of one session: whether it is streaming, counted in [`Streaming`]. Leaves
/// the stream when dropped, so that a session ending mid-COPY does not keep the thread batch.
pub(crate) struct Stream {
    shared: Arc<Streaming>,
    on: bool,
}

impl Stream {
    pub(crate) fn new(shared: Arc<Streaming>) -> Self {
        Stream { shared, on: false }
    }

    /// After a read, with the buffer's new size: a buffer at its maximum starts a stream; the
    /// minimum (a short read) or an idle server ends it; in between nothing changes.
    pub(crate) fn update(&mut self, size: usize, max: usize, min: usize, idle: bool) {
        if idle || size <= min {
            self.set(false);
        } else if size >= max {
            self.set(true);
        }
    }

    fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        self.on = on;
        let s = &self.shared;
        if on {
            if s.streams.fetch_add(1, Ordering::Relaxed) == 0 {
                s.set_policy(true);
            }
        } else if s.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            s.set_policy(false);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Sets the calling thread's policy. sched_setscheduler with pid 0 changes only the calling
/// thread on Linux; the niceness is left as it is (a unit's `Nice=` stays in force).
#[cfg(target_os = "linux")]
fn set_thread_policy(batch: bool) -> std::io::Result<()> {
    let policy = if batch { libc::SCHED_BATCH } else { libc::SCHED_OTHER };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; the call reads it only.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn set_thread_policy(_batch: bool) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy as the kernel reports it.
    fn policy() -> libc::c_int {
        // SAFETY: no arguments besides the pid; returns the policy or -1.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[tokio::test]
    async fn the_thread_is_batch_exactly_while_a_session_streams() {
        const MIN: usize = 1024;
        const MAX: usize = 256 * 1024;
        let shared = Streaming::for_current_runtime();
        let mut a = Stream::new(shared.clone());
        let mut b = Stream::new(shared.clone());
        assert_eq!(policy(), libc::SCHED_OTHER);

        a.update(64 * 1024, MAX, MIN, false);
        assert_eq!(
            policy(),
            libc::SCHED_OTHER,
            "a buffer still growing is not a stream yet"
        );
        a.update(MAX, MAX, MIN, false);
        assert!(shared.batch());
        assert_eq!(policy(), libc::SCHED_BATCH, "a buffer at its maximum starts a stream");
        b.update(MAX, MAX, MIN, false);
        a.update(MAX, MAX, MIN, true);
        assert_eq!(policy(), libc::SCHED_BATCH, "a's server is idle, b still streams");
        a.update(MAX, MAX, MIN, false);
        drop(b);
        assert_eq!(policy(), libc::SCHED_BATCH, "b ended mid-stream, a streams again");
        a.update(128 * 1024, MAX, MIN, false);
        assert_eq!(
            policy(),
            libc::SCHED_BATCH,
            "a read that neither fills nor shrinks changes nothing"
        );
        a.update(MIN, MAX, MIN, false);
        assert_eq!(policy(), libc::SCHED_OTHER, "the last stream ended with a short read");
        a.update(MAX, MAX, MIN, false);
        assert_eq!(policy(), libc::SCHED_BATCH);
        drop(a);
        assert_eq!(
            policy(),
            libc::SCHED_OTHER,
            "a session dropped mid-stream ends its stream"
        );
        assert!(!shared.batch());
    }

    #[test]
    fn a_multi_thread_runtime_is_left_alone() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let shared = rt.block_on(async { Streaming::for_current_runtime() });
        let mut s = Stream::new(shared.clone());
        s.update(256 * 1024, 256 * 1024, 1024, false);
        assert!(!shared.batch());
        assert_eq!(policy(), libc::SCHED_OTHER);
    }
}
