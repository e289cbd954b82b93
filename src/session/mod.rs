//! One client connection, from its first byte to the end:
//!
//! 1. negotiation ([`negotiate`]) under one deadline (`startup_timeout`): encryption requests,
//!    TLS, then a StartupMessage or a CancelRequest (routed to the backend its key stands for);
//! 2. a credential from the entry's source and the upstream connection made with it;
//! 3. the byte relay ([`relay`]).
//!
//! A session gets a [`SessionContext`]: its entry, the credential store, the cancel map, the
//! metrics and the shutdown signal; nothing else of the daemon.

mod caller;
mod negotiate;
mod pooled;
mod recheck;
mod refusal;
mod relay;
pub(crate) mod streaming;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::either::Either;
use tracing::Instrument;

use crate::credentials::{CredentialStore, InUse};
use crate::entry::Database;
use crate::metrics::Metrics;
use crate::peer::Admission;
use crate::pg::cancel::{BackendKey, CancelMap, CancelTarget};
use crate::pg::error::{sqlstate, PgError};
use crate::pg::frame::Boundaries;
use crate::pg::startup::StartupMessage;
use crate::pg::tls::Rewind;
use crate::shutdown::Shutdown;
use crate::upstream::hosts::Chosen;
use crate::upstream::{self, UpstreamSettings};
use negotiate::{negotiate, Opening};

/// Bound on sending dbward's own error to a client: one that does not read must not keep the
/// session (and its credential) alive.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one session may use.
pub(crate) struct SessionContext {
    /// The entry as published when the client connected; a reload applies to later clients.
    pub(crate) entry: Arc<Database>,
    pub(crate) startup_timeout: Duration,
    pub(crate) credentials: Arc<CredentialStore>,
    pub(crate) cancels: Arc<CancelMap<Arc<UpstreamSettings>>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: Shutdown,
    /// The runtime thread's scheduling while sessions stream in bulk.
    pub(crate) streaming: Arc<streaming::Streaming>,
    /// The entry's allowlist applied to this connection's local caller, found at accept.
    pub(crate) admission: Admission,
    /// The session's log context (entry, peer, uid, backend pid, credential). Entered only
    /// where the session logs, not on every poll of its task.
    pub(crate) span: tracing::Span,
}

/// The client's connection: as accepted (Left), or inside TLS (Right).
pub(crate) type ClientIo<S> = Either<S, Box<tokio_rustls::server::TlsStream<Rewind<S>>>>;

/// Sends dbward's own error and closes: the client learns why in its own error message.
async fn send_error<W: AsyncWrite + Unpin>(client: &mut W, e: &PgError) {
    tracing::info!(sqlstate = e.code, error = %e, "refusing client");
    let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
        let _ = client.write_all(&e.to_bytes()).await;
        let _ = client.shutdown().await;
    })
    .await;
}

fn shutting_down() -> PgError {
    PgError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection: dbward is shutting down",
    )
}

/// Serves one client from its first byte to the end.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(ctx: &SessionContext, client: S) {
    // Boxed, and freed once the relay starts: a task's future is as large as its largest state,
    // and negotiation, authentication and the upstream connect together take about 10 KiB of
    // it, which every idle session would otherwise keep for its whole life (the relay itself
    // needs about 1.5 KiB).
    let Some(s) = Box::pin(establish(ctx, client)).instrument(ctx.span.clone()).await else {
        return;
    };
    let kept = relay::relay(
        ctx,
        s.client,
        s.upstream,
        s.pending,
        s.boundaries,
        s.endings,
        s.origin.is_some(),
    )
    .await;
    match (kept, s.origin) {
        (Some(stream), Some(origin)) => {
            Box::pin(pooled::give_back(ctx, stream, s.backend, s.tls, origin, s.credential))
                .instrument(ctx.span.clone())
                .await
        }
        _ => drop(s.credential),
    }
    drop((s.cancel_guard, s.recheck_guard));
}

/// A session with both sides authenticated, ready for the relay.
struct Established<S> {
    client: ClientIo<S>,
    upstream: upstream::UpstreamStream,
    /// Client bytes that came with the startup packet.
    pending: BytesMut,
    boundaries: Boundaries,
    endings: relay::Endings,
    /// Where the server connection came from, when the entry pools it.
    origin: Option<crate::pool::Origin>,
    backend: Option<BackendKey>,
    tls: bool,
    /// Checked out for the whole session: its lease is renewed while used.
    credential: InUse,
    /// Our cancel key for the backend's; the mapping ends with the session.
    cancel_guard: Option<crate::pg::cancel::CancelGuard<Arc<UpstreamSettings>>>,
    recheck_guard: Option<recheck::Guard>,
}

