//! The client-facing protocol of the real dbward binary, against real OpenBao and Postgres 15:
//! encryption negotiation (TLS through SSLRequest and direct, GSSENC, CVE-2021-3935), cancel
//! routing, protocol versions and negotiation, replication startups, dbward's own errors and
//! limits, connection clean-up, and a differential test of the relayed bytes against a direct
//! connection. Clients are psql and a raw wire client (tests/wire), so exact bytes are visible.

// The servers' disruption lock is held for a whole test, across its awaits, on purpose: each
// test has its own runtime, and the lock only orders tests against Postgres restarts.
#![allow(clippy::await_holding_lock)]

mod common;
mod wire;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use wire::*;

/// A CA and a certificate for localhost/127.0.0.1 in `app.dir/tls`, and the `client_tls` line.
fn client_tls(app: &TestApp) -> (Pki, String, String) {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let (ca, cert, key) = pki.write(&app.dir.join("tls"));
    let line = format!(
        "client_tls = {{ cert_file = {}, key_file = {} }}",
        toml_str(&cert),
        toml_str(&key)
    );
    (pki, ca, line)
}

fn psql_conn(conninfo: &str, sql: &str) -> std::process::Output {
    psql(&["-d", conninfo, "-tA", "-c", sql])
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// A TLS handshake with dbward on `port` straight away (direct TLS, no SSLRequest), trusting
/// `pki`'s CA and offering `alpn`.
async fn direct_tls(
    port: u16,
    pki: &Pki,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(pki.client_config(alpn));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Plain startup through dbward as any user; returns the connection and the greeting.
async fn login(port: u16, app: &TestApp, version: u32, extra: &[(&str, &str)]) -> (Wire, Vec<Msg>) {
    let mut w = Wire::tcp(port).await;
    let mut params = vec![("user", "app"), ("database", app.dbname.as_str())];
    params.extend_from_slice(extra);
    let greeting = w.startup(version, &params).await;
    assert!(greeting.iter().all(|m| m.tag != b'E'), "{greeting:?}");
    (w, greeting)
}

// --- 1. Client-facing TLS ---------------------------------------------------------------------------

#[test]
fn client_tls_serves_sslmode_require_and_verify_full() {
    let (_, _g, app) = shared_app("proto_tls_psql");
    let (_pki, ca, line) = client_tls(&app);
    let d = Dbward::start(&app.config("static").db_line(&line));
    let port = d.port();

    let require = format!(
        "host=127.0.0.1 port={port} dbname={} user=app sslmode=require",
        app.dbname
    );
    let out = psql_conn(&require, "\\conninfo");
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log_contents());
    assert!(
        stdout(&out).contains("SSL connection (protocol: TLSv1.3"),
        "{}",
        stdout(&out)
    );

    let verify = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} dbname={} user=app sslmode=verify-full sslrootcert={ca}",
        app.dbname
    );
    let out = psql_conn(&verify, "select current_user");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), app.static_pg_role);

    // A client that does not ask for TLS is still served in plaintext.
    let plain = format!(
        "host=127.0.0.1 port={port} dbname={} user=app sslmode=disable",
        app.dbname
    );
    let out = psql_conn(&plain, "select 1");
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));

    // And a client trusting another CA refuses dbward's certificate itself.
    let other = Pki::new(&["localhost"]);
    let (other_ca, _, _) = other.write(&app.dir.join("other"));
    let wrong = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} dbname={} user=app sslmode=verify-full sslrootcert={other_ca}",
        app.dbname
    );
    let out = psql_conn(&wrong, "select 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("certificate verify failed"), "{}", stderr(&out));
}

#[test]
fn without_client_tls_sslmode_require_fails_with_libpqs_message() {
    let (_, _g, app) = shared_app("proto_no_tls");
    let d = Dbward::start(&app.config("static"));
    let base = format!("host=127.0.0.1 port={} dbname={} user=app", d.port(), app.dbname);
    let out = psql_conn(&format!("{base} sslmode=require"), "select 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server does not support SSL, but SSL was required"),
        "{}",
        stderr(&out)
    );
    let out = psql_conn(&format!("{base} sslmode=prefer"), "select 1");
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));
}

