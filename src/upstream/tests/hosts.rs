//! The host list against scripted servers: the per-host TLS names, and target_session_attrs
//! decided from a 14+ server's ParameterStatus or, for an older server that does not report
//! it, from `SHOW transaction_read_only` before the next host is tried.

use super::*;
use crate::config::TargetSessionAttrs;

fn row_description(column: &str) -> Vec<u8> {
    let mut b = 1i16.to_be_bytes().to_vec();
    b.extend_from_slice(column.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i32.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&25i32.to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'T', &b)
}

fn data_row(value: &str) -> Vec<u8> {
    let mut b = 1i16.to_be_bytes().to_vec();
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value.as_bytes());
    msg(b'D', &b)
}

#[tokio::test]
async fn an_old_read_only_server_is_asked_then_skipped_for_the_next_host() {
    let (old_listener, old_port) = listen().await;
    let (new_listener, new_port) = listen().await;
    let old = tokio::spawn(async move {
        let mut c = accept(&old_listener, None).await;
        c.scram(&["SCRAM-SHA-256"], PASSWORD, false).await;
        // Postgres 13 reports neither default_transaction_read_only nor in_hot_standby.
        c.send(&[msg(b'S', b"server_version\x0013.9\x00"), key_msg(), msg(b'Z', b"I")].concat())
            .await;
        let (tag, body) = c.recv().await;
        assert_eq!(tag, b'Q');
        assert_eq!(body, b"SHOW transaction_read_only\x00");
        c.send(
            &[
                row_description("transaction_read_only"),
                data_row("on"),
                msg(b'C', b"SHOW\x00"),
                msg(b'Z', b"I"),
            ]
            .concat(),
        )
        .await;
        // A host of the wrong kind is told goodbye.
        assert_eq!(c.recv().await.0, b'X');
    });
    let new = tokio::spawn(async move {
        let mut c = accept(&new_listener, None).await;
        c.scram(&["SCRAM-SHA-256"], PASSWORD, false).await;
        c.send(
            &[
                msg(b'S', b"server_version\x0015.4\x00"),
                msg(b'S', b"default_transaction_read_only\x00off\x00"),
                msg(b'S', b"in_hot_standby\x00off\x00"),
                key_msg(),
                msg(b'Z', b"I"),
            ]
            .concat(),
        )
        .await;
        c
    });
    let mut s = settings(old_port, SslMode::Disable, None, "db.internal");
    s.hosts = [old_port, new_port]
        .iter()
        .map(|p| UpstreamHost {
            host: "127.0.0.1".into(),
            port: *p,
            server_name: ServerName::try_from("db.internal").unwrap(),
        })
        .collect();
    s.ha.target_session_attrs = TargetSessionAttrs::ReadWrite;
    let mut failed = Vec::new();
    let chosen = crate::upstream::hosts::connect(&s, &params(), &password(), &Arc::default(), &mut |h, e| {
        failed.push(format!("{h}: {e}"))
    })
    .await
    .unwrap();
    old.await.unwrap();
    let _c = new.await.unwrap();
    assert_eq!(chosen.label, format!("127.0.0.1:{new_port}"));
    assert_eq!(chosen.host.port, new_port);
    assert_eq!(chosen.role.kind(), Some("primary"));
    assert!(
        failed.is_empty(),
        "a host of the wrong kind is no connection failure: {failed:?}"
    );
}

#[tokio::test]
async fn no_host_left_names_each() {
    let (l, port) = listen().await;
    drop(l);
    let mut s = settings(port, SslMode::Disable, None, "db.internal");
    s.hosts = vec![
        UpstreamHost {
            host: "127.0.0.1".into(),
            port,
            server_name: ServerName::try_from("db.internal").unwrap(),
        };
        2
    ];
    let mut failed = Vec::new();
    let e = match crate::upstream::hosts::connect(&s, &params(), &password(), &Arc::default(), &mut |h, _| {
        failed.push(h.to_string())
    })
    .await
    {
        Ok(_) => panic!("nothing listens"),
        Err(e) => e,
    };
    let pg = e.to_pg_error("payments").unwrap();
    assert_eq!(pg.code, "08001");
    assert!(
        e.to_string().ends_with(&format!(
            "(target_session_attrs=any): 127.0.0.1:{port}: connection refused; 127.0.0.1:{port}: connection refused"
        )),
        "{e}"
    );
    assert_eq!(failed.len(), 2, "each failed host is counted: {failed:?}");
}

#[test]
fn each_host_is_verified_under_its_own_name_unless_sni_says_otherwise() {
    let text = |extra: &str| {
        format!(
            "[vault]\naddress = \"http://127.0.0.1:8200\"\n[vault.auth]\nmethod = \"token\"\ntoken_file = \"/t\"\n\
             [[databases]]\nname = \"p\"\nlisten = [\"127.0.0.1:6432\"]\nupstream = [\"pg-a.internal:5432\", \"10.0.0.6:5433\"]\n{extra}\n\
             [databases.credentials]\nkind = \"database\"\nrole = \"p\"\n"
        )
    };
    let c = crate::config::Config::parse(&text("")).unwrap();
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    let names: Vec<ServerName<'static>> = s.hosts.iter().map(|h| h.server_name.clone()).collect();
    assert_eq!(
        names,
        [
            ServerName::try_from("pg-a.internal").unwrap(),
            ServerName::try_from("10.0.0.6").unwrap()
        ]
    );
    let one = s.for_address(&s.hosts[1], "10.0.0.6:5433".parse().unwrap());
    assert_eq!((one.addr(), one.hosts.len()), ("10.0.0.6:5433".to_string(), 0));
    assert_eq!(one.server_name, s.hosts[1].server_name);

    let c = crate::config::Config::parse(&text("sni = \"pg.example\"")).unwrap();
    let s = UpstreamSettings::from_config(0, &c.databases[0]).unwrap();
    assert!(s
        .hosts
        .iter()
        .all(|h| h.server_name == ServerName::try_from("pg.example").unwrap()));
}
