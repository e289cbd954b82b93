//! Compatibility with real clients and real server setups, through the real dbward binary:
//! psql (scripts, `\copy`), pgbench, tokio-postgres (prepared statements, binary parameters,
//! COPY of tens of MB, LISTEN/NOTIFY, pipelining, cancel), startup parameters reaching the
//! server, and upstream TLS against Postgres itself: `ssl=on`, `hostssl`-only rules,
//! `sslmode=verify-full` with a CA generated here, and a wrong CA or name refused clearly.
//!
//! This binary turns `ssl` on in its own Postgres cluster (the first test that needs it does, for
//! all) and edits pg_hba.conf for its own roles only.

// The servers' disruption lock is held for a whole test, across its awaits, on purpose: each
// test has its own runtime, and the lock only orders tests against Postgres restarts.
#![allow(clippy::await_holding_lock)]

mod common;
mod wire;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{AsyncMessage, NoTls};
use wire::*;

/// dbward for `app` connecting upstream with `sslmode`, and `ca_file` and `sni` if given.
fn start_tls(app: &TestApp, sslmode: &str, ca_file: Option<&str>, sni: Option<&str>) -> Dbward {
    let mut cfg = app.config("static");
    let entry = &mut cfg.databases[0];
    entry.sslmode = Some(sslmode.into());
    entry
        .extra
        .extend(ca_file.map(|ca| format!("ca_file = {}", toml_str(ca))));
    entry.extra.extend(sni.map(|name| format!("sni = {}", toml_str(name))));
    Dbward::start(&cfg)
}

fn out_text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The owner of the data directory: files the server reads must belong to it.
fn chown_like_data_dir(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(servers().pg_data_dir()).unwrap();
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid())).unwrap();
}

/// Turns on TLS in this binary's Postgres with a certificate for 127.0.0.1/localhost from a
/// CA made here; returns that CA. Idempotent.
fn server_tls() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let s = servers();
        let pki = Pki::new(&["127.0.0.1", "localhost"]);
        let data = s.pg_data_dir();
        let (cert, key) = (data.join("dbward-test-server.crt"), data.join("dbward-test-server.key"));
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_like_data_dir(&cert);
        chown_like_data_dir(&key);
        // ssl is reloadable (Postgres 10+): no restart, so other tests are not disturbed.
        s.pg_exec(
            "postgres",
            &format!(
                "alter system set ssl_cert_file = {};\nalter system set ssl_key_file = {};\nalter system set ssl = on;\nselect pg_reload_conf();",
                pg_literal(&cert.to_string_lossy()),
                pg_literal(&key.to_string_lossy())
            ),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.pg_exec("postgres", "show ssl") != "on" {
            assert!(Instant::now() < deadline, "ssl did not turn on:\n{}", log_tail(s.pg_log_path(), 20));
            std::thread::sleep(Duration::from_millis(50));
        }
        pki
    })
}

/// Puts `lines` at the top of pg_hba.conf (first match wins) and reloads.
fn hba_prepend(lines: &str) {
    static HBA: Mutex<()> = Mutex::new(());
    let _g = HBA.lock().unwrap_or_else(|e| e.into_inner());
    let s = servers();
    let path = s.pg_data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{lines}\n{old}")).unwrap();
    let errors = s.pg_exec(
        "postgres",
        "select pg_reload_conf(); select count(*) from pg_hba_file_rules where error is not null",
    );
    assert!(
        errors.ends_with('0'),
        "pg_hba.conf has errors after adding {lines:?}: {errors}"
    );
    // The postmaster re-reads the file asynchronously after the signal.
    std::thread::sleep(Duration::from_millis(300));
}

// --- psql ------------------------------------------------------------------------------------------

