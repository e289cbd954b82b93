//! Everything a client sends before its StartupMessage or CancelRequest: SSLRequest (TLS when
//! the entry has `client_tls`, else 'N'), direct TLS (Postgres 17 clients with
//! `sslnegotiation=direct`), GSSENCRequest ('N'). The decisions are a pure function, [`step`],
//! from the negotiation's [`State`] and the packet that arrived to what to do next; the async
//! driver [`negotiate`] only reads, writes and runs the TLS handshake.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::either::Either;

use super::{send_error, shutting_down, ClientIo, SessionContext};
use crate::pg::cancel::BackendKey;
use crate::pg::error::{sqlstate, PgError};
use crate::pg::startup::{self, ReadError, StartupError, StartupMessage, StartupPacket};
use crate::pg::tls::{Rewind, ALPN_POSTGRESQL, TLS_HANDSHAKE_BYTE};

/// What the client came for, once negotiation is over.
pub(crate) enum Opening {
    Startup(StartupMessage),
    Cancel(BackendKey),
}

/// Where negotiation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Nothing received yet: a TLS ClientHello may come instead of a packet (direct TLS).
    Start,
    /// In plaintext after at least one packet; which encryption requests were answered 'N'.
    Plain { ssl_refused: bool, gss_refused: bool },
    /// Inside TLS: only a StartupMessage or a CancelRequest may follow.
    Encrypted,
}

/// What the next bytes from a client are.
#[derive(Debug)]
pub(crate) enum Incoming {
    Packet(StartupPacket),
    /// A TLS ClientHello where the first packet should be.
    DirectTls,
}

/// What to do with what arrived.
#[derive(Debug)]
pub(crate) enum Step {
    /// Answer with this byte and read on in the new state.
    Answer(u8, State),
    /// Start TLS: after answering 'S' to an SSLRequest, or at once for direct TLS.
    StartTls {
        direct: bool,
    },
    /// End the session: tell the client why (FATAL) or, where Postgres closes without a word,
    /// close.
    End(StartupError),
    /// Answer with this byte, then end: Postgres answers an encryption request before it
    /// notices the unencrypted bytes that came with it.
    AnswerThenEnd(u8, StartupError),
    /// Close without a word: the client speaks TLS and could not read a Postgres error.
    Close(&'static str),
    Done(Opening),
}

impl std::fmt::Debug for Opening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opening::Startup(m) => f.debug_tuple("Startup").field(m).finish(),
            Opening::Cancel(k) => f.debug_tuple("Cancel").field(k).finish(),
        }
    }
}

/// Decides the next step. `tls_offered`: the entry has `client_tls`. `buffered`: bytes arrived
/// after the packet in the same read.
pub(crate) fn step(state: State, incoming: Incoming, tls_offered: bool, buffered: bool) -> Step {
    let (ssl_refused, gss_refused) = match state {
        State::Start => (false, false),
        State::Plain {
            ssl_refused,
            gss_refused,
        } => (ssl_refused, gss_refused),
        State::Encrypted => (true, true),
    };
    let packet = match incoming {
        Incoming::DirectTls if state == State::Start && tls_offered => return Step::StartTls { direct: true },
        // Only looked for before the first packet; later a 0x16 is a length byte.
        Incoming::DirectTls => {
            return Step::Close("client started TLS directly (sslnegotiation=direct) but client_tls is not configured")
        }
        Incoming::Packet(p) => p,
    };
    match packet {
        // Postgres reads a second request's code as a protocol version (1234.5679) once the
        // first was answered, and refuses that version.
        StartupPacket::SslRequest if ssl_refused => Step::End(startup::unsupported_version(startup::SSL_REQUEST_CODE)),
        // CVE-2021-3935: what follows the request in the same read arrived unencrypted and,
        // once TLS is on, would pass for something sent under it. Refused before 'S' (dbward
        // does not start a handshake it will abandon); after 'N' as Postgres does.
        StartupPacket::SslRequest if buffered && tls_offered => Step::End(unencrypted("SSL request")),
        StartupPacket::SslRequest if buffered => Step::AnswerThenEnd(b'N', unencrypted("SSL request")),
        StartupPacket::SslRequest if tls_offered => Step::StartTls { direct: false },
        StartupPacket::SslRequest => Step::Answer(
            b'N',
            State::Plain {
                ssl_refused: true,
                gss_refused,
            },
        ),
        StartupPacket::GssEncRequest if gss_refused => {
            Step::End(startup::unsupported_version(startup::GSSENC_REQUEST_CODE))
        }
        StartupPacket::GssEncRequest if buffered => Step::AnswerThenEnd(b'N', unencrypted("GSSAPI encryption request")),
        // GSSAPI encryption is not offered: 'N' lets the client go on (libpq then tries TLS or
        // plaintext, as its settings say).
        StartupPacket::GssEncRequest => Step::Answer(
            b'N',
            State::Plain {
                ssl_refused,
                gss_refused: true,
            },
        ),
        StartupPacket::Cancel { pid, secret } => Step::Done(Opening::Cancel(BackendKey { pid, secret })),
        StartupPacket::Startup(m) => Step::Done(Opening::Startup(m)),
    }
}

