//! The uid of a Unix socket's peer, as the kernel recorded it at `connect` (`SO_PEERCRED`).

use tokio::net::UnixStream;

use super::PeerError;

pub(super) fn peer_uid(s: &UnixStream) -> Result<u32, PeerError> {
    s.peer_cred().map(|c| c.uid()).map_err(PeerError::PeerCred)
}
