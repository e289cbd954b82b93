//! Who may connect to each entry: with no `allowed_users`/`allowed_groups` every local user,
//! including any service that can be made to open a loopback connection, gets the entry's
//! Vault-issued role. A warning, so `--strict` fails a deploy that forgot the allowlist.

use crate::config::DatabaseConfig;

use super::report::{Check, Verdict};

pub(super) fn local_callers(db: &DatabaseConfig) -> Check {
    let title = "local callers";
    match &db.allowed {
        Some(a) => Check::new(&db.name, "local_callers", title, Verdict::Pass, format!("only {}", a.describe())),
        None => Check::new(
            &db.name,
            "local_callers",
            title,
            Verdict::Warn,
            format!("no allowed_users or allowed_groups: {}", crate::peer::OPEN_ENTRY_RISK),
        )
        .fix(format!(
            "list who may connect in database entry {:?}: allowed_users = [\"<the application's user>\"] or allowed_groups = [\"<its group>\"]",
            db.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_without_allowlist_warns_and_one_with_it_passes() {
        let open = crate::config::test_config("", "kind = \"database\"\nrole = \"payments\"");
        let c = local_callers(&open.databases[0]);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.message
                .contains("any local user can connect as the Vault-issued role"),
            "{}",
            c.message
        );
        let closed =
            crate::config::test_config("allowed_users = [\"root\"]", "kind = \"database\"\nrole = \"payments\"");
        let c = local_callers(&closed.databases[0]);
        assert_eq!(
            (c.verdict, c.message.as_str()),
            (Verdict::Pass, "only allowed_users: root")
        );
    }
}
