//! The uid that owns the peer end of a loopback TCP connection: both ends are sockets of this
//! host, so the kernel knows who opened the client's one. Asked first of `sock_diag`
//! (`NETLINK_INET_DIAG`, one exact lookup by the 4-tuple, no scan), then of `/proc/net/tcp{,6}`
//! where netlink is not available (a sandbox without `AF_NETLINK`, no `inet_diag` module).
//! Both report the socket's owner as the reader's user namespace sees it.

use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use super::PeerError;

/// The owner uid of the socket whose local address is `peer` and remote address is `local`:
/// the client's end of the connection dbward accepted on `local`.
pub(crate) async fn peer_uid(local: SocketAddr, peer: SocketAddr) -> Result<u32, PeerError> {
    let (local, peer) = (canonical(local), canonical(peer));
    if !peer.ip().is_loopback() && !is_local_address(peer.ip()) {
        return Err(PeerError::NotLocal { peer });
    }
    let diag = match sock_diag(local, peer) {
        Ok(Some(uid)) => return Ok(uid),
        Ok(None) => "no such socket".to_string(),
        Err(e) => e.to_string(),
    };
    // The kernel prints every socket of the table: milliseconds on a busy host, so not on the
    // runtime's threads.
    let proc = match tokio::task::spawn_blocking(move || proc_net(local, peer)).await {
        Ok(Ok(Some(uid))) => return Ok(uid),
        Ok(Ok(None)) => "no such socket".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    Err(PeerError::NotFound {
        peer,
        local,
        diag,
        proc,
    })
}

/// An IPv4 client of an IPv6 socket shows as `::ffff:a.b.c.d`; the kernel files it as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A non-loopback listener (allow_remote_clients) also hears this host's own addresses; only
/// those have a local peer socket. Anything else is another machine.
fn is_local_address(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// One `SOCK_DIAG_BY_FAMILY` request for exactly this connection (not a dump).
fn sock_diag(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let (family, mut id) = match peer {
        SocketAddr::V4(_) => (AF_INET, SocketId::new_v4()),
        SocketAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
    };
    id.source_address = peer.ip();
    id.source_port = peer.port();
    id.destination_address = local.ip();
    id.destination_port = local.port();
    // INET_DIAG_NOCOOKIE: match by addresses, not by a cookie from an earlier answer.
    id.cookie = [0xff; 8];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    // The kernel answers a diag request inside send(): the answer is queued by now, so a
    // non-blocking read either has it or there is none, and no caller can make this wait.
    socket.set_non_blocking(true)?;
    let mut answer = vec![0u8; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let mut at = 0;
    while at < n {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[at..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag answer: {e}")))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                if r.header.socket_id.source_port == peer.port()
                    && r.header.socket_id.destination_port == local.port() =>
            {
                return Ok(Some(r.header.uid));
            }
            NetlinkPayload::Error(e) => {
                return match e.code.map(|c| c.get().abs()) {
                    Some(c) if c == nix::errno::Errno::ENOENT as i32 => Ok(None),
                    Some(c) => Err(io::Error::from_raw_os_error(c)),
                    None => Ok(None),
                }
            }
            NetlinkPayload::Done(_) => return Ok(None),
            _ => {}
        }
        if len == 0 {
            break;
        }
        at += len;
    }
    Ok(None)
}

/// The same answer from `/proc/net/tcp{,6}`: the line whose local address is `peer` and whose
/// remote address is `local`, its `uid` column.
fn proc_net(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let file = match peer {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    Ok(find_in_table(&fs::read_to_string(file)?, local, peer))
}

fn find_in_table(table: &str, local: SocketAddr, peer: SocketAddr) -> Option<u32> {
    let (want_local, want_remote) = (proc_address(peer), proc_address(local));
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == want_local && f[2] == want_remote)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// The kernel prints addresses as 32-bit words in host byte order (`%08X`), then `:%04X` port.
fn proc_address(a: SocketAddr) -> String {
    let octets: Vec<u8> = match a.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut s = String::with_capacity(40);
    for word in octets.chunks(4) {
        let w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        s.push_str(&format!("{w:08X}"));
    }
    s.push_str(&format!(":{:04X}", a.port()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A real loopback connection of this process: the owner of its client end is our uid.
    async fn check(bind: &str) {
        let l = TcpListener::bind(bind).unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, peer) = l.accept().unwrap();
        let local = server.local_addr().unwrap();
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(sock_diag(local, peer).unwrap(), Some(me), "sock_diag {bind}");
        assert_eq!(proc_net(local, peer).unwrap(), Some(me), "/proc/net {bind}");
        assert_eq!(peer_uid(local, peer).await.unwrap(), me);
        drop(client);
        drop(server);
        // The listener's own address as the "peer": no client socket has it.
        let gone = SocketAddr::new(peer.ip(), l.local_addr().unwrap().port());
        assert_eq!(sock_diag(local, gone).unwrap(), None);
    }

    #[tokio::test]
    async fn finds_the_owner_of_a_loopback_connection_v4() {
        check("127.0.0.1:0").await;
    }

    #[tokio::test]
    async fn finds_the_owner_of_a_loopback_connection_v6() {
        if TcpListener::bind("[::1]:0").is_ok() {
            check("[::1]:0").await;
        }
    }

    #[tokio::test]
    async fn a_remote_peer_is_not_looked_up() {
        let local: SocketAddr = "127.0.0.1:6432".parse().unwrap();
        let far: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        assert!(matches!(peer_uid(local, far).await, Err(PeerError::NotLocal { .. })));
    }

    #[test]
    fn proc_table_lines_match_by_both_addresses() {
        let table =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                       0: 0100007F:1920 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1001        0 1 1 0\n";
        let local: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:6432".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find_in_table(table, local, peer), Some(1001));
            assert_eq!(find_in_table(table, peer, local), None);
        }
    }
}
