//! The byte relay between a client and its upstream, once both sides are authenticated.
//! Nothing is parsed; only the ends of server messages are followed, so that the 57P01 dbward
//! sends at shutdown lands between two of them. Bytes are counted into the metric as they move.
//! With `[databases.pool]` the client's message starts are followed too, so that a client
//! leaving while the server is idle leaves a connection that can be kept (see [`crate::pool`]).
//!
//! Buffers start small ([`BUFFER_MIN`]): an idle session costs a few KiB (1,000 idle sessions
//! are meant to fit in 24 MiB with the rest of the process). A read that fills its
//! buffer doubles it, up to [`BUFFER_MAX`], so COPY and large results move in large reads and
//! writes; a short read shrinks it back.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::streaming::Stream;
use super::{shutting_down, ClientIo, SessionContext};
use crate::credentials::{HardEnd, Retirement};
use crate::pg::frame::Boundaries;
use crate::pool::client::{ClientMessages, Seen};
use crate::shutdown::Shutdown;
use crate::upstream::UpstreamStream;

/// A relay buffer's size while messages are small (most sessions, most of the time).
const BUFFER_MIN: usize = 1024;
/// The most a relay buffer grows to while bytes stream (COPY, large results).
const BUFFER_MAX: usize = 256 * 1024;

/// Once shutdown ends a session, how long the relay may take to finish passing on the server
/// message in flight (so the 57P01 can follow it) and to deliver the 57P01 itself.
const SHUTDOWN_MESSAGE_WAIT: Duration = Duration::from_secs(1);

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
    /// The credential's hard end is near and the session was between transactions.
    Retired(HardEnd),
    /// The host no longer meets target_session_attrs and the session was between transactions.
    RoleChanged(super::recheck::Reason),
    /// The client left while the server was idle with every request answered: the server
    /// connection can be kept.
    Reusable,
}

/// How the server-to-client copy stopped without an error.
enum Down {
    Eof,
    Retire(HardEnd),
    RoleChanged(super::recheck::Reason),
}

/// A copy failed on this side.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// What ends a session between transactions besides its two sides: the credential's hard end
/// drawing near, and a recheck finding that the host no longer meets target_session_attrs.
pub(super) struct Endings {
    pub(super) retirement: Retirement,
    pub(super) recheck: Option<oneshot::Receiver<super::recheck::Reason>>,
}

