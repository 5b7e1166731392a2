//! Watching sudoers during admin sessions: a temporary administrator can
//! make themselves permanent by planting a sudoers entry (the classic being
//! `alice ALL=(ALL) NOPASSWD: ALL` in `/etc/sudoers.d`). Each session keeps
//! the sudoers files' lines at its start; lines added since that grant its
//! user something are found, audited, and (by default) taken out again.
//!
//! The analysis is pure and works on lines, so it is tested here without
//! touching `/etc`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The sudoers files' lines at one moment: path → lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot(pub BTreeMap<String, Vec<String>>);

/// The largest sudoers file read; a bigger one is reported, not parsed.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

impl Snapshot {
    /// Reads `paths`: each a file, or a directory whose regular files are
    /// read (not recursively, as sudo's `@includedir`). Unreadable files
    /// are left out (and so count as new if they become readable).
    pub fn take(paths: &[PathBuf]) -> Snapshot {
        let mut files = BTreeMap::new();
        for path in paths {
            match fs::metadata(path) {
                Ok(meta) if meta.is_dir() => {
                    let Ok(entries) = fs::read_dir(path) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        read_into(&entry.path(), &mut files);
                    }
                }
                Ok(_) => read_into(path, &mut files),
                Err(_) => {}
            }
        }
        Snapshot(files)
    }

    /// As stored with the session.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }

    /// From the session's record; a missing or damaged baseline is empty,
    /// so every entry for the user then counts as added (safe side).
    pub fn from_json(text: Option<&str>) -> Snapshot {
        text.and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default()
    }
}

fn read_into(path: &Path, files: &mut BTreeMap<String, Vec<String>>) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_file() {
        return;
    }
    let text = if meta.len() > MAX_FILE_BYTES {
        // Too big to be a real sudoers file: one line that names it, so a
        // change is still seen.
        format!("# epm: file of {} bytes not read", meta.len())
    } else {
        match fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => return,
        }
    };
    files.insert(
        path.to_string_lossy().into_owned(),
        text.lines().map(str::to_owned).collect(),
    );
}

/// Lines added to one file since the baseline that grant the user
/// something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file.
    pub path: String,
    /// The file did not exist at the session's start.
    pub new_file: bool,
    /// The added lines that concern the user.
    pub lines: Vec<String>,
}

/// What changed between `baseline` and `now` in the user's favour.
pub fn findings(
    baseline: &Snapshot,
    now: &Snapshot,
    user: &str,
    groups: &[String],
) -> Vec<Finding> {
    let mut found = Vec::new();
    for (path, lines) in &now.0 {
        let before = baseline.0.get(path);
        let added: Vec<String> = lines
            .iter()
            .filter(|line| before.is_none_or(|old| !old.contains(line)))
            .filter(|line| concerns(line, user, groups))
            .cloned()
            .collect();
        if !added.is_empty() {
            found.push(Finding {
                path: path.clone(),
                new_file: before.is_none(),
                lines: added,
            });
        }
    }
    found
}

/// Whether a sudoers line could give `user` rights: a user specification
/// for them, for `ALL`, or for one of their groups (`%group`), an alias
/// naming them, or an include (which can pull in anything).
pub fn concerns(line: &str, user: &str, groups: &[String]) -> bool {
    let line = line.trim();
    // `#include` and `#includedir` are directives, not comments.
    if line.starts_with("#include") || line.starts_with("@include") {
        return true;
    }
    let code = match line.split_once('#') {
        Some((code, _)) => code.trim(),
        None => line,
    };
    if code.is_empty() || code.starts_with("Defaults") {
        return false;
    }
    let words: Vec<&str> = code
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == ':')
        .filter(|w| !w.is_empty())
        .collect();
    let Some(first) = words.first() else {
        return false;
    };
    if first.ends_with("_Alias") {
        return words.iter().skip(2).any(|w| names_user(w, user, groups));
    }
    names_user(first, user, groups)
}

fn names_user(word: &str, user: &str, groups: &[String]) -> bool {
    let word = word.trim_start_matches('!');
    word == user
        || word == "ALL"
        || word
            .strip_prefix('%')
            .is_some_and(|g| groups.iter().any(|mine| mine == g))
}

