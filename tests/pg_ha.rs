//! Postgres HA against a real primary and streaming replica: host choice by
//! `target_session_attrs` (the same host libpq picks for the same multi-host string), one 08001
//! naming every host when none can be used, and a failover (primary crashed, replica promoted)
//! that new sessions follow at once while sessions on the old primary end with an error.

// The shared guard of the servers is held for a whole test, across awaits, on the test's own
// single-threaded runtime: that is its purpose.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// The role the KV secret names; it exists on both servers of a pair.
const HA_USER: &str = "ha_app";

fn ha_password() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| random_hex(12))
}

/// The pair the routing tests share (they never disturb it).
fn pair() -> &'static HaPair {
    static PAIR: OnceLock<HaPair> = OnceLock::new();
    PAIR.get_or_init(|| HaPair::start(&servers().root.join("ha-shared"), HA_USER, ha_password()))
}

/// An entry of `app` (KV credentials naming [`HA_USER`]) with the standby listed first.
fn ha_entry(app: &TestApp, name: &str, pair: &HaPair, attrs: &str) -> Entry {
    let mut e = app.entry(name, "kv");
    e.upstream = format!(
        "[\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
        pair.replica_port, pair.primary_port
    );
    e.dbname = Some("postgres".into());
    e.line(&format!("target_session_attrs = {attrs:?}"))
}

async fn server_port(c: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    Ok(c.query_one("select inet_server_port()", &[]).await?.get(0))
}

