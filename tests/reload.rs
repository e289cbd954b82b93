//! SIGHUP reload against real servers: database entries and listeners are added, changed and
//! removed without dropping established sessions; a bad config is refused and the old one kept.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::*;

async fn whoami(c: &tokio_postgres::Client) -> String {
    c.query_one("select current_user::text", &[])
        .await
        .expect("query")
        .get(0)
}

/// A second `[[databases]]` entry reading the app's static role.
fn second_entry(app: &TestApp, name: &str, port: u16) -> String {
    format!(
        "\n[[databases]]\nname = {}\nlisten = [\"127.0.0.1:{port}\"]\nupstream = \"127.0.0.1:{}\"\ndbname = {}\n\
         sslmode = \"disable\"\n[databases.credentials]\nkind = \"static\"\nrole = {}\n",
        toml_str(name),
        app.servers.pg_port(),
        toml_str(&app.dbname),
        toml_str(&app.static_role)
    )
}

fn reload(d: &Dbward, config: &str, expect_in_log: &str, nth: usize) {
    std::fs::write(&d.config_path, config).unwrap();
    d.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.log_contents().matches(expect_in_log).count() < nth {
        assert!(
            std::time::Instant::now() < deadline,
            "no {expect_in_log:?} after SIGHUP:\n{}",
            d.log_contents()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sighup_adds_changes_and_removes_databases_without_dropping_sessions() {
    let s = servers();
    let _g = s.shared();
    let app = s.new_app("reload_live");
    let (pa, pb) = (free_port(), free_port());
    let base = app.config_toml("kv", &[format!("127.0.0.1:{pa}")]);
    let mut d = Dbward::start(&base);
    let on_a = connect(pa, &app.dbname, "x").await;
    assert_eq!(whoami(&on_a).await, app.kv_username);

    // Add entry B and change A (switch it to the static role).
    let changed_a = base
        .replace(
            &format!("path = {}", toml_str(&app.kv_path)),
            &format!("role = {}", toml_str(&app.static_role)),
        )
        .replace("kind = \"kv\"", "kind = \"static\"");
    reload(
        &d,
        &format!("{changed_a}{}", second_entry(&app, "b", pb)),
        "configuration reloaded",
        1,
    );
    let on_b = connect(pb, &app.dbname, "x").await;
    assert_eq!(whoami(&on_b).await, app.static_pg_role);
    // A's next client gets the changed entry; the session from before keeps its own login.
    assert_eq!(whoami(&connect(pa, &app.dbname, "x").await).await, app.static_pg_role);
    assert_eq!(whoami(&on_a).await, app.kv_username);

    // Remove A: its port closes, its established session lives on.
    let only_b = format!(
        "{}{}",
        &base[..base.find("[[databases]]").unwrap()],
        second_entry(&app, "b", pb)
    );
    reload(&d, &only_b, "configuration reloaded", 2);
    let refused = try_connect(pa, &app.dbname, "x").await;
    assert!(refused.is_err(), "removed listener still accepts");
    assert_eq!(whoami(&on_a).await, app.kv_username);
    assert_eq!(whoami(&on_b).await, app.static_pg_role);

    // A bad config is refused with the key named; everything keeps working.
    let bad = only_b.replace("kind = \"static\"", "kind = \"kvv\"");
    reload(&d, &bad, "reload refused", 1);
    assert!(
        d.log_contents()
            .contains("databases[0].credentials.kind: unknown value"),
        "{}",
        d.log_contents()
    );
    assert_eq!(whoami(&connect(pb, &app.dbname, "x").await).await, app.static_pg_role);
    assert!(d.is_running());
}

#[tokio::test]
async fn reload_that_cannot_bind_keeps_the_old_config() {
    let s = servers();
    let _g = s.shared();
    let app = s.new_app("reload_bind");
    let (pa, pb) = (free_port(), free_port());
    let base = app.config_toml("static", &[format!("127.0.0.1:{pa}")]);
    let d = Dbward::start(&base);
    // Something else holds B's port.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", pb)).unwrap();
    reload(
        &d,
        &format!("{base}{}", second_entry(&app, "b", pb)),
        "reload refused",
        1,
    );
    assert!(
        d.log_contents().contains(&format!("cannot listen on 127.0.0.1:{pb}")),
        "{}",
        d.log_contents()
    );
    assert_eq!(whoami(&connect(pa, &app.dbname, "x").await).await, app.static_pg_role);
}
