//! Authentication against scripted servers: SCRAM with and without channel binding, MD5 and
//! cleartext only where safe, and the errors a broken or hostile server gets.

use super::*;

#[tokio::test]
async fn scram_over_plain_connection() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        assert_eq!(c.param("user"), "v-token-payments");
        assert_eq!(c.param("application_name"), "psql");
        let header = c.scram(&["SCRAM-SHA-256"], PASSWORD, false).await;
        assert_eq!(header, "n,,");
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let connected = connect(&s, &params(), &password()).await.unwrap();
    let _c = server.await.unwrap();
    assert!(!connected.tls);
    assert_eq!(connected.backend_pid, Some(4242));
    assert_eq!(connected.key.as_ref().unwrap().secret, vec![1, 2, 3, 4]);
    assert_eq!(
        &connected.greeting[..],
        &greeting_msgs()[..],
        "greeting without BackendKeyData"
    );
    assert!(!format!("{connected:?}").contains("[1, 2, 3, 4]"));
}

/// A SCRAM login to a TLS server offering `mechanisms`; returns the GS2 header the client
/// sent and whether the connection is TLS.
async fn scram_over_tls(mechanisms: &'static [&'static str], sslmode: SslMode, verify: bool) -> (String, bool) {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        let header = c.scram(mechanisms, PASSWORD, false).await;
        c.finish_startup().await;
        (header, c)
    });
    let s = settings(port, sslmode, verify.then(|| pki.roots()), "db.internal");
    let connected = connect(&s, &params(), &password()).await.unwrap();
    let (header, _c) = server.await.unwrap();
    (header, connected.tls)
}

#[tokio::test]
async fn scram_plus_over_tls() {
    let (header, tls) = scram_over_tls(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], SslMode::VerifyFull, true).await;
    assert_eq!(header, "p=tls-server-end-point,,");
    assert!(tls);
}

#[tokio::test]
async fn scram_over_tls_without_plus_says_y() {
    let (header, tls) = scram_over_tls(&["SCRAM-SHA-256"], SslMode::Require, false).await;
    assert_eq!(header, "y,,");
    assert!(tls);
}

#[tokio::test]
async fn authentication_ok_before_scram_final_is_refused() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        // A server that does not know the password cannot produce SASLFinal; it skips to Ok.
        c.scram(&["SCRAM-SHA-256"], "not-the-password", true).await;
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(matches!(e, UpstreamError::Auth(_)), "{e}");
    assert!(e.to_string().contains("before proving it knows the password"), "{e}");
    let pg = e.to_pg_error("payments").unwrap();
    assert_eq!(pg.code, "08004");
    assert!(
        pg.message.contains("\"payments\"") && pg.message.contains("127.0.0.1:"),
        "{pg}"
    );
    assert!(!e.to_string().contains(PASSWORD));
}

#[tokio::test]
async fn wrong_password_is_forwarded_verbatim() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.scram(&["SCRAM-SHA-256"], "the-rotated-password", false).await;
        c
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(e.is_password_rejected(), "{e}");
    assert_eq!(e.sqlstate(), "28P01");
    assert!(e.to_pg_error("payments").is_none());
    let UpstreamError::Server(se) = &e else { panic!("{e}") };
    assert_eq!(
        &se.raw[..],
        &error_msg("28P01", "password authentication failed for user \"v-token-payments\"")[..]
    );
    assert_eq!(se.severity, "FATAL");
}

#[tokio::test]
async fn md5_needs_verified_tls_or_explicit_permission() {
    async fn run(allow: bool) -> Result<Connected, UpstreamError> {
        let (listener, port) = listen().await;
        let server = tokio::spawn(async move {
            let mut c = accept(&listener, None).await;
            c.send(&auth_msg(5, &[1, 2, 3, 4])).await;
            let (tag, body) = c.recv().await;
            assert_eq!(tag, b'p');
            let expected =
                postgres_protocol::authentication::md5_hash(b"v-token-payments", PASSWORD.as_bytes(), [1, 2, 3, 4]);
            assert_eq!(body, [expected.as_bytes(), b"\0"].concat());
            c.send(&auth_msg(0, b"")).await;
            c.finish_startup().await;
            c
        });
        let mut s = settings(port, SslMode::Disable, None, "db.internal");
        s.allow_insecure_password = allow;
        let r = connect(&s, &params(), &password()).await;
        if allow {
            server.await.unwrap();
        }
        r
    }
    let e = run(false).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("MD5") && text.contains("unencrypted") && text.contains("allow_insecure_password"),
        "{text}"
    );
    assert!(text.contains("verify-full"), "{text}");
    assert_eq!(e.sqlstate(), "08004");
    run(true).await.unwrap();
}

