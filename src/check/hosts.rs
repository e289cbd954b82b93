//! The upstream-hosts step, for entries with a host list or a `target_session_attrs`: every
//! host tried with the credential, its role (primary or standby, server version) reported, and
//! whether `target_session_attrs` can be met now.

use super::entry::Entry;
use super::report::{Check, Verdict};
use super::Run;
use crate::config::TargetSessionAttrs;
use crate::upstream::survey;
use crate::vault::Credential;

impl Run<'_> {
    /// One line per host, then whether a session could land now. Nothing for a single host
    /// with `target_session_attrs = any`: the upstream step says all there is.
    pub(super) async fn upstream_hosts(&self, e: &Entry<'_>, cred: &Credential) -> Vec<Check> {
        let (db, settings) = (e.db, e.upstream);
        let attrs = settings.ha.target_session_attrs;
        if settings.host_list().len() == 1 && attrs == TargetSessionAttrs::Any {
            return Vec::new();
        }
        let dbname = db
            .dbname
            .clone()
            .or_else(|| self.opts.dbname.clone())
            .unwrap_or_else(|| "postgres".to_string());
        let params = vec![
            ("user".to_string(), cred.username.clone()),
            ("database".to_string(), dbname),
            ("application_name".to_string(), "dbward check".to_string()),
        ];
        let hosts = survey::survey(settings, &params, &cred.password).await;
        let mut out: Vec<Check> = hosts
            .iter()
            .map(|h| {
                let verdict = match &h.state {
                    Ok(_) => Verdict::Pass,
                    // A host down is what a list is for; only all of them down fails.
                    Err(_) => Verdict::Warn,
                };
                let mut c = Check::new(
                    &db.name,
                    "upstream_host",
                    format!("upstream host {}", h.host),
                    verdict,
                    h.describe(attrs),
                );
                if let Ok((role, meets)) = &h.state {
                    c = c
                        .detail("role", role.kind().unwrap_or("unknown"))
                        .detail("server_version", role.version.clone().unwrap_or_default())
                        .detail("meets_target_session_attrs", meets.is_ok());
                }
                c
            })
            .collect();
        let title = format!("target_session_attrs={attrs}");
        out.push(if survey::can_meet(attrs, &hosts) {
            let on: Vec<&str> = hosts.iter().filter(|h| h.usable()).map(|h| h.host.as_str()).collect();
            let message = if on.is_empty() {
                "met by the second pass (no standby is up; any host is taken)".to_string()
            } else {
                format!("can be met now by {}", on.join(", "))
            };
            Check::new(&db.name, "target_session_attrs", title, Verdict::Pass, message)
        } else {
            Check::new(
                &db.name,
                "target_session_attrs",
                title,
                Verdict::Fail,
                "no host can be used now: sessions get 08001",
            )
            .fix("start or promote a server of the kind target_session_attrs asks for, or correct the upstream list")
        });
        out
    }
}
