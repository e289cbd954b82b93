//! The session's two hooks into its entry's pool ([`crate::pool`]), when `[databases.pool]` is
//! set: a kept server connection instead of a new one, and handing the connection back when the
//! client leaves at a point where it can be kept.

use bytes::BytesMut;

use super::{upstream_params, SessionContext};
use crate::credentials::InUse;
use crate::pg::cancel::BackendKey;
use crate::pg::startup::StartupMessage;
use crate::pool::{Origin, PoolEnv, PoolKey, Reused};
use crate::upstream::hosts::Place;
use crate::upstream::UpstreamStream;

fn env(ctx: &SessionContext) -> PoolEnv<'_> {
    PoolEnv {
        credentials: &ctx.credentials,
        metrics: &ctx.metrics,
        shutdown: &ctx.shutdown,
        timeout: ctx.entry.cfg.connect_timeout,
    }
}

/// The pool key of this client's startup parameters; None when the entry keeps no connections.
pub(super) fn key(ctx: &SessionContext, msg: &StartupMessage) -> Option<PoolKey> {
    ctx.entry.pool.as_ref()?;
    // Replication connections are never kept: their protocol has no ReadyForQuery to go by.
    if msg.replication().is_some() {
        return None;
    }
    Some(PoolKey::new(&upstream_params(&ctx.entry, msg, "")))
}

/// A kept connection for this client, made with the credential the store hands out now.
pub(super) async fn take(ctx: &SessionContext, msg: &StartupMessage, key: &PoolKey) -> Option<Reused> {
    let pool = ctx.entry.pool.as_ref()?;
    let generation = ctx.credentials.peek(&ctx.entry.name).await?.generation;
    let app = msg.get("application_name").unwrap_or_default();
    let reused = pool.take(&env(ctx), key, generation, app).await?;
    tracing::debug!(backend_pid = ?reused.connected.backend_pid, "reusing a kept server connection");
    Some(reused)
}

/// Where a fresh connection came from, if it can be kept later.
pub(super) fn origin(key: Option<PoolKey>, greeting: &BytesMut, place: &Place) -> Option<Origin> {
    Origin::of(key?, greeting, place)
}

/// Hands the connection back to the entry's pool (which resets it or closes it).
pub(super) async fn give_back(
    ctx: &SessionContext,
    stream: UpstreamStream,
    backend: Option<BackendKey>,
    tls: bool,
    origin: Origin,
    credential: InUse,
) {
    if let Some(pool) = &ctx.entry.pool {
        pool.put(&env(ctx), stream, backend, tls, origin, credential).await;
    }
}
