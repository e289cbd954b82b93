//! systemd integration, inert outside systemd: the `sd_notify` protocol (`READY=1` once the
//! listeners are bound, `STOPPING=1` when draining starts, `RELOADING=1`, `WATCHDOG=1` pings when
//! the unit sets `WatchdogSec=`) and socket activation (`LISTEN_FDS`), so that listening sockets
//! belong to systemd and survive restarts: clients that connect meanwhile wait in the backlog
//! instead of being refused.
//!
//! The protocols are the `sd-notify` crate's (pure Rust: dbward must not need libsystemd to run
//! outside systemd); this module decides what to send when, and matches the passed sockets to
//! listen addresses. Nothing here removes environment variables: that is unsound while other
//! threads may read the environment, and dbward starts no child processes that could inherit
//! them. So the passed descriptors are never owned here either (a second reader of the same
//! variables would own them too): `ActivatedSockets::from_env` duplicates them, and the
//! duplicates are what dbward adopts and closes.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::config::ListenAddr;

/// Sends `state` to the service manager. Returns whether it was sent: false when not started by
/// systemd with `Type=notify` (no `NOTIFY_SOCKET`), or when sending failed (logged: a lost
/// `READY=1` makes the start time out, and the operator should see why).
fn notify(state: &[NotifyState<'_>]) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match sd_notify::notify(state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = %socket.to_string_lossy(), error = %e, ?state, "cannot notify systemd");
            false
        }
    }
}

/// `READY=1`: every listener is bound (or adopted). systemd starts units ordered after dbward
/// only now, and `systemctl start` returns. `status` shows in `systemctl status`.
pub fn ready(status: &str) -> bool {
    notify(&[NotifyState::Ready, NotifyState::Status(status)])
}

/// `STOPPING=1`: draining has begun. The stop timeout is extended to cover `grace` plus time
/// for closing and revoking leases, so a `shutdown_grace` longer than `TimeoutStopSec=` is
/// honoured instead of ending in SIGKILL.
pub(crate) fn stopping(grace: Duration) -> bool {
    let extend = grace + Duration::from_secs(15);
    let status = format!("draining open sessions (up to {}s)", grace.as_secs());
    // NotifyState::ExtendTimeoutUsec holds a u32 (71 minutes); shutdown_grace may be longer.
    let extend = format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros());
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status(&status),
        NotifyState::Custom(&extend),
    ])
}

/// `RELOADING=1`: a reload (SIGHUP) has begun; send [`ready`] again when it is done, whether it
/// succeeded or the old configuration stays. `MONOTONIC_USEC` goes with it, as systemd 253+
/// asks of `RELOADING=1`.
pub fn reloading() -> bool {
    let status = NotifyState::Status("reloading the configuration");
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, status]),
        Err(_) => notify(&[NotifyState::Reloading, status]),
    }
}

