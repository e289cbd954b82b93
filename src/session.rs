//! One client connection, from its first byte to the end:
//!
//! 1. negotiation, under one deadline (`startup_timeout`): SSLRequest (TLS when the entry has
//!    `client_tls`, else 'N'), direct TLS (Postgres 17 clients with `sslnegotiation=direct`),
//!    GSSENCRequest ('N'), CancelRequest (routed to the backend its key stands for);
//! 2. the StartupMessage, a credential from the cache, and the upstream connection made with it;
//! 3. a byte relay. Nothing after authentication is parsed; only the ends of server messages are
//!    followed, so that the 57P01 dbward sends at shutdown lands between two of them.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::either::Either;

use crate::app::{App, Database};
use crate::credentials::InUse;
use crate::pg::cancel::{BackendKey, CancelTarget};
use crate::pg::error::{sqlstate, PgError};
use crate::pg::frame::Boundaries;
use crate::pg::startup::{self, ReadError, StartupMessage, StartupPacket};
use crate::pg::tls::{Rewind, ALPN_POSTGRESQL, TLS_HANDSHAKE_BYTE};
use crate::upstream::{self, Connected, UpstreamStream};

/// Relay buffer per direction: large enough that COPY and big result sets move in few syscalls.
const RELAY_BUFFER: usize = 64 * 1024;

/// Once shutdown ends a session, how long the relay may take to finish passing on the server
/// message in flight (so the 57P01 can follow it) and to deliver the 57P01 itself.
const SHUTDOWN_MESSAGE_WAIT: Duration = Duration::from_secs(1);

/// Bound on sending dbward's own error to a client: one that does not read must not keep the
/// session (and its credential) alive.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's connection: as accepted (Left), or inside TLS (Right).
pub type ClientIo<S> = Either<S, Box<tokio_rustls::server::TlsStream<Rewind<S>>>>;

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

/// What the client came for, once negotiation is over.
enum Opening {
    Startup(StartupMessage),
    Cancel(BackendKey),
}

/// Serves one client from its first byte to the end.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(app: &Arc<App>, db: &Arc<Database>, client: S) {
    let Some((mut client, opening, pending)) = negotiate(app, db, client).await else {
        return;
    };
    let msg = match opening {
        Opening::Cancel(key) => return route_cancel(app, db, key).await,
        Opening::Startup(m) => m,
    };
    if app.shutdown.is_stopping() {
        return send_error(&mut client, &shutting_down()).await;
    }
    if let Some(v) = msg
        .get("replication")
        .filter(|v| !matches!(*v, "false" | "off" | "no" | "0"))
    {
        if !db.cfg.allow_replication {
            let e = PgError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "dbward: replication connections (replication={v}) are not relayed for database entry {:?}",
                    db.name
                ),
            )
            .with_hint("set allow_replication = true for this database entry to relay them");
            return send_error(&mut client, &e).await;
        }
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
            let target = CancelTarget {
                database: db.name.clone(),
                upstream: db.upstream.clone(),
                key: k.clone(),
            };
            let (key, guard) = app.cancels.register(target, msg.secret_len());
            (Some(key), Some(guard))
        }
        None => (None, None),
    };
    let mut hello = BytesMut::with_capacity(upstream.greeting.len() + 128);
    if msg.needs_negotiation() {
        hello.extend_from_slice(&msg.negotiate_protocol_version());
    }
    hello.put_u8(b'R');
    hello.put_i32(8);
    hello.put_i32(0);
    if let Some(k) = &key {
        k.encode(&mut hello);
    }
    // The greeting starts at a message boundary (after AuthenticationOk) and may end inside a
    // message the server sent early, so the relay's tracking starts from it.
    let mut boundaries = Boundaries::default();
    boundaries.advance(&upstream.greeting);
    hello.extend_from_slice(&upstream.greeting);
    if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
        return;
    }
    tracing::debug!(
        ?connect_time,
        tls = upstream.tls,
        client_tls = matches!(client, Either::Right(_)),
        "session established"
    );

    relay(app, db, client, upstream.stream, pending, boundaries).await;
    drop(credential);
}

/// What the next bytes from a client are.
enum Incoming {
    Packet(StartupPacket),
    /// A TLS ClientHello where the first packet should be.
    DirectTls,
}