#[tokio::test]
async fn direct_tls_requires_alpn_postgresql() {
    let (_, _g, app) = shared_app("proto_direct_tls");
    let (pki, _, line) = client_tls(&app);
    let d = Dbward::start(&app.config("static").db_line(&line));
    let port = d.port();
    let params = [("user", "app"), ("database", app.dbname.as_str())];

    // As libpq 17 does with sslnegotiation=direct: TLS first, ALPN "postgresql".
    let mut w = Wire::tcp(port)
        .await
        .into_tls(pki.client_config(&[b"postgresql"]), "localhost")
        .await;
    let greeting = w.startup(V3_0, &params).await;
    assert_eq!(greeting[0].raw(), [b'R', 0, 0, 0, 8, 0, 0, 0, 0], "{greeting:?}");
    assert_eq!(
        Wire::first_column(&w.simple("select current_user").await),
        std::slice::from_ref(&app.static_pg_role)
    );

    // Without ALPN a direct TLS connection could be a replay aimed at another service.
    let mut w = Wire::tcp(port)
        .await
        .into_tls(pki.client_config(&[]), "localhost")
        .await;
    let e = w.expect().await;
    assert_eq!(e.code(), "08P01", "{e:?}");
    assert!(e.fields()[&'M'].contains("without ALPN"), "{e:?}");

    // Offering only another protocol fails the handshake.
    let err = direct_tls(port, &pki, &[b"http/1.1"])
        .await
        .expect_err("handshake must fail");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");

    d.wait_for_log("client TLS handshake failed", Duration::from_secs(5));
}

#[tokio::test]
async fn direct_tls_without_client_tls_is_closed() {
    let (_, _g, app) = shared_app("proto_direct_off");
    let d = Dbward::start(&app.config("static"));
    let pki = Pki::new(&["localhost"]);
    assert!(direct_tls(d.port(), &pki, &[b"postgresql"]).await.is_err());
    // Without client_tls the ClientHello is read as Postgres 15 reads it: a startup packet of
    // an invalid length, closed on without a word.
    d.wait_for_log("invalid length of startup packet", Duration::from_secs(5));
}

#[tokio::test]
async fn gssenc_is_declined_then_tls_and_startup_work() {
    let (_, _g, app) = shared_app("proto_gssenc");
    let (pki, _, line) = client_tls(&app);
    let d = Dbward::start(&app.config("static").db_line(&line));
    let mut w = Wire::tcp(d.port()).await;
    w.send(&gssenc_request()).await;
    assert_eq!(w.recv_byte().await, Some(b'N'));
    let mut w = w.start_tls(pki.client_config(&[b"postgresql"]), "localhost").await;
    w.startup(V3_0, &[("user", "app"), ("database", &app.dbname)]).await;
    assert_eq!(Wire::first_column(&w.simple("select 7").await), ["7"]);

    // Without client_tls, GSSENC and SSL both get 'N' and the session goes on in plaintext.
    let plain = Dbward::start(&app.config("static"));
    let mut w = Wire::tcp(plain.port()).await;
    w.send(&gssenc_request()).await;
    assert_eq!(w.recv_byte().await, Some(b'N'));
    w.send(&ssl_request()).await;
    assert_eq!(w.recv_byte().await, Some(b'N'));
    w.startup(V3_0, &[("user", "app"), ("database", &app.dbname)]).await;
    assert_eq!(Wire::first_column(&w.simple("select 8").await), ["8"]);
}

#[tokio::test]
async fn plaintext_bytes_after_ssl_request_are_refused() {
    let (_, _g, app) = shared_app("proto_cve_2021_3935");
    let (_pki, _, line) = client_tls(&app);
    let d = Dbward::start(&app.config("static").db_line(&line));
    let mut w = Wire::tcp(d.port()).await;
    // A man-in-the-middle appends its own StartupMessage to the client's SSLRequest.
    let mut bytes = ssl_request();
    bytes.extend_from_slice(&startup(V3_0, &[("user", "app"), ("database", &app.dbname)]));
    w.send(&bytes).await;
    let answer = w.until_eof().await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert_eq!(answer[0].code(), "08P01");
    assert_eq!(answer[0].fields()[&'S'], "FATAL");
    assert_eq!(answer[0].fields()[&'M'], "received unencrypted data after SSL request");
}

