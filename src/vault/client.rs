//! The HTTP client for the Vault API (`/v1/...`): TLS with the configured CA or the system
//! roots, `X-Vault-Namespace`, a timeout on every request, and errors (see [`super::error`])
//! that keep Vault's status and message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiFuture, GaiResolver, Name};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};

use super::error::{clean_errors, describe_hyper_error, transport_kind, DnsError, ErrorBody};
use super::error::{LocalError, Malformed, VaultError, VaultSetupError};
use super::ha::Nodes;
use super::ratelimit::RateLimit;
use crate::config::VaultConfig;
use crate::metrics::Metrics;

/// Vault answers are small; anything larger is not a Vault answer.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A successful response: the JSON body and the server's `Date` header (for clock-skew checks).
/// Every string in the body is wiped when the response is dropped: credentials and tokens pass
/// through it. Its Debug shows the status only.
pub(crate) struct VaultResponse {
    pub(crate) status: u16,
    pub(crate) body: serde_json::Value,
    pub(crate) date: Option<String>,
}

impl std::fmt::Debug for VaultResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultResponse")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Drop for VaultResponse {
    fn drop(&mut self) {
        fn wipe(v: &mut serde_json::Value) {
            use zeroize::Zeroize;
            match v {
                serde_json::Value::String(s) => s.zeroize(),
                serde_json::Value::Array(a) => a.iter_mut().for_each(wipe),
                serde_json::Value::Object(o) => o.values_mut().for_each(wipe),
                _ => {}
            }
        }
        wipe(&mut self.body);
    }
}

impl VaultResponse {
    pub(crate) fn str_field(&self, ptr: &str) -> Option<&str> {
        self.body.pointer(ptr).and_then(|v| v.as_str())
    }

    pub(crate) fn u64_field(&self, ptr: &str) -> Option<u64> {
        self.body.pointer(ptr).and_then(|v| v.as_u64())
    }
}

/// The strings of a JSON array (policies, capabilities); anything else is no strings.
pub(crate) fn string_list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

