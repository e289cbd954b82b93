//! `allowed_users` / `allowed_groups` of a database entry: which local callers may use it.
//! Names are resolved to ids here, at validation, so a typo is a config error naming the key and
//! the value, and the running daemon compares numbers only. The text as written is kept for the
//! refusal message, which quotes the rule a caller failed.

use nix::unistd::{Group, User};

use super::{err, ConfigError};

/// One listed user or group: its id, and how the file wrote it (`"payments"` or `"1001"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: u32,
    pub written: String,
}

/// The local callers an entry admits: a caller whose uid is in `users`, or who is a member of
/// one of `groups` (its primary group or a supplementary one), is admitted. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    pub users: Vec<Listed>,
    pub groups: Vec<Listed>,
}

impl Allowlist {
    pub fn admits_uid(&self, uid: u32) -> bool {
        self.users.iter().any(|u| u.id == uid)
    }

    pub fn admits_any_gid(&self, gids: &[u32]) -> bool {
        self.groups.iter().any(|g| gids.contains(&g.id))
    }

    /// The rule as the file wrote it: `allowed_users: payments, 1001; allowed_groups: payments-clients`.
    pub fn describe(&self) -> String {
        let list = |key: &str, l: &[Listed]| {
            (!l.is_empty()).then(|| {
                let names: Vec<&str> = l.iter().map(|x| x.written.as_str()).collect();
                format!("{key}: {}", names.join(", "))
            })
        };
        [list("allowed_users", &self.users), list("allowed_groups", &self.groups)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The entry's allowlist; None when neither key is given (every local caller is admitted).
pub(super) fn allowlist(
    i: usize,
    users: Option<Vec<String>>,
    groups: Option<Vec<String>>,
) -> Result<Option<Allowlist>, ConfigError> {
    if users.is_none() && groups.is_none() {
        return Ok(None);
    }
    let users = resolve(i, "allowed_users", users.unwrap_or_default(), |name| {
        User::from_name(name).map(|u| u.map(|u| u.uid.as_raw()))
    })?;
    let groups = resolve(i, "allowed_groups", groups.unwrap_or_default(), |name| {
        Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw()))
    })?;
    if users.is_empty() && groups.is_empty() {
        return Err(err(
            format!("databases[{i}].allowed_users"),
            "allowed_users and allowed_groups are both empty, which admits no one; list who may connect, or remove both keys to admit every local user",
        ));
    }
    Ok(Some(Allowlist { users, groups }))
}

/// Numeric strings are ids as they are (a uid need not have a passwd entry); names must exist.
fn resolve(
    i: usize,
    field: &str,
    written: Vec<String>,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<Vec<Listed>, ConfigError> {
    let what = if field == "allowed_users" { "user" } else { "group" };
    written
        .into_iter()
        .enumerate()
        .map(|(j, w)| {
            let key = format!("databases[{i}].{field}[{j}]");
            let id = match w.parse::<u32>() {
                Ok(id) => id,
                Err(_) if w.is_empty() => return Err(err(key, format!("{w:?} is not a {what} name or id"))),
                Err(_) => match lookup(&w) {
                    Ok(Some(id)) => id,
                    Ok(None) => {
                        return Err(err(
                            key,
                            format!("no {what} {w:?} on this host (names are resolved when the config is loaded); create it or write the numeric id"),
                        ))
                    }
                    Err(e) => return Err(err(key, format!("cannot look up {what} {w:?}: {e}"))),
                },
            };
            Ok(Listed { id, written: w })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(entry: &str) -> Result<Config, String> {
        let text = format!(
            "[vault]\naddress = \"http://127.0.0.1:8200\"\n[vault.auth]\nmethod = \"token\"\n\
             token_file = \"/nonexistent/token\"\n\n[[databases]]\nname = \"payments\"\n\
             listen = [\"127.0.0.1:6432\"]\nupstream = \"db.internal:5432\"\n{entry}\n\
             [databases.credentials]\nkind = \"database\"\nrole = \"payments\"\n"
        );
        Config::parse(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn names_resolve_to_ids_and_keep_their_spelling() {
        let c = parse("allowed_users = [\"root\", \"1001\"]\nallowed_groups = [\"root\"]").unwrap();
        let a = c.databases[0].allowed.as_ref().unwrap();
        assert_eq!(a.users.iter().map(|u| u.id).collect::<Vec<_>>(), [0, 1001]);
        assert_eq!(a.groups[0].id, 0);
        assert_eq!(a.describe(), "allowed_users: root, 1001; allowed_groups: root");
        assert!(a.admits_uid(1001) && !a.admits_uid(1002));
        assert!(a.admits_any_gid(&[5, 0]) && !a.admits_any_gid(&[5]));
    }

    #[test]
    fn unknown_names_and_empty_lists_name_key_and_value() {
        let e = parse("allowed_users = [\"root\", \"no-such-user-dbward\"]").unwrap_err();
        assert!(
            e.starts_with("databases[0].allowed_users[1]: no user \"no-such-user-dbward\" on this host"),
            "{e}"
        );
        let e = parse("allowed_groups = [\"no-such-group-dbward\"]").unwrap_err();
        assert!(
            e.starts_with("databases[0].allowed_groups[0]: no group \"no-such-group-dbward\""),
            "{e}"
        );
        let e = parse("allowed_users = []").unwrap_err();
        assert!(e.contains("admits no one"), "{e}");
        assert_eq!(parse("").unwrap().databases[0].allowed, None);
    }
}
