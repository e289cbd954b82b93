//! A hostile network and hostile servers on the upstream side, through the real dbward binary
//! with the real OpenBao and Postgres:
//!
//! - a server (or anyone on the path) answering the SSLRequest with an ErrorResponse 28P01
//!   before TLS: the client never sees that text, gets dbward's 08001 "refused TLS", and the
//!   credential is kept (the Vault audit log shows the reads);
//! - `require_auth` and `channel_binding` against the real Postgres over TLS (SCRAM-SHA-256-PLUS
//!   with tls-server-end-point), and against an impostor that says AuthenticationOk at once.
//!
//! This binary turns `ssl` on in its own Postgres cluster (reloadable, no restart).

mod common;
mod wire;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::Pki;

/// One ErrorResponse as a hostile party would inject it.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let body = format!("SFATAL\0VFATAL\0C{code}\0M{message}\0\0");
    let mut m = vec![b'E'];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body.as_bytes());
    m
}

/// A TCP server on a fresh loopback port that runs `script` on every connection; returns the
/// port. The accept loop lives as long as the test's runtime.
async fn fake_upstream<F, Fut>(script: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(script(tcp));
        }
    });
    port
}

/// Reads one length-prefixed startup packet (SSLRequest or StartupMessage).
async fn read_startup(tcp: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    tcp.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    tcp.read_exact(&mut body).await.ok()?;
    Some(body)
}

const INJECTED: &str = "password authentication failed for user (injected by the network)";

#[tokio::test]
async fn error_instead_of_tls_is_not_relayed_and_keeps_the_credential() {
    let (s, _g, app) = shared_app("sec-ssl-err");
    let port = fake_upstream(|mut tcp| async move {
        if read_startup(&mut tcp).await.is_some() {
            let _ = tcp.write_all(&error_response("28P01", INJECTED)).await;
        }
    })
    .await;
    let mut cfg = app.config("database");
    cfg.databases[0].upstream = format!("127.0.0.1:{port}");
    cfg.databases[0].sslmode = Some("require".into());
    let d = Dbward::start(&cfg);

    for attempt in 0..6 {
        let e = connect_refused(d.port(), &app.dbname, "app").await;
        assert_eq!(e.code().code(), "08001", "attempt {attempt}: {e:?}");
        assert!(
            e.message().contains(&format!("server at 127.0.0.1:{port} refused TLS")),
            "attempt {attempt}: {}",
            e.message()
        );
        let all = format!("{} {:?} {:?}", e.message(), e.detail(), e.hint());
        assert!(!all.contains("injected"), "the injected text reached the client: {all}");
    }
    let reads = s.count_audit_requests(&format!("database/creds/{}", app.dynamic_role));
    assert!(reads <= 2, "{reads} Vault reads over six attempts: the credential was dropped");
    assert!(!d.log_contents().contains("fetching a new one"), "{}", d.log_contents());
}

/// Turns on TLS in this binary's Postgres with a certificate for 127.0.0.1 from a CA made here;
/// returns the CA file. Idempotent.
fn server_tls() -> &'static std::path::Path {
    static CA: OnceLock<std::path::PathBuf> = OnceLock::new();
    CA.get_or_init(|| {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let s = servers();
        let pki = Pki::new(&["127.0.0.1", "localhost"]);
        let data = s.pg_data_dir();
        let (cert, key) = (data.join("dbward-sec-server.crt"), data.join("dbward-sec-server.key"));
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let meta = std::fs::metadata(data).unwrap();
        for p in [&cert, &key] {
            std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid())).unwrap();
        }
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
        let ca = std::env::temp_dir().join(format!("dbward-sec-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        ca
    })
}

/// dbward for `app`'s static role upstream over verify-full, with extra entry `lines`.
fn start_verified(app: &TestApp, lines: &[&str]) -> Dbward {
    let ca = server_tls();
    let mut cfg = app.config("static");
    let entry = &mut cfg.databases[0];
    entry.sslmode = Some("verify-full".into());
    entry.extra.push(format!("ca_file = {}", toml_str(&ca.to_string_lossy())));
    entry.extra.extend(lines.iter().map(|l| l.to_string()));
    Dbward::start(&cfg)
}

#[tokio::test]
async fn channel_binding_require_and_require_auth_against_real_postgres() {
    let (_s, _g, app) = shared_app("sec-cb");
    let d = start_verified(
        &app,
        &["require_auth = \"scram-sha-256\"", "channel_binding = \"require\""],
    );
    let c = connect(d.port(), &app.dbname, "app").await;
    let row = c
        .query_one(
            "select current_user::text, ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), app.static_pg_role);
    assert!(row.get::<_, bool>(1), "upstream connection is TLS");
    drop(c);

    // The server uses SCRAM: a policy that allows only md5 (or forbids SCRAM) refuses it.
    let d = start_verified(&app, &["require_auth = \"md5,password\""]);
    let e = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(e.code().code(), "08004", "{e:?}");
    assert!(
        e.message().contains("authentication method requirement \"md5,password\" failed: server requested SASL (scram-sha-256) authentication"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn impostor_saying_authentication_ok_at_once_is_refused_when_auth_is_required() {
    let (_s, _g, app) = shared_app("sec-trust");
    // No TLS, no password asked: AuthenticationOk, one ParameterStatus, ReadyForQuery.
    let port = fake_upstream(|mut tcp| async move {
        if read_startup(&mut tcp).await.is_none() {
            return;
        }
        let mut reply = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        let status = b"server_version\x0015.0\x00";
        reply.push(b'S');
        reply.extend_from_slice(&(status.len() as u32 + 4).to_be_bytes());
        reply.extend_from_slice(status);
        reply.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 7, 0, 0, 0, 9]);
        reply.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        let _ = tcp.write_all(&reply).await;
        let mut sink = [0u8; 1024];
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    let mut cfg = app.config("static");
    cfg.databases[0].upstream = format!("127.0.0.1:{port}");
    cfg.databases[0].sslmode = Some("disable".into());
    cfg.databases[0].extra.push("require_auth = \"scram-sha-256\"".into());
    let d = Dbward::start(&cfg);
    let e = connect_refused(d.port(), &app.dbname, "app").await;
    assert_eq!(e.code().code(), "08004", "{e:?}");
    assert!(
        e.message().contains("server did not complete authentication"),
        "{}",
        e.message()
    );
}