/// Negotiation, the credential and the upstream connection, up to the greeting sent to the
/// client. `None` when the session ended on the way (the client was told why).
async fn establish<S: AsyncRead + AsyncWrite + Unpin>(ctx: &SessionContext, client: S) -> Option<Established<S>> {
    let (mut client, opening, pending) = negotiate(ctx, client).await?;
    let msg = match opening {
        // A caller the allowlist refuses may not cancel the entry's queries either.
        Opening::Cancel(_) if ctx.admission.is_refused() => return None,
        Opening::Cancel(key) => {
            route_cancel(ctx, key).await;
            return None;
        }
        Opening::Startup(m) => m,
    };
    if !admit(ctx, &msg, &mut client).await {
        return None;
    }
    let db = &ctx.entry;
    let started = Instant::now();
    // The credential stays checked out for the whole session: its lease is renewed while used.
    let pool_key = pooled::key(ctx, &msg);
    let reused = match &pool_key {
        Some(k) => pooled::take(ctx, &msg, k).await,
        None => None,
    };
    let (upstream, credential, origin, place) = match reused {
        Some(r) => {
            let place = r.origin.place.clone();
            (r.connected, r.credential, Some(r.origin), place)
        }
        None => {
            let (chosen, credential) = open_upstream(ctx, &msg, &mut client).await?;
            let (upstream, place) = chosen.split();
            let origin = pooled::origin(pool_key, &upstream.greeting, &place);
            (upstream, credential, origin, place)
        }
    };
    let connect_time = started.elapsed();
    let span = tracing::Span::current();
    span.record("credential", credential.generation);
    if let Some(pid) = upstream.backend_pid {
        span.record("backend_pid", pid);
    }

    // Our own cancel key stands in for the backend's; the mapping ends with the session.
    let (key, cancel_guard) = match &upstream.key {
        Some(k) => {
            let target = CancelTarget {
                database: db.name.clone(),
                // The host the session is on, not the list.
                upstream: place.host.clone(),
                key: k.clone(),
            };
            let (key, guard) = ctx.cancels.register(target, msg.secret_len());
            (Some(key), Some(guard))
        }
        None => (None, None),
    };
    let mut hello = BytesMut::with_capacity(upstream.greeting.len() + 128);
    if msg.needs_negotiation() {
        hello.extend_from_slice(&msg.negotiate_protocol_version());
    }
    crate::pg::frame::authentication_ok(&mut hello);
    if let Some(k) = &key {
        k.encode(&mut hello);
    }
    // The greeting starts at a message boundary (after AuthenticationOk) and may end inside a
    // message the server sent early, so the relay's tracking starts from it.
    let mut boundaries = Boundaries::default();
    boundaries.advance(&upstream.greeting);
    hello.extend_from_slice(&upstream.greeting);
    if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
        return None;
    }
    tracing::debug!(
        ?connect_time,
        upstream = %place.label,
        role = %place.role,
        tls = upstream.tls,
        client_tls = matches!(client, Either::Right(_)),
        "session established"
    );

    let retirement = credential.retirement(ctx.entry.cfg.credentials.retire_margin);
    let login = recheck::Login {
        params: upstream_params(db, &msg, &credential.username),
        password: credential.password.clone(),
        keys: credential.scram_keys().clone(),
    };
    let (rechecks, recheck_guard) = match recheck::start(&db.upstream, &place.host, &place.role, &place.label, login) {
        Some((rx, guard)) => (Some(rx), Some(guard)),
        None => (None, None),
    };
    Some(Established {
        client,
        backend: upstream.key.clone(),
        tls: upstream.tls,
        upstream: upstream.stream,
        pending,
        boundaries,
        endings: relay::Endings {
            retirement,
            recheck: rechecks,
        },
        origin,
        credential,
        cancel_guard,
        recheck_guard,
    })
}

