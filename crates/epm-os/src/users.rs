//! Users and their groups: uid → user name, gid → group name, a user's
//! groups (the one `getgrouplist` of EPM) and the machine's local accounts.
//!
//! Resolution goes through the system's user database (NSS on Linux,
//! Directory Services on macOS), which can be slow (LDAP). [`Names`] caches
//! answers for a short time, for the exec path: long enough that a burst of
//! execs costs one lookup, short enough that a renamed user is seen soon.
//! The free functions ask the database each time, for requests that are
//! rare (a justification, `policy explain`, an admin session).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(60);
/// Bound on each map, so a flood of distinct ids cannot grow memory.
const MAX_ENTRIES: usize = 4096;

type Entry = (Option<Arc<str>>, Instant);
type GroupsEntry = (Arc<[u32]>, Instant);

/// Cached user and group names.
#[derive(Debug, Default)]
pub struct Names {
    users: Mutex<HashMap<u32, Entry>>,
    groups: Mutex<HashMap<u32, Entry>>,
    memberships: Mutex<HashMap<(u32, u32), GroupsEntry>>,
}

impl Names {
    /// The user name for `uid`, or `None` if the user database has none.
    pub fn user(&self, uid: u32) -> Option<Arc<str>> {
        cached(&self.users, uid, || {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| Arc::from(u.name))
        })
    }

    /// The group name for `gid`, or `None` if the group database has none.
    pub fn group(&self, gid: u32) -> Option<Arc<str>> {
        cached(&self.groups, gid, || {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| Arc::from(g.name))
        })
    }

    /// The groups the user directory says `uid` belongs to, `gid` (its
    /// primary group) first; empty for a uid the directory does not know.
    /// For gates that cannot see a process's own groups (Endpoint
    /// Security): on macOS, `getgrouplist` asks Open Directory, which
    /// includes groups the user is in only by way of another group.
    pub fn member_groups(&self, uid: u32, gid: u32) -> Arc<[u32]> {
        cached(&self.memberships, (uid, gid), || match self.user(uid) {
            Some(name) => Arc::from(groups_of(&name, gid)),
            None => Arc::from([]),
        })
    }

    /// [`Names::member_groups`] if it is known and fresh, without asking the
    /// directory (for a thread that must not block).
    pub fn member_groups_if_cached(&self, uid: u32, gid: u32) -> Option<Arc<[u32]>> {
        fresh(&self.memberships, (uid, gid), Instant::now())
    }
}

/// The groups the user directory says `user` belongs to, `gid` (its
/// primary group) first: `getgrouplist(3)`, the whole list (on macOS, Open
/// Directory's, including groups the user is in by way of another group).
/// A user the directory does not know is in `gid` only.
pub fn groups_of(user: &str, gid: u32) -> Vec<u32> {
    group_list_from(user, gid, 32)
}

/// The names of `gids`, in order, without repeats; ids the group database
/// does not know are left out.
pub fn group_names(gids: &[u32]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(gids.len());
    for &gid in gids {
        if let Some(name) = group_name(gid)
            && !names.contains(&name)
        {
            names.push(name);
        }
    }
    names
}

/// The name of group `gid`, if the group database has it.
pub fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// An account as the user database knows it, with its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: std::path::PathBuf,
    /// Login shell (may be empty).
    pub shell: String,
}

impl Account {
    /// The account named `name`, if the user database has one.
    pub fn by_name(name: &str) -> Option<Account> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(Account::from)
    }

    /// The account of `uid`, if the user database has one.
    pub fn by_uid(uid: u32) -> Option<Account> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(Account::from)
    }

    /// Its group ids, primary first ([`groups_of`]).
    pub fn groups(&self) -> Vec<u32> {
        groups_of(&self.name, self.gid)
    }

    /// Its group names, primary first, without repeats.
    pub fn group_names(&self) -> Vec<String> {
        group_names(&self.groups())
    }
}

impl From<nix::unistd::User> for Account {
    fn from(user: nix::unistd::User) -> Account {
        Account {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            shell: user.shell.to_string_lossy().into_owned(),
        }
    }
}

/// A person's account on this machine, with their group names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUser {
    /// User name.
    pub name: String,
    /// Group names, primary first.
    pub groups: Vec<String>,
}

/// The device's people: accounts with a uid at or above the platform's
/// first regular uid ([`crate::paths::FIRST_REGULAR_UID`]), `nobody` left
/// out, at most 1000, sorted by name, with their groups.
pub fn local_users() -> Vec<LocalUser> {
    const MAX_USERS: usize = 1000;
    let nobody = 65_534;
    let mut users: Vec<LocalUser> = passwd_entries()
        .into_iter()
        .filter(|(_, uid)| *uid >= crate::paths::FIRST_REGULAR_UID && *uid != nobody)
        .take(MAX_USERS)
        .filter_map(|(name, _)| Account::by_name(&name))
        .map(|account| LocalUser {
            groups: account.group_names(),
            name: account.name,
        })
        .collect();
    users.sort_by(|a, b| a.name.cmp(&b.name));
    users.dedup_by(|a, b| a.name == b.name);
    users
}