pub struct VaultClient {
    /// The first configured address (what people are told about when one is named).
    address: String,
    nodes: Nodes,
    rate_limit: RateLimit,
    namespace: Option<String>,
    timeout: Duration,
    http: Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl VaultClient {
    /// Builds the client; errors name the config key.
    pub(crate) fn new(cfg: &VaultConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, VaultSetupError> {
        let addresses = if cfg.addresses.is_empty() {
            std::slice::from_ref(&cfg.address)
        } else {
            &cfg.addresses[..]
        };
        let roots = match &cfg.ca_file {
            Some(path) => crate::tls_files::load_roots("vault.ca_file", path)?,
            // Plain http verifies no certificate, so it needs no system store.
            None if addresses.iter().all(|a| a.starts_with("http://")) => rustls::RootCertStore::empty(),
            None => crate::tls_files::system_roots()?,
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
        // The scheme is the HTTPS connector's business (https_or_http).
        tcp.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Arc::new(VaultClient {
            address: cfg.address.trim_end_matches('/').to_string(),
            nodes: Nodes::new(addresses),
            rate_limit: RateLimit::default(),
            namespace: cfg.namespace.clone(),
            timeout: cfg.request_timeout,
            http,
            metrics,
        }))
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// `vault.request_timeout`: no request outlives it.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET /v1/<path>`.
    pub(crate) async fn read(&self, token: &SecretString, path: &str) -> Result<VaultResponse, VaultError> {
        self.call("read", Method::GET, path, Some(token), None).await
    }

    /// A request with a JSON body. `op` names the operation in errors ("login", "renew", ...).
    pub(crate) async fn write(
        &self,
        op: &'static str,
        path: &str,
        token: Option<&SecretString>,
        body: &(impl serde::Serialize + ?Sized),
    ) -> Result<VaultResponse, VaultError> {
        // Login bodies carry the JWT or secret_id: they are serialized from borrowed fields
        // straight into a buffer that is wiped when hyper lets go of it.
        self.call(op, Method::PUT, path, token, Some(wiped_body(body))).await
    }

    /// Counts a request Vault refused with 403 in `dbward_vault_denied_total` (`database` is
    /// empty for the token's own operations).
    pub(crate) fn count_denied(&self, database: &str, op: &str) {
        self.metrics.vault_denied_total.with_label_values(&[database, op]).inc();
    }

    /// A request with no body other than GET (e.g. `sys/health`), without a token.
    pub(crate) async fn get_unauthenticated(&self, op: &'static str, path: &str) -> Result<VaultResponse, VaultError> {
        self.call(op, Method::GET, path, None, None).await
    }

    async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<VaultResponse, VaultError> {
        let path = path.trim_start_matches('/');
        // sys/health answers 429 for a standby: that is no rate limit.
        let quota_applies = !path.starts_with("sys/health");
        if quota_applies {
            if let Some(retry_in) = self.rate_limit.held(std::time::Instant::now()) {
                return Err(VaultError::RateLimited {
                    op,
                    path: path.to_string(),
                    retry_in,
                });
            }
        }
        let mut queue: std::collections::VecDeque<usize> = self.nodes.order(std::time::Instant::now()).into();
        let mut redirected = false;
        let mut last_err = None;
        while let Some(i) = queue.pop_front() {
            let started = std::time::Instant::now();
            let result = self.attempt(i, op, method.clone(), path, token, body.clone()).await;
            let status = match &result {
                Ok(a) => a.status.to_string(),
                Err(e) => e.label(),
            };
            let address = self.nodes.base(i);
            self.metrics
                .vault_requests_total
                .with_label_values(&[op, &status, address])
                .inc();
            self.metrics
                .vault_request_seconds
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            let answer = match result {
                Ok(a) => a,
                Err(e @ (VaultError::Unreachable { .. } | VaultError::Timeout { .. })) => {
                    self.node_failed(i, !queue.is_empty());
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match answer.status {
                307 if self.nodes.len() > 1 => {
                    // A standby pointing at the active node: followed once, to a configured address.
                    let target = answer.location.as_deref().and_then(|l| self.nodes.redirect_target(l));
                    match target {
                        Some(j) if j != i && !redirected => {
                            redirected = true;
                            queue.retain(|&k| k != j);
                            queue.push_front(j);
                        }
                        _ => self.node_failed(i, !queue.is_empty()),
                    }
                    last_err = Some(answer.into_error(op, path));
                }
                429 if quota_applies => {
                    self.nodes.answered(i);
                    let retry_in = self.rate_limit.limited(
                        &answer.headers,
                        std::time::Instant::now(),
                        std::time::SystemTime::now(),
                    );
                    tracing::debug!(op, path, ?retry_in, "Vault answered 429: every request holds back");
                    return Err(VaultError::RateLimited {
                        op,
                        path: path.to_string(),
                        retry_in,
                    });
                }
                500..=599 if self.nodes.len() > 1 => {
                    self.node_failed(i, !queue.is_empty());
                    last_err = Some(answer.into_error(op, path));
                }
                _ => {
                    self.nodes.answered(i);
                    return answer.into_response(op, path);
                }
            }
        }
        Err(last_err.expect("at least one address is configured"))
    }

    /// Node `i` could not answer; `moving_on`: another node is tried next (a failover).
    fn node_failed(&self, i: usize, moving_on: bool) {
        self.nodes.failed(i, std::time::Instant::now());
        if moving_on {
            self.metrics
                .vault_failovers_total
                .with_label_values(&[self.nodes.base(i)])
                .inc();
            tracing::debug!(
                address = self.nodes.base(i),
                "Vault node could not answer; trying the next address"
            );
        }
    }

    /// The request, with namespace and (sensitive) token headers.
    fn request(
        &self,
        base: &str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, LocalError> {
        let url = format!("{}/v1/{}", base, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            let mut v = http::HeaderValue::from_str(t.expose_secret()).map_err(|_| LocalError::TokenNotHeaderSafe)?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| LocalError::BadRequestUrl {
                url,
                source: Arc::new(e),
            })
    }

    /// One request to node `i`: its answer whatever the status, or why there was none.
    async fn attempt(
        &self,
        i: usize,
        op: &'static str,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<Bytes>,
    ) -> Result<Answer, VaultError> {
        let address = self.nodes.base(i);
        let req = self.request(address, method, path, token, body)?;
        let unreachable = |e: &(dyn std::error::Error + 'static), detail: String| VaultError::Unreachable {
            op,
            path: path.to_string(),
            address: address.to_string(),
            kind: transport_kind(e),
            detail,
        };
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(&e, describe_hyper_error(&e)))?;
            let status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(&*e, format!("reading the response failed: {e}")))?
                .to_bytes();
            Ok::<_, VaultError>((status, parts.headers, body))
        };
        let (status, headers, body) =
            tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| VaultError::Timeout {
                    op,
                    path: path.to_string(),
                    address: address.to_string(),
                    after: self.timeout,
                })??;
        let text = |name: header::HeaderName| headers.get(name).and_then(|d| d.to_str().ok()).map(str::to_string);
        Ok(Answer {
            status,
            date: text(header::DATE),
            location: text(header::LOCATION),
            // The body may hold a password or token: the raw bytes are wiped once parsed.
            body: zeroize::Zeroizing::new(Vec::<u8>::from(body)),
            headers,
        })
    }
}

/// One node's answer before it is judged.
struct Answer {
    status: u16,
    date: Option<String>,
    location: Option<String>,
    headers: http::HeaderMap,
    body: zeroize::Zeroizing<Vec<u8>>,
}

impl Answer {
    fn into_response(self, op: &'static str, path: &str) -> Result<VaultResponse, VaultError> {
        let body = parse_body(op, path, self.status, &self.body)?;
        Ok(VaultResponse {
            status: self.status,
            body,
            date: self.date,
        })
    }

    /// An answer that is not taken as Vault's last word (a 5xx or a redirect) as an error.
    fn into_error(self, op: &'static str, path: &str) -> VaultError {
        match self.into_response(op, path) {
            Err(e) => e,
            Ok(r) => VaultError::Status {
                op,
                path: path.to_string(),
                status: r.status,
                errors: vec![],
            },
        }
    }
}

/// `body` as JSON in one buffer that is zeroed when the last reference to it drops. Its size
/// is measured first so that the buffer never grows: a growing Vec would leave unwiped copies
/// of the secret behind in freed memory. (hyper and rustls copy what they send into their own
/// buffers; those are out of reach.)
fn wiped_body(body: &(impl serde::Serialize + ?Sized)) -> Bytes {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, body).expect("request bodies serialize");
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *buf, body).expect("request bodies serialize");
    Bytes::from_owner(buf)
}

