//! SIGHUP reload against real servers: database entries and listeners are added, changed and
//! removed without dropping established sessions; a bad config is refused and the old one kept.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::*;

/// Writes `config` over dbward's config file, sends SIGHUP and waits until the log shows
/// `expect_in_log` for the `nth` time.
fn reload(d: &Dbward, config: &TestConfig, expect_in_log: &str, nth: usize) {
    std::fs::write(&d.config_path, config.toml()).unwrap();
    d.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        &format!("{expect_in_log:?} after SIGHUP"),
        || {
            let log = d.log_contents();
            if log.matches(expect_in_log).count() >= nth {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
}

#[tokio::test]
async fn sighup_adds_changes_and_removes_databases_without_dropping_sessions() {
    let (_, _g, app) = shared_app("reload_live");
    let base = app.config("kv");
    let b = app.entry("b", "static");
    let (pa, pb) = (base.port(), b.port());
    let mut d = Dbward::start(&base);
    let on_a = connect(pa, &app.dbname, "x").await;
    assert_eq!(whoami(&on_a).await.unwrap(), app.kv_username);

    // Add entry B and change A (switch it to the static role).
    let mut changed_a = base.clone().entry(b.clone());
    changed_a.databases[0].credentials = app.credentials("static");
    reload(&d, &changed_a, "configuration reloaded", 1);
    let on_b = connect(pb, &app.dbname, "x").await;
    assert_eq!(whoami(&on_b).await.unwrap(), app.static_pg_role);
    // A's next client gets the changed entry; the session from before keeps its own login.
    assert_eq!(
        whoami(&connect(pa, &app.dbname, "x").await).await.unwrap(),
        app.static_pg_role
    );
    assert_eq!(whoami(&on_a).await.unwrap(), app.kv_username);

    // Remove A: its port closes, its established session lives on.
    let only_b = TestConfig {
        databases: vec![b],
        ..base
    };
    reload(&d, &only_b, "configuration reloaded", 2);
    let refused = try_connect(pa, &app.dbname, "x").await;
    assert!(refused.is_err(), "removed listener still accepts");
    assert_eq!(whoami(&on_a).await.unwrap(), app.kv_username);
    assert_eq!(whoami(&on_b).await.unwrap(), app.static_pg_role);

    // A bad config is refused with the key named; everything keeps working.
    let mut bad = only_b.clone();
    bad.databases[0].credentials.kind = "kvv".into();
    reload(&d, &bad, "reload refused", 1);
    assert!(
        d.log_contents()
            .contains("databases[0].credentials.kind: unknown value"),
        "{}",
        d.log_contents()
    );
    assert_eq!(
        whoami(&connect(pb, &app.dbname, "x").await).await.unwrap(),
        app.static_pg_role
    );
    assert!(d.is_running());
}

#[tokio::test]
async fn reload_that_cannot_bind_keeps_the_old_config() {
    let (_, _g, app) = shared_app("reload_bind");
    let base = app.config("static");
    let b = app.entry("b", "static");
    let (pa, pb) = (base.port(), b.port());
    let d = Dbward::start(&base);
    // Something else holds B's port.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", pb)).unwrap();
    reload(&d, &base.clone().entry(b), "reload refused", 1);
    assert!(
        d.log_contents().contains(&format!("cannot listen on 127.0.0.1:{pb}")),
        "{}",
        d.log_contents()
    );
    assert_eq!(
        whoami(&connect(pa, &app.dbname, "x").await).await.unwrap(),
        app.static_pg_role
    );
}
