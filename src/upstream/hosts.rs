//! Choosing the upstream host for a session, as libpq does with a multi-host connection string:
//! hosts in the configured order (or shuffled, `load_balance_hosts = random`), every name
//! resolved at this attempt and every address it resolves to tried in turn, each address with
//! its own `connect_timeout`, each authenticated connection checked against
//! `target_session_attrs` (with a second pass accepting any host for `prefer-standby`). A host
//! that fails is skipped for the rest of the attempt; when none is left the error names every
//! host tried and why.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use rand::seq::SliceRandom;
use secrecy::SecretString;
use tokio::io::AsyncWriteExt;

use super::session_attrs::{self, Mismatch, ServerRole};
use super::{connect_with_keys, scram, Connected, UpstreamError, UpstreamHost, UpstreamSettings};
use crate::config::{LoadBalanceHosts, TargetSessionAttrs};

/// How long a rejected host gets to read our Terminate before its connection is dropped.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection a session got, and where it is.
pub(crate) struct Chosen {
    pub(crate) conn: Connected,
    /// Settings for that one address (the host's TLS name kept): cancel requests and rechecks
    /// go there, not to the list.
    pub(crate) host: Arc<UpstreamSettings>,
    /// The configured `host:port` (the metrics' `host` label).
    pub(crate) label: String,
    pub(crate) role: ServerRole,
}

/// Where a connection landed, kept beside it (also while a pool holds it): cancel requests
/// and rechecks go to that one host.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) host: Arc<UpstreamSettings>,
    pub(crate) label: String,
    pub(crate) role: ServerRole,
}

impl Chosen {
    pub(crate) fn split(self) -> (Connected, Place) {
        let place = Place {
            host: self.host,
            label: self.label,
            role: self.role,
        };
        (self.conn, place)
    }
}

/// One host that could not be used in an attempt.
#[derive(Debug)]
pub struct HostFailure {
    /// The configured `host:port`, with the address tried when the name is not one.
    pub host: String,
    pub reason: HostReason,
}

/// Why a host could not be used.
#[derive(Debug)]
pub enum HostReason {
    /// It could not be reached, authenticated or asked.
    Failed(UpstreamError),
    /// It works but is of the wrong kind for target_session_attrs.
    Mismatch(Mismatch),
}

impl std::fmt::Display for HostFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            HostReason::Mismatch(m) => write!(f, "{}: {m}", self.host),
            HostReason::Failed(e) => write!(f, "{}: {}", self.host, reason_text(e)),
        }
    }
}

/// A failure in few words; the host is named before it.
pub(super) fn reason_text(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Connect { source, .. } => match source.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => source.to_string(),
        },
        UpstreamError::Resolve { source, .. } => format!("cannot resolve: {source}"),
        UpstreamError::Timeout { after, during, .. } => {
            format!("timed out after {} while {during}", humantime::format_duration(*after))
        }
        UpstreamError::Server(se) => se.to_string(),
        e => e.to_string(),
    }
}

/// Failures of an attempt, joined for one message: `a:5432: connection refused; b:5432: ...`.
pub(super) fn join(failures: &[HostFailure]) -> String {
    failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; ")
}

/// Opens the session's upstream connection on the first host that works and meets
/// target_session_attrs. `failed` hears of every host that could not be used (for metrics),
/// with its configured `host:port`.
pub(crate) async fn connect(
    settings: &UpstreamSettings,
    params: &[(String, String)],
    password: &SecretString,
    keys: &Arc<scram::KeyCache>,
    failed: &mut (dyn FnMut(&str, &UpstreamError) + Send),
) -> Result<Chosen, UpstreamError> {
    let hosts = settings.host_list();
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    let random = settings.ha.load_balance_hosts == LoadBalanceHosts::Random;
    if random {
        order.shuffle(&mut rand::thread_rng());
    }
    let wanted = settings.ha.target_session_attrs;
    // libpq: prefer-standby looks for a standby first, then takes any host.
    let passes: &[TargetSessionAttrs] = match wanted {
        TargetSessionAttrs::PreferStandby => &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any],
        _ => std::slice::from_ref(&settings.ha.target_session_attrs),
    };
    let mut failures = Vec::new();
    for &attrs in passes {
        for &i in &order {
            let host = &hosts[i];
            let label = host.addr();
            let addrs = match resolve(settings, host).await {
                Ok(a) => a,
                Err(e) => {
                    failed(&label, &e);
                    failures.push(HostFailure {
                        host: label,
                        reason: HostReason::Failed(e),
                    });
                    continue;
                }
            };
            let mut addrs = addrs;
            if random {
                addrs.shuffle(&mut rand::thread_rng());
            }
            for a in addrs {
                let one = settings.for_address(host, a);
                let shown = if host.host.parse::<std::net::IpAddr>().is_ok() {
                    label.clone()
                } else {
                    format!("{label} ({a})")
                };
                match try_address(&one, attrs, params, password, keys).await {
                    Ok((conn, role)) => {
                        tracing::debug!(upstream = %shown, role = %role, "upstream host chosen");
                        return Ok(Chosen {
                            conn,
                            host: Arc::new(one),
                            label,
                            role,
                        });
                    }
                    Err(reason) => {
                        if let HostReason::Failed(e) = &reason {
                            failed(&label, e);
                        }
                        tracing::debug!(upstream = %shown, reason = ?reason, "upstream host skipped");
                        failures.push(HostFailure { host: shown, reason });
                    }
                }
            }
        }
    }
    // One host and a plain failure: that failure as it is (the server's own error reaches the
    // client verbatim), as before lists existed.
    if hosts.len() == 1 && failures.len() == 1 && matches!(failures[0].reason, HostReason::Failed(_)) {
        if let Some(HostFailure {
            reason: HostReason::Failed(e),
            ..
        }) = failures.pop()
        {
            return Err(e);
        }
    }
    Err(UpstreamError::NoHost { wanted, failures })
}