/// The port psql (libpq) lands on with the same host list and target_session_attrs.
fn libpq_choice(pair: &HaPair, attrs: &str) -> i32 {
    let conninfo = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} dbname=postgres user={HA_USER} target_session_attrs={attrs}",
        pair.replica_port, pair.primary_port
    );
    let out = psql_command()
        .args(["-tA", "-d", &conninfo, "-c", "select inet_server_port()"])
        .env("PGPASSWORD", ha_password())
        .output()
        .expect("run psql");
    assert!(out.status.success(), "psql {conninfo}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// With the standby listed first, every target_session_attrs lands where libpq lands:
/// read-write and primary on the primary, standby, read-only, prefer-standby and any on the
/// standby.
#[tokio::test]
async fn host_choice_matches_libpq_for_every_target_session_attrs() {
    let (_s, _g, app) = shared_app("ha_choice");
    let pair = pair();
    app.write_kv(HA_USER, ha_password());
    let attrs = ["any", "read-write", "read-only", "primary", "standby", "prefer-standby"];
    let mut cfg = app.config("kv");
    cfg.databases = attrs
        .iter()
        .map(|a| ha_entry(&app, &format!("ha_{}", a.replace('-', "_")), pair, a))
        .collect();
    let d = Dbward::start(&cfg);
    let expected = |a: &str| match a {
        "read-write" | "primary" => pair.primary_port as i32,
        _ => pair.replica_port as i32,
    };
    for (a, entry) in attrs.iter().zip(&cfg.databases) {
        let c = connect(entry.port(), "postgres", "app").await;
        let got = server_port(&c).await.unwrap();
        assert_eq!(
            got,
            expected(a),
            "target_session_attrs={a} via dbward; log:\n{}",
            d.log_contents()
        );
        assert_eq!(
            got,
            libpq_choice(pair, a),
            "target_session_attrs={a}: dbward and libpq differ"
        );
    }
}

/// No host left: one 08001 that names every host tried and why.
#[tokio::test]
async fn every_host_down_gives_one_error_naming_each() {
    let (_s, _g, app) = shared_app("ha_down");
    let (a, b) = (free_port(), free_port());
    let mut cfg = app.config("kv");
    cfg.databases[0].upstream = format!("[\"127.0.0.1:{a}\", \"127.0.0.1:{b}\"]");
    cfg.databases[0] = cfg.databases[0].clone().line("target_session_attrs = \"read-write\"");
    let d = Dbward::start(&cfg);
    let e = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(e.code().code(), "08001", "{e:?}");
    let m = e.message();
    assert!(m.contains("target_session_attrs=read-write"), "{m}");
    assert!(
        m.contains(&format!(
            "127.0.0.1:{a}: connection refused; 127.0.0.1:{b}: connection refused"
        )),
        "{m}"
    );
}

/// A primary turned read-only ends the sessions of an entry with `recheck_interval` at their
/// next transaction boundary (57P01, saying why). Then a session on the primary, the primary
/// crashed (`-m immediate`), the replica promoted: the session ends with an error within its
/// keepalive window, and new connections reach the promoted server within a second of the
/// promotion finishing.
#[tokio::test]
async fn failover_new_sessions_follow_and_old_ones_end() {
    let (s, _g, app) = shared_app("ha_failover");
    let pair = HaPair::start(&s.root.join("ha-failover"), HA_USER, ha_password());
    app.write_kv(HA_USER, ha_password());
    let mut cfg = app.config("kv");
    cfg.databases[0] = ha_entry(&app, "ha_failover", &pair, "read-write")
        .line("keepalives_idle = \"1s\"")
        .line("keepalives_interval = \"1s\"")
        .line("keepalives_count = 2");
    cfg.databases
        .push(ha_entry(&app, "ha_rechecked", &pair, "read-write").line("recheck_interval = \"1s\""));
    let d = Dbward::start(&cfg);
    let port = d.port();

    let (rechecked, connection) = pg_config(cfg.databases[1].port(), "postgres", "app")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    assert_eq!(server_port(&rechecked).await.unwrap(), pair.primary_port as i32);
    let primary = pair.primary_port;
    pair.superuser_sql(primary, "alter system set default_transaction_read_only = on");
    pair.superuser_sql(primary, "select pg_reload_conf()");
    // 1 s interval; the rest is slack for a loaded machine.
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the session on the read-only primary was not ended")
        .unwrap()
        .expect_err("the session must end with an error");
    let e = ended
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {ended:?}"));
    assert_eq!(e.code().code(), "57P01", "{e:?}");
    assert!(
        e.message().contains(&format!(
            "upstream host 127.0.0.1:{primary} no longer meets target_session_attrs=read-write: read-only (default_transaction_read_only = on)"
        )),
        "{}",
        e.message()
    );
    pair.superuser_sql(primary, "alter system reset default_transaction_read_only");
    pair.superuser_sql(primary, "select pg_reload_conf()");

    // The reload reaches new backends shortly after pg_reload_conf() returns.
    let old = connect_eventually(port, "postgres", Duration::from_secs(10), "the primary writable again").await;
    assert_eq!(server_port(&old).await.unwrap(), pair.primary_port as i32);

    pair.crash_primary();
    // Keepalive window 1 s + 2 × 1 s; the rest is slack for a loaded machine.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if old.is_closed() {
                return None;
            }
            if let Err(e) = server_port(&old).await {
                return Some(e);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the session on the crashed primary did not end");
    if let Some(e) = ended {
        eprintln!("[pg_ha] session on the old primary ended: {e}");
    }

    // Before the promotion nothing accepts writes: one 08001 naming both hosts.
    let e = connect_refused(port, "postgres", "app").await;
    assert_eq!(e.code().code(), "08001", "{e:?}");
    assert!(e.message().contains("read-only (standby)"), "{}", e.message());

    pair.promote_replica();
    let promoted = Instant::now();
    let deadline = promoted + Duration::from_secs(1);
    let landed = loop {
        match try_connect(port, "postgres", "app").await {
            Ok(c) => break server_port(&c).await.unwrap(),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no new session 1 s after the promotion: {e}; log:\n{}",
                    d.log_contents()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    eprintln!(
        "[pg_ha] first session on the promoted server {:?} after the promotion",
        promoted.elapsed()
    );
    assert_eq!(landed, pair.replica_port as i32);
}

/// GET on the admin listener: status and body.
fn admin_get(port: u16, path: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let resp = match agent.get(&format!("http://127.0.0.1:{port}{path}")).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_string().unwrap())
}

/// `dbward check` and `/readyz` name each host's role and say whether target_session_attrs
/// can be met; the connect metrics carry the configured host a session landed on.
#[tokio::test]
async fn check_readyz_and_metrics_name_each_host() {
    let (_s, _g, app) = shared_app("ha_report");
    let pair = pair();
    app.write_kv(HA_USER, ha_password());
    let mut cfg = app.config("kv");
    cfg.databases[0] = ha_entry(&app, "ha_report", pair, "read-write");
    let admin = free_port();
    cfg.admin = Some(format!("127.0.0.1:{admin}"));

    let path = app.dir.join("ha_report.toml");
    std::fs::write(&path, cfg.toml()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbward"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .env_remove("VAULT_TOKEN")
        .env_remove("BAO_TOKEN")
        .env_remove("DBWARD_CONFIG")
        .output()
        .expect("run dbward check");
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let (r, p) = (pair.replica_port, pair.primary_port);
    assert!(
        text.contains(&format!("127.0.0.1:{r}: standby, version 15"))
            && text.contains("does not meet target_session_attrs=read-write: read-only (standby)"),
        "{text}"
    );
    assert!(text.contains(&format!("127.0.0.1:{p}: primary, version 15")), "{text}");
    assert!(text.contains(&format!("can be met now by 127.0.0.1:{p}")), "{text}");

    let d = Dbward::start(&cfg);
    let (status, body) = admin_get(admin, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{p}: primary")), "{body}");
    assert!(body.contains(&format!("127.0.0.1:{r}: standby")), "{body}");

    let c = connect(d.port(), "postgres", "app").await;
    assert_eq!(server_port(&c).await.unwrap(), p as i32);
    let (_, metrics) = admin_get(admin, "/metrics");
    let landed = format!("dbward_upstream_connect_seconds_count{{database=\"ha_report\",host=\"127.0.0.1:{p}\"}} 1");
    assert!(metrics.contains(&landed), "{landed} missing from:\n{metrics}");
}

/// `load_balance_hosts = "random"` spreads sessions over the list (libpq 16): over 24 new
/// connections both servers are reached (each is missed with probability 2^-24).
#[tokio::test]
async fn random_load_balancing_reaches_every_host() {
    let (_s, _g, app) = shared_app("ha_random");
    let pair = pair();
    app.write_kv(HA_USER, ha_password());
    let mut cfg = app.config("kv");
    cfg.databases[0] = ha_entry(&app, "ha_random", pair, "any").line("load_balance_hosts = \"random\"");
    let d = Dbward::start(&cfg);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let c = connect(d.port(), "postgres", "app").await;
        seen.insert(server_port(&c).await.unwrap());
    }
    let both: std::collections::BTreeSet<i32> = [pair.primary_port as i32, pair.replica_port as i32].into();
    assert_eq!(seen, both);
}

/// A cancel request goes to the host the session is on: with the standby listed first, a
/// read-write session's query on the primary is cancelled (57014), not left running.
#[tokio::test]
async fn cancel_reaches_the_host_the_session_is_on() {
    let (_s, _g, app) = shared_app("ha_cancel");
    let pair = pair();
    app.write_kv(HA_USER, ha_password());
    let mut cfg = app.config("kv");
    cfg.databases[0] = ha_entry(&app, "ha_cancel", pair, "read-write");
    let d = Dbward::start(&cfg);
    let c = connect(d.port(), "postgres", "app").await;
    assert_eq!(server_port(&c).await.unwrap(), pair.primary_port as i32);
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move { c.simple_query("select pg_sleep(60)").await.map(|_| ()) });
    // Cancel once the query runs on the primary.
    let primary = pair.primary_port;
    wait_until_async(Duration::from_secs(10), "the query running on the primary", move || {
        let n = pair.superuser_sql(
            primary,
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'",
        );
        if n == "1" {
            Ok(())
        } else {
            Err(n)
        }
    })
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the cancelled query still runs")
        .unwrap()
        .expect_err("the query was cancelled");
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e:?}");
}
