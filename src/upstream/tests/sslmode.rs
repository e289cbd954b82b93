//! Upstream TLS per sslmode: certificate and name verification, servers without TLS, and
//! what a server may send around its answer to SSLRequest.

use super::*;

/// Runs `open` against a TLS server with `server_pki`'s certificate.
async fn tls_open(
    server_pki: &Pki,
    sslmode: SslMode,
    roots: Option<RootCertStore>,
    name: &str,
) -> Result<UpstreamStream, UpstreamError> {
    let (listener, port) = listen().await;
    let acceptor = server_pki.acceptor();
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        assert_eq!(read_packet(&mut tcp).await, StartupPacket::SslRequest);
        tcp.write_all(b"S").await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let s = settings(port, sslmode, roots, name);
    let mut during = "";
    let result = open(&s, &mut during).await;
    server.await.unwrap();
    result
}

#[tokio::test]
async fn verify_full_accepts_right_ca_and_name() {
    let pki = Pki::new(&["db.internal"]);
    let s = tls_open(&pki, SslMode::VerifyFull, Some(pki.roots()), "db.internal")
        .await
        .unwrap();
    assert!(matches!(s, Either::Right(_)));
    assert!(server_certificate(&s).is_some());
    // Debug names the kind and the sockets, nothing of the TLS session.
    let debug = format!("{s:?}");
    assert!(
        debug.starts_with("Right(TlsStream") && debug.contains("ClientConnection"),
        "{debug}"
    );
}

#[tokio::test]
async fn verify_full_refuses_wrong_name() {
    let pki = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyFull, Some(pki.roots()), "other.internal")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("TLS to 127.0.0.1:"), "{text}");
    assert!(
        text.contains("certificate for other.internal not valid: not valid for other.internal"),
        "{text}"
    );
    assert!(text.contains("db.internal"), "{text}");
    assert_eq!(e.sqlstate(), "08001");
}

#[tokio::test]
async fn verify_full_refuses_unknown_ca() {
    let pki = Pki::new(&["db.internal"]);
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyFull, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("certificate for db.internal not valid: unknown issuer"),
        "{e}"
    );
}

#[tokio::test]
async fn verify_ca_ignores_name_but_not_issuer() {
    let pki = Pki::new(&["db.internal"]);
    tls_open(&pki, SslMode::VerifyCa, Some(pki.roots()), "other.internal")
        .await
        .unwrap();
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::VerifyCa, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");
}

#[tokio::test]
async fn require_verifies_nothing_without_ca_file_but_the_chain_with_one() {
    let pki = Pki::new(&["db.internal"]);
    tls_open(&pki, SslMode::Require, None, "other.internal").await.unwrap();
    let other = Pki::new(&["db.internal"]);
    let e = tls_open(&pki, SslMode::Require, Some(other.roots()), "db.internal")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown issuer"), "{e}");
}

/// Server answering the SSLRequest with `answer`, then closing after a moment.
async fn answer_ssl_request(
    answer: impl AsRef<[u8]> + Send + 'static,
    sslmode: SslMode,
) -> Result<UpstreamStream, UpstreamError> {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        assert_eq!(read_packet(&mut tcp).await, StartupPacket::SslRequest);
        tcp.write_all(answer.as_ref()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let s = settings(port, sslmode, None, "db.internal");
    let result = open(&s, &mut "").await;
    server.abort();
    result
}

#[tokio::test]
async fn server_without_tls() {
    let e = answer_ssl_request(b"N", SslMode::Require).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("server {} does not support TLS but sslmode=require", e_addr(&e))
    );
    assert!(matches!(
        answer_ssl_request(b"N", SslMode::Prefer).await.unwrap(),
        Either::Left(_)
    ));
    let e = answer_ssl_request(b"X", SslMode::Prefer).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Protocol(_)), "{e}");
}

fn e_addr(e: &UpstreamError) -> String {
    match e {
        UpstreamError::TlsNotSupported { addr, .. } => addr.clone(),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn bytes_after_ssl_accept_are_refused() {
    let e = answer_ssl_request(b"S\x16\x03\x01injected", SslMode::Require)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CVE-2021-3935"), "{e}");
    assert_eq!(e.sqlstate(), "08P01");
}

#[tokio::test]
async fn error_instead_of_ssl_answer_is_not_the_servers_word() {
    for mode in [SslMode::Prefer, SslMode::Require, SslMode::VerifyFull] {
        let e = answer_ssl_request(
            msg(
                b'E',
                b"SFATAL\x00C28P01\x00Mpassword authentication failed (injected)\x00\x00",
            ),
            mode,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, UpstreamError::TlsRefused { .. }), "{mode}: {e}");
        assert!(!e.is_password_rejected());
        assert!(!e.to_string().contains("injected"), "{e}");
        assert_eq!(e.sqlstate(), "08001");
        let pg = e
            .to_pg_error("payments")
            .expect("dbward's own error, not a relayed one");
        assert!(pg.message.contains("refused TLS"), "{}", pg.message);
    }
    let e = answer_ssl_request(b"X", SslMode::Require).await.unwrap_err();
    assert!(matches!(e, UpstreamError::TlsRefused { .. }), "{e}");
}

#[test]
fn sqlstate_metric_classes_are_bounded() {
    assert_eq!(crate::upstream::sqlstate_class("28P01"), "28");
    assert_eq!(crate::upstream::sqlstate_class("3D000"), "3D");
    assert_eq!(crate::upstream::sqlstate_class("a\"}x"), "XX");
    assert_eq!(crate::upstream::sqlstate_class("é1"), "XX");
    assert_eq!(crate::upstream::sqlstate_class("2"), "XX");
    assert_eq!(crate::upstream::sqlstate_class(""), "XX");
}
