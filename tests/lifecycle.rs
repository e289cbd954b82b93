//! The credential lifecycle against a real OpenBao and Postgres with short TTLs: refresh ahead,
//! renewal of leases still in use, revocation of unused ones, the Vault token kept alive across
//! its max TTL with the JWT rotating on disk, leases revoked behind dbward's back, and Vault
//! frozen or gone.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Dynamic role 6 s / 18 s, token 8 s / 16 s, JWT rotated on disk: 40 s of steady new
/// connections with no failure, a connection from the start still working past the default
/// TTL, credentials replaced (several users seen), Vault reads bounded by the lease schedule,
/// replaced leases revoked when unused.
#[tokio::test]
async fn forty_seconds_of_connections_across_lease_and_token_expiry() {
    let (s, _g, app) = shared_app("life_steady");
    app.set_jwt_role_ttls("8s", Some("16s"));
    let role = app.short_dynamic_role("6s", "18s");
    let mut cfg = app.config("database");
    cfg.databases[0].credentials = Credentials::database(&role);
    let d = Dbward::start(&cfg);
    let port = d.port();

    let long = connect(port, &app.dbname, "long").await;
    let first_user = whoami(&long).await.unwrap();

    let started = Instant::now();
    let mut users = BTreeSet::new();
    let mut connections = 0;
    let mut failures = Vec::new();
    let mut long_checked = false;
    let mut jwt_rotated = false;
    while started.elapsed() < Duration::from_secs(40) {
        match try_connect(port, &app.dbname, "app").await {
            Ok(c) => match whoami(&c).await {
                Ok(u) => {
                    users.insert(u);
                }
                Err(e) => failures.push(format!("{:?}: query: {e}", started.elapsed())),
            },
            Err(e) => failures.push(format!("{:?}: connect: {e}", started.elapsed())),
        }
        connections += 1;
        if !long_checked && started.elapsed() > Duration::from_secs(10) {
            // Past the 6 s default TTL: the lease was renewed because this session uses it.
            assert_eq!(
                whoami(&long).await.expect("the long-lived session still works"),
                first_user
            );
            long_checked = true;
        }
        if !jwt_rotated && started.elapsed() > Duration::from_secs(12) {
            // Kubernetes rotates projected tokens; the next login must read the new one.
            app.write_jwt(&app.jwt_subject, JWT_AUDIENCE, 3600);
            jwt_rotated = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        failures.is_empty(),
        "{} of {connections} connections failed:\n{}\n--- log:\n{}",
        failures.len(),
        failures.join("\n"),
        d.log_contents()
    );
    assert!(long_checked);
    assert!(users.len() >= 2, "credentials were never replaced: {users:?}");

    let reads = s.count_audit_requests(&format!("database/creds/{role}"));
    eprintln!(
        "[lifecycle] {connections} connections in 40 s, {} users, {reads} credential reads, {} logins, {} revocations",
        users.len(),
        s.count_audit_requests("auth/jwt/login"),
        s.count_audit_requests("sys/leases/revoke")
    );
    // Every ~4 s by the lease, plus one per new login (~every 11 s): about 15 in 40 s.
    assert!(
        (5..=25).contains(&reads),
        "{reads} credential reads for {connections} connections"
    );
    let logins = s.count_audit_requests("auth/jwt/login");
    assert!(
        logins >= 2,
        "the token was never replaced before its 16 s max TTL ({logins} logins)"
    );
    let log = d.log_contents();
    assert!(log.contains("renewed lease still in use"), "no renewal logged");
    assert!(
        log.contains("renewed the Vault token") || logins >= 3,
        "token neither renewed nor replaced"
    );
    let revokes = s.count_audit_requests("sys/leases/revoke");
    assert!(
        revokes >= 3,
        "replaced leases are not revoked when unused ({revokes} revocations)"
    );
}

/// Leases revoked with `sys/leases/revoke-prefix` behind dbward's back: the next client
/// connects anyway (28P01 from Postgres, new credential, one retry).
#[tokio::test]
async fn leases_revoked_behind_our_back_are_replaced_transparently() {
    let (s, _g, app) = shared_app("life_revoked");
    let d = Dbward::start(&app.config("database"));
    let port = d.port();
    let before = whoami(&connect(port, &app.dbname, "x").await).await.unwrap();
    s.vault_write(
        &format!("sys/leases/revoke-prefix/database/creds/{}", app.dynamic_role),
        &json!({}),
    );
    let after = whoami(&connect(port, &app.dbname, "x").await)
        .await
        .expect("the client must not notice");
    assert_ne!(before, after);
    d.wait_for_log("28P01", Duration::from_secs(5));
    let log = d.log_contents();
    assert!(log.contains(&app.dynamic_role), "the likely cause names the Vault role");
}

/// Vault frozen (SIGSTOP): a new connection is served from the cached credential at once.
#[tokio::test]
async fn frozen_vault_does_not_delay_connections_with_a_cached_credential() {
    let s = servers();
    let _g = s.exclusive();
    let app = s.new_app("life_frozen");
    let d = Dbward::start(&app.config("database"));
    let port = d.port();
    let user = whoami(&connect(port, &app.dbname, "x").await).await.unwrap();

    struct Thaw(&'static Servers);
    impl Drop for Thaw {
        fn drop(&mut self) {
            self.0.thaw_vault();
        }
    }
    s.freeze_vault();
    let _thaw = Thaw(s);
    let started = Instant::now();
    let c = connect(port, &app.dbname, "x").await;
    assert_eq!(whoami(&c).await.unwrap(), user);
    // A path that asked Vault would wait for the 10 s request timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} with Vault frozen",
        started.elapsed()
    );
}

/// Vault gone and nothing cached: 08001 naming Vault's address and state.
#[tokio::test]
async fn unreachable_vault_without_cache_is_08001() {
    let (_, _g, app) = shared_app("life_novault");
    let dead = free_port();
    let mut cfg = app.config("database");
    cfg.vault_address = format!("http://127.0.0.1:{dead}");
    let d = Dbward::start(&cfg);
    let port = d.port();
    let db = connect_refused(port, &app.dbname, "x").await;
    assert_eq!(db.code().code(), "08001");
    assert!(
        db.message()
            .contains(&format!("Vault at http://127.0.0.1:{dead} is unreachable")),
        "{}",
        db.message()
    );
    assert!(db.hint().unwrap_or_default().contains("Vault is up"), "{:?}", db.hint());
}

/// A clean shutdown revokes the leases dbward holds: their Postgres roles are gone.
#[test]
fn clean_shutdown_revokes_held_leases() {
    let (_, _g, app) = shared_app("life_shutdown");
    let mut d = Dbward::start(&app.config("database"));
    let port = d.port();
    // psql, a separate process, so the session is closed before the shutdown starts.
    let out = psql(&[
        &format!("host=127.0.0.1 port={port} dbname={} user=x", app.dbname),
        "-tAc",
        "select current_user",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let exists = |u: &str| app.pg_exec(&format!("select count(*) from pg_roles where rolname = '{u}'"));
    assert_eq!(exists(&user), "1");
    d.signal(libc::SIGTERM);
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("dbward exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        exists(&user),
        "0",
        "the lease was not revoked at shutdown:\n{}",
        d.log_contents()
    );
}

/// The revocations of this app's tokens in the audit log, by lease (the lease id as the audit
/// device records it: HMACed, but the same value for the same lease).
fn revocations_by_lease(s: &Servers, app: &TestApp) -> std::collections::BTreeMap<String, usize> {
    let mut by_lease = std::collections::BTreeMap::new();
    for r in s.audit_requests("sys/leases/revoke") {
        let ours = r["auth"]["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == app.policy.as_str()));
        if ours {
            let lease = r["request"]["data"]["lease_id"].to_string();
            *by_lease.entry(lease).or_insert(0) += 1;
        }
    }
    by_lease
}

/// The minimal policy most teams write: `read` on the credential path, nothing else (Vault's
/// default policy adds lease renewal and the token's own endpoints, not `sys/leases/revoke`).
/// Over 40 s of rotation with 6 s leases every replaced lease gets at most two revocation
/// attempts (the first is denied and the operation is not retried until the next login), the
/// denial is logged once per lease at most, naming path, capability and fix, and counted in
/// `dbward_vault_denied_total{operation="revoke"}`.
#[tokio::test]
async fn a_policy_without_revoke_costs_one_denied_revocation_per_lease_not_a_storm() {
    let (s, _g, app) = shared_app("life_norevoke");
    app.set_jwt_role_ttls("8s", Some("16s"));
    let role = app.short_dynamic_role("6s", "18s");
    app.set_policy(&format!(
        "path \"database/creds/{role}\" {{ capabilities = [\"read\"] }}\n"
    ));
    let mut cfg = app.config("database").with_admin();
    cfg.databases[0].credentials = Credentials::database(&role);
    let admin = cfg.admin_port();
    let d = Dbward::start(&cfg);
    let port = d.port();

    let started = Instant::now();
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(40) {
        match try_connect(port, &app.dbname, "app").await {
            Ok(c) => {
                if let Err(e) = whoami(&c).await {
                    failures.push(format!("{:?}: query: {e}", started.elapsed()));
                }
            }
            Err(e) => failures.push(format!("{:?}: connect: {e}", started.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = d.log_contents();
    assert!(
        failures.is_empty(),
        "connections failed:\n{}\n--- log:\n{log}",
        failures.join("\n")
    );

    let reads = s
        .audit_requests(&format!("database/creds/{role}"))
        .into_iter()
        .filter(|r| {
            r["auth"]["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == app.policy.as_str()))
        })
        .count();
    let by_lease = revocations_by_lease(s, &app);
    let attempts: usize = by_lease.values().sum();
    let most = by_lease.values().copied().max().unwrap_or(0);
    let denial_lines = log
        .lines()
        .filter(|l| l.contains("sys/leases/revoke") && l.contains("denied"))
        .count();
    eprintln!(
        "[lifecycle] policy without revoke: {reads} credential reads, {} leases revoked, {attempts} revoke \
         attempts (at most {most} per lease), {denial_lines} log lines about the denial",
        by_lease.len()
    );
    assert!(reads >= 5, "credentials were not rotated ({reads} reads)");
    assert!(!by_lease.is_empty(), "no revocation was attempted:\n{log}");
    assert!(most <= 2, "{most} revoke attempts for one lease: {by_lease:?}");
    assert!(
        denial_lines <= by_lease.len(),
        "{denial_lines} log lines for {} leases:\n{log}",
        by_lease.len()
    );
    let line = log
        .lines()
        .find(|l| l.contains("sys/leases/revoke") && l.contains("denied"))
        .expect("the denial is logged");
    for want in ["update", "revoke_unused = false"] {
        assert!(line.contains(want), "the denial line lacks {want:?}: {line}");
    }
    let body = ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    let series = format!(
        "dbward_vault_denied_total{{database=\"{}\",operation=\"revoke\"}}",
        app.tag
    );
    assert!(body.contains(&series), "no {series} in:\n{body}");
}

/// Revokes (with the root token) every token Vault issued to this app's policy: dbward's.
/// Returns how many.
fn revoke_app_tokens(s: &Servers, app: &TestApp) -> usize {
    let (status, list) = s.vault_request("LIST", "auth/token/accessors", Some(ROOT_TOKEN), None);
    assert_eq!(status, 200, "LIST auth/token/accessors: {list}");
    let mut revoked = 0;
    for accessor in list["data"]["keys"].as_array().unwrap() {
        let body = json!({ "accessor": accessor });
        let (status, token) = s.vault_request("POST", "auth/token/lookup-accessor", Some(ROOT_TOKEN), Some(&body));
        let ours = status == 200
            && token["data"]["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == app.policy.as_str()));
        if ours {
            s.vault_write("auth/token/revoke-accessor", &body);
            revoked += 1;
        }
    }
    revoked
}

/// A KV credential being served when an operator revokes dbward's token (and removes its JWT
/// role): within the lookup interval the cached credential is dropped, new connections get
/// 28000 naming the refused login, and they work again once the role is back.
#[tokio::test]
async fn a_revoked_token_is_honoured_within_the_check_interval() {
    let (s, _g, app) = shared_app("life_revoked_token");
    let mut cfg = app.config("kv");
    cfg.auth.settings.push(("token_check_interval".into(), "1s".into()));
    let d = Dbward::start(&cfg);
    let port = d.port();
    assert_eq!(
        whoami(&connect(port, &app.dbname, "x").await).await.unwrap(),
        app.kv_username
    );

    s.vault_delete(&format!("auth/jwt/role/{}", app.jwt_role));
    assert!(revoke_app_tokens(s, &app) >= 1, "dbward's token not found");
    let revoked_at = Instant::now();
    // Polled with a deadline: the check runs every second.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match try_connect(port, &app.dbname, "x").await {
            Ok(_) => "connected with a credential of the revoked token".to_string(),
            Err(e) => match e.as_db_error() {
                Some(db) if db.code().code() == "28000" => break,
                _ => format!("{e:?}"),
            },
        };
        assert!(
            Instant::now() < deadline,
            "no 28000 within 20 s of the revocation: {last}\n--- log:\n{}",
            d.log_contents()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = revoked_at.elapsed();
    let refused = connect_refused(port, &app.dbname, "x").await;
    assert!(
        refused.message().contains("auth/jwt/login"),
        "the refusal names the login: {}",
        refused.message()
    );
    assert!(
        d.log_contents().contains("the token was revoked"),
        "{}",
        d.log_contents()
    );

    app.set_jwt_role_ttls("1h", None);
    let c = connect_eventually(
        port,
        &app.dbname,
        Duration::from_secs(20),
        "a new login once the role is back",
    )
    .await;
    assert_eq!(whoami(&c).await.unwrap(), app.kv_username);
    eprintln!("[lifecycle] revoked token noticed after {noticed:?} (check interval 1 s)");
}

/// A session running `BEGIN; SELECT pg_sleep(0.3); COMMIT` (three statements) in a loop through
/// the Vault token's max TTL (16 s; leases 6 s / 18 s): dbward learns the token's end when Vault
/// caps its renewal, and closes the session with its own 57P01 between two transactions before
/// the lease dies with the token; never the server's "terminating connection" inside one.
#[tokio::test]
async fn a_session_is_retired_between_transactions_before_the_token_max_ttl() {
    let (_s, _g, app) = shared_app("life_retire");
    app.set_jwt_role_ttls("8s", Some("16s"));
    let role = app.short_dynamic_role("6s", "18s");
    let mut cfg = app.config("database").with_admin();
    cfg.databases[0].credentials = Credentials::database(&role);
    let admin = cfg.admin_port();
    let d = Dbward::start(&cfg);
    let port = d.port();
    let started = Instant::now();
    // The connection task's own end is kept: an ErrorResponse that arrives while the client is
    // idle (no query in flight) ends the connection task with it, and the client sees Closed.
    let (c, connection) = pg_config(port, &app.dbname, "long")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through dbward");
    let connection = tokio::spawn(connection);
    let mut transactions = 0;
    let (failed_in, err) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the session outlived the token's max TTL by far ({transactions} transactions)"
        );
        if let Err(e) = c.simple_query("BEGIN").await {
            break ("BEGIN", e);
        }
        if let Err(e) = c.simple_query("SELECT pg_sleep(0.3)").await {
            break ("SELECT", e);
        }
        if let Err(e) = c.simple_query("COMMIT").await {
            break ("COMMIT", e);
        }
        transactions += 1;
    };
    let ended = started.elapsed();
    let log = d.log_contents();
    let conn_end = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the connection task ends")
        .unwrap();
    let db = match (err.as_db_error(), &conn_end) {
        (Some(db), _) => db.clone(),
        (None, Err(e)) if e.as_db_error().is_some() => e.as_db_error().unwrap().clone(),
        _ => panic!("{failed_in}: {err:?}, connection {conn_end:?} after {ended:?}\n--- log:\n{log}"),
    };
    eprintln!(
        "[lifecycle] session ended after {ended:?} and {transactions} transactions: {} {}",
        db.code().code(),
        db.message()
    );
    assert_eq!(
        failed_in, "BEGIN",
        "ended inside a transaction: {db:?}\n--- log:\n{log}"
    );
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(
        db.message()
            .starts_with("dbward: this session's database credential reaches its end at")
            && db.message().contains("(Vault token max TTL); reconnect for a new one"),
        "{}",
        db.message()
    );
    assert!(ended < Duration::from_secs(17), "retired only after {ended:?}");
    assert!(transactions >= 10, "{transactions} transactions");
    let body = ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    let series = format!(
        "dbward_sessions_retired_total{{database=\"{}\",reason=\"token_max_ttl\"}} 1",
        app.tag
    );
    assert!(body.contains(&series), "no {series} in:\n{body}");
    // New connections keep working, on the new token's credential.
    whoami(&connect(port, &app.dbname, "x").await).await.unwrap();
}
