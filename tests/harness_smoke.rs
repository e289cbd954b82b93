//! Tests of the test harness itself (tests/common), against the real servers: if these fail,
//! every other integration test's failure is suspect. Nothing here runs dbward.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn servers_start_and_answer() {
    let s = servers();
    let _g = s.shared();
    eprintln!(
        "[harness] servers ready in {:?} (vault {}, postgres port {})",
        s.startup_time(),
        s.vault_addr(),
        s.pg_port()
    );

    let (status, health) = s.vault_request("GET", "sys/health", None, None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["sealed"], false);

    assert!(s.pg_exec("postgres", "show server_version_num").starts_with("15"));
    assert_eq!(s.pg_exec("postgres", "show max_connections"), "300");
    assert_eq!(s.pg_exec("postgres", "show password_encryption"), "scram-sha-256");
}

#[tokio::test]
async fn dynamic_credentials_log_in_to_postgres() {
    let (s, _g, app) = shared_app("smoke_dyn");

    let (user, password, resp) = app.read_creds("database");
    assert_eq!(resp["lease_duration"], 3600, "{resp}");
    assert!(resp["lease_id"]
        .as_str()
        .unwrap()
        .starts_with(&format!("database/creds/{}/", app.dynamic_role)));

    let client = connect_with_password(s.pg_port(), &app.dbname, &user, &password)
        .await
        .expect("log in with Vault's password");
    let row = client
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), user);
    assert_eq!(row.get::<_, String>(1), app.dbname);
    // Membership in the owner role is what lets every credential kind share tables.
    client
        .batch_execute(&format!(
            "set role {}; create table t(x int); insert into t values (1)",
            pg_ident(&app.owner_role)
        ))
        .await
        .unwrap();
    assert_eq!(app.pg_exec("select count(*) from t"), "1");

    let err = connect_with_password(s.pg_port(), &app.dbname, &user, "wrong")
        .await
        .expect_err("wrong password must fail");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("28P01"), "{err}");
}

#[tokio::test]
async fn static_and_kv_credentials_log_in() {
    let (s, _g, app) = shared_app("smoke_creds");

    let (user, password, resp) = app.read_creds("static");
    assert_eq!(user, app.static_pg_role);
    assert!(resp["data"]["ttl"].as_u64().unwrap() > 3000, "{resp}");
    let c = connect_with_password(s.pg_port(), &app.dbname, &user, &password)
        .await
        .expect("static login");
    assert_eq!(
        c.query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        user
    );

    app.rotate_static_role();
    let (_, rotated, _) = app.read_creds("static");
    assert_ne!(rotated, password);
    assert!(
        connect_with_password(s.pg_port(), &app.dbname, &user, &password)
            .await
            .is_err(),
        "old password still works"
    );
    connect_with_password(s.pg_port(), &app.dbname, &user, &rotated)
        .await
        .expect("rotated password");

    let (user, password, _) = app.read_creds("kv");
    assert_eq!(
        (user.as_str(), password.as_str()),
        (app.kv_username.as_str(), app.kv_password.as_str())
    );
    connect_with_password(s.pg_port(), &app.dbname, &user, &password)
        .await
        .expect("kv login");
}

