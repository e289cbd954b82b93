//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (every database has a valid credential or can get one; the body says which is not
//! and why), `/startupz` (the first Vault login happened).
//!
//! It keeps answering while dbward drains open sessions after SIGTERM, so that `/readyz` can
//! say 503 "shutting down" and Prometheus still sees the drain; it stops with the sessions.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::core::Collector;
use tokio::net::TcpListener;

use crate::clock::unix_now;
use crate::credentials::CredentialStore;
use crate::entry::Entries;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What the admin server reads: the published entries, the credential store (without asking
/// Vault unless a credential is missing), the metrics and the shutdown state.
#[derive(Clone)]
pub(crate) struct AdminContext {
    pub(crate) entries: Entries,
    pub(crate) credentials: Arc<CredentialStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: Shutdown,
}

/// How long `/readyz` waits for Vault when a database has no cached credential: kubelet and
/// load balancer probes time out after a few seconds, and a slow Vault means "not ready" anyway.
const READY_VAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// The admin listener: the socket systemd passed for `addr` (socket activation), else a new one.
pub(crate) async fn bind_or_take(
    a: std::net::SocketAddr,
    activated: &mut crate::systemd::ActivatedSockets,
) -> std::io::Result<TcpListener> {
    match activated.take_tcp(a) {
        Some(l) => TcpListener::from_std(l),
        None => TcpListener::bind(a).await,
    }
}

pub(crate) async fn serve(app: AdminContext, listener: TcpListener) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(listen = %a, "admin server listening");
    }
    let slots = crate::admin_limits::Slots::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = app.shutdown.terminating() => return,
        };
        let Some(slot) = slots.admit(&stream) else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = crate::admin_limits::http1_builder()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(slot);
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn handle(app: &AdminContext, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    // Every endpoint is read-only: anything but GET/HEAD is a client mistake worth saying so.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served\n".into(),
            PLAIN,
        );
    }
    match req.uri().path() {
        "/metrics" => {
            refresh_scrape_gauges(app).await;
            text(
                StatusCode::OK,
                app.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/startupz" => match app.credentials.auth().current() {
            Some(_) => text(StatusCode::OK, "logged in to Vault\n".into(), PLAIN),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no Vault login yet\n".into(), PLAIN),
        },
        "/readyz" => {
            let (ready, body) = readiness(app).await;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body, PLAIN)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /startupz\n".into(),
            PLAIN,
        ),
    }
}

/// Sets the gauges that describe "now" rather than an event: time left on each credential and
/// on the Vault token, and readiness. Computed per scrape from what is cached, never by asking
/// Vault, so a scrape is cheap and has no side effects (no cache-hit counts either).
async fn refresh_scrape_gauges(app: &AdminContext) {
    let m = &app.metrics;
    let now = Instant::now();
    let stopping = app.shutdown.is_stopping();
    let snapshot = app.entries.load_full();
    let databases = &snapshot.databases;
    let names: Vec<&str> = databases.iter().map(|d| d.name.as_str()).collect();
    forget_removed_databases(m, &names);
    for db in databases {
        let held = app.credentials.peek(&db.name).await;
        let left = m.credential_expires_in_seconds.with_label_values(&[&db.name]);
        match held.as_ref().map(|h| h.expires_at()) {
            Some(Some(at)) => left.set(at.saturating_duration_since(now).as_secs_f64()),
            // A KV secret does not expire: no value is more honest than a huge one.
            Some(None) => {
                let _ = m.credential_expires_in_seconds.remove_label_values(&[&db.name]);
            }
            // Nothing valid is cached: as good as expired.
            None => left.set(0.0),
        }
        m.leases_held
            .with_label_values(&[&db.name])
            .set(app.credentials.leases_held(&db.name) as i64);
        m.database_ready
            .with_label_values(&[&db.name])
            .set(i64::from(held.is_some() && !stopping));
    }
    let token_left = app.credentials.auth().current().and_then(|t| t.remaining(now));
    match token_left {
        Some(left) => {
            m.vault_token_expires_in_seconds
                .with_label_values::<&str>(&[])
                .set(left.as_secs_f64());
            // Renewals replace the token without touching metrics: keep the timestamp current.
            m.vault_token_expiry_timestamp_seconds
                .set((unix_now() + left.as_secs_f64()) as i64);
        }
        None => {
            m.vault_token_expires_in_seconds.reset();
            m.vault_token_expiry_timestamp_seconds.set(0);
        }
    }
}

