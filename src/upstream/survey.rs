//! A look at every upstream host of an entry, for `dbward check` and `/readyz`: each address
//! connected and authenticated with the entry's credential, its role (primary or standby,
//! read-only, version) read as a session's host choice reads it, and whether it meets the
//! entry's `target_session_attrs`. Nothing of it is kept: the next look asks again.

use std::sync::Arc;

use secrecy::SecretString;

use super::session_attrs::{self, Mismatch, ServerRole};
use super::{connect_with_keys, UpstreamError, UpstreamSettings};
use crate::config::TargetSessionAttrs;

/// One address of the list, as it answered now.
#[derive(Debug)]
pub(crate) struct HostState {
    /// The configured `host:port`, with the address when the name is not one.
    pub(crate) host: String,
    pub(crate) state: Result<(ServerRole, Result<(), Mismatch>), UpstreamError>,
}

impl HostState {
    /// Whether a session could land here now.
    pub(crate) fn usable(&self) -> bool {
        matches!(self.state, Ok((_, Ok(()))))
    }

    /// `127.0.0.1:5432: primary, version 15.4; meets target_session_attrs=read-write`.
    pub(crate) fn describe(&self, attrs: TargetSessionAttrs) -> String {
        match &self.state {
            Ok((role, Ok(()))) => format!("{}: {role}; meets target_session_attrs={attrs}", self.host),
            Ok((role, Err(m))) => format!("{}: {role}; does not meet target_session_attrs={attrs}: {m}", self.host),
            Err(e) => format!("{}: {}", self.host, super::hosts::reason_text(e)),
        }
    }
}

/// Whether `target_session_attrs` can be met by one of `hosts` (prefer-standby: by any host).
pub(crate) fn can_meet(attrs: TargetSessionAttrs, hosts: &[HostState]) -> bool {
    match attrs {
        TargetSessionAttrs::PreferStandby => hosts.iter().any(|h| h.state.is_ok()),
        _ => hosts.iter().any(HostState::usable),
    }
}

/// Every address of every host, in the configured order, each under connect_timeout.
pub(crate) async fn survey(
    settings: &UpstreamSettings,
    params: &[(String, String)],
    password: &SecretString,
) -> Vec<HostState> {
    let attrs = settings.ha.target_session_attrs;
    let keys = Arc::default();
    let mut out = Vec::new();
    for host in settings.host_list() {
        let label = host.addr();
        let addrs = match super::hosts::resolve(settings, &host).await {
            Ok(a) => a,
            Err(e) => {
                out.push(HostState {
                    host: label,
                    state: Err(e),
                });
                continue;
            }
        };
        for a in addrs {
            let one = settings.for_address(&host, a);
            let shown = if host.host.parse::<std::net::IpAddr>().is_ok() {
                label.clone()
            } else {
                format!("{label} ({a})")
            };
            let state = async {
                let mut conn = connect_with_keys(&one, params, password, &keys).await?;
                let mut role = ServerRole::from_greeting(&conn.greeting);
                let addr = one.addr();
                match tokio::time::timeout(
                    one.connect_timeout,
                    session_attrs::complete(&mut role, &mut conn.stream, &addr),
                )
                .await
                {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(UpstreamError::Timeout {
                            addr,
                            after: one.connect_timeout,
                            during: "asking the server's role",
                        })
                    }
                }
                super::hosts::goodbye(&mut conn).await;
                let meets = match attrs {
                    // Its first pass: a standby is what it prefers.
                    TargetSessionAttrs::PreferStandby => session_attrs::meets(TargetSessionAttrs::Standby, &role),
                    a => session_attrs::meets(a, &role),
                };
                Ok((role, meets))
            }
            .await;
            out.push(HostState { host: shown, state });
        }
    }
    out
}

/// `/readyz`'s lines for an entry with a host list or a target_session_attrs (None otherwise):
/// one per host, indented, and whether target_session_attrs can be met now (false: not ready).
/// The whole look is bounded by `within`.
pub(crate) async fn readiness(
    settings: &UpstreamSettings,
    dbname: &str,
    username: &str,
    password: &SecretString,
    within: std::time::Duration,
) -> Option<(bool, String)> {
    let attrs = settings.ha.target_session_attrs;
    if settings.host_list().len() == 1 && attrs == TargetSessionAttrs::Any {
        return None;
    }
    let params = vec![
        ("user".to_string(), username.to_string()),
        ("database".to_string(), dbname.to_string()),
        ("application_name".to_string(), "dbward readyz".to_string()),
    ];
    let Ok(hosts) = tokio::time::timeout(within, survey(settings, &params, password)).await else {
        return Some((
            false,
            format!(
                "  NOT READY: the upstream hosts did not all answer within {}s\n",
                within.as_secs()
            ),
        ));
    };
    let mut body: String = hosts.iter().map(|h| format!("  {}\n", h.describe(attrs))).collect();
    let met = can_meet(attrs, &hosts);
    if !met {
        body.push_str(&format!(
            "  NOT READY: no host meets target_session_attrs={attrs}: sessions get 08001\n"
        ));
    }
    Some((met, body))
}
