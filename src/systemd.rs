//! systemd integration, inert outside systemd: the `sd_notify` protocol (`READY=1` once the
//! listeners are bound, `STOPPING=1` when draining starts, `RELOADING=1`, `WATCHDOG=1` pings when
//! the unit sets `WatchdogSec=`) and socket activation (`LISTEN_FDS`), so that listening sockets
//! belong to systemd and survive restarts: clients that connect meanwhile wait in the backlog
//! instead of being refused.
//!
//! Implemented here rather than with libsystemd: the protocols are a datagram and a few
//! environment variables, and dbward must not need a C library to run outside systemd.
//! Nothing here removes environment variables: that is unsound while other threads may read
//! the environment, and dbward starts no child processes that could inherit them.

use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::ListenAddr;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (newline-separated `KEY=value` assignments) to the service manager. Returns
/// whether it was sent: false when not started by systemd with `Type=notify` (no
/// `NOTIFY_SOCKET`), or when sending failed (logged: a lost `READY=1` makes the start time out,
/// and the operator should see why).
pub fn notify(state: &str) -> bool {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    match notify_to(&socket, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = %socket.to_string_lossy(), error = %e, state, "cannot notify systemd");
            false
        }
    }
}

/// Sends one notification datagram to `socket`: a path, or `@name` for the abstract namespace.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    // systemd reads its notify socket promptly; the timeout only guards against a manager that
    // does not, so that a watchdog ping can never stall a runtime thread for long.
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        Some(b'/') => {
            sock.send_to(state.as_bytes(), Path::new(socket))?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "NOTIFY_SOCKET is neither a path nor an abstract socket (@name)",
            ))
        }
    }
    Ok(())
}

/// `READY=1`: every listener is bound (or adopted). systemd starts units ordered after dbward
/// only now, and `systemctl start` returns. `status` shows in `systemctl status`.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={status}"))
}

/// `STOPPING=1`: draining has begun. The stop timeout is extended to cover `grace` plus time
/// for closing and revoking leases, so a `shutdown_grace` longer than `TimeoutStopSec=` is
/// honoured instead of ending in SIGKILL.
pub fn stopping(grace: Duration) -> bool {
    let extend = grace + Duration::from_secs(15);
    notify(&format!(
        "STOPPING=1\nSTATUS=draining open sessions (up to {}s)\nEXTEND_TIMEOUT_USEC={}",
        grace.as_secs(),
        extend.as_micros()
    ))
}

/// `RELOADING=1`: a reload (SIGHUP) has begun; send [`ready`] again when it is done, whether it
/// succeeded or the old configuration stays.
pub fn reloading() -> bool {
    notify("RELOADING=1\nSTATUS=reloading the configuration")
}