/// Every (name, uid) in the passwd database.
fn passwd_entries() -> Vec<(String, u32)> {
    // getpwent walks process-wide state: one walker at a time.
    static WALK: Mutex<()> = Mutex::new(());
    let _guard = WALK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut entries = Vec::new();
    // SAFETY: setpwent/getpwent/endpwent are called under WALK, so no other
    // thread of this process walks the database meanwhile; each entry's
    // fields are copied before the next call may overwrite them, and a
    // null pw_name is skipped.
    unsafe {
        libc::setpwent();
        loop {
            let entry = libc::getpwent();
            if entry.is_null() {
                break;
            }
            let name_ptr = (*entry).pw_name;
            if name_ptr.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(name_ptr)
                .to_string_lossy()
                .into_owned();
            entries.push((name, (*entry).pw_uid));
        }
        libc::endpwent();
    }
    entries
}

/// `getgrouplist(3)` with room for `room` groups at first, growing the
/// buffer until they fit.
// The casts convert on Apple (`int`) and are no-ops elsewhere (`gid_t`).
#[allow(clippy::unnecessary_cast)]
fn group_list_from(user: &str, gid: u32, mut room: nix::libc::c_int) -> Vec<u32> {
    // Apple declares the groups as `int`, everyone else as `gid_t`.
    #[cfg(target_vendor = "apple")]
    type RawGid = nix::libc::c_int;
    #[cfg(not(target_vendor = "apple"))]
    type RawGid = nix::libc::gid_t;
    let Ok(user) = std::ffi::CString::new(user) else {
        return Vec::new();
    };
    loop {
        let mut groups: Vec<RawGid> = vec![0; room as usize];
        let mut count = room;
        // SAFETY: a C string, and a buffer of `count` elements of the type
        // the platform declares; getgrouplist writes at most `count` and
        // sets `count` to what it wrote (or, on Linux, to what it needs).
        let found = unsafe {
            nix::libc::getgrouplist(
                user.as_ptr(),
                gid as RawGid,
                groups.as_mut_ptr(),
                &mut count,
            )
        };
        if found >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            return groups.into_iter().map(|g| g as u32).collect();
        }
        if room >= 65_536 {
            return vec![gid];
        }
        room = room.saturating_mul(4).max(count).max(1);
    }
}

fn cached<K: std::hash::Hash + Eq + Copy, V: Clone>(
    map: &Mutex<HashMap<K, (V, Instant)>>,
    id: K,
    resolve: impl FnOnce() -> V,
) -> V {
    let now = Instant::now();
    if let Some(value) = fresh(map, id, now) {
        return value;
    }
    // Resolve without holding the lock: a slow directory must not stall
    // other workers that only need cached names.
    let value = resolve();
    if let Ok(mut map) = map.lock() {
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, at)| now.duration_since(*at) < TTL);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(id, (value.clone(), now));
    }
    value
}

/// The value cached for `id`, if it is younger than [`TTL`] at `now`.
fn fresh<K: std::hash::Hash + Eq, V: Clone>(
    map: &Mutex<HashMap<K, (V, Instant)>>,
    id: K,
    now: Instant,
) -> Option<V> {
    let map = map.lock().ok()?;
    let (value, at) = map.get(&id)?;
    (now.duration_since(*at) < TTL).then(|| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_unknown_ids_do_not() {
        let names = Names::default();
        assert_eq!(names.user(0).as_deref(), Some("root"));
        assert_eq!(
            names.group(0).as_deref(),
            Some(if cfg!(target_os = "macos") {
                "wheel"
            } else {
                "root"
            })
        );
        assert_eq!(names.user(3_999_999_999), None);
        // Cached: the second answer is the same.
        assert_eq!(names.user(0).as_deref(), Some("root"));
    }

    #[test]
    fn a_users_groups_are_what_id_says() {
        let names = Names::default();
        let root = names.member_groups(0, 0);
        let id = std::process::Command::new("id")
            .args(["-G", "root"])
            .output()
            .unwrap();
        let mut expected: Vec<u32> = String::from_utf8(id.stdout)
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        let mut got = root.to_vec();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert_eq!(root.first(), Some(&0), "the primary group comes first");
        assert!(names.member_groups(3_999_999_999, 3_999_999_999).is_empty());
        assert_eq!(names.member_groups_if_cached(0, 0), Some(root));
        assert_eq!(names.member_groups_if_cached(0, 65_534), None);
    }

    #[test]
    fn a_list_longer_than_the_buffer_is_read_whole() {
        // No room at first: the loop must grow the buffer, not give up.
        assert_eq!(group_list_from("root", 0, 0), groups_of("root", 0));
        // A user the directory does not know is in its primary group only.
        assert_eq!(groups_of("no-such-user-epm", 12345), [12345]);
    }

    #[test]
    fn group_names_keep_order_and_drop_repeats_and_unknowns() {
        let root = group_name(0).unwrap();
        assert_eq!(
            group_names(&[0, 3_999_999_999, 0]),
            std::slice::from_ref(&root)
        );
        let account = Account::by_uid(0).unwrap();
        assert_eq!(account.name, "root");
        assert_eq!(account.group_names().first(), Some(&root));
        assert_eq!(Account::by_name("root"), Some(account));
        assert_eq!(Account::by_name("no-such-user-epm"), None);
    }

    #[test]
    fn local_users_are_people_not_system_accounts() {
        let users = local_users();
        assert!(users.iter().all(|u| u.name != "root" && u.name != "nobody"));
        assert!(users.windows(2).all(|w| w[0].name < w[1].name));
    }
}
