//! Integration-test harness: real PostgreSQL 15 and OpenBao servers, never mocks.
//!
//! Each test binary that says `mod common;` gets ONE Postgres cluster and ONE OpenBao dev server,
//! started lazily by the first [`servers()`] call and shared by all its tests. Tests stay
//! independent (and run in parallel) by asking for their own fixture with
//! [`Servers::new_app`]: a database, Postgres roles, Vault database/KV/JWT configuration and a
//! policy, all named after the test's tag.
//!
//! | module | owns |
//! | --- | --- |
//! | `process` | child processes (keeper thread, PDEATHSIG, atexit), the start-and-retry loop, polling with deadlines |
//! | `servers` | the shared [`Servers`] and their disruption lock |
//! | `postgres` | the cluster, psql, and tokio-postgres clients ([`pg_config`]) |
//! | `vault` | OpenBao (the shared one and [`TlsBao`]), Vault requests, test JWTs |
//! | `fixture` | [`TestApp`]: one test's slice of the servers |
//! | `config` | [`TestConfig`]: the one way to write a `dbward.toml` |
//! | `daemon` | [`Dbward`]: the product binary as a child process |
//! | `vault_restart` | the dev server restarted with its state lost, and an app's Vault setup again |
//! | `raft` | [`RaftCluster`]: a three-node OpenBao raft cluster (fleet tests) |
//! | `replica` | [`HaPair`]: a primary and its streaming replica, for failover tests |
//!
//! Calls here are blocking (processes, files, blocking HTTP). They are fine inside
//! `#[tokio::test]` as long as nothing on the same runtime must make progress meanwhile (for
//! instance a lock held by a tokio-postgres client of that runtime); otherwise use
//! `spawn_blocking` (or [`wait_until_async`]).
//!
//! Tests that disturb the shared servers ([`Servers::restart_postgres`],
//! [`Servers::freeze_vault`]) take [`Servers::exclusive`]; tests in the same binary that must
//! not see the disturbance take [`Servers::shared`]. Better still, put them in their own binary.

#![allow(dead_code)]

mod config;
mod daemon;
mod fixture;
mod postgres;
mod process;
mod raft;
mod replica;
mod servers;
mod vault;
mod vault_restart;

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// Not every test binary uses every item.
#[allow(unused_imports)]
pub use self::{
    config::{Auth, Credentials, Entry, TestConfig},
    daemon::Dbward,
    fixture::TestApp,
    postgres::{
        connect, connect_eventually, connect_refused, connect_with_password, pg_config, psql, psql_command,
        try_connect, whoami,
    },
    process::{wait_until, wait_until_async, ChildGuard},
    raft::RaftCluster,
    replica::HaPair,
    servers::{servers, shared_app, Servers},
    vault::{bao_binary, TlsBao},
};

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
        if process::lock(&GIVEN).get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no free port found on 127.0.0.1");
}

/// `free_port()` for OpenBao, whose dev server also binds port + 1 (the cluster listener).
pub fn free_port_pair() -> u16 {
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

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The last `n` lines of a log file, for failure messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// stdout then stderr of a finished process, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
