//! One client connection: the startup packet, the credential from the cache, the upstream
//! connection opened with it, then a plain byte relay until either side closes. Nothing after
//! authentication is parsed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::app::{App, Database};
use crate::credentials::InUse;
use crate::pg::cancel::CancelTarget;
use crate::pg::error::{sqlstate, PgError};
use crate::pg::startup::{self, ReadError, StartupMessage, StartupPacket};
use crate::upstream::{self, Connected};

/// Relay buffer per direction: large enough that COPY and big result sets move in few syscalls.
const RELAY_BUFFER: usize = 64 * 1024;

async fn send_error<S: AsyncWrite + Unpin>(client: &mut S, e: &PgError) {
    tracing::info!(sqlstate = e.code, error = %e, "refusing client");
    let _ = client.write_all(&e.to_bytes()).await;
    let _ = client.shutdown().await;
}

/// Serves one client from its first byte to the end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(app: &Arc<App>, db: &Arc<Database>, mut client: S) {
    let startup_timeout = app.config.proxy.startup_timeout.0;
    let msg = loop {
        let packet = tokio::select! {
            r = tokio::time::timeout(startup_timeout, startup::read(&mut client)) => r,
            _ = app.shutdown.terminating() => return,
        };
        match packet {
            Err(_) => {
                let e = PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("dbward: no startup packet within {startup_timeout:?}"),
                );
                return send_error(&mut client, &e).await;
            }
            Ok(Err(ReadError::Closed)) => return,
            Ok(Err(ReadError::Io(e))) => {
                tracing::debug!(error = %e, "client went away during startup");
                return;
            }
            Ok(Err(ReadError::Protocol(e))) => return send_error(&mut client, &e).await,
            // Client-side TLS and GSSAPI encryption are not offered: 'N' lets the client go on in
            // plaintext or stop with its own clear message (sslmode=require).
            Ok(Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                if client.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(Ok(StartupPacket::Cancel { pid, secret })) => {
                return route_cancel(app, crate::pg::cancel::BackendKey { pid, secret }).await;
            }
            Ok(Ok(StartupPacket::Startup(m))) => break m,
        }
    };
    if app.shutdown.is_stopping() {
        let e = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "dbward is shutting down");
        return send_error(&mut client, &e).await;
    }
    if let Some(v) = msg.get("replication").filter(|v| !matches!(*v, "false" | "off" | "no" | "0")) {
        let e = PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("dbward: replication connections (replication={v}) are not relayed for database entry {:?}", db.name),
        );
        return send_error(&mut client, &e).await;
    }

    let started = Instant::now();
    // The credential stays checked out for the whole session: its lease is renewed while used.
    let Some((upstream, credential)) = open_upstream(app, db, &msg, &mut client).await else {
        return;
    };
    let connect_time = started.elapsed();
    let span = tracing::Span::current();
    span.record("credential", credential.generation);
    if let Some(pid) = upstream.backend_pid {
        span.record("backend_pid", pid);
    }

    // Our own cancel key stands in for the backend's; the mapping ends with the session.
    let (key, _cancel_guard) = match &upstream.key {
        Some(k) => {
            let (key, guard) = app.cancels.register(CancelTarget {
                database: db.name.clone(),
                upstream: db.upstream.clone(),
                key: k.clone(),
            });
            (Some(key), Some(guard))
        }
        None => (None, None),
    };
    let mut hello = BytesMut::with_capacity(upstream.greeting.len() + 64);
    if msg.needs_negotiation() {
        hello.extend_from_slice(&msg.negotiate_protocol_version());
    }
    hello.put_u8(b'R');
    hello.put_i32(8);
    hello.put_i32(0);
    if let Some(k) = &key {
        k.encode(&mut hello);
    }
    hello.extend_from_slice(&upstream.greeting);
    if client.write_all(&hello).await.is_err() {
        return;
    }
    tracing::debug!(?connect_time, tls = upstream.tls, "session established");

    relay(app, db, client, upstream.stream).await;
    drop(credential);
}

