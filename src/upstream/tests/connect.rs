//! Connecting: timeouts, refused connections, cancel requests, and settings built from the
//! config.

use super::*;

#[tokio::test]
async fn timeout_names_addr_duration_and_stage() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let c = accept(&listener, None).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(c);
    });
    let mut s = settings(port, SslMode::Disable, None, "db.internal");
    s.connect_timeout = Duration::from_millis(200);
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.abort();
    assert_eq!(
        e.to_string(),
        format!("connecting to 127.0.0.1:{port} timed out after 200ms while authenticating")
    );
    let pg = e.to_pg_error("payments").unwrap();
    assert_eq!((pg.severity, pg.code), ("FATAL", "08001"));
    assert!(pg.hint.unwrap().contains("connect_timeout"));
}

#[tokio::test]
async fn refused_connection() {
    let (listener, port) = listen().await;
    drop(listener);
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Connect { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
        "{e}"
    );
    let pg = e.to_pg_error("payments").unwrap();
    assert!(
        pg.message
            .starts_with(&format!("database \"payments\": cannot connect to 127.0.0.1:{port}")),
        "{pg}"
    );
}

#[tokio::test]
async fn cancel_goes_over_tls_when_configured() {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move { accept(&listener, Some(&server_pki)).await.first });
    let s = settings(port, SslMode::VerifyFull, Some(pki.roots()), "db.internal");
    let key = BackendKey {
        pid: 4242,
        secret: vec![9, 8, 7, 6],
    };
    cancel(&s, &key).await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        StartupPacket::Cancel {
            pid: 4242,
            secret: vec![9, 8, 7, 6]
        }
    );

    // prefer against a server without TLS: plain.
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move { accept(&listener, None).await.first });
    let s = settings(port, SslMode::Prefer, None, "db.internal");
    cancel(&s, &key).await.unwrap();
    assert_eq!(
        server.await.unwrap(),
        StartupPacket::Cancel {
            pid: 4242,
            secret: vec![9, 8, 7, 6]
        }
    );
}

// --- settings ---

fn config_with(extra: &str) -> crate::config::Config {
    crate::config::test_config(extra, "kind = \"database\"\nrole = \"payments\"")
}

#[test]
fn settings_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&["db.internal"]);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let c = config_with(&format!(
        "ca_file = {:?}\nsni = \"pg.example\"\nconnect_timeout = \"3s\"",
        ca.display().to_string()
    ));
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert_eq!(s.addr(), "db.internal:5432");
    assert_eq!(s.sslmode, SslMode::VerifyFull);
    assert!(s.tls.is_some());
    assert_eq!(s.server_name, ServerName::try_from("pg.example").unwrap());
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert!(!s.allow_insecure_password);
    assert!(!format!("{s:?}").contains("BEGIN"));

    let c = config_with("sslmode = \"disable\"");
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert!(s.tls.is_none());

    let mut c = config_with("");
    c.databases[0].upstream = crate::config::HostPort::parse("[::1]:5433").unwrap();
    c.databases[0].ca_file = Some(ca.clone());
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert_eq!(s.addr(), "[::1]:5433");
}

#[test]
fn settings_errors_name_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let mut c = config_with(&format!("ca_file = {:?}", not_pem.display().to_string()));
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "databases[0].ca_file: {:?} contains no PEM certificate",
            not_pem.display().to_string()
        )
    );

    c.databases[0].ca_file = Some("/nonexistent/x.pem".into());
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].ca_file: cannot read \"/nonexistent/x.pem\": No such file"),
        "{e}"
    );

    let pki = Pki::new(&["db.internal"]);
    let cert = dir.path().join("client.pem");
    std::fs::write(&cert, &pki.ca_pem).unwrap();
    c.databases[0].ca_file = None;
    c.databases[0].sslmode = SslMode::Require;
    c.databases[0].client_cert = Some(crate::config::ClientCert {
        cert_file: cert.clone(),
        key_file: cert.clone(),
    });
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].key_file: ") && e.contains("no PEM private key"),
        "{e}"
    );

    c.databases[0].client_cert = None;
    c.databases[0].sni = Some("not a name!".into());
    let e = UpstreamSettings::from_config(0, &c.databases[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("databases[0].sni: \"not a name!\" is not a valid TLS server name"),
        "{e}"
    );
}