/// How often systemd expects `WATCHDOG=1`, when the unit sets `WatchdogSec=` for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] from the variables' values; `me` is this process's id.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    // WATCHDOG_PID names the process meant; absent means this one (older systemd versions).
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval for as long as the process runs (through the
/// shutdown drain too: a drain of `shutdown_grace` must not look like a hang). Returns at once
/// without `WatchdogSec=`. Spawn it on the runtime: a ping proves that the runtime still
/// schedules tasks, which is what a wedged dbward would stop doing.
pub async fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::info!(?interval, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(interval / 2);
    // A late tick (a long stall) should ping once now, not burst to catch up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify("WATCHDOG=1");
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
    name: Option<String>,
    local: Local,
}

/// A listening socket systemd passed.
#[derive(Debug)]
pub enum Activated {
    Tcp(std::net::TcpListener),
    /// The path is systemd's socket file: it must not be removed when dbward exits, or the
    /// socket unit would keep listening on a socket nobody can reach.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// The sockets systemd passed (socket activation), to be adopted by listen address. Empty when
/// not socket-activated.
#[derive(Default)]
pub struct ActivatedSockets {
    sockets: Vec<Passed>,
}

/// The passed descriptors are owned once: a second owner would close them under the first.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Parses `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`: the names of the passed sockets
/// (None where unnamed), or an empty list when they are not meant for process `me`.
pub fn listen_fds_from(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Vec<Option<String>>, String> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    // An inherited LISTEN_FDS (a shell started from a socket-activated service) is not ours.
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(Vec::new());
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
    if n > 1024 {
        return Err(format!("LISTEN_FDS={n} is implausibly large"));
    }
    let names: Vec<Option<String>> = match names {
        Some(list) if !list.is_empty() => list
            .split(':')
            .map(|s| Some(s.to_string()).filter(|s| !s.is_empty()))
            .collect(),
        _ => Vec::new(),
    };
    Ok((0..n).map(|i| names.get(i).cloned().flatten()).collect())
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
    pub fn none() -> Self {
        Self::default()
    }

    /// Takes ownership of the sockets systemd passed to this process. Call once, before
    /// binding anything; later calls return no sockets. Problems are logged, not fatal: dbward
    /// then binds its listeners itself.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let names = match listen_fds_from(
            var("LISTEN_PID").as_deref(),
            var("LISTEN_FDS").as_deref(),
            var("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        ) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring socket activation variables");
                return Self::none();
            }
        };
        if names.is_empty() || TAKEN.swap(true, Ordering::SeqCst) {
            return Self::none();
        }
        let mut sockets = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            // SAFETY: the socket activation protocol hands descriptors 3..3+LISTEN_FDS to the
            // process named by LISTEN_PID (checked above), and TAKEN makes this the only owner.
            let passed = unsafe { OwnedFd::from_raw_fd(raw) };
            // systemd passes them without close-on-exec; the duplicate std makes has it set.
            let fd = match passed.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(fd = raw, error = %e, "cannot use a socket passed by systemd");
                    continue;
                }
            };
            drop(passed);
            let local = describe(&fd);
            tracing::debug!(fd = raw, ?name, ?local, "socket passed by systemd");
            sockets.push(Passed { fd, name, local });
        }
        ActivatedSockets { sockets }
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    fn take_where(&mut self, want: impl Fn(&Local) -> bool) -> Option<OwnedFd> {
        let i = self.sockets.iter().position(|p| want(&p.local))?;
        Some(self.sockets.remove(i).fd)
    }

    /// The passed TCP listener bound to exactly `addr`, made non-blocking for tokio.
    pub fn take_tcp(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.take_where(|l| *l == Local::Tcp(addr))?;
        let l = std::net::TcpListener::from(fd);
        if let Err(e) = l.set_nonblocking(true) {
            tracing::warn!(listen = %addr, error = %e, "cannot use the socket systemd passed; binding anew");
            return None;
        }
        Some(l)
    }

    /// The passed Unix listener at `path`, made non-blocking for tokio.
    pub fn take_unix(&mut self, path: &Path) -> Option<(std::os::unix::net::UnixListener, PathBuf)> {
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
    pub fn take(&mut self, addr: &ListenAddr) -> Option<Activated> {
        match addr {
            ListenAddr::Tcp(a) => self.take_tcp(*a).map(Activated::Tcp),
            ListenAddr::Unix(p) => self.take_unix(p).map(|(l, p)| Activated::Unix(l, p)),
        }
    }

    /// Closes the sockets no listen address claimed, with a warning naming them: usually a
    /// `ListenStream=` that differs from the config's `listen` (`6432` binds `[::]:6432`, not
    /// `127.0.0.1:6432`).
    pub fn close_unused(self) {
        for p in self.sockets {
            let what = match &p.local {
                Local::Tcp(a) => a.to_string(),
                Local::Unix(path) => path.display().to_string(),
                Local::Other(why) => why.clone(),
            };
            tracing::warn!(
                socket = %what,
                name = p.name.as_deref().unwrap_or("-"),
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
    fn listen_fds_are_ours_only_when_the_pid_matches() {
        assert_eq!(listen_fds_from(None, None, None, 42), Ok(vec![]));
        assert_eq!(listen_fds_from(Some("41"), Some("2"), None, 42), Ok(vec![]));
        assert_eq!(listen_fds_from(Some("42"), None, None, 42), Ok(vec![]));
        assert_eq!(listen_fds_from(Some("42"), Some("2"), None, 42), Ok(vec![None, None]));
        assert_eq!(
            listen_fds_from(Some("42"), Some("3"), Some("pg:admin"), 42),
            Ok(vec![Some("pg".into()), Some("admin".into()), None])
        );
        assert!(listen_fds_from(Some("42"), Some("x"), None, 42).is_err());
        assert!(listen_fds_from(Some("42"), Some("100000"), None, 42).is_err());
    }

    #[test]
    fn watchdog_interval_needs_our_pid_and_a_positive_value() {
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), Some("7"), 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        let name = format!("dbward-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        assert!(notify_to(OsStr::new("vsock:2:1"), "READY=1").is_err());
    }

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
                    name: None,
                })
                .collect(),
        };
        assert_eq!(sockets.len(), 3);
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
        assert_eq!(sockets.len(), 1);
        sockets.close_unused();
    }
}
