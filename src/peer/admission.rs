//! The entry's allowlist applied to one connection: [`check`] at accept, [`Admission`] kept in
//! the session's context until the startup packet, when a refused caller is told why (28000)
//! before any credential is touched.

use std::fmt;

use tokio_util::either::Either;

use crate::config::Allowlist;
use crate::listener::ClientStream;
use crate::pg::error::{sqlstate, PgError};

use super::{account, tcp, unix, PeerError};

/// What the allowlist said about this connection's caller.
#[derive(Debug)]
pub(crate) enum Admission {
    /// The entry has no allowlist: every local caller is admitted, nothing was looked up.
    Open,
    Admitted {
        uid: u32,
    },
    Refused(Refused),
}

#[derive(Debug)]
pub(crate) enum Refused {
    /// The caller is known and neither its uid nor any of its groups is listed.
    NotListed { uid: u32, name: Option<String> },
    /// Who the caller is could not be found out.
    Unidentified(PeerError),
}

impl Admission {
    pub(crate) fn is_refused(&self) -> bool {
        matches!(self, Admission::Refused(_))
    }
}

/// Finds the caller of `stream` and applies `allowed` to it.
pub(crate) async fn check(allowed: Option<&Allowlist>, stream: &ClientStream) -> Admission {
    let Some(allowed) = allowed else {
        return Admission::Open;
    };
    let uid = match caller_uid(stream).await {
        Ok(uid) => uid,
        Err(e) => return Admission::Refused(Refused::Unidentified(e)),
    };
    if allowed.admits_uid(uid) {
        return Admission::Admitted { uid };
    }
    // The user database is only asked when the uid alone does not admit the caller.
    let account = tokio::task::spawn_blocking(move || account::lookup(uid))
        .await
        .unwrap_or_default();
    if allowed.admits_any_gid(&account.gids) {
        return Admission::Admitted { uid };
    }
    Admission::Refused(Refused::NotListed {
        uid,
        name: account.name,
    })
}

async fn caller_uid(stream: &ClientStream) -> Result<u32, PeerError> {
    match stream {
        Either::Right(s) => unix::peer_uid(s),
        Either::Left(s) => {
            let local = s.local_addr().map_err(PeerError::Addresses)?;
            let peer = s.peer_addr().map_err(PeerError::Addresses)?;
            tcp::peer_uid(local, peer).await
        }
    }
}

impl Refused {
    /// What the client is told: who it is, which entry, which rule.
    pub(crate) fn to_pg_error(&self, entry: &str, allowed: Option<&Allowlist>) -> PgError {
        let rule = allowed.map(Allowlist::describe).unwrap_or_default();
        match self {
            Refused::NotListed { uid, name } => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!(
                    "dbward: uid {uid} ({}) may not use database entry {entry:?} ({rule})",
                    Name(name.as_deref())
                ),
            )
            .with_hint(
                "connect as a listed user or a member of a listed group, or add this caller to the entry's allowed_users or allowed_groups",
            ),
            Refused::Unidentified(e) => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("dbward: could not tell which local user opened this connection, so it may not use database entry {entry:?} ({rule}): {e}"),
            )
            .with_hint("connect from this host over loopback or the entry's Unix socket; check that dbward may read its peers (AF_NETLINK or /proc/net)"),
        }
    }
}

/// A user name, or a note that the uid has none.
struct Name<'a>(Option<&'a str>);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.unwrap_or("no user name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Listed;

    #[test]
    fn refusal_names_the_caller_the_entry_and_the_rule() {
        let allowed = Allowlist {
            users: vec![
                Listed {
                    id: 1000,
                    written: "payments".into(),
                },
                Listed {
                    id: 1001,
                    written: "1001".into(),
                },
            ],
            groups: vec![Listed {
                id: 2000,
                written: "payments-clients".into(),
            }],
        };
        let r = Refused::NotListed {
            uid: 65534,
            name: Some("nobody".into()),
        };
        let e = r.to_pg_error("payments", Some(&allowed));
        assert_eq!(e.code, "28000");
        assert_eq!(
            e.message,
            "dbward: uid 65534 (nobody) may not use database entry \"payments\" (allowed_users: payments, 1001; allowed_groups: payments-clients)"
        );
    }
}
