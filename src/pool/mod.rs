//! Opt-in reuse of upstream connections (`[databases.pool]`). A session whose client leaves
//! while the server is idle hands its connection back ([`Pool::put`]): the reset query runs and
//! the connection waits, with the credential it logged in with, for the next client of the same
//! entry whose startup parameters match ([`Pool::take`]). The pool is lease-aware: a connection
//! is kept only for the credential the store hands out now; once that credential is replaced,
//! or its hard end comes near, or it has been idle for `idle_timeout`, the connection is closed,
//! which releases the credential so that its lease can be revoked. Pools are per entry, keyed by
//! the startup parameters without `user` (the Vault-generated name changes with every
//! credential) and without `application_name` (set for each client).

pub(crate) mod client;
mod reset;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::credentials::{CredentialStore, InUse};
use crate::metrics::Metrics;
use crate::pg::cancel::BackendKey;
use crate::shutdown::Shutdown;
use crate::upstream::hosts::Place;
use crate::upstream::{Connected, UpstreamStream};

/// How often idle connections are checked (credential replaced, server gone, timeout).
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The startup parameters a kept connection serves: sorted, without user and application_name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolKey(Vec<(String, String)>);

impl PoolKey {
    pub(crate) fn new(params: &[(String, String)]) -> Self {
        let mut v: Vec<_> = params
            .iter()
            .filter(|(k, _)| k != "user" && k != "application_name")
            .cloned()
            .collect();
        v.sort();
        PoolKey(v)
    }
}

/// What a session needs to hand its connection back: where it came from.
pub(crate) struct Origin {
    pub(crate) key: PoolKey,
    /// The connection's first greeting (after AuthenticationOk, through ReadyForQuery).
    pub(crate) greeting: Bytes,
    /// The host the connection is on (multi-host upstreams): the next session's cancel target.
    pub(crate) place: Place,
}

impl Origin {
    /// For a fresh connection; None when its greeting cannot be replayed (it is then not kept).
    pub(crate) fn of(key: PoolKey, greeting: &[u8], place: &Place) -> Option<Origin> {
        Some(Origin {
            key,
            greeting: reset::keepable_greeting(greeting)?,
            place: place.clone(),
        })
    }
}

/// A kept server connection.
struct Idle {
    origin: Origin,
    stream: UpstreamStream,
    backend: Option<BackendKey>,
    tls: bool,
    /// Held while idle: the lease stays renewed, and is released (so it can be revoked) when
    /// the connection is closed.
    credential: InUse,
    since: Instant,
}

/// One entry's kept connections, oldest first.
pub(crate) struct Pool {
    database: String,
    cfg: PoolConfig,
    idle: Mutex<VecDeque<Idle>>,
    sweeping: AtomicBool,
}

/// A connection taken from the pool, ready for a client.
pub(crate) struct Reused {
    pub(crate) connected: Connected,
    pub(crate) credential: InUse,
    pub(crate) origin: Origin,
}

/// What a pool needs of the daemon, borrowed from the session.
pub(crate) struct PoolEnv<'a> {
    pub(crate) credentials: &'a Arc<CredentialStore>,
    pub(crate) metrics: &'a Arc<Metrics>,
    pub(crate) shutdown: &'a Shutdown,
    /// Bound on the reset query and on `SET application_name`.
    pub(crate) timeout: Duration,
}

