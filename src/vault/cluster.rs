//! Which Vault cluster dbward is talking to: `sys/health`'s `cluster_id`. A token that
//! `lookup-self` suddenly denies means "revoked" in the same cluster, but "unknown" in a Vault
//! that was initialised anew (its storage lost): there the leases are gone while the Postgres
//! roles they made live on until their VALID UNTIL, so cached credentials must keep serving.

use super::VaultClient;

/// The cluster's id, or None when Vault does not say (unreachable, sealed, not initialised).
pub(crate) async fn cluster_id(client: &VaultClient) -> Option<String> {
    let resp = client
        .get_unauthenticated("health", "sys/health?standbyok=true&perfstandbyok=true")
        .await
        .ok()?;
    // A bounded, printable id: it is logged.
    resp.str_field("/cluster_id")
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
}

/// What a denied `lookup-self` means, given the cluster seen before and the one answering now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Denial {
    /// The same cluster (or no way to tell): the token was revoked.
    Revoked,
    /// Another cluster answers at the same address: Vault was initialised anew.
    Reinitialised { before: String, now: String },
}

pub(crate) fn denial(before: Option<&str>, now: Option<&str>) -> Denial {
    match (before, now) {
        (Some(b), Some(n)) if b != n => Denial::Reinitialised {
            before: b.to_string(),
            now: n.to_string(),
        },
        _ => Denial::Revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_different_known_cluster_means_reinitialised() {
        assert_eq!(denial(Some("a"), Some("a")), Denial::Revoked);
        assert_eq!(denial(None, Some("a")), Denial::Revoked);
        assert_eq!(denial(Some("a"), None), Denial::Revoked);
        assert_eq!(
            denial(Some("a"), Some("b")),
            Denial::Reinitialised {
                before: "a".into(),
                now: "b".into()
            }
        );
    }
}