#[test]
fn psql_script_with_copy_and_meta_commands() {
    let (_, _g, app) = shared_app("compat_psql");
    let d = Dbward::start(&app.config("static"));
    let dir = &app.dir;
    let input = dir.join("in.csv");
    let output = dir.join("out.csv");
    let mut csv = String::new();
    let mut cents = 0u64;
    for i in 1..=5000u64 {
        csv.push_str(&format!("{i},\"name, with comma {i}\",{}.{:02}\n", i * 3, i % 100));
        cents += i * 300 + i % 100;
    }
    std::fs::write(&input, &csv).unwrap();
    let script = format!(
        "\\set ON_ERROR_STOP on\n\
         create table things(id int primary key, name text, price numeric);\n\
         \\copy things from '{input}' with (format csv)\n\
         select count(*) as n, sum(price) as total from things \\gset\n\
         \\echo n=:n total=:total\n\
         begin;\n\
         delete from things;\n\
         rollback;\n\
         \\copy (select * from things order by id) to '{output}' with (format csv)\n\
         \\d things\n\
         select current_user, current_setting('application_name');\n",
        input = input.display(),
        output = output.display(),
    );
    let script_path = dir.join("script.sql");
    std::fs::write(&script_path, script).unwrap();
    let out = psql_command()
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &d.port().to_string(),
            "-d",
            &app.dbname,
            "-U",
            "app",
            "-f",
        ])
        .arg(&script_path)
        .env("PGAPPNAME", "compat-psql")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(
        text.contains(&format!("n=5000 total={}.{:02}", cents / 100, cents % 100)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} | compat-psql", app.static_pg_role)),
        "{text}"
    );
    assert!(text.contains("Table \"public.things\""), "{text}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), csv);
}

// --- pgbench ---------------------------------------------------------------------------------------

fn pgbench(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = Command::new(Path::new(PG_BIN).join("pgbench"));
    cmd.args(args).env("PGCONNECT_TIMEOUT", "10").env_remove("PGPASSWORD");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.output().expect("run pgbench")
}

fn tps(o: &Output) -> f64 {
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{}", out_text(o)))
}

#[test]
fn pgbench_runs_through_dbward() {
    let (s, _g, app) = shared_app("compat_pgbench");
    let d = Dbward::start(&app.config("static"));
    let port = d.port().to_string();
    let proxied = ["-h", "127.0.0.1", "-p", &port, "-U", "app"];
    let out = pgbench(&[&proxied[..], &["-i", "-s", "1", "-q", &app.dbname]].concat(), None);
    assert!(out.status.success(), "{}", out_text(&out));

    let run = ["-c", "4", "-j", "2", "-t", "250", "-M", "prepared", "-n"];
    let out = pgbench(&[&proxied[..], &run, &[app.dbname.as_str()]].concat(), None);
    assert!(out.status.success(), "{}", out_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("number of transactions actually processed: 1000/1000"),
        "{text}"
    );
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    let via = tps(&out);

    let (user, password, _) = app.read_creds("static");
    let pg_port = s.pg_port().to_string();
    let direct = ["-h", "127.0.0.1", "-p", &pg_port, "-U", &user];
    let out = pgbench(&[&direct[..], &run, &[app.dbname.as_str()]].concat(), Some(&password));
    assert!(out.status.success(), "{}", out_text(&out));
    eprintln!(
        "pgbench -c 4 -t 250 -M prepared: {via:.0} tps through dbward, {:.0} tps direct",
        tps(&out)
    );
}

// --- tokio-postgres --------------------------------------------------------------------------------

