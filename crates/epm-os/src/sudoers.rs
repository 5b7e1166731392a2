//! Watching sudoers during admin sessions: a temporary administrator can
//! make themselves permanent by planting a sudoers entry (the classic being
//! `alice ALL=(ALL) NOPASSWD: ALL` in `/etc/sudoers.d`, or the same written
//! as `#1001 ALL=…`, `root, "alice" ALL=…`, through an alias, or as a
//! symlink in `sudoers.d`). Each session keeps the sudoers files' contents
//! at its start ([`Snapshot`]: symlinks recorded as such, with their
//! target's lines). A file that changed since is read by sudo's own parser
//! (`cvtsudoers -f json`), before and after, and the entries the change
//! added are judged on the parsed structure: a user specification for the
//! user (by name or uid), `ALL`, one of their groups, an alias or netgroup
//! (which could name them), any new `Defaults`, any changed alias, and any
//! `@include` directive count. No text pattern decides. Where the parser is
//! missing or cannot read the file, the change counts (safe side).

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
    // sudo follows a symlink in sudoers.d: record it as one, with what it
    // points at, so planting or re-pointing one is a change.
    let link = meta
        .file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok())
        .flatten();
    let meta = match (&link, fs::metadata(path)) {
        (Some(_), Ok(target)) => target,
        (Some(target), Err(_)) => {
            files.insert(
                path.to_string_lossy().into_owned(),
                vec![format!("# epm: symbolic link to {}", target.display())],
            );
            return;
        }
        (None, _) => meta,
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
    let mut lines: Vec<String> = link
        .map(|target| format!("# epm: symbolic link to {}", target.display()))
        .into_iter()
        .collect();
    lines.extend(text.lines().map(str::to_owned));
    files.insert(path.to_string_lossy().into_owned(), lines);
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

/// Who a finding is judged for.
#[derive(Debug, Clone, Default)]
pub struct Account {
    /// User name.
    pub user: String,
    /// User id.
    pub uid: u32,
    /// Group names.
    pub groups: Vec<String>,
    /// Group ids.
    pub gids: Vec<u32>,
}

/// What changed between `baseline` and `now` in the user's favour, as
/// sudo's parser reads each changed file before and after.
pub fn findings(baseline: &Snapshot, now: &Snapshot, account: &Account) -> Vec<Finding> {
    let mut found = Vec::new();
    for (path, lines) in &now.0 {
        let before = baseline.0.get(path);
        if before == Some(lines) {
            continue;
        }
        let added: Vec<String> = lines
            .iter()
            .filter(|line| before.is_none_or(|old| !old.contains(line)))
            .cloned()
            .collect();
        let includes = added.iter().any(|l| {
            let l = l.trim_start();
            l.starts_with("#include") || l.starts_with("@include")
        });
        let concerns = includes
            || match (parse(lines), parse(before.map_or(&[][..], Vec::as_slice))) {
                (Some(after), Some(before)) => new_entries(&before, &after)
                    .iter()
                    .any(|(section, entry)| entry_concerns(section, entry, account)),
                // Unreadable to sudo's parser: count it.
                _ => true,
            };
        if concerns {
            found.push(Finding {
                path: path.clone(),
                new_file: before.is_none(),
                lines: if added.is_empty() {
                    lines.clone()
                } else {
                    added
                },
            });
        }
    }
    found
}

/// sudo's parser's reading of one sudoers text, as JSON (`None` when
/// `cvtsudoers` is missing or cannot read it). The text goes through a
/// private temporary file; its includes are read as sudo would.
fn parse(lines: &[String]) -> Option<serde_json::Value> {
    let mut file = tempfile::Builder::new()
        .prefix("epm-sudoers-")
        .tempfile()
        .ok()?;
    for line in lines {
        writeln!(file, "{line}").ok()?;
    }
    file.flush().ok()?;
    let output = std::process::Command::new(CVTSUDOERS)
        .args(["-f", "json", "-i", "sudoers"])
        .arg(file.path())
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        // Nothing in it (comments only).
        return Some(serde_json::Value::Object(serde_json::Map::new()));
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// sudo's converter, which parses sudoers exactly as sudo does.
const CVTSUDOERS: &str = "cvtsudoers";

/// What `after` has that `before` has not: new entries of each list
/// (`User_Specs`, `Defaults`), new or changed entries of each map (the
/// aliases), with the section's name.
fn new_entries(
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> Vec<(String, serde_json::Value)> {
    let mut found = Vec::new();
    let Some(sections) = after.as_object() else {
        return found;
    };
    for (section, entries) in sections {
        let old = before.get(section);
        match entries {
            serde_json::Value::Array(list) => {
                for entry in list {
                    let known = old
                        .and_then(|o| o.as_array())
                        .is_some_and(|o| o.contains(entry));
                    if !known {
                        found.push((section.clone(), entry.clone()));
                    }
                }
            }
            serde_json::Value::Object(map) => {
                for (name, value) in map {
                    if old.and_then(|o| o.get(name)) != Some(value) {
                        found.push((section.clone(), value.clone()));
                    }
                }
            }
            other => {
                if old != Some(other) {
                    found.push((section.clone(), other.clone()));
                }
            }
        }
    }
    found
}

/// Whether a parsed entry could give the account something: a user
/// specification whose user list names them (by name, uid, `ALL`, one of
/// their groups, or an alias or netgroup, which could), anything else but
/// a user specification (a `Defaults`, an alias) always.
fn entry_concerns(section: &str, entry: &serde_json::Value, account: &Account) -> bool {
    if section != "User_Specs" {
        return true;
    }
    let Some(users) = entry.get("User_List").and_then(|u| u.as_array()) else {
        return true;
    };
    users.iter().any(|member| {
        if member.get("negated").and_then(serde_json::Value::as_bool) == Some(true) {
            return false;
        }
        let text = |key: &str| member.get(key).and_then(serde_json::Value::as_str);
        let number = |key: &str| member.get(key).and_then(serde_json::Value::as_u64);
        text("username").is_some_and(|n| n == account.user || n == "ALL")
            || number("userid").is_some_and(|n| n == u64::from(account.uid))
            || text("usergroup").is_some_and(|g| account.groups.iter().any(|m| m == g))
            || number("usergid").is_some_and(|g| account.gids.iter().any(|&m| u64::from(m) == g))
            || ["useralias", "netgroup", "nonunixgroup", "nonunixgroupid"]
                .iter()
                .any(|key| member.get(*key).is_some())
    })
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

    fn alice() -> Account {
        Account {
            user: "alice".into(),
            uid: 4242,
            groups: vec!["alice".into(), "staff".into()],
            gids: vec![4242, 50],
        }
    }

    fn parser_here() -> bool {
        let here = std::process::Command::new(CVTSUDOERS)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !here {
            eprintln!("skipped: cvtsudoers (sudo's parser) is not installed");
        }
        here
    }

    fn added(line: &str) -> Vec<Finding> {
        let mut baseline = Snapshot::default();
        baseline
            .0
            .insert("/etc/sudoers".into(), vec!["root ALL=(ALL) ALL".into()]);
        let mut now = baseline.clone();
        now.0.get_mut("/etc/sudoers").unwrap().push(line.to_owned());
        findings(&baseline, &now, &alice())
    }

    #[test]
    fn sudos_parser_finds_every_spelling_of_the_user() {
        if !parser_here() {
            return;
        }
        for line in [
            "alice ALL=(ALL) NOPASSWD: ALL",
            "#4242 ALL=(ALL) NOPASSWD: ALL",
            "root, \"alice\" ALL=(ALL) ALL",
            "root,alice ALL=(ALL) ALL",
            "%staff ALL=(ALL:ALL) NOPASSWD:ALL",
            "%#50 ALL=(ALL) ALL",
            "ALL ALL=(ALL) NOPASSWD: ALL",
            "User_Alias TEMPS = bob, alice",
            "Defaults:alice !authenticate",
            "Defaults env_keep += LD_PRELOAD",
            "@includedir /tmp/evil",
            "this is not sudoers (",
        ] {
            assert_eq!(added(line).len(), 1, "{line}");
        }
        for line in [
            "# alice ALL=(ALL) ALL",
            "bob ALL=(ALL) ALL",
            "%admins ALL=(ALL) ALL",
            "",
        ] {
            assert!(added(line).is_empty(), "{line}");
        }
    }

    #[test]
    fn only_changed_files_count_and_new_files_are_marked() {
        if !parser_here() {
            return;
        }
        let mut baseline = Snapshot::default();
        baseline.0.insert(
            "/etc/sudoers".into(),
            vec!["root ALL=(ALL) ALL".into(), "%staff ALL=(ALL) ALL".into()],
        );
        let mut now = baseline.clone();
        assert!(findings(&baseline, &now, &alice()).is_empty());
        now.0.insert(
            "/etc/sudoers.d/zz".into(),
            vec!["# planted".into(), "alice ALL=(ALL) NOPASSWD: ALL".into()],
        );
        now.0.insert(
            "/etc/sudoers.d/bob".into(),
            vec!["bob ALL=(ALL) ALL".into()],
        );
        let found = findings(&baseline, &now, &alice());
        assert_eq!(
            found,
            vec![Finding {
                path: "/etc/sudoers.d/zz".into(),
                new_file: true,
                lines: vec!["# planted".into(), "alice ALL=(ALL) NOPASSWD: ALL".into()],
            }]
        );
    }

    #[test]
    fn snapshots_read_files_directories_and_symlinks_and_removal_keeps_other_lines() {
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
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "alice ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, drop_in.join("link")).unwrap();
        let now = Snapshot::take(&paths);
        let link = now.0[&drop_in.join("link").display().to_string()].clone();
        assert!(link[0].starts_with("# epm: symbolic link to "), "{link:?}");
        let found = vec![
            Finding {
                path: main.display().to_string(),
                new_file: false,
                lines: vec!["alice ALL=(ALL) NOPASSWD: ALL".into()],
            },
            Finding {
                path: drop_in.join("link").display().to_string(),
                new_file: true,
                lines: link,
            },
        ];
        for finding in &found {
            remove(finding).unwrap();
        }
        assert_eq!(fs::read_to_string(&main).unwrap(), "root ALL=(ALL) ALL\n");
        assert_eq!(
            fs::metadata(&main).unwrap().permissions().mode() & 0o777,
            0o440
        );
        assert!(fs::symlink_metadata(drop_in.join("link")).is_err());
        assert!(elsewhere.exists(), "the link goes, not what it pointed at");
        assert_eq!(Snapshot::take(&paths), baseline);
        assert_eq!(Snapshot::from_json(Some("garbage")), Snapshot::default());
    }
}