#[tokio::test]
async fn negotiation_is_bounded_by_startup_timeout() {
    let (_, _g, app) = shared_app("proto_slow_tls");
    let (_pki, _, line) = client_tls(&app);
    let d = Dbward::start(&app.config("static").db_line(&line).proxy("startup_timeout", "1s"));
    let started = Instant::now();
    // SSLRequest answered, then no handshake: the connection must not stay open.
    let mut w = Wire::tcp(d.port()).await;
    w.send(&ssl_request()).await;
    assert_eq!(w.recv_byte().await, Some(b'S'));
    assert!(w.closes_silently(Duration::from_secs(10)).await);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // Half a startup packet: closed without a word once the time is up, as Postgres closes
    // at authentication_timeout (tests/conformance.rs); the log says why.
    let started = Instant::now();
    let mut w = Wire::tcp(d.port()).await;
    w.send(&startup(V3_0, &[("user", "app")])[..6]).await;
    assert!(w.closes_silently(Duration::from_secs(10)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    d.wait_for_log(
        "no startup packet within startup_timeout (1s; 6 bytes",
        Duration::from_secs(5),
    );
}

// --- 4. Cancel ---------------------------------------------------------------------------------------

/// Runs `select pg_sleep(30)` on `w` and returns a task that waits for its outcome.
async fn start_sleep(mut w: Wire) -> tokio::task::JoinHandle<(Vec<Msg>, Duration, Wire)> {
    w.send(&query("select pg_sleep(30)")).await;
    tokio::spawn(async move {
        let t = Instant::now();
        let msgs = w.until_ready().await;
        (msgs, t.elapsed(), w)
    })
}

#[tokio::test]
async fn cancel_reaches_the_backend_through_another_listener_and_over_tls() {
    let (_, _g, app) = shared_app("proto_cancel");
    let (pki, _, line) = client_tls(&app);
    let (p1, p2) = (free_port(), free_port());
    let cfg = app
        .config("static")
        .listen(&[format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}")])
        .db_line(&line);
    let d = Dbward::start(&cfg);

    let (mut w, greeting) = login(p1, &app, V3_0, &[]).await;
    let (pid, secret) = backend_key(&greeting);
    assert_eq!(secret.len(), 4);
    // The pid is the backend's own: clients compare it with NOTIFY's and pg_backend_pid().
    assert_eq!(
        Wire::first_column(&w.simple("select pg_backend_pid()").await),
        [pid.to_string()]
    );

    // An unknown key is dropped silently and cancels nothing.
    let sleeping = start_sleep(w).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut bad = secret.clone();
    bad[0] ^= 0xff;
    let mut c = Wire::tcp(p2).await;
    c.send(&cancel_request(pid, &bad)).await;
    assert!(c.closes_silently(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!sleeping.is_finished(), "a wrong key must not cancel");

    // The right key, on the other listener, inside TLS (as libpq does with sslmode=require).
    let mut c = Wire::tcp(p2)
        .await
        .start_tls(pki.client_config(&[b"postgresql"]), "localhost")
        .await;
    c.send(&cancel_request(pid, &secret)).await;
    assert!(c.closes_silently(Duration::from_secs(10)).await);
    let (msgs, took, mut w) = sleeping.await.unwrap();
    let e = error_in(&msgs);
    assert_eq!(e.code(), "57014", "{msgs:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(Wire::first_column(&w.simple("select 1").await), ["1"]);
    d.wait_for_log("cancel request routed", Duration::from_secs(5));
}

#[tokio::test]
async fn protocol_3_2_client_gets_a_long_key_in_front_of_a_3_0_server() {
    let (_, _g, app) = shared_app("proto_v32");
    let d = Dbward::start(&app.config("static"));
    let (w, greeting) = login(d.port(), &app, V3_2, &[]).await;
    assert!(
        greeting.iter().all(|m| m.tag != b'v'),
        "3.2 needs no negotiation: {greeting:?}"
    );
    let (pid, secret) = backend_key(&greeting);
    assert_eq!(secret.len(), 32);

    let sleeping = start_sleep(w).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A 3.0-length prefix of the key is not the key.
    let mut c = Wire::tcp(d.port()).await;
    c.send(&cancel_request(pid, &secret[..4])).await;
    assert!(c.closes_silently(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sleeping.is_finished());

    let mut c = Wire::tcp(d.port()).await;
    c.send(&cancel_request(pid, &secret)).await;
    assert!(c.closes_silently(Duration::from_secs(10)).await);
    let (msgs, _, _) = sleeping.await.unwrap();
    assert_eq!(error_in(&msgs).code(), "57014");

    // Two sessions never share a key.
    let (_w1, g1) = login(d.port(), &app, V3_2, &[]).await;
    let (_w2, g2) = login(d.port(), &app, V3_2, &[]).await;
    assert_ne!(backend_key(&g1).1, backend_key(&g2).1);
}

// --- 5. Protocol versions ------------------------------------------------------------------------

#[tokio::test]
async fn grease_probe_gets_negotiate_protocol_version_and_the_session_works() {
    let (_, _g, app) = shared_app("proto_grease");
    let d = Dbward::start(&app.config("static"));
    // What libpq's max_protocol_version=grease sends: 3.9999 and made-up _pq_ options.
    let (mut w, greeting) = login(
        d.port(),
        &app,
        (3 << 16) | 9999,
        &[("_pq_.test_protocol_negotiation", ""), ("_pq_.bogus_option", "on")],
    )
    .await;
    let v = &greeting[0];
    assert_eq!(v.tag, b'v', "{greeting:?}");
    assert_eq!(v.i32_at(0), (3 << 16) | 2, "newest version dbward speaks");
    assert_eq!(v.i32_at(4), 2);
    assert_eq!(&v.body[8..], b"_pq_.test_protocol_negotiation\0_pq_.bogus_option\0");
    assert_eq!(greeting[1].raw(), [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    assert_eq!(backend_key(&greeting).1.len(), 32, "3.2 session");
    assert_eq!(Wire::first_column(&w.simple("select 'ok'").await), ["ok"]);

    // A 3.0 client with an option: negotiation says 3.0, never more than asked for.
    let (mut w, greeting) = login(d.port(), &app, V3_0, &[("_pq_.compression", "on")]).await;
    assert_eq!(greeting[0].tag, b'v');
    assert_eq!(greeting[0].i32_at(0), 3 << 16);
    assert_eq!(&greeting[0].body[8..], b"_pq_.compression\0");
    assert_eq!(backend_key(&greeting).1.len(), 4);
    assert_eq!(Wire::first_column(&w.simple("select 'ok'").await), ["ok"]);
}

#[tokio::test]
async fn other_major_versions_and_malformed_startups_are_refused() {
    // As Postgres answers them (tests/conformance.rs compares the two): a FATAL where Postgres
    // sends one, in the protocol-2 format for a 2.x client, and silence where Postgres only logs.
    let (_, _g, app) = shared_app("proto_malformed");
    let d = Dbward::start(&app.config("static"));
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            startup(4 << 16, &[("user", "u")]),
            "0A000",
            "unsupported frontend protocol 4.0",
        ),
        (
            [&[0, 0, 0, 13][..], &(3u32 << 16).to_be_bytes(), b"user\0"].concat(),
            "08P01",
            "invalid startup packet layout",
        ),
        (startup(V3_0, &[("database", "x")]), "28000", "no PostgreSQL user name"),
        (startup(V3_0, &[("user", "")]), "28000", "no PostgreSQL user name"),
    ];
    for (bytes, code, text) in cases {
        let mut w = Wire::tcp(d.port()).await;
        w.send(&bytes).await;
        let msgs = w.until_eof().await;
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        let f = msgs[0].fields();
        assert_eq!((f[&'S'].as_str(), f[&'C'].as_str()), ("FATAL", code), "{f:?}");
        assert!(f[&'M'].contains(text), "{f:?}");
        assert!(parses_as_error(&msgs[0]));
    }

    // A protocol-2.0 client reads 'E' and a NUL-terminated text.
    let mut w = Wire::tcp(d.port()).await;
    w.send(&startup(2 << 16, &[("user", "u")])).await;
    let mut got = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, tokio::io::AsyncReadExt::read_to_end(&mut w.io, &mut got))
        .await
        .expect("closed")
        .expect("read");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "EFATAL:  unsupported frontend protocol 2.0: server supports 3.0 to 3.2\n\0"
    );

    // Postgres only logs these (COMMERROR) and closes.
    for bytes in [
        vec![0, 0, 0, 2, 0, 0, 0, 0],
        vec![0x7f, 0, 0, 0, 0, 0, 0, 0],
        [&[b'X', 0, 0, 0, 4][..], &startup(V3_0, &[("user", "u")])].concat(),
        [&[0, 0, 0, 12][..], &CANCEL_REQUEST.to_be_bytes(), &[0, 0, 0, 1]].concat(),
    ] {
        let mut w = Wire::tcp(d.port()).await;
        w.send(&bytes).await;
        assert!(w.closes_silently(Duration::from_secs(10)).await, "{bytes:02x?}");
    }
    d.wait_for_log("invalid length of startup packet", Duration::from_secs(5));

    // A name given twice takes the later value, as in Postgres.
    let (mut w, _) = login(
        d.port(),
        &app,
        V3_0,
        &[("application_name", "first"), ("application_name", "second")],
    )
    .await;
    assert_eq!(
        Wire::first_column(&w.simple("select current_setting('application_name')").await),
        ["second"]
    );
}

#[test]
fn replication_startups_pass_only_when_allowed() {
    let (s, _g, app) = shared_app("proto_replication");
    app.pg_exec(&format!("alter role {} replication", pg_ident(&app.static_pg_role)));

    let off = Dbward::start(&app.config("static"));
    let conninfo = |port: u16, mode: &str| {
        format!(
            "host=127.0.0.1 port={port} dbname={} user=app replication={mode}",
            app.dbname
        )
    };
    let out = psql_conn(&conninfo(off.port(), "database"), "IDENTIFY_SYSTEM");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("replication connections (replication=database) are not relayed"),
        "{err}"
    );
    assert!(err.contains("allow_replication"), "{err}");

    let on = Dbward::start(&app.config("static").db_line("allow_replication = true"));
    let out = psql_conn(&conninfo(on.port(), "database"), "IDENTIFY_SYSTEM");
    assert!(out.status.success(), "{}\n{}", stderr(&out), on.log_contents());
    let system_id = s.pg_exec("postgres", "select system_identifier from pg_control_system()");
    assert!(stdout(&out).starts_with(&format!("{system_id}|")), "{}", stdout(&out));

    // Physical replication streams WAL in CopyBoth mode through the relay.
    let lsn = app.pg_exec("create table r(x int); insert into r values (1); select pg_current_wal_lsn()");
    let lsn = lsn.lines().last().unwrap().to_string();
    let dir = app.dir.join("wal");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(std::path::Path::new(PG_BIN).join("pg_receivewal"))
        .args(["-h", "127.0.0.1", "-p", &on.port().to_string(), "-U", "app", "-D"])
        .arg(&dir)
        .args(["-E", &lsn, "--no-loop", "-w"])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stderr(&out), on.log_contents());
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(!files.is_empty(), "pg_receivewal wrote no WAL");
}

// --- 6. Errors and limits -------------------------------------------------------------------------

#[tokio::test]
async fn max_client_connections_gives_53300() {
    let (_, _g, app) = shared_app("proto_max_clients");
    let d = Dbward::start(&app.config("static").db_line("max_client_connections = 1"));
    // Dbward::start's readiness probe was a client too; its slot frees as soon as dbward sees
    // it close.
    let mut held = connect_when_free(d.port(), &app).await;
    let f = refused_startup(d.port(), &[("user", "app"), ("database", &app.dbname)], "53300").await;
    assert!(f[&'M'].contains("max_client_connections (1)"), "{f:?}");
    held.send(&terminate()).await;
    assert!(held.until_eof().await.is_empty());
    // The slot comes back once the session is over.
    connect_when_free(d.port(), &app).await;
}

/// A session through dbward, retried while the entry is at max_client_connections (53300).
async fn connect_when_free(port: u16, app: &TestApp) -> Wire {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut w = Wire::tcp(port).await;
        w.send(&startup(V3_0, &[("user", "app"), ("database", &app.dbname)]))
            .await;
        let msgs = w.until_ready_or_eof().await;
        if msgs.iter().any(|m| m.tag == b'Z') {
            return w;
        }
        assert_eq!(error_in(&msgs).code(), "53300", "{msgs:?}");
        assert!(Instant::now() < deadline, "slot not released: {msgs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn vault_denial_is_28000_and_unreachable_upstream_is_08001() {
    let (_, _g, app) = shared_app("proto_errors");
    app.set_policy("path \"sys/leases/renew\" { capabilities = [\"update\"] }\n");
    let d = Dbward::start(&app.config("static"));
    refused_startup(d.port(), &[("user", "app"), ("database", &app.dbname)], "28000").await;
    app.set_policy(&app.default_policy_hcl());

    let closed = free_port();
    let mut cfg = app.config("static");
    cfg.databases[0].upstream = format!("127.0.0.1:{closed}");
    let d = Dbward::start(&cfg);
    let f = refused_startup(d.port(), &[("user", "app"), ("database", &app.dbname)], "08001").await;
    assert!(f[&'M'].contains(&format!("127.0.0.1:{closed}")), "{f:?}");

    // The server's own errors are relayed as sent: a database that does not exist (3D000).
    let mut cfg = app.config("static");
    cfg.databases[0].dbname = None;
    let d = Dbward::start(&cfg);
    let f = refused_startup(d.port(), &[("user", "app"), ("database", "no_such_db")], "3D000").await;
    assert_eq!(f[&'M'], "database \"no_such_db\" does not exist");
}

#[tokio::test]
async fn shutdown_sends_57p01_between_server_messages() {
    let (_, _g, app) = shared_app("proto_shutdown");
    let d = Dbward::start(&app.config("static").proxy("shutdown_grace", "1s"));
    let (mut idle, _) = login(d.port(), &app, V3_0, &[]).await;
    let (mut busy, _) = login(d.port(), &app, V3_0, &[]).await;
    // Rows of uneven sizes, more than can pass before the grace period ends.
    // (A set-returning function in the select list streams; in FROM it would be materialized.)
    busy.send(&query(
        "select repeat('x', (g % 5000) + 1) from (select generate_series(1, 100000000) g) s",
    ))
    .await;
    let first = busy.expect().await;
    assert_eq!(first.tag, b'T');
    d.signal(libc::SIGTERM);

    let msgs = idle.until_eof().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let f = msgs[0].fields();
    assert_eq!((f[&'S'].as_str(), f[&'C'].as_str()), ("FATAL", "57P01"), "{f:?}");

    // The busy client reads whole DataRows (framing intact) and then the 57P01.
    let mut rows = 0u64;
    let last = loop {
        let m = busy.recv().await.expect("EOF without 57P01");
        if m.tag != b'D' {
            break m;
        }
        rows += 1;
    };
    assert_eq!(last.code(), "57P01", "after {rows} rows: {last:?}");
    assert!(busy.recv().await.is_none());
    assert!(rows > 0);
    let mut d = d;
    assert!(d.wait_exit(Duration::from_secs(10)).is_some(), "dbward did not exit");
}

/// Backends of `user` still connected.
fn backends(app: &TestApp, user: &str) -> usize {
    app.pg_exec(&format!(
        "select count(*) from pg_stat_activity where usename = {}",
        pg_literal(user)
    ))
    .parse()
    .unwrap()
}

fn wait_no_backends(app: &TestApp, user: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends(app, user) > 0 {
        assert!(Instant::now() < deadline, "{what}: upstream connection still open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn sessions_end_without_leaking_upstream_connections() {
    let (_, _g, app) = shared_app("proto_leaks");
    let d = Dbward::start(&app.config("static"));
    let port = d.port();
    let user = app.static_pg_role.clone();

    // Terminate.
    let (mut w, _) = login(port, &app, V3_0, &[]).await;
    assert_eq!(backends(&app, &user), 1);
    w.send(&terminate()).await;
    assert!(w.until_eof().await.is_empty());
    wait_no_backends(&app, &user, "after Terminate");

    // Half-close without Terminate: the answer to what was sent still arrives.
    let (mut w, _) = login(port, &app, V3_0, &[]).await;
    w.send(&query("select 42")).await;
    w.io.shutdown().await.unwrap();
    let msgs = w.until_eof().await;
    assert_eq!(Wire::first_column(&msgs), ["42"]);
    wait_no_backends(&app, &user, "after a half-close");

    // The client just disappears.
    let (w, _) = login(port, &app, V3_0, &[]).await;
    drop(w);
    wait_no_backends(&app, &user, "after the client vanished");

    // The server ends the backend while the client idles: the client is closed too.
    let (mut w, greeting) = login(port, &app, V3_0, &[]).await;
    let (pid, _) = backend_key(&greeting);
    app.pg_exec(&format!("select pg_terminate_backend({pid})"));
    let msgs = w.until_eof().await;
    assert_eq!(error_in(&msgs).code(), "57P01");
    wait_no_backends(&app, &user, "after pg_terminate_backend");

    d.wait_for_log("end=\"server closed\"", Duration::from_secs(5));
    d.wait_for_log("end=\"client closed\"", Duration::from_secs(5));
}

// --- 8. Differential ---------------------------------------------------------------------------------

/// One step of the script: what the client sends, and the message type after which it stops
/// reading (ReadyForQuery unless the server is to ask for COPY data first).
struct Step {
    send: Vec<u8>,
    until: u8,
}

fn step(send: Vec<u8>) -> Step {
    Step { send, until: b'Z' }
}

fn script() -> Vec<Step> {
    let int4 = 23;
    let mut steps = vec![
        step(query("truncate items")),
        step(query(
            "insert into items values (1, 'apple', 1.50, '\\x00ff'), (2, 'pear', NULL, NULL); \
             select * from items order by id",
        )),
        step(query("select 1/0")),
        step(query("")),
        step(query(
            "do $$ begin raise notice 'hello %', 42; raise warning 'careful' using hint = 'be careful'; end $$",
        )),
        step(query("set application_name = 'differential'; show application_name")),
        step(query("insert into items values (1, 'duplicate')")),
        step(query(
            "begin; insert into items values (3, 'plum'); select nonexistent; commit",
        )),
        step(query("rollback")),
        step(query("select id, name from items order by id; select 'multi', 2")),
        step(query("select repeat(md5(g::text), 40) from generate_series(1, 3000) g")),
    ];
    // Extended protocol: named statement, binary parameter and results, Describe of both kinds.
    let mut b = parse("s1", "select id, name, price, data from items where id = $1", &[int4]);
    b.extend(describe(b'S', "s1"));
    b.extend(bind("", "s1", &[1], &[Some(&1i32.to_be_bytes())], &[1, 0, 0, 1]));
    b.extend(describe(b'P', ""));
    b.extend(execute("", 0));
    b.extend(sync());
    steps.push(step(b));
    // A portal run in pieces (PortalSuspended), then closed.
    let mut b = parse("", "select g, g * 2 from generate_series(1, 5) g", &[]);
    b.extend(bind("p", "", &[], &[], &[]));
    b.extend(execute("p", 2));
    b.extend(execute("p", 2));
    b.extend(execute("p", 0));
    b.extend(close(b'P', "p"));
    b.extend(sync());
    steps.push(step(b));
    // Errors in the extended protocol: everything up to Sync is skipped.
    let mut b = bind("", "s1", &[], &[], &[]);
    b.extend(execute("", 0));
    b.extend(sync());
    steps.push(step(b));
    let mut b = parse("bad", "select * from nowhere", &[]);
    b.extend(bind("", "bad", &[], &[], &[]));
    b.extend(sync());
    steps.push(step(b));
    // Binary results of several types, NULL parameter.
    let mut b = parse(
        "",
        "select 1::int8, 'x'::text, true, date '2024-02-29', 1.5::float8, array[1,2], $1::text is null",
        &[25],
    );
    b.extend(bind("", "", &[0], &[None], &[1]));
    b.extend(execute("", 0));
    b.extend(sync());
    steps.push(step(b));
    // COPY OUT, text and binary.
    steps.push(step(query("copy items to stdout")));
    steps.push(step(query(
        "copy (select id, name from items order by id) to stdout with (format binary)",
    )));
    // COPY IN: the server asks (CopyInResponse), the client sends.
    steps.push(Step {
        send: query("copy items (id, name) from stdin"),
        until: b'G',
    });
    let mut b = copy_data(b"10\tten\n11\televen\n");
    b.extend(copy_data(b"12\ttwelve\n"));
    b.extend(copy_done());
    steps.push(step(b));
    steps.push(Step {
        send: query("copy items (id, name) from stdin"),
        until: b'G',
    });
    let mut b = copy_data(b"20\ttwenty\n");
    b.extend(copy_fail("client changed its mind"));
    steps.push(step(b));
    steps.push(Step {
        send: query("copy items (id, name) from stdin"),
        until: b'G',
    });
    steps.push(step([copy_data(b"not a number\tx\n"), copy_done()].concat()));
    // COPY IN through the extended protocol.
    let mut b = parse("", "copy items (id, name) from stdin", &[]);
    b.extend(bind("", "", &[], &[], &[]));
    b.extend(execute("", 0));
    b.extend(flush());
    steps.push(Step { send: b, until: b'G' });
    steps.push(step([copy_data(b"30\tthirty\n"), copy_done(), sync()].concat()));
    steps.push(step(query("select count(*), sum(id) from items")));
    steps
}

/// Runs the script and returns, per step, the raw bytes received.
async fn run_script(w: &mut Wire) -> Vec<Vec<Msg>> {
    let mut out = Vec::new();
    for s in script() {
        w.send(&s.send).await;
        let mut got = Vec::new();
        loop {
            let m = w.expect().await;
            let done = m.tag == s.until;
            got.push(m);
            if done {
                break;
            }
        }
        out.push(got);
    }
    w.send(&terminate()).await;
    assert!(w.until_eof().await.is_empty());
    out
}

#[tokio::test]
async fn relayed_bytes_equal_a_direct_connection() {
    let (s, _g, app) = shared_app("proto_differential");
    app.create_table("items(id int primary key, name text, price numeric(6,2), data bytea)");
    let (user, password, _) = app.read_creds("static");
    let params = |u: &str| {
        vec![
            ("user", u.to_string()),
            ("database", app.dbname.clone()),
            ("application_name", "diff".to_string()),
        ]
    };

    let mut direct = Wire::tcp(s.pg_port()).await;
    let p = params(&user);
    let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let direct_greeting = direct.login_scram(&p, &password).await;
    let direct_out = run_script(&mut direct).await;

    let d = Dbward::start(&app.config("static"));
    let mut proxied = Wire::tcp(d.port()).await;
    let p = params("whoever");
    let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proxied_greeting = proxied.startup(V3_0, &p).await;
    assert_eq!(proxied_greeting[0].raw(), [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    let proxied_out = run_script(&mut proxied).await;

    let no_key = |g: &[Msg]| {
        g.iter()
            .filter(|m| m.tag != b'K' && m.tag != b'R')
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(no_key(&proxied_greeting), no_key(&direct_greeting), "greeting");
    assert_eq!(direct_out.len(), proxied_out.len());
    let mut total = 0;
    for (i, (a, b)) in direct_out.iter().zip(&proxied_out).enumerate() {
        assert_eq!(b, a, "step {i}");
        total += a.iter().map(|m| m.body.len() + 5).sum::<usize>();
    }
    // Sanity: the script exercised what it claims to.
    let tags: std::collections::HashSet<u8> = direct_out.iter().flatten().map(|m| m.tag).collect();
    for t in [
        b'T', b'D', b'C', b'E', b'N', b'I', b'S', b'1', b'2', b't', b's', b'3', b'H', b'G', b'd', b'c',
    ] {
        assert!(tags.contains(&t), "script produced no '{}' message", t as char);
    }
    eprintln!("differential: {} steps, {total} bytes identical", direct_out.len());
}
