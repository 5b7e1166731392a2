//! uid → user name and gid → group name, cached.
//!
//! Resolution goes through the system's user database (NSS on Linux,
//! Directory Services on macOS), which can be slow (LDAP) and is on the exec
//! path, so answers are cached for a short time: long enough that a burst of
//! execs costs one lookup, short enough that a renamed user is seen soon.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(60);
/// Bound on each map, so a flood of distinct ids cannot grow memory.
const MAX_ENTRIES: usize = 4096;

type Entry = (Option<Arc<str>>, Instant);

/// Cached user and group names.
#[derive(Debug, Default)]
pub struct Names {
    users: Mutex<HashMap<u32, Entry>>,
    groups: Mutex<HashMap<u32, Entry>>,
}

impl Names {
    /// The user name for `uid`, or `None` if the user database has none.
    pub fn user(&self, uid: u32) -> Option<Arc<str>> {
        cached(&self.users, uid, || {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name)
        })
    }

    /// The group name for `gid`, or `None` if the group database has none.
    pub fn group(&self, gid: u32) -> Option<Arc<str>> {
        cached(&self.groups, gid, || {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name)
        })
    }
}

fn cached(
    map: &Mutex<HashMap<u32, Entry>>,
    id: u32,
    resolve: impl FnOnce() -> Option<String>,
) -> Option<Arc<str>> {
    let now = Instant::now();
    if let Ok(map) = map.lock()
        && let Some((name, at)) = map.get(&id)
        && now.duration_since(*at) < TTL
    {
        return name.clone();
    }
    // Resolve without holding the lock: a slow directory must not stall
    // other workers that only need cached names.
    let name: Option<Arc<str>> = resolve().map(Arc::from);
    if let Ok(mut map) = map.lock() {
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, (_, at)| now.duration_since(*at) < TTL);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(id, (name.clone(), now));
    }
    name
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
}
