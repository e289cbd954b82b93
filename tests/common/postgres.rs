//! The shared PostgreSQL 15 cluster (initdb, start, stop, superuser SQL through psql) and the
//! clients tests use: [`pg_config`], the one `tokio_postgres::Config` every tokio-postgres
//! connection starts from, and [`psql_command`], psql with a clean environment.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::process::{lock, open_log, spawn_supervised, start_server, stop_child, wait_server_ready};
use super::{free_port, random_hex, Servers, PG_BIN};

// --- Starting the cluster ----------------------------------------------------------------------

pub(super) struct PgStarted {
    pub child: Child,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub password: String,
    pub owner: Option<(u32, u32)>,
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

pub(super) fn start_postgres_cluster(root: &Path) -> Result<PgStarted, String> {
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

    // SIGQUIT: immediate shutdown, which still removes shared memory.
    let (child, port) = start_server(
        "postgres",
        &log,
        libc::SIGQUIT,
        free_port,
        |port| spawn_postgres(&data, port, &log, owner).map_err(|e| format!("spawn postgres: {e}")),
        pg_isready,
    )?;
    Ok(PgStarted {
        child,
        port,
        data,
        log,
        password,
        owner,
    })
}

/// Runs the `postgres` binary directly (not pg_ctl): the process is ours to signal and wait for.
pub(super) fn spawn_postgres(data: &Path, port: u16, log: &Path, owner: Option<(u32, u32)>) -> io::Result<Child> {
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

/// Whether the server on `port` accepts connections (pg_isready).
pub(super) fn pg_isready(port: u16) -> Result<bool, String> {
    Ok(Command::new(Path::new(PG_BIN).join("pg_isready"))
        .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
        .status()
        .map_err(|e| format!("run pg_isready: {e}"))?
        .success())
}

// --- The cluster's methods ---------------------------------------------------------------------

impl Servers {
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
    /// The postmaster's pid, `None` while stopped.
    pub fn postgres_pid(&self) -> Option<i32> {
        lock(&self.pg).as_ref().map(|c| c.id() as i32)
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
        if let Err(e) = wait_server_ready(&mut child, "postgres", &self.pg_log, || pg_isready(self.pg_port)) {
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
}

// --- Clients -----------------------------------------------------------------------------------

/// The connection settings of every tokio-postgres client in the tests: 127.0.0.1:`port`,
/// `dbname`, `user`, no TLS, no password (as a client of dbward has none), a 10 s connect
/// timeout. Add `.password(..)`, `.application_name(..)` and the like to the result.
pub fn pg_config(port: u16, dbname: &str, user: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .dbname(dbname)
        .user(user)
        .connect_timeout(Duration::from_secs(10));
    cfg
}

/// Connects to 127.0.0.1:`port` without TLS or password (as a client of dbward does); the
/// connection task is spawned on the current runtime. Panics on failure.
pub async fn connect(port: u16, dbname: &str, user: &str) -> tokio_postgres::Client {
    try_connect(port, dbname, user)
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}/{dbname} as {user}: {e}"))
}

/// [`connect`] that returns the error (its `as_db_error()` has the SQLSTATE and message).
pub async fn try_connect(port: u16, dbname: &str, user: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    finish_connect(pg_config(port, dbname, user)).await
}

/// [`try_connect`] that must fail with an error from the server (dbward or Postgres); returns
/// that error (SQLSTATE, message, detail, hint).
pub async fn connect_refused(port: u16, dbname: &str, user: &str) -> tokio_postgres::error::DbError {
    match try_connect(port, dbname, user).await {
        Ok(_) => panic!("connect to 127.0.0.1:{port}/{dbname} as {user} succeeded; it must be refused"),
        Err(e) => e
            .as_db_error()
            .cloned()
            .unwrap_or_else(|| panic!("not a server error: {e:?}")),
    }
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
    let mut cfg = pg_config(port, dbname, user);
    cfg.password(password);
    finish_connect(cfg).await
}

async fn finish_connect(cfg: tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `current_user` of the session.
pub async fn whoami(c: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    Ok(c.query_one("select current_user::text", &[]).await?.get(0))
}

fn psql_bin() -> PathBuf {
    let p = Path::new(PG_BIN).join("psql");
    if p.exists() {
        p
    } else {
        PathBuf::from("psql")
    }
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