/// The addresses `host` resolves to now (never cached: a failover may have moved the name).
pub(super) async fn resolve(
    settings: &UpstreamSettings,
    host: &UpstreamHost,
) -> Result<Vec<SocketAddr>, UpstreamError> {
    let addr = host.addr();
    let resolve_error = |source| UpstreamError::Resolve {
        addr: addr.clone(),
        host: host.host.clone(),
        source,
    };
    let lookup = tokio::net::lookup_host((host.host.as_str(), host.port));
    match tokio::time::timeout(settings.connect_timeout, lookup).await {
        Ok(Ok(a)) => {
            let list: Vec<SocketAddr> = a.collect();
            if list.is_empty() {
                return Err(resolve_error(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no addresses found",
                )));
            }
            Ok(list)
        }
        Ok(Err(e)) => Err(resolve_error(e)),
        Err(_) => Err(UpstreamError::Timeout {
            addr,
            after: settings.connect_timeout,
            during: "resolving the host name",
        }),
    }
}

/// One address: connect and authenticate under connect_timeout, then check the server's kind.
async fn try_address(
    one: &UpstreamSettings,
    attrs: TargetSessionAttrs,
    params: &[(String, String)],
    password: &SecretString,
    keys: &Arc<scram::KeyCache>,
) -> Result<(Connected, ServerRole), HostReason> {
    let mut conn = connect_with_keys(one, params, password, keys)
        .await
        .map_err(HostReason::Failed)?;
    let mut role = ServerRole::from_greeting(&conn.greeting);
    let addr = one.addr();
    let checked = tokio::time::timeout(
        one.connect_timeout,
        session_attrs::check(attrs, &mut role, &mut conn.stream, &addr),
    )
    .await;
    match checked {
        Ok(Ok(Ok(()))) => Ok((conn, role)),
        Ok(Ok(Err(m))) => {
            goodbye(&mut conn).await;
            Err(HostReason::Mismatch(m))
        }
        Ok(Err(e)) => Err(HostReason::Failed(e)),
        Err(_) => Err(HostReason::Failed(UpstreamError::Timeout {
            addr,
            after: one.connect_timeout,
            during: "checking target_session_attrs",
        })),
    }
}

/// Terminate and close: a host of the wrong kind gets a clean goodbye, as libpq gives it.
pub(super) async fn goodbye(conn: &mut Connected) {
    let mut bye = BytesMut::new();
    postgres_protocol::message::frontend::terminate(&mut bye);
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        let _ = conn.stream.write_all(&bye).await;
        let _ = conn.stream.shutdown().await;
    })
    .await;
}

/// Asks the one address of `one` again whether it meets `attrs` (a new connection with the
/// session's credential): Some(why) when it no longer does.
pub(crate) async fn recheck(
    one: &UpstreamSettings,
    attrs: TargetSessionAttrs,
    params: &[(String, String)],
    password: &SecretString,
    keys: &Arc<scram::KeyCache>,
) -> Result<Option<Mismatch>, UpstreamError> {
    match try_address(one, attrs, params, password, keys).await {
        Ok((mut conn, _)) => {
            goodbye(&mut conn).await;
            Ok(None)
        }
        Err(HostReason::Mismatch(m)) => Ok(Some(m)),
        Err(HostReason::Failed(e)) => Err(e),
    }
}
