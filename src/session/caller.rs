//! The one admission hook of a session: a local caller the entry's allowlist refused (found
//! at accept, [`crate::peer`]) is told why, counted and logged here, before any credential is
//! checked out.

use tokio::io::AsyncWrite;

use crate::peer::{Admission, Refused};

use super::{send_error, SessionContext};

/// False when the caller was refused; the client has been sent 28000 naming it and the rule.
pub(super) async fn admit<W: AsyncWrite + Unpin>(ctx: &SessionContext, client: &mut W) -> bool {
    let Admission::Refused(refused) = &ctx.admission else {
        return true;
    };
    let db = &ctx.entry;
    ctx.metrics
        .client_connections_rejected_total
        .with_label_values(&[&db.name, "peer_not_allowed"])
        .inc();
    match refused {
        Refused::NotListed { uid, name } => tracing::warn!(
            uid,
            user = name.as_deref().unwrap_or("-"),
            "refusing client: neither its uid nor its groups are in the entry's allowed_users or allowed_groups"
        ),
        Refused::Unidentified(e) => tracing::warn!(error = %e, "refusing client: its uid could not be found"),
    }
    send_error(client, &refused.to_pg_error(&db.name, db.cfg.allowed.as_ref())).await;
    false
}
