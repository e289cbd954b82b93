//! The startup conversation after the StartupMessage: authentication (cleartext, MD5, SCRAM with
//! optional channel binding) and the greeting up to the first ReadyForQuery. Decides which
//! password methods are safe to answer over the connection at hand.

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::auth_policy::{AuthPolicy, ChannelBindingMode, Progress, Request};
use super::scram::{ChannelBinding, ScramClient, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use super::{io_error, ServerError, UpstreamError};
use crate::pg::cancel::BackendKey;

/// Largest server message accepted before ReadyForQuery. Real ones are well under 1 KiB; the
/// cap keeps a broken or hostile server from making us buffer without bound.
const MAX_MESSAGE_LEN: usize = 1 << 20;

/// Most greeting bytes (notices, ParameterStatus, ReadyForQuery) kept for the client before
/// ReadyForQuery. A real server sends well under 4 KiB; without a cap, a hostile one could make
/// every connection buffer up to the connect timeout's worth of notices.
pub(super) const MAX_GREETING_LEN: usize = 256 * 1024;

/// Adds one message to the greeting, refusing the connection (08P01) once it grows past the cap.
fn keep(greeting: &mut BytesMut, raw: &[u8], addr: &str) -> Result<(), UpstreamError> {
    if greeting.len() + raw.len() > MAX_GREETING_LEN {
        return Err(UpstreamError::Protocol(format!(
            "upstream {addr} sent more than {} KiB of notices and parameters before ReadyForQuery; a PostgreSQL server sends a few hundred bytes",
            MAX_GREETING_LEN / 1024
        )));
    }
    greeting.extend_from_slice(raw);
    Ok(())
}

/// What the authentication needs to know about the connection.
pub(super) struct Context<'a> {
    pub addr: &'a str,
    pub database: &'a str,
    pub user: &'a str,
    pub password: &'a SecretString,
    /// The credential's SCRAM salted-password cache.
    pub keys: &'a std::sync::Arc<super::scram::KeyCache>,
    pub tls: bool,
    /// TLS with a verified certificate chain: only then may a password leave in a replayable form.
    pub tls_verified: bool,
    pub allow_insecure_password: bool,
    /// tls-server-end-point data of the server certificate, when it can be computed.
    pub certificate_hash: Option<Vec<u8>>,
    /// The entry's require_auth and channel_binding.
    pub policy: &'a AuthPolicy,
}

pub(super) struct Outcome {
    pub key: Option<BackendKey>,
    pub greeting: BytesMut,
}

/// Runs authentication and collects the greeting.
pub(super) async fn startup<S>(
    stream: &mut S,
    ctx: &Context<'_>,
    during: &mut &'static str,
) -> Result<Outcome, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let mut greeting = BytesMut::new();
    *during = "authenticating";
    authenticate(stream, ctx, &mut buf, &mut greeting, during).await?;
    *during = "waiting for the server to become ready";
    let key = until_ready(stream, ctx.addr, &mut buf, &mut greeting, during).await?;
    greeting.extend_from_slice(&buf);
    Ok(Outcome { key, greeting })
}

/// What to do after an authentication request was handled.
enum Next {
    /// Send this reply (it may hold the password or an equivalent: wiped after sending).
    Reply(BytesMut),
    /// Nothing to send; read the next request.
    Read,
    Authenticated,
}

/// Answers authentication requests until AuthenticationOk. Notices are kept for the client.
async fn authenticate<S>(
    stream: &mut S,
    ctx: &Context<'_>,
    buf: &mut BytesMut,
    greeting: &mut BytesMut,
    during: &'static str,
) -> Result<(), UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let addr = ctx.addr;
    let mut scram: Option<ScramClient> = None;
    let mut progress = Progress::default();
    loop {
        let raw = next_message(stream, buf, addr, during).await?;
        match raw[0] {
            b'R' => {}
            b'E' => return Err(server_error(raw, addr)),
            b'N' => {
                keep(greeting, &raw, addr)?;
                continue;
            }
            // NegotiateProtocolVersion answers our StartupMessage, not the client's: not forwarded.
            b'v' => continue,
            tag => return Err(unexpected(tag, addr, during)),
        }
        match answer(ctx, raw, &mut scram, &mut progress, during).await? {
            Next::Authenticated => return Ok(()),
            Next::Read => {}
            Next::Reply(mut reply) => {
                let written = stream.write_all(&reply).await;
                zeroize::Zeroize::zeroize(&mut reply[..]);
                written.map_err(|e| io_error(addr, during, e))?;
                stream.flush().await.map_err(|e| io_error(addr, during, e))?;
            }
        }
    }
}

