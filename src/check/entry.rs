//! One database entry: reading its credential (or saying which capability is missing, and
//! where), the lease endpoints it needs, then the upstream and lease-lifetime checks that need
//! the credential, and revoking the test lease.

use super::login::{Capabilities, TokenInfo};
use super::report::{fmt_duration, Check, Report, Verdict};
use super::Run;
use crate::config::{CredentialKind, DatabaseConfig};
use crate::policy::{self, Requirement};
use crate::upstream::UpstreamSettings;
use crate::vault::{self, Credential, VaultError, VaultToken};

/// The database entry under check.
pub(super) struct Entry<'a> {
    /// Its position in `databases`, as config keys name it (`databases[0].credentials.role`).
    pub(super) index: usize,
    pub(super) db: &'a DatabaseConfig,
    pub(super) upstream: &'a UpstreamSettings,
}

impl Entry<'_> {
    /// The Vault database role (empty for KV, whose messages never name one).
    pub(super) fn role(&self) -> &str {
        self.db.credentials.source.role().unwrap_or_default()
    }

    /// The database secrets engine's mount (empty for KV).
    pub(super) fn secrets_mount(&self) -> &str {
        self.db.credentials.source.mount().unwrap_or_default()
    }
}

/// The check's token and what the run learned about it, the same for every entry.
pub(super) struct Access<'a> {
    pub(super) token: &'a VaultToken,
    pub(super) info: &'a TokenInfo,
    /// What the config needs, path by path ([`policy::requirements`]).
    pub(super) reqs: &'a [Requirement],
    /// None: Vault would not say (`sys/capabilities-self` failed); the reads themselves tell.
    pub(super) caps: Option<&'a Capabilities>,
}

impl Access<'_> {
    /// Known to be missing: Vault said what the token may do on `path`, and it is not `capability`.
    fn lacks(&self, path: &str, capability: &str) -> bool {
        self.caps
            .and_then(|c| c.get(path))
            .is_some_and(|rule| !rule.allows(capability))
    }
}

