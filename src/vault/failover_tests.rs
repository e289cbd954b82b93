//! The Vault client against several configured nodes and a rate limit: broken or hostile
//! peers played by small fake servers (a sealed node, a standby redirecting, a 429 with
//! Retry-After), since a real Vault cannot be made to answer each of these on demand.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::VaultClient;
use crate::config::{AuthConfig, Login, VaultConfig};
use crate::metrics::Metrics;

fn cfg(addresses: Vec<String>) -> VaultConfig {
    VaultConfig {
        address: addresses[0].clone(),
        addresses,
        state_file: None,
        namespace: None,
        ca_file: None,
        request_timeout: Duration::from_secs(5),
        revoke_on_shutdown: true,
        auth: AuthConfig {
            mount: "token".into(),
            login: Login::Token {
                token_file: "/dev/null".into(),
            },
            token_check_interval: Duration::from_secs(60),
        },
    }
}

/// A server answering every request with `status`, `headers` and `body`; counts requests.
async fn fixed_vault(
    status: &'static str,
    headers: String,
    body: &'static str,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

fn cluster(addresses: Vec<String>) -> (Arc<VaultClient>, Arc<Metrics>) {
    let c = cfg(addresses);
    let metrics = Arc::new(Metrics::new());
    (VaultClient::new(&c, metrics.clone()).unwrap(), metrics)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_dead_or_sealed_node_is_skipped_and_not_asked_again_on_the_next_request() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (sealed, sealed_seen) = fixed_vault(
        "503 Service Unavailable",
        String::new(),
        r#"{"errors":["Vault is sealed"]}"#,
    )
    .await;
    let (good, good_seen) = fixed_vault("200 OK", String::new(), r#"{"data":{"ok":true}}"#).await;
    let (c, metrics) = cluster(vec![dead.clone(), sealed.clone(), good.clone()]);
    let t = SecretString::from("t");
    for _ in 0..3 {
        let r = c.read(&t, "secret/data/x").await.unwrap();
        assert_eq!(r.body.pointer("/data/ok"), Some(&serde_json::Value::Bool(true)));
    }
    assert_eq!(
        sealed_seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the sealed node is asked once"
    );
    assert_eq!(good_seen.load(std::sync::atomic::Ordering::SeqCst), 3);
    let text = metrics.render();
    for node in [&dead, &sealed] {
        assert!(
            text.contains(&format!("dbward_vault_failovers_total{{address=\"{node}\"}} 1")),
            "{text}"
        );
    }
    assert!(
        text.contains(&format!(
            "dbward_vault_requests_total{{address=\"{good}\",operation=\"read\",status=\"200\"}} 3"
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_redirect_is_followed_once_and_only_to_a_configured_address() {
    let (good, good_seen) = fixed_vault("200 OK", String::new(), r#"{"data":{}}"#).await;
    let to_good = format!("Location: {good}/v1/database/creds/x\r\n");
    let (standby, _) = fixed_vault("307 Temporary Redirect", to_good, "").await;
    let (c, _) = cluster(vec![standby.clone(), good.clone()]);
    c.read(&SecretString::from("t"), "database/creds/x").await.unwrap();
    assert_eq!(good_seen.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A redirect elsewhere is not followed: the token stays with the configured nodes.
    let (elsewhere, elsewhere_seen) = fixed_vault("200 OK", String::new(), r#"{"data":{}}"#).await;
    let (rogue, _) = fixed_vault(
        "307 Temporary Redirect",
        format!("Location: {elsewhere}/v1/database/creds/x\r\n"),
        "",
    )
    .await;
    let (c, _) = cluster(vec![rogue, format!("http://127.0.0.1:{}", free_port())]);
    let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(elsewhere_seen.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_429_holds_back_every_request_for_the_time_vault_asks() {
    let (limited, seen) = fixed_vault(
        "429 Too Many Requests",
        "Retry-After: 30\r\n".to_string(),
        r#"{"errors":["request path \"database/creds/x\": rate limit quota exceeded"]}"#,
    )
    .await;
    let (c, _) = cluster(vec![limited]);
    let t = SecretString::from("t");
    let first = c.read(&t, "database/creds/x").await.unwrap_err();
    let left = first.rate_limited_for().expect("rate limited");
    assert!(
        left > Duration::from_secs(29) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    // Another operation on another path is held back too, without a request.
    let second = c
        .write("renew", "sys/leases/renew", Some(&t), &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(second.rate_limited_for().is_some(), "{second:?}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        second
            .to_string()
            .starts_with("Vault is rate-limiting dbward; retry in 30 s"),
        "{second}"
    );
}
