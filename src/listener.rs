//! Listening sockets (TCP and Unix) and the accept loop of each: the per-database connection
//! cap, a tracing span per session, and stopping on shutdown. Each accepted client gets a
//! [`SessionContext`]: its entry as published at that moment and the shared [`Services`].

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ListenAddr;
use crate::credentials::CredentialStore;
use crate::entry::Entries;
use crate::metrics::Metrics;
use crate::peer;
use crate::pg::cancel::CancelMap;
use crate::pg::error::{sqlstate, PgError};
use crate::session::{self, SessionContext};
use crate::shutdown::Shutdown;
use crate::systemd::{Activated, ActivatedSockets};
use crate::upstream::UpstreamSettings;

/// What every session shares, whichever entry it serves.
#[derive(Clone)]
pub(crate) struct Services {
    pub(crate) credentials: Arc<CredentialStore>,
    pub(crate) cancels: Arc<CancelMap<Arc<UpstreamSettings>>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: Shutdown,
    pub(crate) streaming: Arc<crate::session::streaming::Streaming>,
}

pub(crate) enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped.
    Unix(UnixListener, UnlinkOnDrop),
}

/// A Unix listener's socket file; removed on drop when dbward created it (true), kept when
/// systemd passed the socket (socket activation: the file must outlive dbward).
pub(crate) struct UnlinkOnDrop(PathBuf, bool);

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// [`bind`], or adopts the socket systemd passed for `addr` (socket activation).
pub(crate) async fn bind_or_take(
    addr: &ListenAddr,
    socket_mode: u32,
    activated: &mut ActivatedSockets,
) -> io::Result<Listener> {
    match activated.take(addr) {
        Some(Activated::Tcp(l)) => Ok(Listener::Tcp(TcpListener::from_std(l)?)),
        Some(Activated::Unix(l, path)) => Ok(Listener::Unix(UnixListener::from_std(l)?, UnlinkOnDrop(path, false))),
        None => bind(addr, socket_mode).await,
    }
}

/// Binds one listen address. A Unix socket file left by a crashed run is replaced; one that a
/// live process still serves is not.
async fn bind(addr: &ListenAddr, socket_mode: u32) -> io::Result<Listener> {
    match addr {
        ListenAddr::Tcp(a) => {
            let socket = match a {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(*a)?;
            Ok(Listener::Tcp(socket.listen(1024)?))
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)?;
            let guard = UnlinkOnDrop(path.clone(), true);
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
            Ok(Listener::Unix(l, guard))
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; refusing to replace it", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running process (another dbward?)", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket file from an earlier run");
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// Accepts clients for database entry `name` until shutdown or `stop` (the listener was removed
/// by a reload); each client gets its own task, tracked for graceful shutdown. The entry is
/// looked up at every accept, so a reload that changes it applies to the next client while
/// established sessions keep the settings they started with.
pub(crate) async fn accept_loop(
    entries: Entries,
    services: Services,
    name: String,
    listener: Listener,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = services.shutdown.stopping() => break,
            _ = stop.cancelled() => break,
            r = accept(&listener) => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(database = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let snapshot = entries.load();
        let Some(db) = snapshot.database(&name).cloned() else {
            break;
        };
        let startup_timeout = snapshot.config.proxy.startup_timeout;
        drop(snapshot);
        services
            .metrics
            .client_connections_total
            .with_label_values(&[&db.name])
            .inc();
        let span = tracing::info_span!(
            "session",
            database = %db.name,
            peer = %peer,
            uid = tracing::field::Empty,
            backend_pid = tracing::field::Empty,
            credential = tracing::field::Empty,
        );
        let Ok(permit) = db.slots.clone().try_acquire_owned() else {
            services
                .metrics
                .client_connections_rejected_total
                .with_label_values(&[&db.name, "too_many_connections"])
                .inc();
            tokio::spawn(refuse_full(stream, db.name.clone(), db.cfg.max_client_connections).instrument(span));
            continue;
        };
        let credentials = services.credentials.clone();
        let cancels = services.cancels.clone();
        let metrics = services.metrics.clone();
        let shutdown = services.shutdown.clone();
        let streaming = services.streaming.clone();
        // The task itself is not instrumented: entering the span on every poll would cost each
        // relayed transaction; the session enters it where it logs (see session::serve).
        services.shutdown.sessions().spawn(async move {
            // Boxed: the lookup's future is large and would otherwise stay in the task for the
            // session's whole life (see session::serve).
            let admission = Box::pin(peer::check(db.cfg.allowed.as_ref(), &stream))
                .instrument(span.clone())
                .await;
            if let peer::Admission::Admitted { uid } = &admission {
                span.record("uid", uid);
            }
            let ctx = SessionContext {
                entry: db,
                startup_timeout,
                credentials,
                cancels,
                metrics,
                shutdown,
                streaming,
                admission,
                span,
            };
            // Boxed, so the task's own allocation stays small (see session::serve).
            Box::pin(session::serve(&ctx, stream)).await;
            drop(permit);
        });
    }
}

/// Tells a client over `max_client_connections` why it is refused (53300), bounded in time so
/// that a client that does not read cannot hold the task.
async fn refuse_full(mut stream: ClientStream, name: String, limit: usize) {
    tracing::warn!(limit, "refusing client: max_client_connections reached");
    let e = PgError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        format!("dbward: database entry {name:?} has reached max_client_connections ({limit})"),
    )
    .with_hint("close idle connections or raise max_client_connections");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&e.to_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A client connection from either kind of listener.
pub(crate) type ClientStream = Either<tokio::net::TcpStream, tokio::net::UnixStream>;

async fn accept(l: &Listener) -> io::Result<(ClientStream, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Either::Left(s), peer.to_string()))
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            Ok((Either::Right(s), format!("unix:{}", path.0.display())))
        }
    }
}
