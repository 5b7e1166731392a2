//! Parsing `/proc/PID/*` text. Pure functions on strings, so they are
//! tested with fixtures; the fanotify gate does the reading.
//!
//! At `FAN_OPEN_EXEC_PERM` time the process has not exec'd yet: these are
//! the credentials it execs *with* (a setuid bit on the new program is not
//! applied yet), and its parent is the new program's parent.

/// The fields of `/proc/PID/status` a decision needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// Parent pid (`PPid`).
    pub ppid: u32,
    /// Real uid (first `Uid` field): the user who started the program,
    /// which is who a policy's `users` scope means even under a setuid helper.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Real gid.
    pub gid: u32,
    /// Effective gid.
    pub egid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Parses `/proc/PID/status`; `None` if a required field is missing.
pub fn parse_status(text: &str) -> Option<ProcStatus> {
    let mut status = ProcStatus::default();
    let (mut have_ppid, mut have_uid, mut have_gid) = (false, false, false);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut numbers = value.split_whitespace().map(str::parse::<u32>);
        match key {
            "PPid" => {
                status.ppid = numbers.next()?.ok()?;
                have_ppid = true;
            }
            "Uid" => {
                status.uid = numbers.next()?.ok()?;
                status.euid = numbers.next()?.ok()?;
                have_uid = true;
            }
            "Gid" => {
                status.gid = numbers.next()?.ok()?;
                status.egid = numbers.next()?.ok()?;
                have_gid = true;
            }
            "Groups" => {
                status.groups = numbers.filter_map(Result::ok).collect();
            }
            _ => {}
        }
    }
    (have_ppid && have_uid && have_gid).then_some(status)
}

/// Parses `/proc/PID/loginuid`; the kernel's "unset" value (u32::MAX) is `None`.
pub fn parse_loginuid(text: &str) -> Option<u32> {
    match text.trim().parse::<u32>() {
        Ok(u32::MAX) | Err(_) => None,
        Ok(uid) => Some(uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tbash\nUmask:\t0022\nState:\tR (running)\nTgid:\t4242\n\
        Ngid:\t0\nPid:\t4242\nPPid:\t4100\nTracerPid:\t0\nUid:\t1000\t0\t0\t0\n\
        Gid:\t1000\t27\t1000\t1000\nFDSize:\t256\nGroups:\t4 24 27 1000 \nNStgid:\t4242\n";

    #[test]
    fn status_fields() {
        let status = parse_status(STATUS).unwrap();
        assert_eq!(
            status,
            ProcStatus {
                ppid: 4100,
                uid: 1000,
                euid: 0,
                gid: 1000,
                egid: 27,
                groups: vec![4, 24, 27, 1000],
            }
        );
    }

    #[test]
    fn empty_groups_and_missing_fields() {
        let no_groups = STATUS.replace("Groups:\t4 24 27 1000 ", "Groups:\t");
        assert_eq!(parse_status(&no_groups).unwrap().groups, Vec::<u32>::new());
        assert_eq!(parse_status(&STATUS.replace("PPid:\t4100\n", "")), None);
        assert_eq!(parse_status("garbage"), None);
        assert_eq!(parse_status(&STATUS.replace("Uid:\t1000", "Uid:\tx")), None);
    }

    #[test]
    fn loginuid() {
        assert_eq!(parse_loginuid("1000\n"), Some(1000));
        assert_eq!(parse_loginuid("4294967295"), None);
        assert_eq!(parse_loginuid(""), None);
    }
}