/// Handles one authentication request ('R'), deciding whether the password may be sent in the
/// form asked for over this connection.
async fn answer(
    ctx: &Context<'_>,
    raw: BytesMut,
    scram: &mut Option<ScramClient>,
    progress: &mut Progress,
    during: &'static str,
) -> Result<Next, UpstreamError> {
    let addr = ctx.addr;
    if raw.len() < 9 {
        return Err(UpstreamError::Protocol(format!(
            "upstream {addr} sent a truncated authentication request"
        )));
    }
    let code = i32::from_be_bytes(raw[5..9].try_into().expect("4 bytes"));
    if !(0..=12).contains(&code) || code == 1 || code == 4 {
        return Err(UpstreamError::Auth(format!(
            "upstream {addr} asked for authentication method {code}, which dbward does not know"
        )));
    }
    let request = match code {
        0 => Request::Ok,
        3 => Request::Password,
        5 => Request::Md5,
        7 | 8 => Request::Gss,
        9 => Request::Sspi,
        10..=12 => Request::Sasl,
        _ => Request::Other,
    };
    ctx.policy
        .check(request, *progress)
        .map_err(|reason| UpstreamError::Auth(format!("upstream {addr}: {reason}")))?;
    let mut reply = BytesMut::new();
    match parse(raw, addr)? {
        Message::AuthenticationOk => {
            if scram.as_ref().is_some_and(|s| !s.is_verified()) {
                return Err(UpstreamError::Auth(format!(
                    "upstream {addr} reported authentication success before proving it knows the password \
                     (SCRAM server signature not verified); refusing the connection"
                )));
            }
            return Ok(Next::Authenticated);
        }
        Message::AuthenticationCleartextPassword => {
            insecure_allowed(ctx, "a cleartext password")?;
            frontend::password_message(ctx.password.expose_secret().as_bytes(), &mut reply)
                .map_err(|e| encode_error(addr, e))?;
            progress.finished = true;
        }
        Message::AuthenticationMd5Password(body) => {
            insecure_allowed(ctx, "an MD5 password hash")?;
            let hash = Zeroizing::new(postgres_protocol::authentication::md5_hash(
                ctx.user.as_bytes(),
                ctx.password.expose_secret().as_bytes(),
                body.salt(),
            ));
            frontend::password_message(hash.as_bytes(), &mut reply).map_err(|e| encode_error(addr, e))?;
            progress.finished = true;
        }
        Message::AuthenticationSasl(body) => {
            if scram.is_some() {
                return Err(UpstreamError::Protocol(format!(
                    "upstream {addr} started SASL authentication twice"
                )));
            }
            let mechanisms: Vec<String> = body.mechanisms().map(|m| Ok(m.to_string())).collect().map_err(|e| {
                UpstreamError::Protocol(format!("upstream {addr} sent an invalid SASL mechanism list: {e}"))
            })?;
            let binding = choose_binding(ctx, &mechanisms)?;
            let client = ScramClient::with_keys(ctx.password.expose_secret().as_bytes(), binding, ctx.keys.clone());
            frontend::sasl_initial_response(client.mechanism(), &client.client_first(), &mut reply)
                .map_err(|e| encode_error(addr, e))?;
            *scram = Some(client);
        }
        Message::AuthenticationSaslContinue(body) => {
            let Some(client) = scram.take() else {
                return Err(UpstreamError::Protocol(format!(
                    "upstream {addr} sent SASLContinue without SASL"
                )));
            };
            let (client, client_final) = server_first(addr, client, body.data().to_vec()).await?;
            frontend::sasl_response(&client_final, &mut reply).map_err(|e| encode_error(addr, e))?;
            *scram = Some(client);
        }
        Message::AuthenticationSaslFinal(body) => {
            let Some(client) = scram.as_mut() else {
                return Err(UpstreamError::Protocol(format!(
                    "upstream {addr} sent SASLFinal without SASL"
                )));
            };
            client
                .handle_server_final(body.data())
                .map_err(|e| scram_failed(addr, e))?;
            progress.finished = true;
            progress.bound = client.mechanism() == SCRAM_SHA_256_PLUS;
            return Ok(Next::Read);
        }
        Message::AuthenticationKerberosV5 => return Err(unsupported_method(ctx, "Kerberos V5")),
        Message::AuthenticationScmCredential => return Err(unsupported_method(ctx, "SCM credential")),
        Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
            return Err(unsupported_method(ctx, "GSSAPI"))
        }
        Message::AuthenticationSspi => return Err(unsupported_method(ctx, "SSPI")),
        _ => return Err(unexpected(b'R', addr, during)),
    }
    Ok(Next::Reply(reply))
}

