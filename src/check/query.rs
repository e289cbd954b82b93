//! The smallest Postgres query client `dbward check` needs: `SELECT 1` on an upstream stream
//! that the upstream module has already authenticated, then Terminate. Only the outcome
//! matters, so rows are skipped and the server's error is kept (SQLSTATE and message).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upstream::UpstreamStream;

/// Why `SELECT 1` did not come back clean.
#[derive(Debug, thiserror::Error)]
pub(super) enum QueryError {
    #[error("{0}")]
    Encode(std::io::Error),
    #[error("sending SELECT 1 failed: {0}")]
    Send(std::io::Error),
    #[error("bad answer to SELECT 1: {0}")]
    Parse(std::io::Error),
    #[error("reading the answer to SELECT 1 failed: {0}")]
    Read(std::io::Error),
    #[error("the server closed the connection during SELECT 1")]
    Closed,
    /// The server's ErrorResponse.
    #[error("SELECT 1 failed: {code} {message}")]
    Server { code: String, message: String },
}

/// Sends `SELECT 1` and reads up to ReadyForQuery; then says goodbye (Terminate).
pub(super) async fn select_one(stream: &mut UpstreamStream) -> Result<(), QueryError> {
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).map_err(QueryError::Encode)?;
    stream.write_all(&out).await.map_err(QueryError::Send)?;
    stream.flush().await.map_err(QueryError::Send)?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut error = None;
    loop {
        while let Some(msg) = backend::Message::parse(&mut buf).map_err(QueryError::Parse)? {
            match msg {
                backend::Message::ErrorResponse(body) => {
                    let mut fields = body.fields();
                    let (mut code, mut message) = (String::new(), String::new());
                    while let Ok(Some(f)) = fields.next() {
                        match f.type_() {
                            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                            _ => {}
                        }
                    }
                    error = Some(QueryError::Server { code, message });
                }
                backend::Message::ReadyForQuery(_) => {
                    let mut bye = BytesMut::new();
                    frontend::terminate(&mut bye);
                    let _ = stream.write_all(&bye).await;
                    let _ = stream.shutdown().await;
                    return error.map_or(Ok(()), Err);
                }
                _ => {}
            }
        }
        let n = stream.read_buf(&mut buf).await.map_err(QueryError::Read)?;
        if n == 0 {
            return Err(QueryError::Closed);
        }
    }
}