impl Run<'_> {
    /// Everything about one database entry: read, lease capabilities, lease TTLs, upstream,
    /// revocation of the test lease.
    pub(super) async fn database(&self, r: &mut Report, e: &Entry<'_>, access: &Access<'_>) {
        let db = e.db;
        let path = db.credentials.vault_path();
        let upstream_title = format!("upstream {}", e.upstream.addr());
        let cred = if access.lacks(&path, "read") {
            r.push(self.missing_capability(e, &path, "read", access.info, None));
            None
        } else {
            match vault::secrets::fetch(&self.client, &access.token.token, &db.credentials).await {
                Ok(c) => {
                    r.push(read_ok(db, &c));
                    Some(c)
                }
                Err(err) if err.is_denied() => {
                    r.push(self.missing_capability(e, &path, "read", access.info, Some(&err)));
                    None
                }
                Err(err) => {
                    r.push(self.read_failure(e, &err));
                    None
                }
            }
        };
        let (can_renew, can_revoke) = self.lease_endpoints(r, e, access);

        let Some(cred) = cred else {
            r.push(Check::new(
                &db.name,
                "upstream",
                upstream_title,
                Verdict::Skip,
                "not tried (no credential)",
            ));
            return;
        };
        r.push(self.upstream(e, &cred).await);
        for c in self.upstream_hosts(e, &cred).await {
            r.push(c);
        }
        if let Some(lease) = &cred.lease {
            for c in self.lease_ttl(e, access, lease, cred.fetched_at, can_renew).await {
                r.push(c);
            }
            r.push(self.revoke_lease(e, access.token, lease, can_revoke).await);
        }
    }

    /// The lease endpoints: needed by this entry even when its read failed. Returns whether the
    /// token may renew and revoke leases, as far as Vault said.
    fn lease_endpoints(&self, r: &mut Report, e: &Entry<'_>, access: &Access<'_>) -> (bool, bool) {
        let db = e.db;
        let lease_reqs: Vec<&Requirement> = access
            .reqs
            .iter()
            .filter(|q| q.path.starts_with("sys/leases/") && q.databases.contains(&db.name))
            .collect();
        if lease_reqs.is_empty() {
            return (false, false);
        }
        let title = format!(
            "leases ({})",
            lease_reqs
                .iter()
                .map(|q| q.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let missing: Vec<&&Requirement> = lease_reqs
            .iter()
            .filter(|q| access.lacks(&q.path, q.capability))
            .collect();
        let can_renew = lease_reqs.iter().any(|q| q.path == policy::LEASE_RENEW_PATH)
            && !missing.iter().any(|q| q.path == policy::LEASE_RENEW_PATH);
        let can_revoke = !missing.iter().any(|q| q.path == policy::LEASE_REVOKE_PATH);
        if missing.is_empty() {
            let (verdict, how) = if access.caps.is_some() {
                (Verdict::Pass, "\"update\" granted")
            } else {
                (Verdict::Skip, "not verified (capabilities unknown)")
            };
            r.push(Check::new(&db.name, "leases", title, verdict, how));
        }
        for q in missing {
            let alternative = if q.path == policy::LEASE_RENEW_PATH {
                format!("databases[{}].credentials.renew_in_use = false", e.index)
            } else {
                format!(
                    "databases[{}].credentials.revoke_unused = false and vault.revoke_on_shutdown = false",
                    e.index
                )
            };
            // Not fatal: dbward stops asking after the first 403 (until the next login) and
            // lets the lease run out, so this is a warning naming the knob.
            let mut c = self
                .missing_capability(e, &q.path, q.capability, access.info, None)
                .fix(format!(
                    "add path {:?} {{ capabilities = [\"update\"] }} to {}, or set {alternative}; `dbward policy --config {}` prints the policy this config needs",
                    q.path,
                    access.info.editable_policies(),
                    self.config_file()
                ));
            c.verdict = Verdict::Warn;
            c.message.push_str(if q.path == policy::LEASE_RENEW_PATH {
                "; leases still used by sessions will end at their TTL instead of being renewed"
            } else {
                "; replaced leases will be left to expire instead of being revoked"
            });
            r.push(c);
        }
        (can_renew, can_revoke)
    }

    /// The token may not do `capability` on `path`.
    fn missing_capability(
        &self,
        e: &Entry<'_>,
        path: &str,
        capability: &str,
        info: &TokenInfo,
        denied: Option<&VaultError>,
    ) -> Check {
        let db = e.db;
        let key = match db.credentials.kind() {
            CredentialKind::Kv => format!("databases[{}].credentials.path", e.index),
            _ => format!("databases[{}].credentials.role (or .mount)", e.index),
        };
        let verb = if capability == "read" {
            format!("read {path}")
        } else {
            format!("{capability} {path}")
        };
        let mut message = format!(
            "missing capability {capability:?} (token policies: {}; issued by {})",
            info.policies_text(),
            self.login
        );
        if let Some(err) = denied {
            message.push_str(&format!("; {err}"));
        }
        Check::new(&db.name, if path.starts_with("sys/leases/") { "leases" } else { "read" }, verb, Verdict::Fail, message)
            .fix(format!(
                "add path {path:?} {{ capabilities = [{capability:?}] }} to {}, or correct {key} if the config is what is wrong; `dbward policy --config {}` prints the policy this config needs",
                info.editable_policies(),
                self.config_file()
            ))
            .detail("path", path)
            .detail("missing", vec![capability])
            .detail("policies", info.policies.clone())
            .detail("issued_by", self.login.clone())
    }

    fn read_failure(&self, e: &Entry<'_>, err: &VaultError) -> Check {
        let c = &e.db.credentials;
        let index = e.index;
        let path = c.vault_path();
        let (role, mount) = (e.role(), e.secrets_mount());
        let fix = match (err, c.kind()) {
            (VaultError::Status { status: 404, .. }, CredentialKind::Kv) => Some(format!(
                "no secret at {path}: write it there, or correct databases[{index}].credentials.path (the KV v2 API path, with /data/ after the mount)"
            )),
            (VaultError::Status { status: 404, .. }, _) => Some(format!(
                "nothing answers at {path}: is a database secrets engine mounted at {mount}/ (databases[{index}].credentials.mount)?"
            )),
            (VaultError::Status { errors, .. }, _) if says_no_role(errors) => Some(format!(
                "create Vault role {role:?} ({mount}/{}roles/{role}), or correct databases[{index}].credentials.role",
                if c.kind() == CredentialKind::Static { "static-" } else { "" }
            )),
            (VaultError::Malformed { problem: vault::error::Malformed::MissingKey { .. }, .. }, CredentialKind::Kv) => Some(format!(
                "set databases[{index}].credentials.username_key / password_key to the secret's keys, or add the keys to the secret"
            )),
            (VaultError::Malformed { .. }, CredentialKind::Kv) => {
                Some(format!("check that {path} is a KV v2 secret with a current (not deleted) version"))
            }
            _ if err.is_unavailable() => Some("check that Vault is up, unsealed and reachable".into()),
            _ => None,
        };
        Check::new(
            &e.db.name,
            "read",
            format!("read {path}"),
            Verdict::Fail,
            err.to_string(),
        )
        .fix_opt(fix)
        .detail("path", path)
        .detail("issued_by", self.login.clone())
    }

    async fn revoke_lease(&self, e: &Entry<'_>, token: &VaultToken, lease: &vault::Lease, needed: bool) -> Check {
        let title = format!("cleanup: revoke test lease {}", lease.id);
        match vault::secrets::revoke_lease(&self.client, &token.token, &lease.id).await {
            Ok(()) => Check::new(&e.db.name, "revoke_lease", title, Verdict::Pass, "revoked")
                .detail("lease_id", lease.id.clone()),
            Err(err) => {
                let verdict = if needed { Verdict::Fail } else { Verdict::Warn };
                Check::new(&e.db.name, "revoke_lease", title, verdict, format!("not revoked: {err}"))
                    .fix(format!(
                        "dbward revokes leases at sys/leases/revoke: grant \"update\" on it; this lease goes with the check's token, or revoke it by hand: `bao lease revoke {}`",
                        lease.id
                    ))
                    .detail("lease_id", lease.id.clone())
            }
        }
    }
}

/// Vault's messages for a secrets role that does not exist ("unknown role", "role not found").
fn says_no_role(errors: &[String]) -> bool {
    errors.iter().any(|m| {
        let m = m.to_lowercase();
        m.contains("unknown role") || m.contains("not found")
    })
}

fn read_ok(db: &DatabaseConfig, c: &Credential) -> Check {
    let mut message = format!("ok, user {}", c.username);
    match (&c.lease, db.credentials.kind()) {
        (Some(l), _) => message.push_str(&format!(
            ", lease {} ({})",
            fmt_duration(l.duration),
            if l.renewable { "renewable" } else { "not renewable" }
        )),
        (None, CredentialKind::Static) => {
            if let Some(v) = c.valid_for {
                message.push_str(&format!(", password rotates in {}", fmt_duration(v)));
            }
        }
        _ => {}
    }
    Check::new(&db.name, "read", format!("read {}", c.path), Verdict::Pass, message)
        .detail("path", c.path.clone())
        .detail("user", c.username.clone())
}