#[tokio::test]
async fn cleartext_over_verified_tls() {
    let pki = Arc::new(Pki::new(&["db.internal"]));
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        c.send(&auth_msg(3, b"")).await;
        let (tag, body) = c.recv().await;
        assert_eq!((tag, body), (b'p', format!("{PASSWORD}\0").into_bytes()));
        c.send(&auth_msg(0, b"")).await;
        c.finish_startup().await;
        c
    });
    let s = settings(port, SslMode::VerifyFull, Some(pki.roots()), "db.internal");
    connect(&s, &params(), &password()).await.unwrap();
    server.await.unwrap();

    // The same over unverified TLS is refused.
    let (listener, port) = listen().await;
    let server_pki = pki.clone();
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, Some(&server_pki)).await;
        c.send(&auth_msg(3, b"")).await;
        c
    });
    let s = settings(port, SslMode::Require, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    let _ = server.await;
    assert!(
        e.to_string()
            .contains("cleartext password over TLS without certificate verification"),
        "{e}"
    );
}

/// A server that sends `messages` after the startup packet.
async fn scripted(messages: Vec<u8>) -> UpstreamError {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.send(&messages).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.abort();
    e
}

#[tokio::test]
async fn unsupported_methods_are_named() {
    let e = scripted(auth_msg(10, b"SCRAM-SHA-1\0OAUTHBEARER\0\0")).await;
    assert!(e.to_string().contains("[SCRAM-SHA-1, OAUTHBEARER]"), "{e}");
    assert_eq!(e.sqlstate(), "08004");
    let e = scripted(auth_msg(7, b"")).await;
    assert!(e.to_string().contains("GSSAPI"), "{e}");
    let e = scripted(auth_msg(42, b"")).await;
    assert!(e.to_string().contains("authentication method 42"), "{e}");
}

#[tokio::test]
async fn protocol_violations() {
    let e = scripted(msg(b'Z', b"I")).await;
    assert!(matches!(e, UpstreamError::Protocol(_)), "{e}");
    assert!(e.to_string().contains("unexpected message type 'Z'"), "{e}");
    let e = scripted(b"R\x7f\xff\xff\xff".to_vec()).await;
    assert!(e.to_string().contains("invalid length"), "{e}");
    assert_eq!(e.to_pg_error("payments").unwrap().code, "08P01");
    let e = scripted(auth_msg(12, b"v=AAAA")).await;
    assert!(e.to_string().contains("SASLFinal without SASL"), "{e}");
}

#[tokio::test]
async fn server_error_after_authentication() {
    let e = scripted(
        [
            auth_msg(0, b""),
            msg(b'S', b"a\0b\0"),
            error_msg("3D000", "database \"nope\" does not exist"),
        ]
        .concat(),
    )
    .await;
    assert_eq!(e.sqlstate(), "3D000");
    assert!(!e.is_password_rejected());
    assert!(e.to_pg_error("payments").is_none());
}

#[tokio::test]
async fn eof_during_startup_names_the_upstream() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        drop(accept(&listener, None).await);
    });
    let s = settings(port, SslMode::Disable, None, "db.internal");
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.await.unwrap();
    assert!(
        e.to_string()
            .contains(&format!("upstream 127.0.0.1:{port} closed the connection")),
        "{e}"
    );
}

/// A server that says AuthenticationOk at once (an impostor, or `trust`), under `policy`.
async fn instant_ok(policy: &str, cb: crate::upstream::auth_policy::ChannelBindingMode) -> Result<(), UpstreamError> {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.send(&auth_msg(0, b"")).await;
        c.finish_startup().await;
        c
    });
    let mut s = settings(port, SslMode::Disable, None, "db.internal");
    s.auth_policy = crate::upstream::auth_policy::AuthPolicy {
        require_auth: crate::upstream::auth_policy::RequireAuth::parse(policy).unwrap(),
        channel_binding: cb,
    };
    let result = connect(&s, &params(), &password()).await.map(drop);
    server.abort();
    result
}

