//! `[databases.pool]` against a real OpenBao and Postgres: a kept server connection serves the
//! next client with nothing of the previous session left (temp tables, SET, prepared
//! statements, advisory locks, LISTEN), with application_name and cancel requests of its own;
//! a session that ends inside a transaction is never kept; a credential rotation closes the
//! idle connections of the old credential so that its lease is revoked.

// The shared/exclusive guard of the servers is held for a whole test, across awaits, on
// the test's own single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::*;

/// The value of one series (`name{labels}`) on dbward's /metrics, 0 when absent.
fn metric(admin: u16, series: &str) -> f64 {
    let body = ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn wait_metric(admin: u16, series: String, want: f64) {
    let s = series.clone();
    wait_until_async(Duration::from_secs(10), "metric value", move || {
        let v = metric(admin, &s);
        if v == want {
            Ok(())
        } else {
            Err(format!("{s} = {v}, want {want}"))
        }
    })
    .await;
}

fn pooled_config(app: &TestApp, pool: &str) -> TestConfig {
    let mut cfg = app.config("database").with_admin();
    cfg.databases[0] = cfg.databases[0].clone().line(&format!("pool = {{ {pool} }}"));
    cfg
}

async fn connect_as(port: u16, dbname: &str, application_name: &str) -> tokio_postgres::Client {
    let mut c = pg_config(port, dbname, "app");
    c.application_name(application_name);
    let (client, connection) = c.connect(tokio_postgres::NoTls).await.expect("connect through dbward");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn text(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test]
async fn a_kept_connection_carries_nothing_of_the_previous_session() {
    let (_s, _g, app) = shared_app("pool_leak");
    let cfg = pooled_config(&app, "max_idle = 2");
    let (admin, name) = (cfg.admin_port(), cfg.databases[0].name.clone());
    let d = Dbward::start(&cfg);
    let idle = format!("dbward_pool_idle{{database=\"{name}\"}}");

    let a = connect_as(d.port(), &app.dbname, "first").await;
    let pid = text(&a, "select pg_backend_pid()::text").await;
    a.batch_execute(
        "create temp table leak_t (x int); insert into leak_t values (1);
         set statement_timeout = '4321s'; prepare leak_p as select 1;
         select pg_advisory_lock(4242); listen leak_chan;",
    )
    .await
    .unwrap();
    drop(a);
    wait_metric(admin, idle.clone(), 1.0).await;

    let b = connect_as(d.port(), &app.dbname, "second").await;
    assert_eq!(
        text(&b, "select pg_backend_pid()::text").await,
        pid,
        "the kept backend serves the next client"
    );
    assert_eq!(
        metric(admin, &format!("dbward_pool_reused_total{{database=\"{name}\"}}")),
        1.0
    );
    assert_eq!(
        text(&b, "select coalesce(to_regclass('leak_t')::text, 'none')").await,
        "none",
        "temp table"
    );
    assert_eq!(text(&b, "show statement_timeout").await, "0", "SET");
    assert_eq!(
        text(
            &b,
            "select count(*)::text from pg_prepared_statements where name = 'leak_p'"
        )
        .await,
        "0",
        "prepared statement"
    );
    assert_eq!(
        text(
            &b,
            "select count(*)::text from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
        )
        .await,
        "0",
        "advisory lock"
    );
    assert_eq!(
        text(&b, "select count(*)::text from pg_listening_channels()").await,
        "0",
        "LISTEN"
    );
    assert_eq!(
        text(&b, "show application_name").await,
        "second",
        "the new client's application_name"
    );

    // The cancel key the reused session got reaches its backend.
    let token = b.cancel_token();
    let sleeper = tokio::spawn(async move { b.simple_query("select pg_sleep(30)").await.map(|_| ()) });
    let su = app.connect_superuser().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while su
        .query_one(
            &format!("select count(*) from pg_stat_activity where pid = {pid} and query like 'select pg_sleep%' and state = 'active'"),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel request");
    let err = sleeper.await.unwrap().expect_err("the query is cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
}

#[tokio::test]
async fn a_session_ended_inside_a_transaction_is_not_kept() {
    let (_s, _g, app) = shared_app("pool_txn");
    let cfg = pooled_config(&app, "max_idle = 2");
    let (admin, name) = (cfg.admin_port(), cfg.databases[0].name.clone());
    let d = Dbward::start(&cfg);

    let a = connect_as(d.port(), &app.dbname, "txn").await;
    let pid = text(&a, "select pg_backend_pid()::text").await;
    a.batch_execute("begin; create table txn_t (x int)").await.unwrap();
    drop(a);
    let su = app.connect_superuser().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while su
        .query_one(&format!("select count(*) from pg_stat_activity where pid = {pid}"), &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend of the open transaction lives on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = connect_as(d.port(), &app.dbname, "after").await;
    assert_ne!(text(&b, "select pg_backend_pid()::text").await, pid);
    assert_eq!(
        text(&b, "select coalesce(to_regclass('txn_t')::text, 'none')").await,
        "none",
        "rolled back"
    );
    assert_eq!(
        metric(admin, &format!("dbward_pool_reused_total{{database=\"{name}\"}}")),
        0.0
    );
}

#[tokio::test]
async fn a_rotation_closes_idle_connections_of_the_old_credential_and_its_lease_is_revoked() {
    let (_s, _g, app) = shared_app("pool_rotate");
    let role = app.short_dynamic_role("6s", "18s");
    let mut cfg = pooled_config(&app, "max_idle = 2, idle_timeout = \"5m\"");
    cfg.databases[0].credentials = Credentials::database(&role);
    let (admin, name) = (cfg.admin_port(), cfg.databases[0].name.clone());
    let d = Dbward::start(&cfg);

    let a = connect_as(d.port(), &app.dbname, "rot").await;
    let old_user = whoami(&a).await.unwrap();
    drop(a);
    wait_metric(admin, format!("dbward_pool_idle{{database=\"{name}\"}}"), 1.0).await;

    // The credential is replaced after 2/3 of its 6 s lease; the kept connection must go so
    // that the replaced lease is unused and revoked (its role dropped).
    let exists = |u: &str| format!("select count(*) from pg_roles where rolname = '{u}'");
    let su = app.connect_superuser().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while su.query_one(&exists(&old_user), &[]).await.unwrap().get::<_, i64>(0) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old credential's role was not revoked:\n{}",
            d.log_contents()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metric(
            admin,
            &format!("dbward_pool_closed_total{{database=\"{name}\",reason=\"credential_replaced\"}}")
        ) >= 1.0
    );
    let b = connect_as(d.port(), &app.dbname, "rot").await;
    assert_ne!(whoami(&b).await.unwrap(), old_user);
}