#[tokio::test]
async fn jwt_login_token_reads_only_its_policy_paths() {
    let (s, _g, app) = shared_app("smoke_jwt");
    let other = s.new_app("smoke_jwt_other");

    let token = app.login();
    assert!(token.starts_with("s."), "{token}");

    let (status, creds) = s.vault_read_as(&token, &format!("database/creds/{}", app.dynamic_role));
    assert_eq!(status, 200, "{creds}");
    assert_eq!(
        s.vault_read_as(&token, &format!("database/static-creds/{}", app.static_role))
            .0,
        200
    );
    let (status, kv) = s.vault_read_as(&token, &app.kv_path);
    assert_eq!(status, 200, "{kv}");
    assert_eq!(kv["data"]["data"]["username"], app.kv_username.as_str());

    // Outside the policy: another app's paths, and anything else.
    for path in [
        format!("database/creds/{}", other.dynamic_role),
        other.kv_path.clone(),
        "sys/mounts".into(),
    ] {
        let (status, resp) = s.vault_read_as(&token, &path);
        assert_eq!(status, 403, "{path}: {resp}");
    }

    // Lease renew and revoke are in the policy; a revoked user can no longer log in.
    let lease = creds["lease_id"].as_str().unwrap();
    let (status, resp) = s.vault_request(
        "PUT",
        "sys/leases/renew",
        Some(&token),
        Some(&json!({"lease_id": lease, "increment": 600})),
    );
    assert_eq!(status, 200, "{resp}");
    let user = creds["data"]["username"].as_str().unwrap();
    let password = creds["data"]["password"].as_str().unwrap();
    connect_with_password(s.pg_port(), &app.dbname, user, password)
        .await
        .expect("login before revoke");
    let (status, resp) = s.vault_request(
        "PUT",
        "sys/leases/revoke",
        Some(&token),
        Some(&json!({"lease_id": lease})),
    );
    assert!(status == 204 || status == 200, "{status} {resp}");
    assert!(
        connect_with_password(s.pg_port(), &app.dbname, user, password)
            .await
            .is_err(),
        "revoked user still logs in"
    );

    // JWTs the role must refuse.
    let refused = [
        (
            "wrong subject",
            s.make_jwt("system:serviceaccount:someone-else", JWT_AUDIENCE, 3600),
        ),
        ("wrong audience", s.make_jwt(&app.jwt_subject, "not-vault", 3600)),
        ("expired", s.make_jwt(&app.jwt_subject, JWT_AUDIENCE, -300)),
    ];
    for (what, jwt) in refused {
        let (status, resp) = s.vault_login_jwt(&app.jwt_role, &jwt);
        assert!(status >= 400, "{what}: login accepted: {resp}");
    }
    // write_jwt replaces the file that dbward reads.
    app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, -300);
    assert!(s.vault_login_jwt(&app.jwt_role, &app.jwt()).0 >= 400);
    app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, 3600);
    app.login();

    // set_policy takes effect for the existing token.
    app.set_policy(&format!("path \"{}\" {{ capabilities = [\"read\"] }}", app.kv_path));
    assert_eq!(
        s.vault_read_as(&token, &format!("database/creds/{}", app.dynamic_role))
            .0,
        403
    );
    assert_eq!(s.vault_read_as(&token, &app.kv_path).0, 200);
}

#[test]
fn audit_log_counts_requests() {
    let (s, _g, app) = shared_app("smoke_audit");
    let path = format!("database/creds/{}", app.dynamic_role);
    let before = s.count_audit_requests(&path);
    for _ in 0..3 {
        assert_eq!(s.vault_read(&path).0, 200);
    }
    assert_eq!(s.count_audit_requests(&path), before + 3);
    // Prefixes are per test, so parallel tests do not disturb each other's counts.
    assert_eq!(
        s.count_audit_requests(&app.kv_path),
        1,
        "new_app wrote the KV secret once"
    );
    let entry = &s.audit_requests(&path)[0];
    assert_eq!(entry["request"]["operation"], "read");
}

#[test]
fn test_config_is_accepted_by_the_real_parser() {
    let (s, _g, app) = shared_app("smoke_config");
    for (kind, path) in [
        ("database", format!("database/creds/{}", app.dynamic_role)),
        ("static", format!("database/static-creds/{}", app.static_role)),
        ("kv", app.kv_path.clone()),
    ] {
        let toml = app.config(kind).toml();
        let c = dbward::config::Config::parse(&toml).unwrap_or_else(|e| panic!("{kind}: {e}\n{toml}"));
        assert_eq!(c.databases[0].credentials.vault_path(), path);
        assert_eq!(c.vault.address, s.vault_addr());
        assert_eq!(c.vault.auth.token_file(), Some(app.jwt_path.as_path()));
    }
    let cfg = app
        .config("database")
        .db_line("max_client_connections = 2")
        .with_admin();
    let toml = cfg.toml();
    let c = dbward::config::Config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(c.databases[0].max_client_connections, 2);
    assert_eq!(
        c.admin.listen.map(|a| a.to_string()),
        Some(format!("127.0.0.1:{}", cfg.admin_port()))
    );
}

