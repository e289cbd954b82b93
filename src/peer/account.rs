//! A caller's account in the user database: its name (for the refusal message) and every group
//! it is in: the passwd entry's primary group plus its `/etc/group` memberships
//! (`getgrouplist`, through NSS like `id` does).

use std::ffi::CString;

use nix::unistd::{getgrouplist, Uid, User};

/// What the user database says about a uid; a uid without a passwd entry has no name and no
/// groups (only `allowed_users` can admit it, by number).
#[derive(Debug, Default)]
pub(super) struct Account {
    pub(super) name: Option<String>,
    pub(super) gids: Vec<u32>,
}

/// Blocking: NSS may read files or ask a daemon. Lookup errors count as "no entry".
pub(super) fn lookup(uid: u32) -> Account {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Account::default();
    };
    let mut gids = vec![user.gid.as_raw()];
    if let Ok(name) = CString::new(user.name.as_str()) {
        if let Ok(all) = getgrouplist(&name, user.gid) {
            gids.extend(all.into_iter().map(|g| g.as_raw()));
        }
    }
    gids.sort_unstable();
    gids.dedup();
    Account {
        name: Some(user.name),
        gids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_group_root_and_unknown_uids_have_nothing() {
        let root = lookup(0);
        assert_eq!(root.name.as_deref(), Some("root"));
        assert!(root.gids.contains(&0));
        let none = lookup(4_000_000_000);
        assert!(none.name.is_none() && none.gids.is_empty());
    }
}
