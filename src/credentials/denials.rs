//! Background Vault operations Vault refused with 403. Only a policy change fixes a denial, so
//! retrying on a backoff would only send Vault a steady trickle of 403s from every instance: a
//! denied operation is not attempted again for that database entry until the next login (a new
//! token may carry other policies) or a config reload. Each denial is logged once, with the
//! path, the missing capability and the fix, and counted in
//! `dbward_vault_denied_total{database, operation}`.

use std::collections::HashMap;
use std::sync::Mutex;

/// A background operation on leases, with what a policy must grant for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LeaseOp {
    Renew,
    Revoke,
}

impl LeaseOp {
    /// The `operation` label (the same as `dbward_vault_requests_total`'s).
    pub(crate) fn label(self) -> &'static str {
        match self {
            LeaseOp::Renew => "renew",
            LeaseOp::Revoke => "revoke",
        }
    }

    pub(crate) fn path(self) -> &'static str {
        match self {
            LeaseOp::Renew => "sys/leases/renew",
            LeaseOp::Revoke => "sys/leases/revoke",
        }
    }

    /// What to change: the capability to grant, or the knob that stops dbward asking.
    pub(crate) fn fix(self, database: &str) -> String {
        let knob = |key: &str| format!("credentials.{key} = false in database entry {database:?}");
        match self {
            LeaseOp::Renew => format!(
                "grant path \"sys/leases/renew\" {{ capabilities = [\"update\"] }} (Vault's default policy has it), \
                 or set {}; until then leases still used by sessions end at their TTL",
                knob("renew_in_use")
            ),
            LeaseOp::Revoke => format!(
                "grant path \"sys/leases/revoke\" {{ capabilities = [\"update\"] }}, or set {}; until then replaced \
                 leases are left to expire",
                knob("revoke_unused")
            ),
        }
    }
}

/// Denied operations by database entry, each with the login generation it was denied under.
#[derive(Default)]
pub(crate) struct Denials {
    denied: Mutex<HashMap<(String, LeaseOp), u64>>,
}

impl Denials {
    /// Whether `op` was denied for `database` under this login (a newer login tries again).
    pub(crate) fn is_denied(&self, database: &str, op: LeaseOp, generation: u64) -> bool {
        self.denied
            .lock()
            .unwrap()
            .get(&(database.to_string(), op))
            .is_some_and(|&g| g >= generation)
    }

    /// Records a denial; true when it is news (not already known for this login): log it then.
    pub(crate) fn record(&self, database: &str, op: LeaseOp, generation: u64) -> bool {
        let mut denied = self.denied.lock().unwrap();
        let prev = denied.insert((database.to_string(), op), generation);
        prev.is_none_or(|g| g < generation)
    }

    /// A reload: the policy or the knobs may have changed; every operation is tried again.
    pub(crate) fn clear(&self) {
        self.denied.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_holds_until_a_newer_login_or_a_reload() {
        let d = Denials::default();
        assert!(!d.is_denied("d", LeaseOp::Revoke, 1));
        assert!(d.record("d", LeaseOp::Revoke, 1), "first denial is news");
        assert!(
            !d.record("d", LeaseOp::Revoke, 1),
            "the same denial is not logged twice"
        );
        assert!(d.is_denied("d", LeaseOp::Revoke, 1));
        assert!(!d.is_denied("d", LeaseOp::Renew, 1), "only the denied operation");
        assert!(!d.is_denied("e", LeaseOp::Revoke, 1), "only the denied entry");
        assert!(!d.is_denied("d", LeaseOp::Revoke, 2), "a new login tries again");
        assert!(
            d.record("d", LeaseOp::Revoke, 2),
            "denied again under the new login: news"
        );
        d.clear();
        assert!(!d.is_denied("d", LeaseOp::Revoke, 2), "a reload tries again");
    }

    #[test]
    fn the_fix_names_the_capability_and_the_knob() {
        let f = LeaseOp::Revoke.fix("payments");
        assert!(f.contains("\"sys/leases/revoke\""), "{f}");
        assert!(f.contains("[\"update\"]"), "{f}");
        assert!(
            f.contains("revoke_unused = false in database entry \"payments\""),
            "{f}"
        );
        assert!(LeaseOp::Renew.fix("payments").contains("renew_in_use = false"));
    }
}