/// Reads the next startup-phase packet into `buf`, keeping whatever follows it there.
async fn next_packet<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut, first: bool) -> Result<Incoming, ReadError> {
    loop {
        if first && buf.first() == Some(&TLS_HANDSHAKE_BYTE) {
            return Ok(Incoming::DirectTls);
        }
        if let Some(p) = startup::take_packet(buf).map_err(ReadError::Protocol)? {
            return Ok(Incoming::Packet(p));
        }
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Everything before the StartupMessage or CancelRequest: encryption requests and the TLS
/// handshake. Returns the (maybe encrypted) stream, what the client asked for and any bytes it
/// sent after its StartupMessage (pipelined messages, passed on upstream). `None` when the
/// session is over; the client has been told why when it could be.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    app: &Arc<App>,
    db: &Arc<Database>,
    client: S,
) -> Option<(ClientIo<S>, Opening, BytesMut)> {
    let startup_timeout = app.config().proxy.startup_timeout.0;
    let deadline = tokio::time::Instant::now() + startup_timeout;
    let mut io = Either::Left(client);
    let mut buf = BytesMut::with_capacity(1024);
    let mut first = true;
    let mut ssl_asked = false;
    let mut gss_asked = false;
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, next_packet(&mut io, &mut buf, first)) => r,
            _ = app.shutdown.terminating() => {
                send_error(&mut io, &shutting_down()).await;
                return None;
            }
        };
        first = false;
        let incoming = match read {
            Err(_) => {
                let e = PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!(
                        "dbward: no startup packet within {}",
                        humantime::format_duration(startup_timeout)
                    ),
                );
                send_error(&mut io, &e).await;
                return None;
            }
            Ok(Err(ReadError::Closed)) => return None,
            Ok(Err(ReadError::Io(e))) => {
                tracing::debug!(error = %e, "client went away during startup");
                return None;
            }
            Ok(Err(ReadError::Protocol(e))) => {
                send_error(&mut io, &e).await;
                return None;
            }
            Ok(Ok(incoming)) => incoming,
        };
        match incoming {
            Incoming::DirectTls => {
                let Some(acceptor) = db.client_tls.as_ref().map(|t| t.acceptor()) else {
                    // The client speaks TLS: a Postgres error would only be garbage to it.
                    tracing::info!(
                        "client started TLS directly (sslnegotiation=direct) but client_tls is not configured; closing"
                    );
                    return None;
                };
                let Either::Left(plain) = io else {
                    unreachable!("direct TLS is only looked for first")
                };
                io = accept_tls(acceptor, Rewind::new(buf.split(), plain), true, deadline).await?;
                ssl_asked = true;
                gss_asked = true;
            }
            Incoming::Packet(StartupPacket::SslRequest) => {
                if ssl_asked {
                    let e = PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "SSLRequest sent twice or after encryption was established",
                    );
                    send_error(&mut io, &e).await;
                    return None;
                }
                ssl_asked = true;
                // CVE-2021-3935: what follows the request in the same read arrived unencrypted
                // and, once TLS is on, would pass for something sent under it.
                if !buf.is_empty() {
                    let e = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "received unencrypted data after SSL request")
                        .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.");
                    send_error(&mut io, &e).await;
                    return None;
                }
                let acceptor = db.client_tls.as_ref().map(|t| t.acceptor());
                let answer: &[u8] = if acceptor.is_some() { b"S" } else { b"N" };
                if io.write_all(answer).await.is_err() || io.flush().await.is_err() {
                    return None;
                }
                if let Some(acceptor) = acceptor {
                    let Either::Left(plain) = io else {
                        unreachable!("ssl_asked guards a second TLS")
                    };
                    io = accept_tls(acceptor, Rewind::new(BytesMut::new(), plain), false, deadline).await?;
                    gss_asked = true;
                }
            }
            Incoming::Packet(StartupPacket::GssEncRequest) => {
                if gss_asked {
                    let e = PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "GSSENCRequest sent twice or after encryption was established",
                    );
                    send_error(&mut io, &e).await;
                    return None;
                }
                gss_asked = true;
                // GSSAPI encryption is not offered: 'N' lets the client go on (libpq then tries
                // TLS or plaintext, as its settings say).
                if io.write_all(b"N").await.is_err() || io.flush().await.is_err() {
                    return None;
                }
            }
            Incoming::Packet(StartupPacket::Cancel { pid, secret }) => {
                return Some((io, Opening::Cancel(BackendKey { pid, secret }), buf));
            }
            Incoming::Packet(StartupPacket::Startup(m)) => return Some((io, Opening::Startup(m), buf)),
        }
    }
}