#[tokio::test]
async fn require_auth_refuses_authentication_ok_without_an_exchange() {
    use crate::upstream::auth_policy::ChannelBindingMode::Prefer;
    for policy in ["scram-sha-256", "!none", "password,md5"] {
        let e = instant_ok(policy, Prefer).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Auth(_)), "{policy}: {e}");
        assert!(
            e.to_string().contains(&format!(
                "authentication method requirement \"{policy}\" failed: server did not complete authentication"
            )),
            "{e}"
        );
        assert_eq!(e.to_pg_error("payments").unwrap().code, "08004");
    }
    // Unset, "none" and a negated list without !none admit trust, as libpq does.
    for policy in ["", "none", "scram-sha-256,none", "!password"] {
        instant_ok(policy, Prefer)
            .await
            .unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
}

#[tokio::test]
async fn require_auth_refuses_methods_it_does_not_list() {
    let (listener, port) = listen().await;
    let server = tokio::spawn(async move {
        let mut c = accept(&listener, None).await;
        c.scram(&["SCRAM-SHA-256"], PASSWORD, false).await;
        c.finish_startup().await;
        c
    });
    let mut s = settings(port, SslMode::Disable, None, "db.internal");
    s.auth_policy.require_auth = crate::upstream::auth_policy::RequireAuth::parse("!scram-sha-256").unwrap();
    let e = connect(&s, &params(), &password()).await.unwrap_err();
    server.abort();
    assert!(
        e.to_string()
            .contains("server requested SASL (scram-sha-256) authentication"),
        "{e}"
    );
}

#[tokio::test]
async fn channel_binding_require() {
    use crate::upstream::auth_policy::ChannelBindingMode::{Disable, Require};
    // Trust: no binding happened.
    let e = instant_ok("", Require).await.unwrap_err();
    assert!(e.to_string().contains("authenticated without channel binding"), "{e}");

    // Over TLS with -PLUS offered: bound.
    let pki = Arc::new(Pki::new(&["db.internal"]));
    for (mechanisms, cb, ok) in [
        (&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"][..], Require, true),
        (&["SCRAM-SHA-256"][..], Require, false),
        (&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"][..], Disable, true),
    ] {
        let (listener, port) = listen().await;
        let server_pki = pki.clone();
        let list: Vec<&'static str> = mechanisms.to_vec();
        let server = tokio::spawn(async move {
            let mut c = accept(&listener, Some(&server_pki)).await;
            let header = c.scram(&list, PASSWORD, false).await;
            c.finish_startup().await;
            header
        });
        let mut s = settings(port, SslMode::VerifyFull, Some(pki.roots()), "db.internal");
        s.auth_policy.channel_binding = cb;
        let result = connect(&s, &params(), &password()).await;
        if ok {
            result.unwrap_or_else(|e| panic!("{mechanisms:?} {cb:?}: {e}"));
            let header = server.await.unwrap();
            let want = if cb == Require {
                "p=tls-server-end-point,,"
            } else {
                "n,,"
            };
            assert_eq!(header, want);
        } else {
            server.abort();
            let e = result.unwrap_err();
            assert!(e.to_string().contains("did not offer SCRAM-SHA-256-PLUS"), "{e}");
        }
    }
}

#[tokio::test]
async fn greeting_is_capped() {
    let notice = msg(
        b'N',
        &[b"SNOTICE\0C00000\0M".as_slice(), &[b'x'; 8000], b"\0\0"].concat(),
    );
    let mut script = auth_msg(0, b"");
    for _ in 0..(crate::upstream::auth::MAX_GREETING_LEN / notice.len() + 2) {
        script.extend_from_slice(&notice);
    }
    let e = scripted(script).await;
    assert!(e.to_string().contains("before ReadyForQuery"), "{e}");
    assert_eq!(e.to_pg_error("payments").unwrap().code, "08P01");
}
