//! End to end, against a real OpenBao and a real Postgres 15: an application connects to dbward
//! with no password and lands on Postgres as the Vault-issued user; every failure it can meet
//! names what failed and what to check.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

/// The SQLSTATE and message of a failed connection or query.
fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e:?}"));
    (db.code().code().to_string(), db.message().to_string())
}

async fn current_user(port: u16, dbname: &str) -> String {
    whoami(&connect(port, dbname, "whoever").await).await.unwrap()
}

#[tokio::test]
async fn dynamic_credentials_psql_and_tokio_postgres_without_password() {
    let (s, _g, app) = shared_app("e2e_dyn");
    let d = Dbward::start(&app.config("database"));
    let port = d.port();

    // psql, as a user would type it: no password, any user name.
    let out = psql(&[
        &format!("host=127.0.0.1 port={port} dbname={} user=anything", app.dbname),
        "-tAc",
        &format!(
            "select current_user || ' ' || pg_has_role(current_user, '{}', 'member')",
            app.owner_role
        ),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (user, member) = stdout.trim().split_once(' ').unwrap();
    assert!(
        user.starts_with("v-") && user.contains("dyn"),
        "not a Vault dynamic user: {user}"
    );
    assert_eq!(member, "true", "the Vault-issued user is a member of the app role");

    // The same credential serves the next connection (one Vault read for both).
    assert_eq!(current_user(port, &app.dbname).await, user);
    let reads = s.count_audit_requests(&format!("database/creds/{}", app.dynamic_role));
    assert_eq!(reads, 1, "one credential read for two connections");
    assert!(d.log_contents().contains("fetched credential from Vault"));
}

#[tokio::test]
async fn static_role_credentials() {
    let (_, _g, app) = shared_app("e2e_static");
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    assert_eq!(current_user(port, &app.dbname).await, app.static_pg_role);
}

#[tokio::test]
async fn kv_credentials_and_no_secret_in_logs() {
    let (_, _g, app) = shared_app("e2e_kv");
    let d = Dbward::start(&app.config("kv"));
    let port = d.port();
    assert_eq!(current_user(port, &app.dbname).await, app.kv_username);
    let log = d.log_contents();
    assert!(log.contains(&app.kv_path), "the log names the path it read");
    assert!(!log.contains(&app.kv_password), "the password reached the log");
    assert!(!log.contains(&app.jwt()), "the JWT reached the log");
}

#[tokio::test]
async fn unix_socket_listener_with_mode_0660_and_stale_socket_replaced() {
    let (_, _g, app) = shared_app("e2e_unix");
    let port = free_port();
    let sock = app.dir.join(format!(".s.PGSQL.{port}"));
    // A socket file left behind by a crashed run: bound, never unlinked.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let cfg = app.config("static").listen(&[sock.to_str().unwrap()]);
    let d = Dbward::start(&cfg);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let out = psql(&[
        "-h",
        app.dir.to_str().unwrap(),
        "-p",
        &port.to_string(),
        "-d",
        &app.dbname,
        "-U",
        "x",
        "-tAc",
        "select current_user",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), app.static_pg_role);

    // A live socket is not taken over: a second dbward on the same path refuses to start.
    let (code, output) = Dbward::start_expect_exit(&cfg);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("in use"), "{output}");
    drop(d);
}

#[tokio::test]
async fn wrong_database_name_gets_the_servers_3d000() {
    let (_, _g, app) = shared_app("e2e_nodb");
    // Without `dbname`, the client's database name is used.
    let mut cfg = app.config("static");
    cfg.databases[0].dbname = None;
    let d = Dbward::start(&cfg);
    let port = d.port();
    let db = connect_refused(port, "no_such_db", "x").await;
    let (code, msg) = (db.code().code(), db.message());
    assert_eq!(code, "3D000");
    assert!(msg.contains("no_such_db"), "{msg}");
    assert_eq!(current_user(port, &app.dbname).await, app.static_pg_role);
}

/// The 3 AM story: the secret moves to a new path and the config follows, but the policy does
/// not. The client is told which path Vault denied; other databases keep working; fixing the
/// policy fixes the next connection, without a restart.
#[tokio::test]
async fn moved_secret_with_stale_policy_names_the_path_and_recovers_when_fixed() {
    let (_, _g, app) = shared_app("e2e_3am");
    let new_path = app.move_kv_secret();
    // A second database entry in the same dbward, reading a path the policy does allow.
    let mut cfg = app.config("kv").entry(app.entry("other", "static"));
    cfg.databases[0].credentials = Credentials::kv(&new_path);
    let (moved_port, other_port) = (cfg.port(), cfg.databases[1].port());
    let mut d = Dbward::start(&cfg);

    let db = connect_refused(moved_port, &app.dbname, "x").await;
    assert_eq!(db.code().code(), "28000");
    assert_eq!(
        db.message(),
        format!("dbward: Vault denied read of {new_path} (403 permission denied)")
    );
    let detail = db.detail().unwrap_or_default();
    assert!(detail.contains(&app.policy), "the token's policies are named: {detail}");
    assert!(db.hint().unwrap_or_default().contains("read"), "{:?}", db.hint());
    assert!(d.log_contents().contains(&new_path));

    // The other database entry is unaffected.
    assert_eq!(current_user(other_port, &app.dbname).await, app.static_pg_role);

    // Fix the policy; the next connection succeeds (the Vault error is remembered for 2 s only).
    app.set_policy(&format!(
        "{}path {:?} {{ capabilities = [\"read\"] }}\n",
        app.default_policy_hcl(),
        new_path
    ));
    let c = connect_eventually(moved_port, &app.dbname, Duration::from_secs(20), "after the policy fix").await;
    assert_eq!(whoami(&c).await.unwrap(), app.kv_username);
    assert!(d.is_running());
}

#[tokio::test]
async fn expired_workload_jwt_is_named_not_sent() {
    let (_, _g, app) = shared_app("e2e_jwtexp");
    app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, -60);
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    let db = connect_refused(port, &app.dbname, "x").await;
    let (code, msg) = (db.code().code(), db.message());
    assert_eq!(code, "28000");
    assert!(msg.contains("the JWT expired at"), "{msg}");
    assert!(msg.contains(app.jwt_path.to_str().unwrap()), "{msg}");
    // A fresh JWT on disk is picked up at the next login, without a restart.
    app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, 3600);
    connect_eventually(port, &app.dbname, Duration::from_secs(20), "with a fresh JWT on disk").await;
}