/// Drops the scrape-time gauges of database entries a reload removed: a frozen "not ready"
/// would page someone forever, a frozen "ready" would hide nothing but still mislead.
fn forget_removed_databases(m: &Metrics, current: &[&str]) {
    fn stale(c: &dyn Collector, current: &[&str]) -> Vec<String> {
        c.collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|metric| metric.get_label())
            .filter(|label| label.name() == "database" && !current.contains(&label.value()))
            .map(|label| label.value().to_string())
            .collect()
    }
    for db in stale(&m.credential_expires_in_seconds, current) {
        let _ = m.credential_expires_in_seconds.remove_label_values(&[&db]);
    }
    for db in stale(&m.database_ready, current) {
        let _ = m.database_ready.remove_label_values(&[&db]);
    }
    for db in stale(&m.leases_held, current) {
        let _ = m.leases_held.remove_label_values(&[&db]);
    }
}

/// Ready when not shutting down and every database entry has (or can get) a credential.
/// A cached credential is looked at without counting a cache hit (probes come every few
/// seconds and would drown the clients' hit rate); only a missing one is fetched.
async fn readiness(app: &AdminContext) -> (bool, String) {
    let mut ready = true;
    let mut body = String::new();
    if app.shutdown.is_stopping() {
        ready = false;
        body.push_str("NOT READY: shutting down (draining open sessions)\n");
    }
    for db in app.entries.load_full().databases.iter() {
        let got = match app.credentials.peek(&db.name).await {
            Some(c) => Ok(Ok(c)),
            None => tokio::time::timeout(READY_VAULT_TIMEOUT, app.credentials.get(&db.name)).await,
        };
        match got {
            Ok(Ok(c)) => {
                let left = c.expires_at().map(|e| e.saturating_duration_since(Instant::now()));
                body.push_str(&format!(
                    "{}: ready (credential {} from {}{})\n",
                    db.name,
                    c.generation,
                    c.path,
                    left.map(|l| format!(", valid for {}s more", l.as_secs()))
                        .unwrap_or_default()
                ));
                let dbname = db.cfg.dbname.as_deref().unwrap_or("postgres");
                if let Some((met, hosts)) = crate::upstream::survey::readiness(
                    &db.upstream,
                    dbname,
                    &c.username,
                    &c.password,
                    READY_VAULT_TIMEOUT,
                )
                .await
                {
                    ready &= met;
                    body.push_str(&hosts);
                }
            }
            Ok(Err(e)) => {
                ready = false;
                body.push_str(&format!("{}: NOT READY: {}\n", db.name, e.error));
            }
            Err(_) => {
                ready = false;
                body.push_str(&format!(
                    "{}: NOT READY: Vault did not answer within {}s\n",
                    db.name,
                    READY_VAULT_TIMEOUT.as_secs()
                ));
            }
        }
    }
    (ready, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_of_removed_databases_are_dropped() {
        let m = Metrics::new();
        for db in ["kept", "removed"] {
            m.database_ready.with_label_values(&[db]).set(0);
            m.credential_expires_in_seconds.with_label_values(&[db]).set(10.0);
        }
        forget_removed_databases(&m, &["kept"]);
        let text = m.render();
        assert!(text.contains("dbward_database_ready{database=\"kept\"} 0"), "{text}");
        assert!(
            text.contains("dbward_credential_expires_in_seconds{database=\"kept\"} 10"),
            "{text}"
        );
        assert!(!text.contains("removed"), "{text}");
    }
}