/// The system resolver (getaddrinfo), with its failures wrapped in [`DnsError`]: hyper-util's
/// own "dns error" type is private, so without the wrapper only the text would tell.
#[derive(Clone)]
struct Resolver(GaiResolver);

impl tower_service::Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = DnsError;
    type Future = futures_util::future::MapErr<GaiFuture, fn(std::io::Error) -> DnsError>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), DnsError>> {
        self.0.poll_ready(cx).map_err(DnsError)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        use futures_util::TryFutureExt;
        self.0.call(name).map_err(DnsError as fn(std::io::Error) -> DnsError)
    }
}

/// An error status becomes [`VaultError::Status`] with Vault's messages; a 2xx body must be JSON
/// (or empty).
pub(crate) fn parse_body(
    op: &'static str,
    path: &str,
    status: u16,
    body: &[u8],
) -> Result<serde_json::Value, VaultError> {
    if !(200..300).contains(&status) {
        let errors = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| clean_errors(b.errors))
            .unwrap_or_default();
        return Err(VaultError::Status {
            op,
            path: path.to_string(),
            status,
            errors,
        });
    }
    if body.is_empty() || status == 204 {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| VaultError::Malformed {
        op,
        path: path.to_string(),
        problem: Malformed::NotJson(Arc::new(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wiped_body_is_the_json_in_one_buffer() {
        let body = serde_json::json!({ "role": "payments", "jwt": "eyJ.x.y" });
        let bytes = wiped_body(&body);
        assert_eq!(&bytes[..], &serde_json::to_vec(&body).unwrap()[..]);
    }
    use crate::config::{AuthConfig, Login};
    use crate::vault::error::TransportKind;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cfg(address: String, timeout: Duration) -> VaultConfig {
        VaultConfig {
            addresses: vec![address.clone()],
            address,
            state_file: None,
            namespace: Some("team-a".into()),
            ca_file: None,
            request_timeout: timeout,
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

    /// A one-shot HTTP server answering `response` to whatever it gets; returns what it received.
    async fn fake_vault(status: &'static str, body: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(response.as_bytes()).await.unwrap();
            s.shutdown().await.ok();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (addr, h)
    }

    #[tokio::test]
    async fn denied_read_keeps_status_path_and_message_and_sends_namespace() {
        let (addr, got) = fake_vault(
            "403 Forbidden",
            r#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#,
        )
        .await;
        let c = VaultClient::new(&cfg(addr, Duration::from_secs(5)), Arc::default()).unwrap();
        let err = c
            .read(&SecretString::from("s.secret-token"), "database/creds/payments")
            .await
            .unwrap_err();
        assert!(err.is_denied());
        assert_eq!(
            err.to_string(),
            "Vault denied read of database/creds/payments (403 permission denied)"
        );
        let req = got.await.unwrap().to_lowercase();
        assert!(req.starts_with("get /v1/database/creds/payments "), "{req}");
        assert!(req.contains("x-vault-namespace: team-a"), "{req}");
        assert!(!format!("{err:?}").contains("s.secret-token"));
    }

    #[tokio::test]
    async fn malformed_body_is_reported_not_panicked() {
        let (addr, _got) = fake_vault("200 OK", "{not json").await;
        let c = VaultClient::new(&cfg(addr, Duration::from_secs(5)), Arc::default()).unwrap();
        let err = c.read(&SecretString::from("t"), "secret/data/x").await.unwrap_err();
        assert!(matches!(err, VaultError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("secret/data/x"));
    }

    #[tokio::test]
    async fn hanging_vault_times_out_with_the_path() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let c = VaultClient::new(&cfg(addr, Duration::from_millis(200)), Arc::default()).unwrap();
        let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
        assert!(matches!(err, VaultError::Timeout { .. }), "{err:?}");
        assert!(err.is_unavailable());
    }

    /// A name the resolver refuses on this host (a 64-byte label is longer than DNS allows, so
    /// no query leaves the machine): the failure comes back through dbward's resolver, so it
    /// is named by type.
    #[tokio::test]
    async fn unresolvable_host_is_a_dns_failure() {
        let host = format!("{}.invalid", "a".repeat(64));
        let c = VaultClient::new(
            &cfg(format!("http://{host}:8200"), Duration::from_secs(10)),
            Arc::default(),
        )
        .unwrap();
        let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
        assert!(
            matches!(
                err,
                VaultError::Unreachable {
                    kind: TransportKind::Dns,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("dns error"), "{err}");
    }

    #[tokio::test]
    async fn refused_connection_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = VaultClient::new(
            &cfg(format!("http://127.0.0.1:{port}"), Duration::from_secs(5)),
            Arc::default(),
        )
        .unwrap();
        let err = c.read(&SecretString::from("t"), "database/creds/x").await.unwrap_err();
        assert!(
            matches!(
                err,
                VaultError::Unreachable {
                    kind: TransportKind::Refused,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("refused"), "{err}");
    }
}
