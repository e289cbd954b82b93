//! Bounds on the admin server's connections, so that whoever can reach its port cannot hold
//! dbward's memory or file descriptors: a client must send a whole request header within
//! [`HEADER_READ_TIMEOUT`] (hyper enforces it only once it has a timer), and at most
//! [`MAX_CONNECTIONS`] connections are served at once; one more is answered 503 and closed.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Probes and Prometheus send their request at once; a client still sending headers after this
/// long is slow on purpose or broken.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Kubelet probes and a few Prometheus servers need a handful.
pub(crate) const MAX_CONNECTIONS: usize = 32;

/// Sent without reading the request to a connection over the cap; small enough for the new
/// socket's empty send buffer, so writing it never waits.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
connection: close\r\ncontent-length: 43\r\n\r\ntoo many admin connections; try again soon\n";

/// hyper's HTTP/1 server with its timer set, so the header-read timeout applies.
pub(crate) fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    b
}

/// The admin server's connection slots.
#[derive(Clone)]
pub(crate) struct Slots(Arc<Semaphore>);

impl Slots {
    pub(crate) fn new() -> Slots {
        Slots(Arc::new(Semaphore::new(MAX_CONNECTIONS)))
    }

    /// A slot for `stream`, held until the connection ends; None when all are taken, and then
    /// the client has been answered 503 and the connection is closed.
    pub(crate) fn admit(&self, stream: &TcpStream) -> Option<OwnedSemaphorePermit> {
        match self.0.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                tracing::debug!(limit = MAX_CONNECTIONS, "admin connection refused: too many open");
                let _ = stream.try_write(OVER_CAP);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(OVER_CAP).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    }
}
