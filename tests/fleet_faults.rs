//! Faults a fleet lives through, on the shared servers (each test takes them exclusively):
//! Postgres restarted under dbward; all of Vault restarted with its state lost.

// The servers' disruption lock is a std RwLock held for the whole test, on purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{Duration, Instant};

use common::{connect, connect_eventually, servers, try_connect, wait_until, whoami, Dbward};

/// Postgres stopped (fast shutdown) and started again: the open session ends with an error at
/// once (the server's 57P01, relayed), never hangs; new connections succeed within 1 s of
/// Postgres accepting connections again, with the credential dbward already holds.
#[tokio::test]
async fn postgres_restarted_sessions_end_clearly_and_new_connections_work_within_1s() {
    let s = servers();
    let _g = s.exclusive();
    let app = s.new_app("fleet_pgrestart");
    let d = Dbward::start(&app.config("database"));
    let port = d.port();
    let open = connect(port, &app.dbname, "x").await;
    let user = whoami(&open).await.unwrap();

    s.stop_postgres();
    let err = tokio::time::timeout(Duration::from_secs(5), open.query_one("select 1", &[]))
        .await
        .expect("the session on the stopped server must end, not hang")
        .expect_err("the server is gone");
    if let Some(db) = err.as_db_error() {
        assert!(
            matches!(db.code().code(), "57P01" | "08006"),
            "{}: {}",
            db.code().code(),
            db.message()
        );
    }
    s.start_postgres();
    // start_postgres returns once Postgres accepts connections: from then on, 1 s at most.
    let c = connect_eventually(port, &app.dbname, Duration::from_secs(1), "after the Postgres restart").await;
    assert_eq!(whoami(&c).await.unwrap(), user, "the held credential serves on");
}

/// The dev server killed and started again with nothing in it, then provisioned again: the
/// token and leases dbward holds are unknown to it. Clients connecting every 0.2 s meanwhile
/// keep being served from the cached credential (its Postgres role lives on until its VALID
/// UNTIL), and at the next refresh dbward logs in again (the read with the old token is denied)
/// and fetches a credential from the new Vault. No connection may fail.
#[tokio::test]
async fn vault_restarted_with_state_lost_fails_no_client_and_dbward_logs_in_again() {
    let s = servers();
    let _g = s.exclusive();
    let app = s.new_app("fleet_vaultloss");
    app.create_dynamic_role(&app.dynamic_role, "20s", "1h");
    let mut cfg = app.config("database");
    // The token check runs while the new Vault is still empty: its denial must not drop the
    // cached credential (the new cluster_id tells it from a revocation).
    cfg.auth.settings.push(("token_check_interval".into(), "1s".into()));
    let d = Dbward::start(&cfg);
    let port = d.port();
    let first = whoami(&connect(port, &app.dbname, "x").await).await.unwrap();
    // Long enough for the first check to learn the cluster_id.
    wait_until(Duration::from_secs(10), "dbward's first token check", || {
        let log = d.log_contents();
        match log.contains("the token's Vault cluster") {
            true => Ok(()),
            false => Err(log),
        }
    });

    s.restart_vault_losing_state();
    let mut failures = Vec::new();
    let noticed_by = Instant::now() + Duration::from_secs(15);
    while !d.log_contents().contains("initialised anew") {
        assert!(
            Instant::now() < noticed_by,
            "the new cluster was not noticed within 15 s\n{}",
            d.log_contents()
        );
        match try_connect(port, &app.dbname, "x").await {
            Ok(c) => {
                if let Err(e) = whoami(&c).await {
                    failures.push(format!("query while Vault is empty: {e}"));
                }
            }
            Err(e) => failures.push(format!("connect while Vault is empty: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.configure_vault_again("20s", "1h");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut replaced = None;
    while replaced.is_none() && Instant::now() < deadline {
        match try_connect(port, &app.dbname, "x").await {
            Ok(c) => match whoami(&c).await {
                Ok(user) if user != first => replaced = Some(user),
                Ok(_) => {}
                Err(e) => failures.push(format!("query: {e}")),
            },
            Err(e) => failures.push(format!("connect: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        failures.is_empty(),
        "clients failed: {failures:?}\n{}",
        d.log_contents()
    );
    assert!(
        replaced.is_some(),
        "no credential from the restarted Vault within 30 s\n{}",
        d.log_contents()
    );
    let log = d.log_contents();
    assert!(
        log.contains("logged in to Vault") && log.contains("generation=2"),
        "a new login:\n{log}"
    );
}