/// Whether the StartupMessage may go on to a credential: refused (the client told why) when the
/// user is missing, dbward is shutting down, or replication is asked for but not allowed.
async fn admit<W: AsyncWrite + Unpin>(ctx: &SessionContext, msg: &StartupMessage, client: &mut W) -> bool {
    let db = &ctx.entry;
    if !caller::admit(ctx, client).await {
        return false;
    }
    // As Postgres: NegotiateProtocolVersion (when due), then 28000.
    if let Some(e) = msg.missing_user() {
        ctx.metrics
            .client_startup_errors_total
            .with_label_values(&[&db.name, "missing_user"])
            .inc();
        if msg.needs_negotiation() && client.write_all(&msg.negotiate_protocol_version()).await.is_err() {
            return false;
        }
        send_error(client, &e).await;
        return false;
    }
    if ctx.shutdown.is_stopping() {
        send_error(client, &shutting_down()).await;
        return false;
    }
    if let Some(v) = msg.replication() {
        if !db.cfg.allow_replication {
            let e = PgError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "dbward: replication connections (replication={v}) are not relayed for database entry {:?}",
                    db.name
                ),
            )
            .with_hint("set allow_replication = true for this database entry to relay them");
            send_error(client, &e).await;
            return false;
        }
    }
    true
}

/// Gets a credential and connects upstream with it; a credential the server refuses (28P01) is
/// dropped and replaced once. On failure the client has been told why.
async fn open_upstream<S: AsyncWrite + Unpin>(
    ctx: &SessionContext,
    msg: &StartupMessage,
    client: &mut S,
) -> Option<(Chosen, InUse)> {
    let db = &ctx.entry;
    let mut retried = false;
    loop {
        let cred = match ctx.credentials.checkout(&db.name).await {
            Ok(c) => c,
            Err(e) => {
                ctx.metrics
                    .client_connections_rejected_total
                    .with_label_values(&[&db.name, "credential"])
                    .inc();
                send_error(client, &refusal::credential_refusal(&e)).await;
                return None;
            }
        };
        let params = upstream_params(db, msg, &cred.username);
        let started = Instant::now();
        let mut count_failure = |host: &str, e: &upstream::UpstreamError| {
            let class = e.sqlstate_class();
            ctx.metrics
                .upstream_connect_failures_total
                .with_label_values(&[&db.name, host, &class])
                .inc();
        };
        let result = tokio::select! {
            r = upstream::hosts::connect(&db.upstream, &params, &cred.password, cred.scram_keys(), &mut count_failure) => r,
            _ = ctx.shutdown.terminating() => {
                send_error(client, &shutting_down()).await;
                return None;
            }
        };
        match result {
            Ok(c) => {
                ctx.metrics
                    .upstream_connect_seconds
                    .with_label_values(&[&db.name, &c.label])
                    .observe(started.elapsed().as_secs_f64());
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
                ctx.credentials.rejected(&db.name, cred.generation).await;
            }
            Err(e) => {
                ctx.metrics
                    .client_connections_rejected_total
                    .with_label_values(&[&db.name, "upstream"])
                    .inc();
                tracing::warn!(upstream = %db.upstream.addr(), error = %e, "upstream connection failed");
                match (e.to_pg_error(&db.name), &e) {
                    (Some(pg), _) => send_error(client, &pg).await,
                    // The server's own error (3D000, 28000 from pg_hba...) reaches the client as sent.
                    (None, upstream::UpstreamError::Server(se)) => {
                        let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
                            let _ = client.write_all(&se.raw).await;
                            let _ = client.shutdown().await;
                        })
                        .await;
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
        .or_else(|| msg.get("database").filter(|d| !d.is_empty()).map(str::to_string))
        .unwrap_or_else(|| msg.get("user").unwrap_or_default().to_string());
    let mut params = vec![
        ("user".to_string(), username.to_string()),
        ("database".to_string(), database),
    ];
    params.extend(
        msg.params
            .iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .cloned(),
    );
    params
}

/// Routes a client's CancelRequest to the backend its key stands for. Unknown keys are dropped
/// silently, as Postgres does, so keys cannot be probed; so are keys of another database entry,
/// whose listeners may be open to other users.
async fn route_cancel(ctx: &SessionContext, key: BackendKey) {
    match ctx.cancels.lookup(&key).filter(|t| t.database == ctx.entry.name) {
        Some(target) => match upstream::cancel(&target.upstream, &target.key).await {
            Ok(()) => {
                ctx.metrics.cancel_requests_total.with_label_values(&["routed"]).inc();
                tracing::info!(database = %target.database, backend_pid = target.key.pid, "cancel request routed");
            }
            Err(e) => {
                ctx.metrics.cancel_requests_total.with_label_values(&["failed"]).inc();
                tracing::warn!(database = %target.database, error = %e, "cancel request could not be delivered");
            }
        },
        None => {
            ctx.metrics
                .cancel_requests_total
                .with_label_values(&["unknown_key"])
                .inc();
            tracing::debug!("cancel request with an unknown key ignored");
        }
    }
}
