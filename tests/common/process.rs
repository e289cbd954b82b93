//! Child processes and waiting: the keeper thread that forks every child (so that
//! `PR_SET_PDEATHSIG` holds), the `atexit` clean-up, stopping and reaping, the one
//! start-and-retry loop every server goes through ([`start_server`], [`wait_ready`]), and
//! polling a condition with a deadline ([`wait_until`]).
//!
//! Process hygiene: statics are never dropped, so the servers are stopped by an `atexit` handler
//! and, should the binary die without running it (abort, SIGKILL), by `PR_SET_PDEATHSIG`. The
//! death signal is tied to the *thread* that forked the child, so every child is spawned from a
//! dedicated keeper thread that lives as long as the process.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use super::{log_tail, random_hex, READY_TIMEOUT};

type Job = Box<dyn FnOnce() + Send>;

/// The thread that forks every child. It must outlive all of them: Linux delivers
/// PR_SET_PDEATHSIG when the forking *thread* exits, and test threads come and go.
pub(super) fn keeper() -> &'static Mutex<mpsc::Sender<Job>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("harness-keeper".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
                // The sender lives in a static and is never dropped; should that ever change,
                // exiting here would SIGKILL every child, so stay.
                loop {
                    thread::park();
                }
            })
            .expect("spawn the harness keeper thread");
        // SAFETY: registering a plain `extern "C" fn` with no captured state.
        unsafe { libc::atexit(cleanup_at_exit) };
        Mutex::new(tx)
    })
}

/// Spawns `cmd` from the keeper thread, with SIGKILL as its parent-death signal, and registers
/// it for the atexit clean-up, which sends `stop_signal` first.
pub(super) fn spawn_supervised(mut cmd: Command, stop_signal: i32) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: prctl/getppid/_exit are async-signal-safe. pre_exec closures run after the
    // uid/gid switch, which matters: a credential change clears PDEATHSIG.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then no signal will come.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    lock(keeper())
        .send(Box::new(move || {
            let _ = tx.send(cmd.spawn());
        }))
        .expect("harness keeper thread is gone");
    let child = rx.recv().expect("harness keeper thread dropped a spawn request")?;
    lock(&TRACKED).push(Tracked {
        pid: child.id() as i32,
        stop_signal,
    });
    Ok(child)
}

/// A child of a test (not of the shared servers), spawned like them (PDEATHSIG, atexit) and
/// killed and reaped on drop, so a failing test leaves nothing behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd` (its own `pre_exec` hooks run first).
    pub fn spawn(cmd: Command) -> io::Result<ChildGuard> {
        spawn_supervised(cmd, libc::SIGKILL).map(ChildGuard)
    }

    /// Waits for the child to exit, up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_timeout(&mut self.0, timeout)
    }

    /// Sends a signal (`libc::SIGTERM`, ...).
    pub fn signal(&self, sig: i32) {
        signal(self.0.id() as i32, sig);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        untrack(self.0.id() as i32);
    }
}

struct Tracked {
    pid: i32,
    stop_signal: i32,
}

/// Children still running, for the atexit handler.
static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());
/// Directories to delete at exit.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Forgets a child that the harness has reaped itself, so atexit never signals a reused pid.
pub(super) fn untrack(pid: i32) {
    lock(&TRACKED).retain(|t| t.pid != pid);
}

extern "C" fn cleanup_at_exit() {
    // try_lock: a test thread might still hold a lock while the process exits; better leave
    // the rest to PDEATHSIG than hang in exit().
    let tracked: Vec<(i32, i32)> = match try_lock_at_exit(&TRACKED) {
        Some(t) => t.iter().map(|t| (t.pid, t.stop_signal)).collect(),
        None => Vec::new(),
    };
    for &(pid, sig) in &tracked {
        // SAFETY: plain signals to our own children. SIGCONT first: a frozen server would not
        // act on a stop signal.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, sig);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left: Vec<i32> = tracked.iter().map(|t| t.0).collect();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&pid| {
            let mut status = 0;
            // SAFETY: reaping our own child; -1 (ECHILD) means it is gone already.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 }
        });
        if !left.is_empty() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    for pid in left {
        let mut status = 0;
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, &mut status, 0);
        }
    }
    // DBWARD_KEEP_TEST_DIRS=1 keeps the servers' logs and data for a post-mortem.
    if std::env::var_os("DBWARD_KEEP_TEST_DIRS").is_some() {
        return;
    }
    if let Some(dirs) = try_lock_at_exit(&TEMP_DIRS) {
        for d in dirs.iter() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// try_lock that sees through poisoning: at exit, whatever the lists hold is still right.
fn try_lock_at_exit<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Locks, ignoring poisoning: a test that panicked while holding a harness lock must not fail
/// every later test with a PoisonError instead of its own message.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(pid, sig) };
}