/// The TLS handshake with a client. Failures are logged and end the session: mid-handshake there
/// is no way to send the client a Postgres error it could read.
async fn accept_tls<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: Rewind<S>,
    direct: bool,
    deadline: tokio::time::Instant,
) -> Option<ClientIo<S>> {
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Err(_) => {
            tracing::info!("client TLS handshake did not finish within startup_timeout");
            return None;
        }
        Ok(Err(e)) => {
            tracing::info!(error = %e, direct, "client TLS handshake failed");
            return None;
        }
        Ok(Ok(tls)) => tls,
    };
    let alpn = tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL);
    let mut io = Either::Right(Box::new(tls));
    // Without SSLRequest, ALPN is the only sign the client meant to speak Postgres here (rustls
    // already refused a client that offered only other protocols).
    if direct && !alpn {
        let e = PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "received direct SSL connection request without ALPN protocol negotiation extension",
        );
        send_error(&mut io, &e).await;
        return None;
    }
    tracing::debug!(direct, alpn, "client TLS established");
    Some(io)
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
                app.metrics
                    .client_connections_rejected_total
                    .with_label_values(&[&db.name, "credential"])
                    .inc();
                send_error(client, &e.to_pg_error()).await;
                return None;
            }
        };
        let params = upstream_params(db, msg, &cred.username);
        let started = Instant::now();
        let result = tokio::select! {
            r = upstream::connect_with_keys(&db.upstream, &params, &cred.password, cred.scram_keys()) => r,
            _ = app.shutdown.terminating() => {
                send_error(client, &shutting_down()).await;
                return None;
            }
        };
        match result {
            Ok(c) => {
                app.metrics
                    .upstream_connect_seconds
                    .with_label_values(&[&db.name])
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
                app.credentials.rejected(&db.name, cred.generation).await;
            }
            Err(e) => {
                let class: String = e.sqlstate().chars().take(2).collect();
                app.metrics
                    .upstream_connect_failures_total
                    .with_label_values(&[&db.name, &class])
                    .inc();
                app.metrics
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
        .or_else(|| msg.get("database").map(str::to_string))
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

/// How the relay ended.
enum End {
    /// The server closed the connection (after Terminate, or on its own, e.g. a FATAL).
    ServerClosed,
    /// The client stopped sending and the server then closed.
    ClientClosed,
    ServerFailed(io::Error),
    ClientFailed(io::Error),
    /// dbward is shutting down.
    Shutdown,
}

/// A copy failed on this side.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    app: &Arc<App>,
    db: &Arc<Database>,
    client: ClientIo<S>,
    upstream: UpstreamStream,
    pending: BytesMut,
    boundaries: Boundaries,
) {
    let active = app.metrics.client_connections_active.with_label_values(&[&db.name]);
    active.inc();
    let started = Instant::now();
    // Counted into the metric as the bytes move, so long-lived sessions show up in
    // dbward_relayed_bytes_total before they end.
    let to_upstream = ByteCount::new(app.metrics.bytes_total.with_label_values(&[&db.name, "to_upstream"]));
    let to_client = ByteCount::new(app.metrics.bytes_total.with_label_values(&[&db.name, "to_client"]));
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let mut down = DownState {
        buf: vec![0; RELAY_BUFFER].into_boxed_slice(),
        start: 0,
        end: 0,
        boundaries,
    };
    let mut terminating = termination_signal(app);

    let end = {
        let upward = async {
            if !pending.is_empty() {
                up_wr.write_all(&pending).await.map_err(PumpError::Write)?;
                to_upstream.add(pending.len() as u64);
            }
            pump(&mut client_rd, &mut up_wr, &to_upstream).await?;
            // Pass the client's half-close on: the server ends the session when it reads the
            // EOF, after finishing what it is doing, and everything it sends until then still
            // reaches the client.
            up_wr.shutdown().await.map_err(PumpError::Write)
        };
        let downward = pump_down(&mut up_rd, &mut client_wr, &mut down, &to_client);
        tokio::pin!(upward, downward);
        let mut client_done = false;
        loop {
            tokio::select! {
                // The server side ending ends the session, whatever the client does: a client
                // that never reads or closes must not hold the upstream connection and its
                // credential.
                r = &mut downward => break match r {
                    Ok(()) if client_done => End::ClientClosed,
                    Ok(()) => End::ServerClosed,
                    Err(PumpError::Read(e)) => End::ServerFailed(e),
                    Err(PumpError::Write(e)) => End::ClientFailed(e),
                },
                r = &mut upward, if !client_done => match r {
                    Ok(()) => client_done = true,
                    Err(PumpError::Read(e)) => break End::ClientFailed(e),
                    Err(PumpError::Write(e)) => break End::ServerFailed(e),
                },
                Ok(()) = &mut terminating => break End::Shutdown,
            }
        }
    };

    let how = match &end {
        End::ServerClosed => "server closed",
        End::ClientClosed => "client closed",
        End::ServerFailed(e) => {
            tracing::debug!(error = %e, "relay: upstream connection failed");
            "upstream error"
        }
        End::ClientFailed(e) => {
            tracing::debug!(error = %e, "relay: client connection failed");
            "client error"
        }
        End::Shutdown => "shutdown",
    };
    if let End::Shutdown = end {
        let finished = tokio::time::timeout(
            SHUTDOWN_MESSAGE_WAIT,
            finish_message(&mut up_rd, &mut client_wr, &mut down, &to_client),
        )
        .await;
        let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, async {
            // Only between two server messages: inside one, it would garble the stream.
            if finished == Ok(true) {
                let _ = client_wr.write_all(&shutting_down().to_bytes()).await;
            }
            let _ = client_wr.shutdown().await;
        })
        .await;
        // No Terminate upstream: the client may have been in the middle of a message of its
        // own. The server sees the EOF and ends the backend, rolling back what was open.
        let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, up_wr.shutdown()).await;
    } else {
        let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, client_wr.shutdown()).await;
    }
    active.dec();
    let (up, down) = (to_upstream.get(), to_client.get());
    tracing::info!(
        duration = ?started.elapsed(),
        bytes_to_upstream = up,
        bytes_to_client = down,
        end = how,
        "session ended"
    );
}

