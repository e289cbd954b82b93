//! The product binary as a child process: [`Dbward`] runs `dbward run --config FILE` with a
//! [`TestConfig`], waits until every listener accepts, and reads its log.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::config::TestConfig;
use super::process::{make_temp_dir, open_log, signal, spawn_supervised, untrack, wait_ready, wait_timeout, NotReady};
use super::DBWARD_READY_TIMEOUT;

/// A running `dbward run --config FILE`, killed on drop. Output (stdout and stderr,
/// `RUST_LOG=dbward=debug`) goes to [`Dbward::log_path`].
pub struct Dbward {
    child: Option<Child>,
    pid: i32,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// Listen addresses found in the config (TCP `host:port` or socket paths).
    pub listen: Vec<String>,
}

impl Dbward {
    /// Starts dbward and waits until every listener in the config accepts connections.
    /// Panics (with the log) if it exits or is not ready within [`DBWARD_READY_TIMEOUT`].
    pub fn start(config: &TestConfig) -> Dbward {
        Self::start_with_env(config, &[])
    }

    /// [`Self::start`] with extra environment variables (they override the defaults).
    pub fn start_with_env(config: &TestConfig, env: &[(&str, &str)]) -> Dbward {
        let mut d = Self::spawn(config, env);
        d.wait_ready(DBWARD_READY_TIMEOUT);
        d
    }

    /// Starts dbward without waiting for anything.
    pub fn spawn(config: &TestConfig, env: &[(&str, &str)]) -> Dbward {
        let dir = make_temp_dir("dbward-run-").expect("temp dir for dbward");
        let config_path = dir.join("dbward.toml");
        let log_path = dir.join("dbward.log");
        fs::write(&config_path, config.toml()).expect("write dbward config");
        let listen = config.listen_addrs();
        let (out, err) = open_log(&log_path).expect("open dbward log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbward"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "dbward=debug")
            .env("NO_COLOR", "1")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = spawn_supervised(cmd, libc::SIGKILL).expect("spawn dbward");
        Dbward {
            pid: child.id() as i32,
            child: Some(child),
            dir,
            config_path,
            log_path,
            listen,
        }
    }

    /// Runs dbward with a config it should reject; returns its exit code (`None` if killed by
    /// a signal) and its output. Panics if it is still running after 30 s.
    pub fn start_expect_exit(config: &TestConfig) -> (Option<i32>, String) {
        let mut d = Self::spawn(config, &[]);
        match d.wait_exit(Duration::from_secs(30)) {
            Some(status) => (status.code(), d.log_contents()),
            None => panic!("dbward did not exit within 30 s; output:\n{}", d.log_contents()),
        }
    }

    /// Waits until every listen address accepts a connection.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let child = self.child.as_mut().expect("dbward has exited");
        let mut pending = self.listen.clone();
        let waited = wait_ready(child, timeout, Duration::from_millis(20), || {
            pending.retain(|addr| !can_connect(addr));
            Ok(pending.is_empty())
        });
        let status = match waited {
            Ok(()) => return,
            Err(NotReady::Exited(status)) => {
                self.child = None;
                format!("exited ({status})")
            }
            Err(NotReady::TimedOut) => format!("still running after {timeout:?}"),
            Err(NotReady::Probe(e)) => e,
        };
        panic!(
            "dbward {status} with {} not accepting connections; output:\n{}",
            pending.join(", "),
            self.log_contents()
        );
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGHUP`, ...).
    pub fn signal(&self, sig: i32) {
        if self.child.is_some() {
            signal(self.pid, sig);
        }
    }

    /// Waits for dbward to exit; `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = wait_timeout(child, timeout)?;
        self.child = None;
        Some(status)
    }

    /// `Some(status)` if dbward has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.wait_exit(Duration::ZERO)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Everything dbward printed so far, ANSI colour codes removed.
    pub fn log_contents(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// Waits until the log contains `needle`; false on timeout.
    pub fn try_wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contents().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `needle`; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        if !self.try_wait_for_log(needle, timeout) {
            panic!(
                "dbward log lacks {needle:?} after {timeout:?}; log:\n{}",
                self.log_contents()
            );
        }
    }

    /// The first TCP listen address, as a port (the common single-listener case).
    pub fn port(&self) -> u16 {
        self.listen
            .iter()
            .find_map(|l| tcp_addr(l).map(|a| a.port()))
            .expect("config has no TCP listener")
    }
}

impl Drop for Dbward {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            untrack(self.pid);
        }
    }
}

fn tcp_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Some(a);
    }
    let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn can_connect(addr: &str) -> bool {
    if addr.starts_with('/') {
        UnixStream::connect(addr).is_ok()
    } else if let Some(a) = tcp_addr(addr) {
        TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok()
    } else {
        panic!("cannot tell how to connect to listen address {addr:?}")
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
