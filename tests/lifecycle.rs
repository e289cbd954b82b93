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