/// Postgres's FATAL for bytes that came in plaintext with an encryption request.
fn unencrypted(request: &str) -> StartupError {
    StartupError::Refuse {
        reason: "unencrypted_data",
        error: Box::new(
            violation(&format!("received unencrypted data after {request}")).with_detail(
                "This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.",
            ),
        ),
    }
}

fn violation(message: &str) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message.to_string())
}

/// Runs negotiation under one deadline (`startup_timeout`). Returns the (maybe encrypted)
/// stream, what the client asked for and any bytes it sent after its StartupMessage (pipelined
/// messages, passed on upstream). `None` when the session is over; the client has been told why
/// when it could be.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SessionContext,
    client: S,
) -> Option<(ClientIo<S>, Opening, BytesMut)> {
    let deadline = tokio::time::Instant::now() + ctx.startup_timeout;
    let tls = ctx.entry.client_tls.as_ref();
    let mut buf = BytesMut::with_capacity(1024);
    let mut plain = client;
    let mut state = State::Start;
    let direct = loop {
        let incoming = next(ctx, &mut plain, &mut buf, state, deadline).await?;
        match step(state, incoming, tls.is_some(), !buf.is_empty()) {
            Step::Answer(byte, next) => {
                answer(&mut plain, byte).await.ok()?;
                state = next;
            }
            Step::StartTls { direct } => {
                if !direct {
                    answer(&mut plain, b'S').await.ok()?;
                }
                break direct;
            }
            Step::End(e) => return end(ctx, &mut plain, e).await,
            Step::AnswerThenEnd(byte, e) => {
                answer(&mut plain, byte).await.ok()?;
                return end(ctx, &mut plain, e).await;
            }
            Step::Close(why) => {
                tracing::info!("{why}; closing");
                return None;
            }
            Step::Done(opening) => return Some((Either::Left(plain), opening, buf)),
        }
    };
    let acceptor = tls?.acceptor();
    // Direct TLS: the ClientHello is already in `buf`; after an SSLRequest `buf` is empty.
    let mut io = accept_tls(ctx, acceptor, Rewind::new(buf.split(), plain), direct, deadline).await?;
    let incoming = next(ctx, &mut io, &mut buf, State::Encrypted, deadline).await?;
    match step(State::Encrypted, incoming, true, !buf.is_empty()) {
        Step::Done(opening) => Some((io, opening, buf)),
        Step::End(e) => end(ctx, &mut io, e).await,
        // Once encrypted, `step` neither answers nor starts TLS again (see the table test).
        Step::Answer(..) | Step::AnswerThenEnd(..) | Step::StartTls { .. } | Step::Close(_) => None,
    }
}

async fn answer<W: AsyncWrite + Unpin>(w: &mut W, byte: u8) -> io::Result<()> {
    w.write_all(&[byte]).await?;
    w.flush().await
}

async fn refuse<W: AsyncWrite + Unpin, T>(w: &mut W, e: &PgError) -> Option<T> {
    send_error(w, e).await;
    None
}