impl Pool {
    pub(crate) fn new(database: &str, cfg: PoolConfig) -> Arc<Pool> {
        Arc::new(Pool {
            database: database.to_string(),
            cfg,
            idle: Mutex::new(VecDeque::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn closed(&self, metrics: &Metrics, reason: &str) {
        metrics
            .pool_closed_total
            .with_label_values(&[&self.database, reason])
            .inc();
    }

    fn publish(&self, metrics: &Metrics, len: usize) {
        metrics.pool_idle.with_label_values(&[&self.database]).set(len as i64);
    }

    /// A kept connection for `key` made with the credential generation handed out now, readied
    /// for a client with `application_name`; None when there is none (connect as usual).
    pub(crate) async fn take(
        &self,
        env: &PoolEnv<'_>,
        key: &PoolKey,
        generation: u64,
        application_name: &str,
    ) -> Option<Reused> {
        loop {
            let (found, stale) = {
                let mut idle = self.lock();
                let stale: Vec<Idle> = drain_where(&mut idle, |c| c.credential.generation != generation);
                let found = idle
                    .iter()
                    .rposition(|c| c.origin.key == *key)
                    .and_then(|i| idle.remove(i));
                self.publish(env.metrics, idle.len());
                (found, stale)
            };
            for c in stale {
                self.closed(env.metrics, "credential_replaced");
                reset::close(c.stream).await;
            }
            let mut c = found?;
            if !alive(&mut c.stream) {
                self.closed(env.metrics, "server_closed");
                continue;
            }
            let greeting = if reset::reported_application_name(&c.origin.greeting) == application_name {
                BytesMut::from(&c.origin.greeting[..])
            } else {
                let sql = reset::set_application_name(application_name);
                if let Err(e) = reset::simple_query(&mut c.stream, &sql, env.timeout).await {
                    tracing::debug!(database = %self.database, error = %e, "kept server connection failed SET application_name; closing it");
                    self.closed(env.metrics, "reset_failed");
                    reset::close(c.stream).await;
                    continue;
                }
                reset::greeting_for(&c.origin.greeting, application_name)
            };
            env.metrics.pool_reused_total.with_label_values(&[&self.database]).inc();
            return Some(Reused {
                connected: Connected {
                    stream: c.stream,
                    backend_pid: c.backend.as_ref().map(|k| k.pid),
                    key: c.backend,
                    greeting,
                    tls: c.tls,
                },
                credential: c.credential,
                origin: c.origin,
            });
        }
    }

    /// Takes back the connection of a session whose client left while the server was idle:
    /// runs the reset query and keeps it, unless dbward is stopping, the reset fails or the
    /// credential is no longer the one handed out.
    pub(crate) async fn put(
        self: &Arc<Self>,
        env: &PoolEnv<'_>,
        mut stream: UpstreamStream,
        backend: Option<BackendKey>,
        tls: bool,
        origin: Origin,
        credential: InUse,
    ) {
        if env.shutdown.is_stopping() {
            self.closed(env.metrics, "shutdown");
            return reset::close(stream).await;
        }
        if let Err(e) = reset::simple_query(&mut stream, &self.cfg.reset_query, env.timeout).await {
            tracing::debug!(database = %self.database, error = %e, "reset query failed; closing the server connection");
            self.closed(env.metrics, "reset_failed");
            return reset::close(stream).await;
        }
        if !current(env.credentials, &self.database, &credential).await {
            self.closed(env.metrics, "credential_replaced");
            return reset::close(stream).await;
        }
        let evicted = {
            let mut idle = self.lock();
            idle.push_back(Idle {
                origin,
                stream,
                backend,
                tls,
                credential,
                since: Instant::now(),
            });
            let evicted = (idle.len() > self.cfg.max_idle).then(|| idle.pop_front()).flatten();
            self.publish(env.metrics, idle.len());
            evicted
        };
        if let Some(c) = evicted {
            self.closed(env.metrics, "full");
            reset::close(c.stream).await;
        }
        if !self.sweeping.swap(true, Ordering::SeqCst) {
            tokio::spawn(sweep(
                Arc::downgrade(self),
                Arc::clone(env.credentials),
                Arc::clone(env.metrics),
                env.shutdown.clone(),
            ));
        }
    }

    /// Removes the connections that must not be used any more, with the reason for each.
    async fn expired(&self, credentials: &CredentialStore, stopping: bool) -> Vec<(Idle, &'static str)> {
        let generation = credentials.peek(&self.database).await.map(|h| h.generation);
        let now = Instant::now();
        let mut idle = self.lock();
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(idle.len());
        while let Some(mut c) = idle.pop_front() {
            let reason = if stopping {
                Some("shutdown")
            } else if generation != Some(c.credential.generation) {
                Some("credential_replaced")
            } else if c.credential.retirement(None).due_at().is_some_and(|(_, at)| at <= now) {
                Some("credential_end")
            } else if now.duration_since(c.since) >= self.cfg.idle_timeout {
                Some("idle_timeout")
            } else if !alive(&mut c.stream) {
                Some("server_closed")
            } else {
                None
            };
            match reason {
                Some(r) => out.push((c, r)),
                None => keep.push_back(c),
            }
        }
        *idle = keep;
        out
    }
}

/// Closes idle connections as they expire. Runs while the pool has connections (at most one
/// per pool) and ends with the pool or at shutdown.
async fn sweep(pool: Weak<Pool>, credentials: Arc<CredentialStore>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => shutdown.is_stopping(),
            _ = shutdown.stopping() => true,
        };
        let Some(p) = pool.upgrade() else { return };
        let gone = p.expired(&credentials, stopping).await;
        for (c, reason) in gone {
            tracing::debug!(database = %p.database, reason, "closing kept server connection");
            p.closed(&metrics, reason);
            reset::close(c.stream).await;
        }
        let mut idle = p.lock();
        p.publish(&metrics, idle.len());
        if idle.is_empty() || stopping {
            // Cleared under the lock: a put that follows starts a new sweep.
            p.sweeping.store(false, Ordering::SeqCst);
            idle.clear();
            return;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A reload replaced the entry: its kept connections close with it (the sockets close;
        // the servers end the backends on EOF).
        self.lock().clear();
    }
}

/// Whether the credential is the one the store hands out now.
async fn current(credentials: &CredentialStore, database: &str, credential: &InUse) -> bool {
    credentials
        .peek(database)
        .await
        .is_some_and(|h| h.generation == credential.generation)
}

/// An idle server sends nothing; readable means closed (EOF), failed, or a message such as a
/// FATAL at its shutdown: in every case the connection is not reused.
fn alive(stream: &mut UpstreamStream) -> bool {
    let mut probe = [0u8; 1];
    stream.read(&mut probe).now_or_never().is_none()
}

fn drain_where(idle: &mut VecDeque<Idle>, pred: impl Fn(&Idle) -> bool) -> Vec<Idle> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < idle.len() {
        if pred(&idle[i]) {
            out.extend(idle.remove(i));
        } else {
            i += 1;
        }
    }
    out
}