/// Takes a finding out: a new file is deleted; from an existing file only
/// the added lines are removed, writing a copy with the same owner and mode
/// and renaming it over the file, so sudo never reads half a file.
pub fn remove(finding: &Finding) -> io::Result<()> {
    let path = Path::new(&finding.path);
    if finding.new_file {
        return match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        };
    }
    let meta = fs::metadata(path)?;
    let text = String::from_utf8_lossy(&fs::read(path)?).into_owned();
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !finding.lines.iter().any(|bad| bad == line))
        .collect();
    let mut body = kept.join("\n");
    body.push('\n');
    let tmp = path.with_extension("epm-tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(body.as_bytes())?;
        file.sync_all()?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn groups() -> Vec<String> {
        vec!["alice".into(), "staff".into()]
    }

    #[test]
    fn lines_that_give_the_user_rights() {
        for line in [
            "alice ALL=(ALL) NOPASSWD: ALL",
            "alice,bob ALL=(ALL) ALL",
            "%staff ALL=(ALL:ALL) NOPASSWD:ALL",
            "ALL ALL=(ALL) NOPASSWD: ALL",
            "User_Alias TEMPS = bob, alice",
            "#includedir /tmp/evil",
            "@include /home/alice/sudoers",
            "  alice   ALL = (root) /usr/bin/apt  # comment",
        ] {
            assert!(concerns(line, "alice", &groups()), "{line}");
        }
        for line in [
            "# alice ALL=(ALL) ALL",
            "bob ALL=(ALL) ALL",
            "%admins ALL=(ALL) ALL",
            "Defaults env_reset",
            "Defaults:alice !requiretty",
            "",
            "malice ALL=(ALL) ALL",
        ] {
            assert!(!concerns(line, "alice", &groups()), "{line}");
        }
    }

    #[test]
    fn only_added_lines_count_and_new_files_are_marked() {
        let mut baseline = Snapshot::default();
        baseline.0.insert(
            "/etc/sudoers".into(),
            vec!["root ALL=(ALL) ALL".into(), "%staff ALL=(ALL) ALL".into()],
        );
        let mut now = baseline.clone();
        assert!(findings(&baseline, &now, "alice", &groups()).is_empty());
        now.0
            .get_mut("/etc/sudoers")
            .unwrap()
            .push("alice ALL=(ALL) NOPASSWD: ALL".into());
        now.0.insert(
            "/etc/sudoers.d/zz".into(),
            vec!["# planted".into(), "alice ALL=(ALL) NOPASSWD: ALL".into()],
        );
        now.0.insert(
            "/etc/sudoers.d/bob".into(),
            vec!["bob ALL=(ALL) ALL".into()],
        );
        let found = findings(&baseline, &now, "alice", &groups());
        assert_eq!(
            found,
            vec![
                Finding {
                    path: "/etc/sudoers".into(),
                    new_file: false,
                    lines: vec!["alice ALL=(ALL) NOPASSWD: ALL".into()],
                },
                Finding {
                    path: "/etc/sudoers.d/zz".into(),
                    new_file: true,
                    lines: vec!["alice ALL=(ALL) NOPASSWD: ALL".into()],
                },
            ]
        );
    }

    #[test]
    fn snapshots_read_files_and_directories_and_removal_keeps_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("sudoers");
        let drop_in = dir.path().join("sudoers.d");
        fs::create_dir(&drop_in).unwrap();
        fs::write(&main, "root ALL=(ALL) ALL\n").unwrap();
        fs::set_permissions(&main, fs::Permissions::from_mode(0o440)).unwrap();
        let paths = vec![main.clone(), drop_in.clone()];
        let baseline = Snapshot::take(&paths);
        assert_eq!(
            Snapshot::from_json(Some(&baseline.to_json())),
            baseline,
            "stored and read back"
        );

        fs::write(&main, "root ALL=(ALL) ALL\nalice ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        fs::write(drop_in.join("evil"), "alice ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        let found = findings(&baseline, &Snapshot::take(&paths), "alice", &groups());
        assert_eq!(found.len(), 2);
        for finding in &found {
            remove(finding).unwrap();
        }
        assert_eq!(fs::read_to_string(&main).unwrap(), "root ALL=(ALL) ALL\n");
        assert_eq!(
            fs::metadata(&main).unwrap().permissions().mode() & 0o777,
            0o440
        );
        assert!(!drop_in.join("evil").exists());
        assert!(findings(&baseline, &Snapshot::take(&paths), "alice", &groups()).is_empty());
        assert_eq!(Snapshot::from_json(Some("garbage")), Snapshot::default());
    }
}