/// Ends the session for what the client sent: counted by reason, logged (with the peer, from
/// the session span), and told to the client only where Postgres would tell it.
async fn end<W: AsyncWrite + Unpin, T>(ctx: &SessionContext, w: &mut W, e: StartupError) -> Option<T> {
    ctx.metrics
        .client_startup_errors_total
        .with_label_values(&[&ctx.entry.name, e.reason()])
        .inc();
    match e {
        StartupError::Silent { reason, detail } => {
            tracing::info!(reason, "{detail}; closing without an answer, as Postgres does");
            None
        }
        StartupError::Refuse { error, .. } => refuse(w, &error).await,
    }
}

/// Reads the next startup-phase packet into `buf`, keeping whatever follows it there. `None`
/// when the session is over (the client closed, stalled past the deadline, sent garbage or
/// dbward is terminating); the client has been told why when it could be.
async fn next<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SessionContext,
    io: &mut S,
    buf: &mut BytesMut,
    state: State,
    deadline: tokio::time::Instant,
) -> Option<Incoming> {
    let direct_tls = state == State::Start && ctx.entry.client_tls.is_some();
    let read = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_packet(io, buf, direct_tls)) => r,
        _ = ctx.shutdown.terminating() => return refuse(io, &shutting_down()).await,
    };
    match read {
        // Postgres ends a stalled startup (authentication_timeout) without a word.
        Err(_) => {
            let detail = format!(
                "no startup packet within startup_timeout ({}; {} bytes of one received)",
                humantime::format_duration(ctx.startup_timeout),
                buf.len()
            );
            end(
                ctx,
                io,
                StartupError::Silent {
                    reason: "timeout",
                    detail,
                },
            )
            .await
        }
        Ok(Err(ReadError::Closed)) => None,
        Ok(Err(ReadError::Io(e))) => {
            tracing::debug!(error = %e, "client went away during startup");
            None
        }
        Ok(Err(ReadError::Startup(e))) => end(ctx, io, e).await,
        Ok(Ok(incoming)) => Some(incoming),
    }
}