#[tokio::test]
async fn jwt_with_wrong_subject_reports_the_claims() {
    let (_, _g, app) = shared_app("e2e_jwtsub");
    app.write_jwt("system:serviceaccount:someone-else", JWT_AUDIENCE, 3600);
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    let db = connect_refused(port, &app.dbname, "x").await;
    let (code, msg) = (db.code().code(), db.message());
    assert_eq!(code, "28000");
    assert!(msg.contains("Vault login of auth/jwt/login failed"), "{msg}");
    assert!(msg.contains("sub=system:serviceaccount:someone-else"), "{msg}");
    assert!(msg.contains(&app.jwt_role), "{msg}");
    assert!(d.log_contents().contains("sub=system:serviceaccount:someone-else"));
}

#[tokio::test]
async fn cancel_reaches_the_right_backend() {
    let (_, _g, app) = shared_app("e2e_cancel");
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    let client = connect(port, &app.dbname, "x").await;
    let bystander = connect(port, &app.dbname, "x").await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    // Cancel once the query is running on the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = bystander
            .query_one(
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.expect("send cancel");
    let err = sleeper.await.unwrap().expect_err("the query must be cancelled");
    assert_eq!(db_error(&err).0, "57014");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The bystander's query was not touched.
    let one: i32 = bystander.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    d.wait_for_log("cancel request routed", Duration::from_secs(5));
}

#[tokio::test]
async fn postgres_restart_then_new_connections_work() {
    let s = servers();
    let _g = s.exclusive();
    let app = s.new_app("e2e_pgrestart");
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    let before = connect(port, &app.dbname, "x").await;
    assert_eq!(before.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    s.restart_postgres();
    // The old session died with its backend; the client sees an error, not a hang.
    assert!(before.query_one("select 1", &[]).await.is_err());
    let c = connect_eventually(port, &app.dbname, Duration::from_secs(30), "after the Postgres restart").await;
    assert_eq!(c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn postgres_down_gives_08001_naming_the_upstream() {
    let (_, _g, app) = shared_app("e2e_pgdown");
    let dead = free_port();
    let mut cfg = app.config("static");
    cfg.databases[0].upstream = format!("127.0.0.1:{dead}");
    let d = Dbward::start(&cfg);
    let port = d.port();
    let db = connect_refused(port, &app.dbname, "x").await;
    let (code, msg) = (db.code().code(), db.message());
    assert_eq!(code, "08001");
    assert!(msg.contains(&format!("127.0.0.1:{dead}")), "{msg}");
    assert!(msg.contains(&app.tag), "names the database entry: {msg}");
}

#[test]
fn bad_config_exits_64_naming_key_and_value() {
    let s = servers();
    let app = s.new_app("e2e_badcfg");
    let mut cfg = app.config("kv");
    cfg.databases[0].credentials.kind = "kvv".into();
    let (code, out) = Dbward::start_expect_exit(&cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("databases[0].credentials.kind: unknown value \"kvv\", expected one of database, static, kv"),
        "{out}"
    );
    let cfg = app.config("kv").listen(&["0.0.0.0:6432"]);
    let (code, out) = Dbward::start_expect_exit(&cfg);
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("databases[0].listen[0]: \"0.0.0.0:6432\" is not a loopback address"),
        "{out}"
    );
}

/// The policy the kernel reports for dbward's runtime thread (its main thread: the default
/// current-thread runtime runs there).
fn sched_policy(pid: i32) -> libc::c_int {
    // SAFETY: takes a pid, returns the policy or -1.
    unsafe { libc::sched_getscheduler(pid) }
}

#[tokio::test]
async fn a_copy_streams_with_the_relay_thread_batch_and_normal_again_after_it() {
    use futures_util::StreamExt;
    let (_, _g, app) = shared_app("e2e_stream");
    let d = Dbward::start(&app.config("database"));
    let client = connect(d.port(), &app.dbname, "whoever").await;
    assert_eq!(sched_policy(d.pid()), libc::SCHED_OTHER, "normal before any stream");

    // ~40 MB. The client reads in spurts, so bytes pile up in dbward's upstream socket
    // between them and its reads fill the buffer: a stream, as a COPY into a slower
    // consumer is.
    let rows = client
        .copy_out("COPY (SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g) TO STDOUT")
        .await
        .unwrap();
    let mut rows = std::pin::pin!(rows);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut total, mut since_pause, mut saw_batch) = (0usize, 0usize, false);
    while let Some(row) = rows.next().await {
        let n = row.unwrap().len();
        total += n;
        since_pause += n;
        if !saw_batch && since_pause >= 256 * 1024 {
            since_pause = 0;
            saw_batch = sched_policy(d.pid()) == libc::SCHED_BATCH;
            assert!(Instant::now() < deadline, "no SCHED_BATCH after {total} bytes");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(
        saw_batch,
        "the relay thread never ran as SCHED_BATCH during {total} bytes of COPY"
    );
    assert_eq!(
        total,
        (1..=200_000).map(|g: usize| g.to_string().len() + 202).sum::<usize>()
    );

    // The COPY ended with the server idle: the thread is back on the normal policy.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sched_policy(d.pid()) != libc::SCHED_OTHER {
        assert!(Instant::now() < deadline, "still SCHED_BATCH after the COPY ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!whoami(&client).await.unwrap().is_empty(), "the session goes on");
}