/// How often systemd expects `WATCHDOG=1`, when the unit sets `WatchdogSec=` for this process
/// (`WATCHDOG_PID`, when set, names this process).
fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings the watchdog at half its interval for as long as the process runs (through the
/// shutdown drain too: a drain of `shutdown_grace` must not look like a hang). Returns at once
/// without `WatchdogSec=`. Spawn it on the runtime: a ping proves that the runtime still
/// schedules tasks, which is what a wedged dbward would stop doing.
pub(crate) async fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::info!(?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(interval / 2);
    // A late tick (a long stall) should ping once now, not burst to catch up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// Where a passed socket listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Local {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// Not a listening stream socket dbward can use (a datagram socket, abstract name...).
    Other(String),
}

struct Passed {
    fd: OwnedFd,
    /// `FileDescriptorName=` (systemd's default: the socket unit's name, or "unknown").
    name: String,
    local: Local,
}

/// A listening socket systemd passed.
#[derive(Debug)]
pub(crate) enum Activated {
    Tcp(std::net::TcpListener),
    /// The path is systemd's socket file: it must not be removed when dbward exits, or the
    /// socket unit would keep listening on a socket nobody can reach.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// The sockets systemd passed (socket activation), to be adopted by listen address. Empty when
/// not socket-activated.
#[derive(Default)]
pub(crate) struct ActivatedSockets {
    sockets: Vec<Passed>,
}

fn describe(fd: &OwnedFd) -> Local {
    let sock = match fd.try_clone() {
        Ok(dup) => socket2::Socket::from(dup),
        Err(e) => return Local::Other(format!("unusable descriptor ({e})")),
    };
    match sock.r#type() {
        Ok(t) if t == socket2::Type::STREAM => {}
        Ok(_) => return Local::Other("not a stream socket".into()),
        Err(e) => return Local::Other(format!("not a socket ({e})")),
    }
    match sock.local_addr() {
        Ok(a) => match (a.as_socket(), a.as_pathname()) {
            (Some(inet), _) => Local::Tcp(inet),
            (None, Some(path)) => Local::Unix(path.to_path_buf()),
            _ => Local::Other("an unnamed or abstract Unix socket".into()),
        },
        Err(e) => Local::Other(format!("getsockname failed ({e})")),
    }
}

impl ActivatedSockets {
    /// No sockets (not socket-activated, or for tests).
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// The sockets systemd passed to this process (`LISTEN_PID`, `LISTEN_FDS`,
    /// `LISTEN_FDNAMES`), as duplicates this value owns; call before binding anything.
    /// Problems are logged, not fatal: dbward then binds its listeners itself.
    ///
    /// The passed descriptors themselves stay open and unowned (sd-notify marks them
    /// close-on-exec): the variables stay set, so owning the descriptors here would let a second
    /// call own and close them too. Keeping them open changes nothing a client sees: systemd
    /// holds its own copy of every socket it passes.
    pub(crate) fn from_env() -> Self {
        let passed = match sd_notify::listen_fds_with_names() {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring socket activation variables");
                return Self::none();
            }
        };
        let mut sockets = Vec::new();
        for (raw, name) in passed {
            // SAFETY: the socket activation protocol hands descriptors 3..3+LISTEN_FDS to the
            // process LISTEN_PID names (sd-notify checked it is this one), open for its
            // lifetime; nothing in dbward owns or closes them, so they stay open while borrowed.
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            // The duplicate std makes is close-on-exec, like the original now.
            let fd = match borrowed.try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(fd = raw, error = %e, "cannot use a socket passed by systemd");
                    continue;
                }
            };
            let local = describe(&fd);
            tracing::debug!(fd = raw, name, ?local, "socket passed by systemd");
            sockets.push(Passed { fd, name, local });
        }
        ActivatedSockets { sockets }
    }

    fn take_where(&mut self, want: impl Fn(&Local) -> bool) -> Option<OwnedFd> {
        let i = self.sockets.iter().position(|p| want(&p.local))?;
        Some(self.sockets.remove(i).fd)
    }

    /// The passed TCP listener bound to exactly `addr`, made non-blocking for tokio.
    pub(crate) fn take_tcp(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.take_where(|l| *l == Local::Tcp(addr))?;
        let l = std::net::TcpListener::from(fd);
        if let Err(e) = l.set_nonblocking(true) {
            tracing::warn!(listen = %addr, error = %e, "cannot use the socket systemd passed; binding anew");
            return None;
        }
        Some(l)
    }

    /// The passed Unix listener at `path`, made non-blocking for tokio.
    fn take_unix(&mut self, path: &Path) -> Option<(std::os::unix::net::UnixListener, PathBuf)> {
        let same = |p: &Path| {
            p == path || matches!((std::fs::canonicalize(p), std::fs::canonicalize(path)), (Ok(a), Ok(b)) if a == b)
        };
        let fd = self.take_where(|l| matches!(l, Local::Unix(p) if same(p)))?;
        let l = std::os::unix::net::UnixListener::from(fd);
        if let Err(e) = l.set_nonblocking(true) {
            tracing::warn!(listen = %path.display(), error = %e, "cannot use the socket systemd passed; binding anew");
            return None;
        }
        Some((l, path.to_path_buf()))
    }

    /// The passed socket for a database listen address, if systemd passed one.
    pub(crate) fn take(&mut self, addr: &ListenAddr) -> Option<Activated> {
        match addr {
            ListenAddr::Tcp(a) => self.take_tcp(*a).map(Activated::Tcp),
            ListenAddr::Unix(p) => self.take_unix(p).map(|(l, p)| Activated::Unix(l, p)),
        }
    }

    /// Closes the sockets no listen address claimed, with a warning naming them: usually a
    /// `ListenStream=` that differs from the config's `listen` (`6432` binds `[::]:6432`, not
    /// `127.0.0.1:6432`).
    pub(crate) fn close_unused(self) {
        for p in self.sockets {
            let what = match &p.local {
                Local::Tcp(a) => a.to_string(),
                Local::Unix(path) => path.display().to_string(),
                Local::Other(why) => why.clone(),
            };
            tracing::warn!(
                socket = %what,
                name = p.name,
                "systemd passed a socket that no listen address in the config matches; closing it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn passed_sockets_are_matched_by_address() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.6432");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let own = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
        let mut sockets = ActivatedSockets {
            sockets: [own(tcp.as_fd()), own(unix.as_fd()), own(udp.as_fd())]
                .into_iter()
                .map(|fd| Passed {
                    local: describe(&fd),
                    fd,
                    name: "unknown".into(),
                })
                .collect(),
        };
        assert_eq!(sockets.sockets.len(), 3);
        assert!(matches!(&sockets.sockets[2].local, Local::Other(_)));

        let other_port = SocketAddr::from(([127, 0, 0, 1], tcp_addr.port().wrapping_add(1)));
        assert!(sockets.take(&ListenAddr::Tcp(other_port)).is_none());
        match sockets.take(&ListenAddr::Tcp(tcp_addr)) {
            Some(Activated::Tcp(l)) => assert_eq!(l.local_addr().unwrap(), tcp_addr),
            other => panic!("{other:?}"),
        }
        match sockets.take(&ListenAddr::Unix(path.clone())) {
            Some(Activated::Unix(_, p)) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert_eq!(sockets.sockets.len(), 1);
        sockets.close_unused();
    }
}
