//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (every database has a valid credential or can get one; the body says which is not
//! and why), `/startupz` (the first Vault login happened).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::App;

pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let a = crate::config::resolve(addr)?;
    TcpListener::bind(a).await
}

pub async fn serve(app: Arc<App>, listener: TcpListener) {
    if let Ok(a) = listener.local_addr() {
        tracing::info!(listen = %a, "admin server listening");
    }
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
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
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

async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, app.metrics.render(), "text/plain; version=0.0.4; charset=utf-8"),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/startupz" => match app.credentials.auth().current() {
            Some(_) => text(StatusCode::OK, "logged in to Vault\n".into(), PLAIN),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no Vault login yet\n".into(), PLAIN),
        },
        "/readyz" => {
            let (ready, body) = readiness(app).await;
            text(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body, PLAIN)
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz, /readyz, /startupz\n".into(), PLAIN),
    }
}

/// Ready when not shutting down and every database entry has (or can get) a credential.
pub async fn readiness(app: &Arc<App>) -> (bool, String) {
    let mut ready = true;
    let mut body = String::new();
    if app.shutdown.is_stopping() {
        ready = false;
        body.push_str("shutting down\n");
    }
    for db in app.databases_in_order() {
        let got = tokio::time::timeout(Duration::from_secs(3), app.credentials.get(&db.name)).await;
        match got {
            Ok(Ok(c)) => {
                let left = c.expires_at().map(|e| e.saturating_duration_since(std::time::Instant::now()));
                body.push_str(&format!(
                    "{}: ready (credential {} from {}{})\n",
                    db.name,
                    c.generation,
                    c.path,
                    left.map(|l| format!(", valid for {}s more", l.as_secs())).unwrap_or_default()
                ));
            }
            Ok(Err(e)) => {
                ready = false;
                body.push_str(&format!("{}: NOT READY: {}\n", db.name, e.error));
            }
            Err(_) => {
                ready = false;
                body.push_str(&format!("{}: NOT READY: Vault did not answer within 3s\n", db.name));
            }
        }
    }
    (ready, body)
}