/// Answers the server-first message. PBKDF2 at the server's iteration count is CPU work: it
/// runs off the runtime threads.
async fn server_first(
    addr: &str,
    mut client: ScramClient,
    data: Vec<u8>,
) -> Result<(ScramClient, Vec<u8>), UpstreamError> {
    let (client, result) = tokio::task::spawn_blocking(move || {
        let result = client.handle_server_first(&data);
        (client, result)
    })
    .await
    .map_err(|e| UpstreamError::Protocol(format!("SCRAM computation for upstream {addr} failed: {e}")))?;
    Ok((client, result.map_err(|e| scram_failed(addr, e))?))
}

/// After AuthenticationOk: ParameterStatus, BackendKeyData and notices up to ReadyForQuery.
async fn until_ready<S: AsyncRead + Unpin>(
    stream: &mut S,
    addr: &str,
    buf: &mut BytesMut,
    greeting: &mut BytesMut,
    during: &'static str,
) -> Result<Option<BackendKey>, UpstreamError> {
    let mut key = None;
    loop {
        let raw = next_message(stream, buf, addr, during).await?;
        match raw[0] {
            b'S' | b'N' => {
                // Validates the message before the client gets it.
                parse(raw.clone(), addr)?;
                keep(greeting, &raw, addr)?;
            }
            b'K' => {
                // Parsed by hand: protocol 3.2 keys are longer than postgres-protocol expects.
                let body = &raw[5..];
                if body.len() < 8 || body.len() > 4 + 256 {
                    return Err(UpstreamError::Protocol(format!(
                        "upstream {addr} sent an invalid BackendKeyData"
                    )));
                }
                key = Some(BackendKey {
                    pid: i32::from_be_bytes(body[..4].try_into().expect("4 bytes")),
                    secret: body[4..].to_vec(),
                });
            }
            b'Z' => {
                parse(raw.clone(), addr)?;
                keep(greeting, &raw, addr)?;
                return Ok(key);
            }
            b'E' => return Err(server_error(raw, addr)),
            b'v' => {}
            tag => return Err(unexpected(tag, addr, during)),
        }
    }
}

/// The server answered SSLRequest with 'E' (servers too old for SSLRequest, or failing at fork):
/// reads the rest of that ErrorResponse.
pub(super) async fn error_after_ssl_request<S: AsyncRead + Unpin>(stream: &mut S, addr: &str) -> UpstreamError {
    let mut buf = BytesMut::from(&b"E"[..]);
    match next_message(stream, &mut buf, addr, "negotiating TLS").await {
        Ok(raw) => server_error(raw, addr),
        Err(e) => e,
    }
}