/// Relays until either side ends. With `pooled`, returns the server connection when the client
/// left at a point where it can be kept.
pub(super) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SessionContext,
    client: ClientIo<S>,
    upstream: UpstreamStream,
    pending: BytesMut,
    boundaries: Boundaries,
    endings: Endings,
    pooled: bool,
) -> Option<UpstreamStream> {
    let Endings {
        retirement,
        mut recheck,
    } = endings;
    let name = ctx.entry.name.as_str();
    let active = ctx.metrics.client_connections_active.with_label_values(&[name]);
    active.inc();
    let started = Instant::now();
    // Counted into the metric as the bytes move, so long-lived sessions show up in
    // dbward_relayed_bytes_total before they end.
    let to_upstream = ByteCount::new(ctx.metrics.bytes_total.with_label_values(&[name, "to_upstream"]));
    let to_client = ByteCount::new(ctx.metrics.bytes_total.with_label_values(&[name, "to_client"]));
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let progress = Progress {
        ready_base: boundaries.ready_count(),
        ready: AtomicU64::new(boundaries.ready_count()),
        idle: AtomicBool::new(boundaries.idle_between_transactions()),
    };
    let mut down = DownState {
        buf: vec![0; BUFFER_MIN],
        start: 0,
        end: 0,
        boundaries,
        progress: &progress,
        stream: Stream::new(ctx.streaming.clone()),
    };
    let mut keep = pooled.then(ClientMessages::default);
    let (mut terminating, retiring) = watch_endings(&ctx.shutdown, retirement);
    let mut retiring = Some(retiring);

    let end = {
        let upward = async {
            if pump(
                &mut client_rd,
                &mut up_wr,
                &to_upstream,
                &pending,
                keep.as_mut(),
                &progress,
            )
            .await?
            {
                return Ok(true);
            }
            // Pass the client's half-close on: the server ends the session when it reads the
            // EOF, after finishing what it is doing, and everything it sends until then still
            // reaches the client.
            up_wr.shutdown().await.map_err(PumpError::Write).map(|()| false)
        };
        let downward = pump_down(
            &mut up_rd,
            &mut client_wr,
            &mut down,
            &to_client,
            &mut retiring,
            &mut recheck,
        );
        tokio::pin!(upward, downward);
        let mut client_done = false;
        loop {
            tokio::select! {
                // In order: the branches are futures that run for the whole session, so the order
                // matters only at its end, and an unbiased select would draw a random number on
                // every wake-up, that is for every transaction.
                biased;
                // The server side ending ends the session, whatever the client does: a client
                // that never reads or closes must not hold the upstream connection and its
                // credential.
                r = &mut downward => break match r {
                    Ok(Down::Retire(end)) => End::Retired(end),
                    Ok(Down::RoleChanged(why)) => End::RoleChanged(why),
                    Ok(Down::Eof) if client_done => End::ClientClosed,
                    Ok(Down::Eof) => End::ServerClosed,
                    Err(PumpError::Read(e)) => End::ServerFailed(e),
                    Err(PumpError::Write(e)) => End::ClientFailed(e),
                },
                r = &mut upward, if !client_done => match r {
                    Ok(true) => break End::Reusable,
                    Ok(false) => client_done = true,
                    Err(PumpError::Read(e)) => break End::ClientFailed(e),
                    Err(PumpError::Write(e)) => break End::ServerFailed(e),
                },
                Ok(()) = &mut terminating => break End::Shutdown,
            }
        }
    };

    let how = ctx.span.in_scope(|| end.describe());
    if let End::Shutdown = end {
        end_at_shutdown(&mut up_rd, &mut up_wr, &mut client_wr, &mut down, &to_client).await;
    } else if let End::Retired(hard) = end {
        end_at_retirement(ctx, hard, &mut up_wr, &mut client_wr).await;
    } else if let End::RoleChanged(why) = &end {
        let msg = crate::pg::error::PgError::fatal(crate::pg::error::sqlstate::ADMIN_SHUTDOWN, why.clone());
        end_between_transactions(&msg, &mut up_wr, &mut client_wr).await;
    } else if let End::Reusable = end {
        let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, client_wr.shutdown()).await;
    } else {
        let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, client_wr.shutdown()).await;
    }
    active.dec();
    let (up, down) = (to_upstream.get(), to_client.get());
    tracing::info!(
        parent: &ctx.span,
        duration = ?started.elapsed(),
        bytes_to_upstream = up,
        bytes_to_client = down,
        end = how,
        "session ended"
    );
    match end {
        End::Reusable => Some(up_rd.unsplit(up_wr)),
        _ => None,
    }
}

/// Ends a session that is between transactions with `msg`, each step bounded in time.
async fn end_between_transactions<UW, CW>(msg: &crate::pg::error::PgError, up_wr: &mut UW, client_wr: &mut CW)
where
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, async {
        let _ = client_wr.write_all(&msg.to_bytes()).await;
        let _ = client_wr.shutdown().await;
    })
    .await;
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, up_wr.shutdown()).await;
}

/// Resolves with what a helper task sent (the recheck's reason, the retirement's hard end);
/// pending forever when there is no helper or it ended without sending.
async fn signalled<T>(rx: &mut Option<oneshot::Receiver<T>>) -> T {
    if let Some(r) = rx.as_mut() {
        if let Ok(v) = r.await {
            return v;
        }
    }
    *rx = None;
    std::future::pending().await
}

/// Ends a session at a transaction boundary shortly before its credential's hard end: the
/// client is told why (57P01) and when, then both sides are closed, each step bounded in time.
async fn end_at_retirement<UW, CW>(ctx: &SessionContext, hard: HardEnd, up_wr: &mut UW, client_wr: &mut CW)
where
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    ctx.metrics
        .sessions_retired_total
        .with_label_values(&[ctx.entry.name.as_str(), hard.by.label()])
        .inc();
    let when = std::time::SystemTime::now() + hard.at.saturating_duration_since(tokio::time::Instant::now());
    let when = humantime::format_rfc3339_seconds(when);
    tracing::info!(parent: &ctx.span, hard_end = %when, by = hard.by.text(), "retiring the session between transactions before its credential's hard end");
    let msg = crate::pg::error::PgError::fatal(
        crate::pg::error::sqlstate::ADMIN_SHUTDOWN,
        format!(
            "dbward: this session's database credential reaches its end at {when} ({}); reconnect for a new one",
            hard.by.text()
        ),
    );
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, async {
        let _ = client_wr.write_all(&msg.to_bytes()).await;
        let _ = client_wr.shutdown().await;
    })
    .await;
    // Between transactions: the server has nothing open to roll back.
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, up_wr.shutdown()).await;
}