/// Resolves (with `Ok`) when shutdown ends sessions. The shared shutdown signal takes a lock
/// whenever it is polled, and a relay's select polls it on every wake-up, that is for every
/// chunk moved; so a helper task waits on it once and passes it on through a channel of this
/// session's own, which polls without locks. The helper ends with the session.
fn termination_signal(app: &Arc<App>) -> tokio::sync::oneshot::Receiver<()> {
    let (mut tx, rx) = tokio::sync::oneshot::channel();
    let app = app.clone();
    tokio::spawn(async move {
        let terminated = tokio::select! {
            _ = app.shutdown.terminating() => true,
            _ = tx.closed() => false,
        };
        if terminated {
            let _ = tx.send(());
        }
    });
    rx
}

/// Copies client bytes upstream until the client's EOF.
/// Bytes moved one way: the session's total (for its end-of-session log line) and the metric.
struct ByteCount {
    total: AtomicU64,
    metric: prometheus::IntCounter,
}

impl ByteCount {
    fn new(metric: prometheus::IntCounter) -> Self {
        ByteCount {
            total: AtomicU64::new(0),
            metric,
        }
    }

    fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.metric.inc_by(n);
    }

    fn get(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, count: &ByteCount) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await.map_err(PumpError::Read)?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        w.flush().await.map_err(PumpError::Write)?;
        count.add(n as u64);
    }
}

/// The server-to-client copy's state. It lives outside the copying future so that the future
/// can be dropped at any await (at shutdown) and what the client has received is still known.
struct DownState {
    buf: Box<[u8]>,
    /// `buf[start..end]` came from the server and has not reached the client yet.
    start: usize,
    end: usize,
    boundaries: Boundaries,
}

/// Copies server bytes to the client until the server's EOF. Each await is a single read or
/// write, after which `st` is up to date.
async fn pump_down<R, W>(r: &mut R, w: &mut W, st: &mut DownState, count: &ByteCount) -> Result<(), PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        while st.start < st.end {
            let n = w.write(&st.buf[st.start..st.end]).await.map_err(PumpError::Write)?;
            if n == 0 {
                return Err(PumpError::Write(io::ErrorKind::WriteZero.into()));
            }
            st.boundaries.advance(&st.buf[st.start..st.start + n]);
            st.start += n;
            count.add(n as u64);
        }
        w.flush().await.map_err(PumpError::Write)?;
        let n = r.read(&mut st.buf).await.map_err(PumpError::Read)?;
        if n == 0 {
            return Ok(());
        }
        st.start = 0;
        st.end = n;
    }
}

/// At shutdown: passes on the rest of the server message the client is in the middle of, and
/// nothing after it, so that dbward's 57P01 can follow. False if that could not be done.
async fn finish_message<R, W>(r: &mut R, w: &mut W, st: &mut DownState, count: &ByteCount) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let need = st.boundaries.to_boundary();
        if need == 0 {
            return w.flush().await.is_ok();
        }
        if st.start == st.end {
            let limit = need.min(st.buf.len());
            match r.read(&mut st.buf[..limit]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    st.start = 0;
                    st.end = n;
                }
            }
        }
        let upto = st.start + (st.end - st.start).min(need);
        match w.write(&st.buf[st.start..upto]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                st.boundaries.advance(&st.buf[st.start..st.start + n]);
                st.start += n;
                count.add(n as u64);
            }
        }
    }
}

/// Routes a client's CancelRequest to the backend its key stands for. Unknown keys are dropped
/// silently, as Postgres does, so keys cannot be probed; so are keys of another database entry,
/// whose listeners may be open to other users.
async fn route_cancel(app: &Arc<App>, db: &Arc<Database>, key: BackendKey) {
    match app.cancels.lookup(&key).filter(|t| t.database == db.name) {
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
            app.metrics
                .cancel_requests_total
                .with_label_values(&["unknown_key"])
                .inc();
            tracing::debug!("cancel request with an unknown key ignored");
        }
    }
}