/// Gets a credential and connects upstream with it; a credential the server refuses (28P01) is
/// dropped and replaced once. On failure the client has been told why.
async fn open_upstream<S: AsyncWrite + Unpin>(
    app: &Arc<App>,
    db: &Arc<Database>,
    msg: &StartupMessage,
    client: &mut S,
) -> Option<(Connected, InUse)> {
    let mut retried = false;
    loop {
        let cred = match app.credentials.checkout(&db.name).await {
            Ok(c) => c,
            Err(e) => {
                app.metrics.client_connections_rejected_total.with_label_values(&[&db.name, "credential"]).inc();
                send_error(client, &e.to_pg_error()).await;
                return None;
            }
        };
        let params = upstream_params(db, msg, &cred.username);
        let started = Instant::now();
        let result = tokio::select! {
            r = upstream::connect(&db.upstream, &params, &cred.password) => r,
            _ = app.shutdown.terminating() => return None,
        };
        match result {
            Ok(c) => {
                app.metrics.upstream_connect_seconds.with_label_values(&[&db.name]).observe(started.elapsed().as_secs_f64());
                return Some((c, cred));
            }
            Err(e) if e.is_password_rejected() && !retried => {
                retried = true;
                tracing::info!(
                    path = %cred.path,
                    username = %cred.username,
                    lease = cred.lease.as_ref().map(|l| l.id.as_str()).unwrap_or("-"),
                    generation = cred.generation,
                    "upstream refused the Vault-issued credential (28P01); fetching a new one"
                );
                app.credentials.rejected(&db.name, cred.generation).await;
            }
            Err(e) => {
                let class: String = e.sqlstate().chars().take(2).collect();
                app.metrics.upstream_connect_failures_total.with_label_values(&[&db.name, &class]).inc();
                app.metrics.client_connections_rejected_total.with_label_values(&[&db.name, "upstream"]).inc();
                tracing::warn!(upstream = %db.upstream.addr(), error = %e, "upstream connection failed");
                match (e.to_pg_error(&db.name), &e) {
                    (Some(pg), _) => send_error(client, &pg).await,
                    // The server's own error (3D000, 28000 from pg_hba...) reaches the client as sent.
                    (None, upstream::UpstreamError::Server(se)) => {
                        let _ = client.write_all(&se.raw).await;
                        let _ = client.shutdown().await;
                    }
                    (None, _) => {
                        let pg = PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("dbward: {e}"));
                        send_error(client, &pg).await
                    }
                }
                return None;
            }
        }
    }
}

/// The startup parameters sent upstream: the client's, with the user replaced by the credential's
/// and the database forced when the entry says so.
fn upstream_params(db: &Database, msg: &StartupMessage, username: &str) -> Vec<(String, String)> {
    // Postgres defaults the database to the user name; the client's user name is meaningless
    // here, so the default is the client's (libpq always sends one).
    let database = db
        .cfg
        .dbname
        .clone()
        .or_else(|| msg.get("database").map(str::to_string))
        .unwrap_or_else(|| msg.get("user").unwrap_or_default().to_string());
    let mut params = vec![("user".to_string(), username.to_string()), ("database".to_string(), database)];
    params.extend(msg.params.iter().filter(|(k, _)| k != "user" && k != "database").cloned());
    params
}

async fn relay<S, U>(app: &Arc<App>, db: &Arc<Database>, mut client: S, mut upstream: U)
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let active = app.metrics.client_connections_active.with_label_values(&[&db.name]);
    active.inc();
    let started = Instant::now();
    let outcome = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER) => Some(r),
        _ = app.shutdown.terminating() => None,
    };
    active.dec();
    let (to_upstream, to_client, how) = match outcome {
        Some(Ok((up, down))) => (up, down, "closed"),
        Some(Err(e)) => {
            tracing::debug!(error = %e, "relay ended with an error");
            (0, 0, "error")
        }
        None => {
            let e = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection: dbward is shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&e.to_bytes())).await;
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
            (0, 0, "shutdown")
        }
    };
    app.metrics.bytes_total.with_label_values(&[&db.name, "to_upstream"]).inc_by(to_upstream);
    app.metrics.bytes_total.with_label_values(&[&db.name, "to_client"]).inc_by(to_client);
    tracing::info!(
        duration = ?started.elapsed(),
        bytes_to_upstream = to_upstream,
        bytes_to_client = to_client,
        end = how,
        "session ended"
    );
}

/// Routes a client's CancelRequest to the backend its key stands for. Unknown keys are dropped
/// silently, as Postgres does, so keys cannot be probed.
async fn route_cancel(app: &Arc<App>, key: crate::pg::cancel::BackendKey) {
    match app.cancels.lookup(&key) {
        Some(target) => match upstream::cancel(&target.upstream, &target.key).await {
            Ok(()) => {
                app.metrics.cancel_requests_total.with_label_values(&["routed"]).inc();
                tracing::info!(database = %target.database, backend_pid = target.key.pid, "cancel request routed");
            }
            Err(e) => {
                app.metrics.cancel_requests_total.with_label_values(&["failed"]).inc();
                tracing::warn!(database = %target.database, error = %e, "cancel request could not be delivered");
            }
        },
        None => {
            app.metrics.cancel_requests_total.with_label_values(&["unknown_key"]).inc();
            tracing::debug!("cancel request with an unknown key ignored");
        }
    }
}