/// A client whose notifications arrive on the returned channel.
async fn connect_listening(
    cfg: &tokio_postgres::Config,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
) {
    let (client, mut conn) = cfg.connect(NoTls).await.expect("connect through dbward");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

#[tokio::test]
async fn tokio_postgres_prepared_binary_pipelined_listen_notify_cancel() {
    let (_, _g, app) = shared_app("compat_tokio_pg");
    let d = Dbward::start(&app.config("static"));
    let mut cfg = pg_config(d.port(), &app.dbname, "app");
    cfg.application_name("compat-app")
        .options("-c statement_timeout=4321 -c search_path=compat_schema,public");
    let (client, _) = connect_listening(&cfg).await;

    // Startup parameters reach the server.
    let row = client
        .query_one("select current_setting('application_name'), current_setting('statement_timeout'), current_setting('search_path')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "compat-app");
    assert_eq!(row.get::<_, String>(1), "4321ms");
    assert_eq!(row.get::<_, String>(2), "compat_schema,public");

    // Prepared statement with binary parameters and results of several types.
    let stmt = client
        .prepare("select $1::int8 + 1, $2::text || '!', $3::bytea, $4::float8 * 2, not $5::bool, $6::int4[], $7::text is null")
        .await
        .unwrap();
    let bytes: Vec<u8> = (0..=255).collect();
    let none: Option<&str> = None;
    for i in 0..50i64 {
        let row = client
            .query_one(
                &stmt,
                &[
                    &i,
                    &"héllo\u{1F600}",
                    &bytes,
                    &1.25f64,
                    &true,
                    &vec![1i32, -2, 3],
                    &none,
                ],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), i + 1);
        assert_eq!(row.get::<_, String>(1), "héllo\u{1F600}!");
        assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
        assert_eq!(row.get::<_, f64>(3), 2.5);
        assert!(!row.get::<_, bool>(4));
        assert_eq!(row.get::<_, Vec<i32>>(5), vec![1, -2, 3]);
        assert!(row.get::<_, bool>(6));
    }

    // Pipelined: many queries in flight on one connection, answers in order.
    let pipelined = futures_util::future::join_all((0..200i32).map(|i| {
        let client = &client;
        async move {
            client
                .query_one("select $1::int4 * 2", &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    }))
    .await;
    assert_eq!(pipelined, (0..200).map(|i| i * 2).collect::<Vec<_>>());

    // LISTEN/NOTIFY between two proxied connections; the pid is the sender's backend.
    let (listener, mut notes) = connect_listening(&pg_config(d.port(), &app.dbname, "app")).await;
    listener.batch_execute("listen compat_channel").await.unwrap();
    let sender_pid: i32 = client.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    client
        .batch_execute("notify compat_channel, 'payload one'; select pg_notify('compat_channel', 'payload two')")
        .await
        .unwrap();
    for expected in ["payload one", "payload two"] {
        let n = tokio::time::timeout(Duration::from_secs(10), notes.recv())
            .await
            .expect("notification")
            .unwrap();
        assert_eq!(
            (n.channel(), n.payload(), n.process_id()),
            ("compat_channel", expected, sender_pid)
        );
    }

    // A cancelled pg_sleep: the CancelRequest goes to dbward, which routes it.
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let t = Instant::now();
        let r = client.batch_execute("select pg_sleep(30)").await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let (r, took) = sleeper.await.unwrap();
    let e = r.expect_err("the sleep must be cancelled");
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn copy_in_and_out_of_tens_of_megabytes() {
    let (_, _g, app) = shared_app("compat_copy");
    app.create_table("big(id int, payload text)");
    let d = Dbward::start(&app.config("static"));
    let client = connect(d.port(), &app.dbname, "app").await;

    const ROWS: usize = 300_000;
    let line = |i: usize| format!("{i}\t{}\n", "abcdefghij".repeat(9 + i % 3));
    let mut expected = 0usize;
    let started = Instant::now();
    let sink = client
        .copy_in::<_, bytes::Bytes>("copy big (id, payload) from stdin")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..ROWS {
        chunk.push_str(&line(i));
        if chunk.len() > 256 * 1024 {
            expected += chunk.len();
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    expected += chunk.len();
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    let n = sink.finish().await.unwrap();
    let copy_in = started.elapsed();
    assert_eq!(n as usize, ROWS);
    assert!(expected > 25_000_000, "{expected}");

    let out_started = Instant::now();
    let stream = client
        .copy_out("copy (select * from big order by id) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut got = 0usize;
    let mut next_id = 0usize;
    let mut carry = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        got += chunk.len();
        carry.extend_from_slice(&chunk);
        // Spot-check content: every complete line is the one that went in.
        while let Some(pos) = carry.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = carry.drain(..=pos).collect();
            if next_id % 997 == 0 {
                assert_eq!(String::from_utf8(l).unwrap(), line(next_id));
            }
            next_id += 1;
        }
    }
    let copy_out = out_started.elapsed();
    assert_eq!((got, next_id), (expected, ROWS));
    let mb = expected as f64 / 1e6;
    eprintln!(
        "COPY through dbward ({} build): in {mb:.1} MB in {copy_in:?} ({:.0} MB/s), out in {copy_out:?} ({:.0} MB/s)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        mb / copy_in.as_secs_f64(),
        mb / copy_out.as_secs_f64()
    );
}

// --- upstream TLS against Postgres ---------------------------------------------------------------

#[tokio::test]
async fn ssl_on_server_with_hostssl_only_and_verify_full() {
    let s = servers();
    let _g = s.shared();
    let pki = server_tls();
    let app = s.new_app("compat_hostssl");
    hba_prepend(&format!(
        "hostnossl all {} 127.0.0.1/32 reject",
        pg_ident(&app.static_pg_role)
    ));
    let ca_dir = app.dir.join("ca");
    let (ca, _, _) = pki.write(&ca_dir);

    // verify-full with the right CA: TLS all the way, checked on the server side.
    let d = start_tls(&app, "verify-full", Some(&ca), None);
    let client = connect(d.port(), &app.dbname, "app").await;
    let row = client
        .query_one("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(row.get::<_, Option<String>>(1).unwrap().starts_with("TLSv1"));

    // The CancelRequest reaches the server with the entry's TLS settings (verify-full).
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.batch_execute("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled in time")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{e}");
    drop(d);

    // Without TLS upstream, the server's own hostssl refusal reaches the client as sent.
    let d = Dbward::start(&app.config("static"));
    let db = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(db.code().code(), "28000", "{db}");
    assert!(db.message().contains("no encryption"), "{db}");
    drop(d);

    // sslmode=require encrypts without checking the certificate.
    let d = start_tls(&app, "require", None, None);
    let client = connect(d.port(), &app.dbname, "app").await;
    assert!(client
        .query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
    drop(d);

    // A CA that did not sign the server's certificate: refused, and the message says why.
    let wrong = Pki::new(&["127.0.0.1"]);
    let (wrong_ca, _, _) = wrong.write(&app.dir.join("wrong"));
    let d = start_tls(&app, "verify-full", Some(&wrong_ca), None);
    let db = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(db.code().code(), "08001", "{db}");
    assert!(db.message().contains("TLS"), "{db}");
    assert!(
        db.message().to_lowercase().contains("issuer") || db.message().contains("certificate"),
        "{db}"
    );
    eprintln!("wrong CA: {}\nhint: {:?}", db.message(), db.hint());
    drop(d);

    // The right CA but a name the certificate does not have.
    let d = start_tls(&app, "verify-full", Some(&ca), Some("db.wrong.example"));
    let db = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(db.code().code(), "08001", "{db}");
    assert!(db.message().contains("db.wrong.example"), "{db}");

    // verify-ca ignores the name.
    let d = start_tls(&app, "verify-ca", Some(&ca), Some("db.wrong.example"));
    connect(d.port(), &app.dbname, "app").await;
}

#[tokio::test]
async fn password_methods_that_leak_the_password_are_refused_with_08004() {
    let (_, _g, app) = shared_app("compat_cleartext");
    // The server asks this role for its password in cleartext.
    hba_prepend(&format!(
        "host all {} 127.0.0.1/32 password",
        pg_ident(&app.static_pg_role)
    ));
    let d = Dbward::start(&app.config("static"));
    let f = refused_startup(d.port(), &[("user", "app"), ("database", &app.dbname)], "08004").await;
    assert!(f[&'M'].contains("cleartext password"), "{f:?}");

    // Over verified TLS it may be sent.
    let pki = server_tls();
    let (ca, _, _) = pki.write(&app.dir.join("ca"));
    let d = start_tls(&app, "verify-full", Some(&ca), None);
    let client = connect(d.port(), &app.dbname, "app").await;
    assert_eq!(client.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}
