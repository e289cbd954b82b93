//! TCP keepalive on upstream sockets, so that a session on a host that went away (power loss,
//! a partition, a failed-over VM) ends with an error after a few seconds of silence instead of
//! waiting on a peer that will never answer. The timing is libpq's keepalives_idle /
//! keepalives_interval / keepalives_count; TCP_USER_TIMEOUT bounds data left unacknowledged
//! the same way, which keepalive probes alone do not (they only run on an idle connection).

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Keepalive;

/// Turns keepalive on for `tcp` with `k`'s timing.
pub(super) fn apply(tcp: &TcpStream, k: &Keepalive) -> std::io::Result<()> {
    let sock = SockRef::from(tcp);
    let ka = TcpKeepalive::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.count);
    sock.set_tcp_keepalive(&ka)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(Some(dead_after(k)))?;
    Ok(())
}

/// How long a silent peer has until the kernel gives up on it.
pub(crate) fn dead_after(k: &Keepalive) -> std::time::Duration {
    k.idle + k.interval * k.count
}
