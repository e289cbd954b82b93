//! The upstream step: one connection as production would open it, with the credential Vault
//! issued, and `SELECT 1` on it. A refusal is explained by its SQLSTATE in terms of the secret
//! kind that issued the credential.

use super::entry::Entry;
use super::query::select_one;
use super::report::{fmt_duration, Check, Verdict};
use super::Run;
use crate::config::CredentialKind;
use crate::upstream::{self, UpstreamError};
use crate::vault::Credential;

impl Run<'_> {
    /// One upstream connection with the credential, and `SELECT 1` on it.
    pub(super) async fn upstream(&self, e: &Entry<'_>, cred: &Credential) -> Check {
        let (db, settings) = (e.db, e.upstream);
        let (dbname, note) = match (&db.dbname, &self.opts.dbname) {
            (Some(d), _) => (d.clone(), String::new()),
            (None, Some(d)) => (d.clone(), " (--dbname)".to_string()),
            (None, None) => (
                "postgres".to_string(),
                " (no dbname in the config; --dbname chooses another)".to_string(),
            ),
        };
        let title = format!("upstream {} database {dbname:?}{note}", settings.addr());
        let params = vec![
            ("user".to_string(), cred.username.clone()),
            ("database".to_string(), dbname.clone()),
            ("application_name".to_string(), "dbward check".to_string()),
        ];
        let fail = |message: String| {
            Check::new(&db.name, "upstream", title.clone(), Verdict::Fail, message)
                .detail("user", cred.username.clone())
        };
        // As a session connects: the first host of the list that meets target_session_attrs.
        let chosen =
            upstream::hosts::connect(settings, &params, &cred.password, &Default::default(), &mut |_, _| {}).await;
        match chosen.map(|c| c.conn) {
            Ok(mut conn) => {
                let tls = if conn.tls { "TLS" } else { "no TLS" };
                match tokio::time::timeout(settings.connect_timeout, select_one(&mut conn.stream)).await {
                    Ok(Ok(())) => Check::new(
                        &db.name,
                        "upstream",
                        title.clone(),
                        Verdict::Pass,
                        format!("SELECT 1 ok as {} ({tls})", cred.username),
                    )
                    .detail("user", cred.username.clone())
                    .detail("tls", conn.tls),
                    Ok(Err(err)) => {
                        fail(err.to_string()).fix("the login works; see the server's message about the query")
                    }
                    Err(_) => fail(format!(
                        "SELECT 1 got no answer within {}",
                        fmt_duration(settings.connect_timeout)
                    ))
                    .fix("check the server's load and log"),
                }
            }
            Err(err) => {
                let (message, fix) = upstream_error(e, &dbname, cred, &err);
                fail(message).fix(fix).detail("sqlstate", err.sqlstate())
            }
        }
    }
}

/// Message and fix for an upstream connection failure.
fn upstream_error(e: &Entry<'_>, dbname: &str, cred: &Credential, err: &UpstreamError) -> (String, String) {
    let (db, index) = (e.db, e.index);
    let c = &db.credentials;
    let (role, mount) = (e.role(), e.secrets_mount());
    match err {
        UpstreamError::Server(se) if se.code == "28P01" => (
            format!("the server refused the credential Vault issued ({se})"),
            match c.kind() {
                CredentialKind::Database => format!(
                    "the Postgres role Vault created for {mount}/roles/{role} cannot log in: check its creation_statements (LOGIN, PASSWORD, VALID UNTIL) and that the database connection in Vault points at this server"
                ),
                CredentialKind::Static => format!(
                    "Vault's password for static role {role:?} is not the role's password on this server: rotate it (`bao write -f {mount}/rotate-role/{role}`), and make sure nothing else changes it"
                ),
                CredentialKind::Kv => format!(
                    "the KV secret at {} does not hold {}'s current password: update the secret (or the role's password)",
                    c.vault_path(),
                    cred.username
                ),
            },
        ),
        UpstreamError::Server(se) if se.code == "3D000" => (
            format!("the server has no database {dbname:?} ({se})"),
            if db.dbname.is_some() {
                format!("correct databases[{index}].dbname, or create the database")
            } else {
                "this entry has no dbname (clients choose): pass --dbname with a database a client would use".to_string()
            },
        ),
        UpstreamError::Server(se) if se.code == "28000" => (
            format!("the server refused the connection ({se})"),
            format!("allow user {} (or its group) from this host in pg_hba.conf", cred.username),
        ),
        UpstreamError::Server(se) if se.code == "42501" => (
            format!("the server refused the connection ({se})"),
            format!("GRANT CONNECT ON DATABASE {dbname} to the role Vault's credentials belong to"),
        ),
        UpstreamError::Server(se) => (
            format!("the server refused the connection ({se})"),
            "see the server's message".to_string(),
        ),
        other => {
            let fix = other
                .to_pg_error(&db.name)
                .and_then(|p| p.hint)
                .unwrap_or_else(|| "see the message".into());
            (other.to_string(), fix)
        }
    }
}
