//! A hostile network and hostile servers on the upstream side, through the real dbward binary
//! with the real OpenBao and Postgres:
//!
//! - a server (or anyone on the path) answering the SSLRequest with an ErrorResponse 28P01
//!   before TLS: the client never sees that text, gets dbward's 08001 "refused TLS", and the
//!   credential is kept (the Vault audit log shows the reads);
//! - `require_auth` and `channel_binding` against the real Postgres over TLS (SCRAM-SHA-256-PLUS
//!   with tls-server-end-point), and against an impostor that says AuthenticationOk at once;
//! - secrets hygiene on the Vault side: after a re-login the previous Vault token is revoked
//!   once no session holds a lease it created (not before, and not left to expire).
//!
//! This binary turns `ssl` on in its own Postgres cluster (reloadable, no restart). None of its
//! tests disturbs the shared servers, so none takes their disruption lock.

mod common;
mod wire;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
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
    let s = servers();
    let app = s.new_app("sec-ssl-err");
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
    assert!(
        reads <= 2,
        "{reads} Vault reads over six attempts: the credential was dropped"
    );
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
    entry
        .extra
        .push(format!("ca_file = {}", toml_str(&ca.to_string_lossy())));
    entry.extra.extend(lines.iter().map(|l| l.to_string()));
    Dbward::start(&cfg)
}

#[tokio::test]
async fn channel_binding_require_and_require_auth_against_real_postgres() {
    let app = servers().new_app("sec-cb");
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
    let app = servers().new_app("sec-trust");
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

/// Accessors of the live tokens that carry `app`'s policy (dbward's), with their lookup.
fn app_tokens(s: &Servers, app: &TestApp) -> Vec<(String, Value)> {
    let (status, list) = s.vault_request("LIST", "auth/token/accessors", Some(ROOT_TOKEN), None);
    assert_eq!(status, 200, "LIST auth/token/accessors: {list}");
    let mut ours = Vec::new();
    for accessor in list["data"]["keys"].as_array().unwrap() {
        let (status, token) = token_by_accessor(s, accessor.as_str().unwrap());
        if status == 200
            && token["data"]["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p == app.policy.as_str()))
        {
            ours.push((accessor.as_str().unwrap().to_string(), token));
        }
    }
    ours
}

fn token_by_accessor(s: &Servers, accessor: &str) -> (u16, Value) {
    let body = json!({ "accessor": accessor });
    s.vault_request("POST", "auth/token/lookup-accessor", Some(ROOT_TOKEN), Some(&body))
}

/// dbward started by hand: its config needs `vault.request_timeout`, which the harness's
/// config does not write. Waits until the listener accepts.
fn start_with_vault_lines(app: &TestApp, cfg: &TestConfig, lines: &str) -> (ChildGuard, std::path::PathBuf) {
    let toml = cfg.toml().replacen("[vault]\n", &format!("[vault]\n{lines}\n"), 1);
    let path = app.dir.join("dbward-tokens.toml");
    std::fs::write(&path, toml).unwrap();
    let log = app.dir.join("dbward-tokens.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dbward"));
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "dbward=debug")
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let child = ChildGuard::spawn(cmd).unwrap();
    let port = cfg.port();
    wait_until(DBWARD_READY_TIMEOUT, "dbward listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .map(drop)
            .map_err(|e| format!("{e}; log:\n{}", log_tail(&log, 20)))
    });
    (child, log)
}

#[tokio::test]
async fn the_previous_vault_token_is_revoked_once_no_session_holds_its_lease() {
    let s = servers();
    let app = s.new_app("sec-tokrevoke");
    // A token cannot be renewed past 30 s: dbward logs in anew at 2/3 of it (20 s), which
    // leaves about 8 s for the revocation to come before the expiry even on a loaded machine.
    // (Vault applies the role's current max TTL at renewal: it stays 30 s for the whole test.)
    app.set_jwt_role_ttls("30s", Some("30s"));
    let cfg = app.config("database");
    let (mut child, log) = start_with_vault_lines(&app, &cfg, "request_timeout = \"1s\"");
    let port = cfg.port();

    let first = wait_until(Duration::from_secs(10), "dbward's first token", || {
        match &app_tokens(s, &app)[..] {
            [one] => Ok(one.clone()),
            other => Err(format!("{} tokens", other.len())),
        }
    });
    let (accessor, info) = first;
    let expires = Instant::now() + Duration::from_secs(info["data"]["ttl"].as_u64().unwrap());

    // A session on the first token's lease, held across the re-login.
    let held = connect(port, &app.dbname, "app").await;
    let first_user = whoami(&held).await.unwrap();
    wait_until(Duration::from_secs(30), "a second login", || {
        match app_tokens(s, &app).len() {
            2 => Ok(()),
            n => Err(format!("{n} tokens; log:\n{}", log_tail(&log, 80))),
        }
    });
    // New connections move to the new token's credential; the held one still works.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = connect(port, &app.dbname, "app").await;
        if whoami(&c).await.unwrap() != first_user {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no credential of the new login; log:\n{}",
            log_tail(&log, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        whoami(&held).await.unwrap(),
        first_user,
        "the held session is untouched"
    );
    assert_eq!(
        token_by_accessor(s, &accessor).0,
        200,
        "revoked while a session holds its lease"
    );

    drop(held);
    wait_until(
        Duration::from_secs(10),
        "the first token revoked",
        || match token_by_accessor(s, &accessor).0 {
            200 => Err(format!("still valid; log:\n{}", log_tail(&log, 20))),
            _ => Ok(()),
        },
    );
    assert!(
        Instant::now() + Duration::from_millis(500) < expires,
        "the first token was gone only at its expiry, not revoked; log:\n{}",
        log_tail(&log, 40)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("revoked the Vault token"), "{text}");
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).is_some());
}