impl End {
    /// The end-of-session log line's `end` field; failures are logged at debug with the error.
    fn describe(&self) -> &'static str {
        match self {
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
            End::Retired(_) => "retired before the credential's hard end",
            End::RoleChanged(_) => "ended: the upstream host no longer meets target_session_attrs",
            End::Reusable => "client closed, server connection kept",
        }
    }
}

/// Ends a session at shutdown: the server message in flight reaches the client whole, then
/// dbward's 57P01, then both sides are closed; each step bounded in time.
async fn end_at_shutdown<UR, UW, CW>(
    up_rd: &mut UR,
    up_wr: &mut UW,
    client_wr: &mut CW,
    down: &mut DownState<'_>,
    to_client: &ByteCount,
) where
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    let finished = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, finish_message(up_rd, client_wr, down, to_client)).await;
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, async {
        // Only between two server messages: inside one, it would garble the stream.
        if finished == Ok(true) {
            let _ = client_wr.write_all(&shutting_down().to_bytes()).await;
        }
        let _ = client_wr.shutdown().await;
    })
    .await;
    // No Terminate upstream: the client may have been in the middle of a message of its own.
    // The server sees the EOF and ends the backend, rolling back what was open.
    let _ = tokio::time::timeout(SHUTDOWN_MESSAGE_WAIT, up_wr.shutdown()).await;
}

/// Two signals for the relay: shutdown ending sessions (the first receiver resolves with `Ok`)
/// and the credential's retirement coming due (the second, with the hard end). Both waits
/// take a lock whenever they are polled (the shared shutdown signal, the credential's watch
/// channel), and a relay polls them on every wake-up, that is for every transaction; so one
/// helper task per session waits on them and passes them on through channels of the session's
/// own, which poll without locks. The helper ends with the session.
fn watch_endings(
    shutdown: &Shutdown,
    mut retirement: Retirement,
) -> (oneshot::Receiver<()>, oneshot::Receiver<HardEnd>) {
    let (mut term_tx, term_rx) = oneshot::channel();
    let (retire_tx, retire_rx) = oneshot::channel();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let due = retirement.wait();
        tokio::pin!(due);
        let mut retire_tx = Some(retire_tx);
        loop {
            tokio::select! {
                _ = shutdown.terminating() => {
                    let _ = term_tx.send(());
                    return;
                }
                _ = term_tx.closed() => return,
                end = &mut due, if retire_tx.is_some() => {
                    if let Some(tx) = retire_tx.take() {
                        let _ = tx.send(end);
                    }
                }
            }
        }
    });
    (term_rx, retire_rx)
}

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

/// What the server-to-client copy last left the client with, for the client-to-server copy
/// to judge (with the pool) whether the server is idle with every request answered.
struct Progress {
    /// ReadyForQuery messages before the relay started (the greeting's).
    ready_base: u64,
    /// ReadyForQuery messages that have reached the client.
    ready: AtomicU64,
    /// Everything read from the server reached the client, and it ended with an idle
    /// ReadyForQuery.
    idle: AtomicBool,
}

impl Progress {
    /// The server owes the client nothing and is between transactions, given what the client
    /// sent (`msgs`).
    fn settled_with(&self, msgs: &ClientMessages) -> bool {
        msgs.settled()
            && self.idle.load(Ordering::Acquire)
            && self.ready.load(Ordering::Acquire) - self.ready_base == msgs.syncs()
    }
}

/// The next buffer size after a read of `n` bytes into `len`: double when it was filled, back
/// to the minimum after a short read.
fn next_size(len: usize, n: usize) -> usize {
    if n == len && len < BUFFER_MAX {
        len * 2
    } else if n < BUFFER_MIN && len > BUFFER_MIN {
        BUFFER_MIN
    } else {
        len
    }
}

/// Copies client bytes upstream (first `pending`, which came with the startup packet) until the
/// client's EOF. With `keep` (the pool), a Terminate or EOF at a point where the server
/// connection can be kept ends the copy with `true`, the Terminate not passed on.
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    count: &ByteCount,
    pending: &[u8],
    mut keep: Option<&mut ClientMessages>,
    progress: &Progress,
) -> Result<bool, PumpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !pending.is_empty() && forward(w, pending, &mut keep, progress, count).await? {
        return Ok(true);
    }
    let mut buf = vec![0u8; BUFFER_MIN];
    let mut last = 0;
    loop {
        last = read_next(r, &mut buf, last).await?;
        if last == 0 {
            return Ok(keep.is_some_and(|m| progress.settled_with(m)));
        }
        if forward(w, &buf[..last], &mut keep, progress, count).await? {
            return Ok(true);
        }
    }
}