/// The next packet off `buf`, reading as needed. `direct_tls`: a TLS record where the first
/// packet should be starts TLS (only with `client_tls`; otherwise those bytes are a length, as
/// Postgres 15 reads them).
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    direct_tls: bool,
) -> Result<Incoming, ReadError> {
    loop {
        if direct_tls && buf.first() == Some(&TLS_HANDSHAKE_BYTE) {
            return Ok(Incoming::DirectTls);
        }
        if let Some(p) = startup::take_packet(buf).map_err(ReadError::Startup)? {
            return Ok(Incoming::Packet(p));
        }
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Startup(StartupError::Silent {
                    reason: "incomplete",
                    detail: format!("incomplete startup packet: the client closed after {} bytes", buf.len()),
                }))
            }
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// The TLS handshake with a client. Failures are logged and end the session: mid-handshake there
/// is no way to send the client a Postgres error it could read.
async fn accept_tls<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SessionContext,
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
        let e = violation("received direct SSL connection request without ALPN protocol negotiation extension");
        return end(
            ctx,
            &mut io,
            StartupError::Refuse {
                reason: "no_alpn",
                error: Box::new(e),
            },
        )
        .await;
    }
    tracing::debug!(direct, alpn, "client TLS established");
    Some(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: State = State::Plain {
        ssl_refused: false,
        gss_refused: false,
    };

    fn ssl() -> Incoming {
        Incoming::Packet(StartupPacket::SslRequest)
    }
    fn gss() -> Incoming {
        Incoming::Packet(StartupPacket::GssEncRequest)
    }
    fn startup() -> Incoming {
        let mut body = 196608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0\0");
        Incoming::Packet(startup::parse(&body).expect("valid startup"))
    }
    fn cancel() -> Incoming {
        Incoming::Packet(StartupPacket::Cancel {
            pid: 7,
            secret: vec![1, 2, 3, 4],
        })
    }

    /// A compact rendering of a step, for table comparison.
    fn show(s: Step) -> String {
        match s {
            Step::Answer(b, st) => format!("answer {} -> {st:?}", b as char),
            Step::StartTls { direct } => format!("tls direct={direct}"),
            Step::End(e) => end_text(e),
            Step::AnswerThenEnd(b, e) => format!("answer {} then {}", b as char, end_text(e)),
            Step::Close(_) => "close".into(),
            Step::Done(Opening::Startup(m)) => format!("startup user={}", m.get("user").unwrap_or("")),
            Step::Done(Opening::Cancel(k)) => format!("cancel pid={}", k.pid),
        }
    }

    fn end_text(e: StartupError) -> String {
        match e {
            StartupError::Refuse { error, .. } => format!("refuse {}: {}", error.code, error.message),
            StartupError::Silent { reason, .. } => format!("silent {reason}"),
        }
    }

    #[test]
    fn every_state_and_packet_gets_the_step_postgres_would_take() {
        let ssl_no = State::Plain {
            ssl_refused: true,
            gss_refused: false,
        };
        let gss_no = State::Plain {
            ssl_refused: false,
            gss_refused: true,
        };
        #[rustfmt::skip]
        let table: Vec<(State, Incoming, bool, bool, &str)> = vec![
            // state, incoming, tls offered, bytes buffered after it, step
            (State::Start, ssl(), false, false, "answer N -> Plain { ssl_refused: true, gss_refused: false }"),
            (State::Start, ssl(), true, false, "tls direct=false"),
            (State::Start, ssl(), true, true, "refuse 08P01: received unencrypted data after SSL request"),
            (State::Start, ssl(), false, true, "answer N then refuse 08P01: received unencrypted data after SSL request"),
            (ssl_no, ssl(), false, false, "refuse 0A000: unsupported frontend protocol 1234.5679: server supports 3.0 to 3.2"),
            (State::Start, gss(), true, false, "answer N -> Plain { ssl_refused: false, gss_refused: true }"),
            (gss_no, gss(), false, false, "refuse 0A000: unsupported frontend protocol 1234.5680: server supports 3.0 to 3.2"),
            (State::Start, gss(), false, true, "answer N then refuse 08P01: received unencrypted data after GSSAPI encryption request"),
            // libpq asks for GSS first, then TLS.
            (gss_no, ssl(), true, false, "tls direct=false"),
            (gss_no, ssl(), false, false, "answer N -> Plain { ssl_refused: true, gss_refused: true }"),
            (ssl_no, gss(), false, false, "answer N -> Plain { ssl_refused: true, gss_refused: true }"),
            (State::Start, Incoming::DirectTls, true, true, "tls direct=true"),
            (State::Start, Incoming::DirectTls, false, true, "close"),
            (PLAIN, Incoming::DirectTls, true, true, "close"),
            (State::Start, startup(), false, false, "startup user=app"),
            (ssl_no, startup(), false, true, "startup user=app"),
            (State::Start, cancel(), false, false, "cancel pid=7"),
            (State::Encrypted, ssl(), true, false, "refuse 0A000: unsupported frontend protocol 1234.5679: server supports 3.0 to 3.2"),
            (State::Encrypted, gss(), true, false, "refuse 0A000: unsupported frontend protocol 1234.5680: server supports 3.0 to 3.2"),
            (State::Encrypted, startup(), true, false, "startup user=app"),
            (State::Encrypted, cancel(), true, false, "cancel pid=7"),
        ];
        for (state, incoming, tls, buffered, want) in table {
            let what = format!("{state:?} + {incoming:?} (tls={tls}, buffered={buffered})");
            assert_eq!(show(step(state, incoming, tls, buffered)), want, "{what}");
        }
    }

    #[test]
    fn once_encrypted_nothing_answers_or_starts_tls_again() {
        for incoming in [ssl(), gss(), startup(), cancel(), Incoming::DirectTls] {
            for buffered in [false, true] {
                let s = step(State::Encrypted, incoming_clone(&incoming), true, buffered);
                assert!(
                    matches!(s, Step::End(_) | Step::Done(_) | Step::Close(_)),
                    "{incoming:?}: {s:?}"
                );
            }
        }
    }

    fn incoming_clone(i: &Incoming) -> Incoming {
        match i {
            Incoming::Packet(p) => Incoming::Packet(p.clone()),
            Incoming::DirectTls => Incoming::DirectTls,
        }
    }
}