/// Waits for `child` to exit, up to `timeout`; `None` if it is still running.
pub(super) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                untrack(child.id() as i32);
                return Some(status);
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Stops a child: `sig`, then SIGKILL if it has not exited within `grace`.
pub(super) fn stop_child(child: &mut Child, sig: i32, grace: Duration) -> ExitStatus {
    signal(child.id() as i32, libc::SIGCONT);
    signal(child.id() as i32, sig);
    if let Some(s) = wait_timeout(child, grace) {
        return s;
    }
    let _ = child.kill();
    let s = child.wait().expect("wait after SIGKILL");
    untrack(child.id() as i32);
    s
}

/// Waits until every thread of `pid` is (or, with `stopped` false, none is) in the stopped
/// state. kill() only queues SIGSTOP: on a busy machine a thread of a multi-threaded server can
/// run on, and answer a request, for a while after it returns.
pub(super) fn wait_all_threads(pid: i32, stopped: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().collect::<Vec<_>>())
            .unwrap_or_default();
        let all = tasks.iter().all(|t| {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name, which may itself contain ") ".
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            matches!(state, Some('T') | Some('t')) == stopped
        });
        if all || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Creates a fresh directory under the system temp dir, deleted by the atexit handler.
pub(super) fn make_temp_dir(prefix: &str) -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}{}-{}", std::process::id(), random_hex(4)));
    // 0755: the postgres OS user must traverse it to reach its data directory.
    fs::DirBuilder::new().mode(0o755).create(&dir)?;
    lock(&TEMP_DIRS).push(dir.clone());
    Ok(dir)
}

/// stdout and stderr appending to `path`.
pub(super) fn open_log(path: &Path) -> io::Result<(Stdio, Stdio)> {
    let f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

// ---------------------------------------------------------------------------------------------
// Starting servers and waiting for conditions.
// ---------------------------------------------------------------------------------------------

/// Why [`wait_ready`] gave up.
pub(super) enum NotReady {
    /// The child exited first.
    Exited(ExitStatus),
    /// `timeout` passed.
    TimedOut,
    /// The readiness probe itself failed (e.g. pg_isready could not run).
    Probe(String),
}

/// Polls `ready` every `interval` until it says yes; gives up when the child exits first or
/// `timeout` passes.
pub(super) fn wait_ready(
    child: &mut Child,
    timeout: Duration,
    interval: Duration,
    mut ready: impl FnMut() -> Result<bool, String>,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                untrack(child.id() as i32);
                return Err(NotReady::Exited(status));
            }
            Ok(None) => {}
            Err(e) => return Err(NotReady::Probe(e.to_string())),
        }
        if ready().map_err(NotReady::Probe)? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(NotReady::TimedOut);
        }
        thread::sleep(interval);
    }
}

/// [`wait_ready`] for a server writing to `log`, with [`READY_TIMEOUT`]: the error names
/// `what` and shows the log's tail.
pub(super) fn wait_server_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    ready: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    wait_ready(child, READY_TIMEOUT, Duration::from_millis(50), ready).map_err(|e| match e {
        NotReady::Exited(status) => format!("{what} exited during start-up ({status}):\n{}", log_tail(log, 30)),
        NotReady::TimedOut => format!("{what} not ready after {READY_TIMEOUT:?}:\n{}", log_tail(log, 30)),
        NotReady::Probe(e) => e,
    })
}

/// The one start-up loop of every server: `spawn` it on a port from `pick_port`, wait until
/// `ready(port)` (see [`wait_server_ready`]); on failure stop it with `stop_signal` and try
/// again on another port, three times in all (a port free a moment ago may be taken meanwhile).
pub(super) fn start_server(
    what: &str,
    log: &Path,
    stop_signal: i32,
    pick_port: fn() -> u16,
    mut spawn: impl FnMut(u16) -> Result<Child, String>,
    mut ready: impl FnMut(u16) -> Result<bool, String>,
) -> Result<(Child, u16), String> {
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = pick_port();
        let mut child = spawn(port)?;
        match wait_server_ready(&mut child, what, log, || ready(port)) {
            Ok(()) => return Ok((child, port)),
            Err(e) => {
                stop_child(&mut child, stop_signal, Duration::from_secs(5));
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// Polls `check` every 50 ms until it returns `Ok` or `timeout` passes (then panics with
/// `what` and the last observation).
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not after {timeout:?}; last: {last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Blocking [`wait_until`] run off the async runtime, so the runtime's connections keep going.
pub async fn wait_until_async<T: Send + 'static>(
    timeout: Duration,
    what: &'static str,
    check: impl FnMut() -> Result<T, String> + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || wait_until(timeout, what, check))
        .await
        .expect("wait_until panicked")
}