/// Reads one whole message (tag, length, body) into its own buffer.
async fn next_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    addr: &str,
    during: &str,
) -> Result<BytesMut, UpstreamError> {
    loop {
        if buf.len() >= 5 {
            let len = (&buf[1..5]).get_u32() as usize;
            if !(4..=MAX_MESSAGE_LEN).contains(&len) {
                return Err(UpstreamError::Protocol(format!(
                    "upstream {addr} sent a message of invalid length {len} while {during}; is it a PostgreSQL server?"
                )));
            }
            if buf.len() > len {
                return Ok(buf.split_to(len + 1));
            }
            buf.reserve(len + 1 - buf.len());
        }
        let n = stream.read_buf(buf).await.map_err(|e| io_error(addr, during, e))?;
        if n == 0 {
            return Err(io_error(addr, during, std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn parse(mut raw: BytesMut, addr: &str) -> Result<Message, UpstreamError> {
    match Message::parse(&mut raw) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(UpstreamError::Protocol(format!(
            "upstream {addr} sent a truncated message"
        ))),
        Err(e) => Err(UpstreamError::Protocol(format!(
            "upstream {addr} sent an invalid message: {e}"
        ))),
    }
}

fn server_error(raw: BytesMut, addr: &str) -> UpstreamError {
    let raw = raw.freeze();
    let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut BytesMut::from(&raw[..])) else {
        return UpstreamError::Protocol(format!("upstream {addr} sent an invalid ErrorResponse"));
    };
    let (mut severity, mut localized, mut code, mut message) = (None, None, None, None);
    let mut fields = body.fields();
    loop {
        match fields.next() {
            Ok(Some(f)) => {
                let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
                match f.type_() {
                    b'V' => severity = Some(value),
                    b'S' => localized = Some(value),
                    b'C' => code = Some(value),
                    b'M' => message = Some(value),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(_) => return UpstreamError::Protocol(format!("upstream {addr} sent an invalid ErrorResponse")),
        }
    }
    UpstreamError::Server(ServerError {
        severity: severity.or(localized).unwrap_or_else(|| "FATAL".into()),
        // XX000 (internal_error) is what libpq assumes when a server leaves the code out.
        code: code.unwrap_or_else(|| "XX000".into()),
        message: message.unwrap_or_default(),
        raw,
    })
}

/// Picks SCRAM-SHA-256-PLUS when it is offered over TLS and we can compute the binding,
/// otherwise SCRAM-SHA-256 with the GS2 flag Postgres expects.
fn choose_binding(ctx: &Context<'_>, mechanisms: &[String]) -> Result<ChannelBinding, UpstreamError> {
    let offered = |m: &str| mechanisms.iter().any(|x| x == m);
    match ctx.policy.channel_binding {
        ChannelBindingMode::Require => {
            let reason = if !ctx.tls {
                "the connection is not encrypted (sslmode allowed a connection without TLS)"
            } else if !offered(SCRAM_SHA_256_PLUS) {
                "the server did not offer SCRAM-SHA-256-PLUS"
            } else if let Some(hash) = &ctx.certificate_hash {
                return Ok(ChannelBinding::TlsServerEndPoint(hash.clone()));
            } else {
                "the server certificate's signature algorithm has no hash to bind to (Ed25519/Ed448)"
            };
            return Err(UpstreamError::Auth(format!(
                "upstream {}: channel binding required (channel_binding = \"require\" for database \"{}\"), but {reason}",
                ctx.addr, ctx.database
            )));
        }
        // libpq sends 'n' with channel_binding=disable, whatever the server offers.
        ChannelBindingMode::Disable if offered(SCRAM_SHA_256) => return Ok(ChannelBinding::Unsupported),
        ChannelBindingMode::Disable | ChannelBindingMode::Prefer => {}
    }
    if ctx.tls && ctx.policy.channel_binding == ChannelBindingMode::Prefer && offered(SCRAM_SHA_256_PLUS) {
        if let Some(hash) = &ctx.certificate_hash {
            return Ok(ChannelBinding::TlsServerEndPoint(hash.clone()));
        }
    }
    if offered(SCRAM_SHA_256) {
        // 'y' tells a server that can bind that we could have: it then refuses, which stops a
        // man-in-the-middle from stripping -PLUS from the list. When the server offered -PLUS
        // but its certificate has no usable hash (Ed25519), neither side can bind: 'n'.
        return Ok(if ctx.tls && !offered(SCRAM_SHA_256_PLUS) {
            ChannelBinding::NotOffered
        } else {
            ChannelBinding::Unsupported
        });
    }
    Err(UpstreamError::Auth(format!(
        "upstream {} offers SASL mechanisms [{}], none of which dbward supports (it supports {SCRAM_SHA_256} and {SCRAM_SHA_256_PLUS})",
        ctx.addr,
        mechanisms.join(", ")
    )))
}

fn insecure_allowed(ctx: &Context<'_>, what: &str) -> Result<(), UpstreamError> {
    if ctx.tls_verified || ctx.allow_insecure_password {
        return Ok(());
    }
    let over = if ctx.tls {
        "TLS without certificate verification"
    } else {
        "an unencrypted connection"
    };
    Err(UpstreamError::Auth(format!(
        "upstream {} asks for {what} over {over}; dbward sends MD5 or cleartext passwords only over TLS with a verified certificate. \
         Set sslmode = \"verify-full\" (or \"verify-ca\") for database \"{}\", switch the server to scram-sha-256 \
         (pg_hba.conf and password_encryption), or set allow_insecure_password = true if the network is trusted",
        ctx.addr, ctx.database
    )))
}

fn unsupported_method(ctx: &Context<'_>, method: &str) -> UpstreamError {
    UpstreamError::Auth(format!(
        "upstream {} asks for {method} authentication, which dbward does not support; \
         configure the server (pg_hba.conf) to use scram-sha-256 for user \"{}\"",
        ctx.addr, ctx.user
    ))
}

fn scram_failed(addr: &str, e: super::scram::ScramError) -> UpstreamError {
    UpstreamError::Auth(format!("SCRAM authentication with upstream {addr} failed: {e}"))
}

fn unexpected(tag: u8, addr: &str, during: &str) -> UpstreamError {
    let shown = if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    };
    UpstreamError::Protocol(format!(
        "upstream {addr} sent unexpected message type {shown} while {during}"
    ))
}

fn encode_error(addr: &str, e: std::io::Error) -> UpstreamError {
    UpstreamError::Protocol(format!("cannot encode a message for upstream {addr}: {e}"))
}