/// Passes `data` upstream, or returns `true` without passing it when it is the client's lone
/// Terminate at a point where the server connection can be kept. Once a Terminate is passed
/// on, `keep` is dropped: the session ends as without the pool.
async fn forward<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    keep: &mut Option<&mut ClientMessages>,
    progress: &Progress,
    count: &ByteCount,
) -> Result<bool, PumpError> {
    if let Some(msgs) = keep.as_deref_mut() {
        if let Seen::Terminate(at) = msgs.advance(data) {
            if at == 0 && data.len() == 5 && progress.settled_with(msgs) {
                return Ok(true);
            }
            *keep = None;
        }
    }
    w.write_all(data).await.map_err(PumpError::Write)?;
    w.flush().await.map_err(PumpError::Write)?;
    count.add(data.len() as u64);
    Ok(false)
}

/// Resizes `buf` after a read of `last` bytes, then reads into it.
async fn read_next<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, last: usize) -> Result<usize, PumpError> {
    let size = next_size(buf.len(), last);
    if size != buf.len() {
        buf.resize(size, 0);
        buf.shrink_to_fit();
    }
    r.read(buf).await.map_err(PumpError::Read)
}

/// The server-to-client copy's state. It lives outside the copying future so that the future
/// can be dropped at any await (at shutdown) and what the client has received is still known.
struct DownState<'p> {
    buf: Vec<u8>,
    /// `buf[start..end]` came from the server and has not reached the client yet.
    start: usize,
    end: usize,
    boundaries: Boundaries,
    progress: &'p Progress,
    stream: Stream,
}

/// Copies server bytes to the client until the server's EOF, or until the session is between
/// transactions once its credential's hard end is near. Each await is a single read or write,
/// after which `st` is up to date.
async fn pump_down<R, W>(
    r: &mut R,
    w: &mut W,
    st: &mut DownState<'_>,
    count: &ByteCount,
    retire: &mut Option<oneshot::Receiver<HardEnd>>,
    recheck: &mut Option<oneshot::Receiver<super::recheck::Reason>>,
) -> Result<Down, PumpError>
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
        let idle = st.boundaries.idle_between_transactions();
        st.progress.ready.store(st.boundaries.ready_count(), Ordering::Release);
        st.progress.idle.store(idle, Ordering::Release);
        let size = next_size(st.buf.len(), st.end);
        if size != st.buf.len() {
            st.buf.resize(size, 0);
            st.buf.shrink_to_fit();
        }
        st.stream.update(size, BUFFER_MAX, BUFFER_MIN, idle);
        // Reads are cancel-safe: a retirement that comes due while the session is idle ends the
        // wait without losing server bytes. Biased: one already due wins over waiting bytes.
        let n = tokio::select! {
            biased;
            end = signalled(retire), if idle => return Ok(Down::Retire(end)),
            why = signalled(recheck), if idle => return Ok(Down::RoleChanged(why)),
            n = r.read(&mut st.buf) => n.map_err(PumpError::Read)?,
        };
        if n == 0 {
            return Ok(Down::Eof);
        }
        st.progress.idle.store(false, Ordering::Release);
        st.start = 0;
        st.end = n;
    }
}

/// At shutdown: passes on the rest of the server message the client is in the middle of, and
/// nothing after it, so that dbward's 57P01 can follow. False if that could not be done.
async fn finish_message<R, W>(r: &mut R, w: &mut W, st: &mut DownState<'_>, count: &ByteCount) -> bool
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_when_filled_and_shrink_after_a_short_read() {
        let mut len = BUFFER_MIN;
        let mut steps = 0;
        while len < BUFFER_MAX {
            len = next_size(len, len);
            steps += 1;
        }
        assert_eq!(len, BUFFER_MAX);
        assert_eq!(steps, 8, "1 KiB to 256 KiB in eight full reads");
        assert_eq!(
            next_size(BUFFER_MAX, BUFFER_MAX),
            BUFFER_MAX,
            "never beyond the maximum"
        );
        assert_eq!(
            next_size(BUFFER_MAX, BUFFER_MAX / 2),
            BUFFER_MAX,
            "a large read keeps it"
        );
        assert_eq!(next_size(BUFFER_MAX, 100), BUFFER_MIN, "a short read shrinks it");
        assert_eq!(next_size(BUFFER_MIN, 100), BUFFER_MIN);
    }
}
