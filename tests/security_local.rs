//! Who may use a database entry, as a local attacker would try it: psql run as another uid
//! (`nobody`) over TCP loopback and over a world-writable (0666) Unix socket is refused with
//! 28000 naming its uid and the entry's rule, while an allowed caller (by uid, by group) gets
//! the Vault-issued role. Config errors that keep a host from trusting the network
//! (`verify-ca` without `ca_file`, `http://` Vault beyond loopback) stop dbward with exit 64.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::Duration;

use common::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// psql as `uid` (root, or another user through setuid before exec).
fn psql_as(uid: u32, conninfo: &str, sql: &str) -> Output {
    let mut cmd = psql_command();
    cmd.args([conninfo, "-tAc", sql]).env("HOME", "/");
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run psql")
}

fn admin_metric(port: u16, line_start: &str) -> Option<f64> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let body = agent
        .get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A refused psql: exit 2, the message of issue 10 item 2, and nothing from Postgres.
fn assert_refused(out: &Output, want: &str) {
    let stderr = output_text(out);
    assert!(!out.status.success(), "psql as nobody connected: {stderr}");
    assert!(stderr.contains(want), "want {want:?} in:\n{stderr}");
    assert!(
        !stderr.contains("v-"),
        "a Vault-issued name reached the refused caller: {stderr}"
    );
}