/// Answers whether Vault replies to a raw HTTP request within `timeout`.
fn vault_answers_within(addr: &str, timeout: Duration) -> bool {
    let mut conn = TcpStream::connect(addr.trim_start_matches("http://")).unwrap();
    conn.set_read_timeout(Some(timeout)).unwrap();
    conn.write_all(b"GET /v1/sys/health HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = [0u8; 12];
    conn.read_exact(&mut buf).is_ok()
}

#[tokio::test]
async fn restart_postgres_and_freeze_vault() {
    let s = servers();
    let _x = s.exclusive();
    let app = s.new_app("smoke_disrupt");

    let before = app.connect_superuser().await;
    let t = Instant::now();
    s.restart_postgres();
    eprintln!("[harness] postgres restarted in {:?}", t.elapsed());
    assert!(
        before.simple_query("select 1").await.is_err(),
        "a connection survived the restart"
    );
    let after = app.connect_superuser().await;
    after.simple_query("select 1").await.unwrap();
    // Vault's database plugin reconnects by itself.
    let (user, password, _) = app.read_creds("database");
    connect_with_password(s.pg_port(), &app.dbname, &user, &password)
        .await
        .expect("login after restart");

    s.freeze_vault();
    let frozen = !vault_answers_within(s.vault_addr(), Duration::from_millis(500));
    s.thaw_vault();
    assert!(frozen, "vault answered while frozen");
    assert!(
        vault_answers_within(s.vault_addr(), Duration::from_secs(10)),
        "vault did not thaw"
    );
}

/// Not a test on its own: the body of the child process that the next test runs. It starts
/// the servers, prints their pids and then exits or hangs as told.
#[test]
fn probe_child_process() {
    let Ok(mode) = std::env::var("DBWARD_HARNESS_PROBE") else {
        return;
    };
    let s = servers();
    println!(
        "PIDS {} {} {}",
        s.postgres_pid().unwrap(),
        s.bao_pid(),
        s.root.display()
    );
    if mode == "hang" {
        loop {
            std::thread::park();
        }
    }
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The servers must not outlive the test binary: when it exits normally (atexit), and when it
/// is killed outright (PR_SET_PDEATHSIG).
#[test]
fn servers_die_with_the_test_binary() {
    for mode in ["exit", "hang"] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "probe_child_process", "--nocapture", "--test-threads=1"])
            .env("DBWARD_HARNESS_PROBE", mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drained aside so that a chatty probe cannot block on a full pipe; shown on failure.
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // libtest prints "test probe_child_process ... " on the same line.
        while !line.contains("PIDS ") {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                panic!("{mode}: probe printed no pids; its stderr:\n{}", stderr.join().unwrap());
            }
        }
        let fields: Vec<&str> = line[line.find("PIDS ").unwrap()..].split_whitespace().collect();
        let pids: Vec<i32> = fields[1..3].iter().map(|p| p.parse().unwrap()).collect();
        let root = std::path::PathBuf::from(fields[3]);
        assert!(
            pids.iter().all(|&p| alive(p)),
            "{mode}: servers not running in the probe"
        );

        if mode == "hang" {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        let stderr = stderr.join().unwrap();
        if mode == "exit" {
            assert!(status.success(), "probe failed: {status}; its stderr:\n{stderr}");
            assert!(!root.exists(), "atexit left {}", root.display());
        }
        let left = wait_gone(&pids, Duration::from_secs(10));
        assert!(
            left.is_empty(),
            "{mode}: still running after the test binary ended: {left:?}"
        );
        if mode == "hang" {
            remove_killed_cluster(&root);
        }
    }
}

/// What atexit would have done for the probe killed with SIGKILL: delete its temp dir, and the
/// small System V segment that a SIGKILLed postmaster leaves (its id is on line 7 of
/// postmaster.pid).
fn remove_killed_cluster(root: &std::path::Path) {
    let pidfile = std::fs::read_to_string(root.join("pg/postmaster.pid")).unwrap_or_default();
    if let Some(shmid) = pidfile
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|id| id.parse::<i32>().ok())
    {
        // SAFETY: IPC_RMID on a segment id read from the dead cluster's pid file.
        unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
    }
    let _ = std::fs::remove_dir_all(root);
}
