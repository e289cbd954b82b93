//! Faults a fleet lives through, on the shared servers (each test takes them exclusively):
//! Postgres restarted under dbward.

// The servers' disruption lock is a std RwLock held for the whole test, on purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::{connect, connect_eventually, servers, whoami, Dbward};

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
