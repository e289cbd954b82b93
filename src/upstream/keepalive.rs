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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_socket_gets_the_configured_timing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let k = Keepalive {
            idle: Duration::from_secs(3),
            interval: Duration::from_secs(1),
            count: 4,
        };
        apply(&tcp, &k).unwrap();
        let sock = SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(3));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(1));
        assert_eq!(sock.keepalive_retries().unwrap(), 4);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
    }
}