#[tokio::test]
async fn tcp_loopback_caller_not_listed_is_refused_and_a_listed_uid_connects() {
    if !is_root() {
        eprintln!("skipped: running psql as another uid needs root");
        return;
    }
    let (_, _g, app) = shared_app("sec_tcp");
    let config = app
        .config("database")
        .with_admin()
        .db_line("allowed_users = [\"root\", \"1001\"]");
    let d = Dbward::start(&config);
    let port = d.port();
    let conninfo = format!("host=127.0.0.1 port={port} dbname={} user=anything", app.dbname);

    let out = psql_as(NOBODY, &conninfo, "select current_user");
    assert_refused(
        &out,
        &format!(
            "FATAL:  dbward: uid 65534 (nobody) may not use database entry \"{}\" (allowed_users: root, 1001)",
            app.tag
        ),
    );
    let rejected = format!(
        "dbward_client_connections_rejected_total{{database=\"{}\",reason=\"peer_not_allowed\"}}",
        app.tag
    );
    assert_eq!(admin_metric(config.admin_port(), &rejected), Some(1.0));
    d.wait_for_log("uid=65534", Duration::from_secs(10));

    let out = psql_as(0, &conninfo, "select current_user");
    assert!(out.status.success(), "root is listed: {}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).trim().starts_with("v-"));
    assert!(!d.log_contents().contains("any local user can connect"));
}

#[tokio::test]
async fn world_writable_unix_socket_admits_only_listed_groups() {
    if !is_root() {
        eprintln!("skipped: running psql as another uid needs root");
        return;
    }
    let (_, _g, app) = shared_app("sec_unix");
    // A directory anyone may enter, a socket anyone may connect to: only the allowlist stands
    // between another local user and the database role.
    let dir = tempfile::Builder::new()
        .prefix("dbward-sock")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock_port = free_port();
    let sock = dir.path().join(format!(".s.PGSQL.{sock_port}"));
    let tcp = app.entry(&app.tag, "database").listen[0].clone();
    let config = app
        .config("database")
        .listen(&[tcp, sock.display().to_string()])
        .db_line("socket_mode = \"0666\"")
        .db_line("allowed_users = [\"1001\"]")
        .db_line("allowed_groups = [\"root\"]");
    let d = Dbward::start(&config);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let conninfo = format!(
        "host={} port={sock_port} dbname={} user=anything",
        dir.path().display(),
        app.dbname
    );

    let out = psql_as(NOBODY, &conninfo, "select current_user");
    assert_refused(
        &out,
        &format!(
            "dbward: uid 65534 (nobody) may not use database entry \"{}\" (allowed_users: 1001; allowed_groups: root)",
            app.tag
        ),
    );
    // root is not listed by uid: it is admitted as a member of group root.
    let out = psql_as(0, &conninfo, "select current_user");
    assert!(out.status.success(), "root is in group root: {}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).trim().starts_with("v-"));
    drop(d);
}

/// A config that is complete except for what a case changes; no server is needed, since each
/// case is refused before anything connects.
fn offline_config(vault_address: &str) -> TestConfig {
    TestConfig {
        vault_address: vault_address.into(),
        vault_ca_file: None,
        vault_lines: Vec::new(),
        auth: Auth::new("token", &[("token_file", "/nonexistent/token")]),
        databases: vec![Entry {
            name: "payments".into(),
            listen: vec![format!("127.0.0.1:{}", free_port())],
            upstream: "127.0.0.1:5432".into(),
            dbname: None,
            sslmode: None,
            extra: Vec::new(),
            credentials: Credentials::database("payments"),
        }],
        admin: None,
        proxy: Vec::new(),
    }
}

#[test]
fn config_errors_that_would_trust_the_network_exit_64() {
    let mut verify_ca = offline_config("http://127.0.0.1:8200");
    verify_ca.databases[0].sslmode = Some("verify-ca".into());
    let cases = [
        (
            verify_ca,
            "databases[0].ca_file: is required with sslmode = \"verify-ca\"",
        ),
        (
            offline_config("http://vault.internal:8200"),
            "vault.address: \"http://vault.internal:8200\" is http:// to a host that is not loopback",
        ),
        (
            offline_config("http://127.0.0.1:8200").db_line("allowed_users = [\"no-such-user-dbward\"]"),
            "databases[0].allowed_users[0]: no user \"no-such-user-dbward\" on this host",
        ),
    ];
    for (config, want) in cases {
        let (code, out) = Dbward::start_expect_exit(&config);
        assert_eq!(code, Some(64), "{out}");
        assert!(out.contains(want), "want {want:?} in:\n{out}");
    }
}

/// The admin server's connection cap (src/admin_limits.rs MAX_CONNECTIONS).
const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Reads until the server closes the connection (or `deadline` passes: None).
fn read_to_close(s: &mut std::net::TcpStream, deadline: std::time::Instant) -> Option<String> {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn admin_server_drops_half_sent_headers_and_caps_its_connections() {
    use std::io::Write;
    use std::net::TcpStream;
    let (_, _g, app) = shared_app("sec_admin");
    let config = app.config("database").with_admin();
    let d = Dbward::start(&config);
    // This entry has no allowlist: dbward says so at start.
    d.wait_for_log(
        "database entry has no allowed_users or allowed_groups: any local user can connect as the Vault-issued role",
        Duration::from_secs(10),
    );
    let addr = format!("127.0.0.1:{}", config.admin_port());

    // Every slot taken by a client that never finishes its header.
    let mut slow: Vec<TcpStream> = (0..ADMIN_MAX_CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: dbward\r\n").unwrap();
            s
        })
        .collect();
    // One more: answered 503 and closed, without waiting for its request.
    let mut extra = TcpStream::connect(&addr).unwrap();
    let answer = read_to_close(&mut extra, std::time::Instant::now() + Duration::from_secs(30))
        .expect("the connection over the cap was neither answered nor closed");
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("too many admin connections"),
        "{answer:?}"
    );

    // The header-read timeout closes each half-sent request (no answer to a request never made).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for s in &mut slow {
        let got = read_to_close(s, deadline).expect("a half-sent header kept its connection open");
        assert!(!got.contains("200 OK"), "{got:?}");
    }
    // The slots are free again.
    wait_until(Duration::from_secs(30), "a full request after the slow ones", || {
        let mut s = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: dbward\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let got = read_to_close(&mut s, std::time::Instant::now() + Duration::from_secs(10)).unwrap_or_default();
        if got.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(got)
        }
    });
}
