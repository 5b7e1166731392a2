//! Time-boxed admin sessions: a user joins the admin group for a while,
//! and leaves it again however the daemon's life goes.
//!
//! The session is stored before the user is added, so whatever happens
//! next (crash, SIGKILL, reboot, update) a session exists for the next
//! start to end. It ends at the first of: its expiry by the trusted clock
//! (never earlier than a time seen before), its length measured on the
//! monotonic clock (a wall clock set back does not stretch it), a wall
//! clock jump, `epmctl admin end`, or, for a session found expired at
//! start, at once. A user who was in the group before their first session
//! is never removed. Sudoers files are compared with their state at the
//! session's start during and at the end of the session ([`epm_os::sudoers`]).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use epm_audit::AuditEvent;
use epm_ipc::{AdminSessionInfo, ElevationVerdict, UserEvent, Window};
use epm_policy::{Action, AdminSessionRule, SessionRequirement};
use epm_store::{AdminSession, IdentityKind, NewAdminSession, Store, SubjectIdentity};
use jiff::{SignedDuration, Timestamp};

use crate::config::{AdminSessionsConfig, SessionProcesses, SudoersChanges};
use crate::exec::audit::AuditSink;
use crate::exec::decider::Decider;
use crate::grants::clock::CLOCK_JUMP;
use crate::grants::flows::{Flows, Met, Requirement, Unmet, lock};
use crate::grants::grant_error::GrantError;
use crate::grants::session_leftovers;
use epm_os::sudoers::{self, Snapshot};

/// How often sessions are checked.
const TICK: Duration = Duration::from_secs(1);
/// The helper warns this long before the end, then [`LAST_WARNING`].
const FIRST_WARNING: SignedDuration = SignedDuration::from_secs(5 * 60);
/// See [`FIRST_WARNING`].
const LAST_WARNING: SignedDuration = SignedDuration::from_secs(60);

/// Audit event names.
pub(crate) mod events {
    /// A session started (or was renewed).
    pub(crate) const STARTED: &str = "admin_session_started";
    /// A session was refused.
    pub(crate) const DENIED: &str = "admin_session_denied";
    /// A session ended; `details.reason` says why.
    pub(crate) const REVOKED: &str = "admin_session_revoked";
    /// A sudoers entry for the session's user appeared.
    pub(crate) const SUDOERS_CHANGE: &str = "sudoers_change_found";
    /// A group change failed (it is retried).
    pub(crate) const FAILED: &str = "admin_session_error";
    /// A setuid or setgid file made during the session.
    pub(crate) const SETUID_FILE: &str = "setuid_file_found";
    /// A process that still carried the admin group at the session's end.
    pub(crate) const GROUP_PROCESS: &str = "admin_group_process_found";
    /// The wall clock was set (a jump past [`crate::grants::clock::CLOCK_JUMP`]; forward,
    /// it may also be the machine waking from sleep), whether or not a
    /// session was open: windows and expiry are judged by the trusted
    /// clock, and the log should say why times in it jump.
    pub(crate) const CLOCK_JUMP: &str = crate::grants::clock::CLOCK_JUMP_EVENT;
}

/// Adding users to groups and taking them out: the platform's directory.
pub(crate) trait GroupDirectory: Send + Sync + fmt::Debug {
    /// Whether `user` is in `group` (as a listed member).
    fn is_member(&self, user: &str, group: &str) -> io::Result<bool>;
    /// Adds `user` to `group`.
    fn add(&self, user: &str, group: &str) -> io::Result<()>;
    /// Removes `user` from `group`.
    fn remove(&self, user: &str, group: &str) -> io::Result<()>;
}

/// What to change in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupChange {
    /// Add the user.
    Add,
    /// Remove the user.
    Remove,
}

/// The command that makes a group change: `dseditgroup` (Directory
/// Services) on macOS, `gpasswd` elsewhere.
pub(crate) fn group_command(
    change: GroupChange,
    user: &str,
    group: &str,
) -> (&'static str, Vec<String>) {
    let user = user.to_owned();
    let group = group.to_owned();
    if cfg!(target_os = "macos") {
        let op = match change {
            GroupChange::Add => "-a",
            GroupChange::Remove => "-d",
        };
        (
            "/usr/sbin/dseditgroup",
            vec![
                "-o".into(),
                "edit".into(),
                op.into(),
                user,
                "-t".into(),
                "user".into(),
                group,
            ],
        )
    } else {
        let op = match change {
            GroupChange::Add => "--add",
            GroupChange::Remove => "--delete",
        };
        ("/usr/bin/gpasswd", vec![op.into(), user, group])
    }
}

/// This machine's groups, changed through [`group_command`].
#[derive(Debug, Default)]
pub(crate) struct SystemGroups;

impl SystemGroups {
    fn change(&self, change: GroupChange, user: &str, group: &str) -> io::Result<()> {
        let (program, args) = group_command(change, user, group);
        let program = if Path::new(program).exists() {
            program
        } else {
            // Debian has gpasswd in /usr/bin, others in /usr/sbin.
            program.rsplit('/').next().unwrap_or(program)
        };
        let output = Command::new(program)
            .args(&args)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl GroupDirectory for SystemGroups {
    fn is_member(&self, user: &str, group: &str) -> io::Result<bool> {
        if cfg!(target_os = "macos") {
            // Directory Services, not /etc/group, knows macOS groups.
            let status = Command::new("/usr/sbin/dseditgroup")
                .args(["-o", "checkmember", "-m", user, group])
                .output()?;
            return Ok(status.status.success());
        }
        let group = nix::unistd::Group::from_name(group)
            .map_err(io::Error::from)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no group {group}")))?;
        let primary = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .is_some_and(|u| u.gid == group.gid);
        Ok(primary || group.mem.iter().any(|m| m == user))
    }

    fn add(&self, user: &str, group: &str) -> io::Result<()> {
        self.change(GroupChange::Add, user, group)
    }

    fn remove(&self, user: &str, group: &str) -> io::Result<()> {
        self.change(GroupChange::Remove, user, group)
    }
}

/// A running session's in-memory state.
#[derive(Debug)]
struct Live {
    /// Its end on the monotonic clock.
    deadline: Instant,
    /// Warnings already sent (0, 1 or 2).
    warned: u8,
}

/// The admin sessions of this machine.
#[derive(Debug)]
pub(crate) struct AdminSessions {
    store: Arc<Mutex<Store>>,
    audit: AuditSink,
    decider: Weak<Decider>,
    flows: Arc<Flows>,
    config: AdminSessionsConfig,
    groups: Box<dyn GroupDirectory>,
    live: Mutex<HashMap<i64, Live>>,
    /// Starts, ends and ticks one at a time.
    changes: Mutex<()>,
    last_tick: Mutex<(Instant, Timestamp)>,
}

impl AdminSessions {
    /// Ends the sessions that expired while the daemon was not running,
    /// then starts the thread that ends the others in time.
    pub(crate) fn start(
        store: Arc<Mutex<Store>>,
        audit: AuditSink,
        decider: &Arc<Decider>,
        flows: Arc<Flows>,
        config: AdminSessionsConfig,
        groups: Box<dyn GroupDirectory>,
    ) -> io::Result<Arc<AdminSessions>> {
        let sessions = Arc::new(AdminSessions {
            store,
            audit,
            decider: Arc::downgrade(decider),
            flows,
            config,
            groups,
            live: Mutex::default(),
            changes: Mutex::default(),
            last_tick: Mutex::new((Instant::now(), Timestamp::now())),
        });
        sessions.recover();
        let weak = Arc::downgrade(&sessions);
        std::thread::Builder::new()
            .name("epm-admin-sessions".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    let Some(sessions) = weak.upgrade() else {
                        return;
                    };
                    sessions.tick();
                }
            })?;
        Ok(sessions)
    }

    fn now(&self) -> Timestamp {
        self.flows.clock().now()
    }

    fn active(&self) -> Vec<AdminSession> {
        match lock(&self.store).active_admin_sessions() {
            Ok(sessions) => sessions,
            Err(error) => {
                tracing::error!(%error, "cannot read admin sessions");
                Vec::new()
            }
        }
    }

    /// At start: sessions past their expiry end now; the others get their
    /// monotonic deadline from the time left.
    fn recover(&self) {
        let _changes = lock(&self.changes);
        let now = self.now();
        for session in self.active() {
            if session.session.expires_at <= now {
                self.revoke(&session, "expired_while_down", true);
            } else {
                let left = now.duration_until(session.session.expires_at);
                let left = Duration::try_from(left).unwrap_or_default();
                lock(&self.live).insert(
                    session.id,
                    Live {
                        deadline: Instant::now() + left,
                        warned: 0,
                    },
                );
            }
        }
    }

    /// One check of every session: clock jumps, expiry, warnings, sudoers.
    fn tick(&self) {
        let _changes = lock(&self.changes);
        let (mono, wall) = (Instant::now(), Timestamp::now());
        let (jumped, before) = {
            let mut last = lock(&self.last_tick);
            let before = last.1;
            let mono_step = mono.duration_since(last.0);
            let wall_step = before.duration_until(wall);
            *last = (mono, wall);
            let mono_step = SignedDuration::try_from(mono_step).unwrap_or(SignedDuration::MAX);
            let jumped = (wall_step - mono_step).abs() > CLOCK_JUMP;
            (jumped.then_some(wall_step - mono_step), before)
        };
        if let Some(by) = jumped {
            self.audit.send(
                AuditEvent::new(events::CLOCK_JUMP)
                    .with_reason(if by.is_negative() {
                        format!(
                            "the wall clock was set back by about {} s",
                            by.as_secs().unsigned_abs()
                        )
                    } else {
                        // The monotonic clock stops while the machine
                        // sleeps; the wall clock does not.
                        format!(
                            "the wall clock moved about {} s ahead of the monotonic clock: it was set forward, or the machine slept",
                            by.as_secs()
                        )
                    })
                    .with_detail("seconds", by.as_secs())
                    .with_detail("wall_before", before.to_string())
                    .with_detail("wall_after", wall.to_string())
                    .with_detail("trusted_now", self.now().to_string()),
            );
        }
        let jumped = jumped.is_some();
        let now = self.now();
        for session in self.active() {
            if jumped {
                self.revoke(&session, "clock_jump", true);
                continue;
            }
            let deadline = lock(&self.live).get(&session.id).map(|l| l.deadline);
            let mono_left = deadline.map(|d| d.saturating_duration_since(mono));
            if session.session.expires_at <= now || mono_left == Some(Duration::ZERO) {
                self.revoke(&session, "expired", true);
                continue;
            }
            self.check_sudoers(&session);
            let wall_left = now.duration_until(session.session.expires_at);
            let left = match mono_left.and_then(|m| SignedDuration::try_from(m).ok()) {
                Some(m) => wall_left.min(m),
                None => wall_left,
            };
            self.warn(&session, left);
        }
    }

    fn warn(&self, session: &AdminSession, left: SignedDuration) {
        let level = if left <= LAST_WARNING {
            2
        } else if left <= FIRST_WARNING {
            1
        } else {
            return;
        };
        {
            let mut live = lock(&self.live);
            let Some(entry) = live.get_mut(&session.id) else {
                return;
            };
            if entry.warned >= level {
                return;
            }
            entry.warned = level;
        }
        let minutes_left = u32::try_from((left.as_secs() + 59) / 60)
            .unwrap_or(1)
            .max(1);
        self.flows.notify(
            session.session.uid,
            &UserEvent::AdminSessionEnding {
                session: info(session),
                minutes_left,
            },
        );
    }

    /// Ends a session: out of the group (unless a member before), a last
    /// sudoers check, then marked revoked. If the group change fails the
    /// session stays open and the next tick tries again: a session is never
    /// marked ended while its user is still in the group.
    fn revoke(&self, session: &AdminSession, reason: &str, leave_group: bool) -> bool {
        let s = &session.session;
        let mut removed = false;
        if leave_group && !s.was_member_before {
            match self.groups.is_member(&s.user, &s.group) {
                Ok(false) => {}
                Ok(true) | Err(_) => match self.groups.remove(&s.user, &s.group) {
                    Ok(()) => removed = true,
                    Err(error) => {
                        tracing::error!(%error, user = s.user, group = s.group, "cannot end an admin session; retrying");
                        let mut event = AuditEvent::new(events::FAILED)
                            .with_detail("session_id", session.id)
                            .with_detail("group", s.group.as_str());
                        event.uid = Some(s.uid);
                        event.user = Some(s.user.clone());
                        event.reason = Some(error.to_string());
                        self.audit.send(event);
                        return false;
                    }
                },
            }
        }
        self.check_sudoers(session);
        if leave_group && !s.was_member_before {
            self.end_group_processes(session);
            self.check_setuid_files(session);
        }
        let now = self.now();
        match lock(&self.store).revoke_admin_session(session.id, now, reason) {
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "cannot mark an admin session ended");
                return false;
            }
        }
        lock(&self.live).remove(&session.id);
        let mut event = AuditEvent::new(events::REVOKED)
            .with_detail("session_id", session.id)
            .with_detail("group", s.group.as_str())
            .with_detail("reason", reason)
            .with_detail("removed_from_group", removed)
            .with_detail("was_member_before", s.was_member_before);
        event.uid = Some(s.uid);
        event.user = Some(s.user.clone());
        event.reason = Some(reason.to_owned());
        event.rule_id = s.rule_id.clone();
        self.audit.send(event);
        let mut ended = info(session);
        ended.ended_at = Some(now);
        ended.end_reason = Some(reason.to_owned());
        if reason != "renewed" {
            self.flows
                .notify(s.uid, &UserEvent::AdminSessionEnded(ended));
        }
        true
    }

    /// The user's processes that still carry the session's group once the
    /// user left it ([`session_leftovers::processes_with_group`]): ended
    /// (SIGKILL) or reported, per the configuration, each audited.
    fn end_group_processes(&self, session: &AdminSession) {
        let s = &session.session;
        let Some(gid) = nix::unistd::Group::from_name(&s.group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
        else {
            return;
        };
        let action = self.config.session_processes;
        for process in session_leftovers::processes_with_group(s.uid, gid) {
            let outcome = match action {
                SessionProcesses::End => nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(process.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .map_err(|e| e.to_string()),
                SessionProcesses::Report => Ok(()),
            };
            let mut event = AuditEvent::new(events::GROUP_PROCESS)
                .with_detail("session_id", session.id)
                .with_detail("group", s.group.as_str())
                .with_detail("command", process.command.as_str())
                .with_detail(
                    "action",
                    if outcome.is_ok() {
                        action.as_str()
                    } else {
                        "end_failed"
                    },
                );
            event.uid = Some(s.uid);
            event.user = Some(s.user.clone());
            event.pid = Some(process.pid);
            event.reason = outcome.err();
            tracing::warn!(
                pid = process.pid,
                user = s.user,
                "a process kept the admin group after the session"
            );
            self.audit.send(event);
        }
    }

    /// Setuid and setgid files made during the session under the scan
    /// paths ([`session_leftovers::new_setuid_files`]): their bits taken
    /// off or reported, per the configuration, each audited.
    fn check_setuid_files(&self, session: &AdminSession) {
        let s = &session.session;
        let scan = session_leftovers::new_setuid_files(
            &self.config.setuid_scan_paths,
            s.started_at.as_second(),
            self.config.setuid_scan_limit,
        );
        if scan.truncated {
            tracing::warn!(
                visited = scan.visited,
                "the setuid scan stopped at its limit"
            );
            let mut event = AuditEvent::new(events::SETUID_FILE)
                .with_detail("session_id", session.id)
                .with_detail("action", "scan_truncated")
                .with_detail("visited", scan.visited);
            event.uid = Some(s.uid);
            event.user = Some(s.user.clone());
            event.reason = Some("the scan reached setuid_scan_limit before its end".into());
            self.audit.send(event);
        }
        for file in &scan.found {
            let outcome = match self.config.setuid_changes {
                SudoersChanges::Remove => session_leftovers::strip_setuid(file),
                SudoersChanges::Report => Ok(()),
            };
            let action = match (&outcome, self.config.setuid_changes) {
                (Err(_), _) => "remove_failed",
                (Ok(()), SudoersChanges::Remove) => "bits_removed",
                (Ok(()), SudoersChanges::Report) => "reported",
            };
            let mut event = AuditEvent::new(events::SETUID_FILE)
                .with_detail("session_id", session.id)
                .with_detail("file", file.path.display().to_string())
                .with_detail("mode", format!("{:o}", file.mode))
                .with_detail("owner_uid", file.uid)
                .with_detail("action", action);
            event.uid = Some(s.uid);
            event.user = Some(s.user.clone());
            event.path = Some(file.path.display().to_string());
            event.reason = outcome.err().map(|e| e.to_string());
            tracing::warn!(file = %file.path.display(), user = s.user, action, "setuid file made during an admin session");
            self.audit.send(event);
        }
    }

    /// Finds sudoers entries for the session's user added since its start;
    /// takes them out or reports them, per the configuration.
    fn check_sudoers(&self, session: &AdminSession) {
        let s = &session.session;
        let baseline = Snapshot::from_json(s.sudoers_baseline.as_deref());
        let now = Snapshot::take(&self.config.sudoers_paths);
        if now == baseline {
            return;
        }
        for finding in sudoers::findings(&baseline, &now, &account(s.uid, &s.user)) {
            let outcome = match self.config.sudoers_changes {
                SudoersChanges::Report => Ok(()),
                SudoersChanges::Remove => sudoers::remove(&finding),
            };
            let action = match &outcome {
                Ok(()) => self.config.sudoers_changes.as_str(),
                Err(_) => "remove_failed",
            };
            tracing::warn!(
                path = finding.path,
                user = s.user,
                action,
                "sudoers entry added during an admin session"
            );
            let mut event = AuditEvent::new(events::SUDOERS_CHANGE)
                .with_detail("session_id", session.id)
                .with_detail("file", finding.path.as_str())
                .with_detail("new_file", finding.new_file)
                .with_detail("lines", finding.lines.clone())
                .with_detail("action", action);
            event.uid = Some(s.uid);
            event.user = Some(s.user.clone());
            event.path = Some(finding.path.clone());
            if let Err(error) = outcome {
                event.reason = Some(error.to_string());
            }
            self.audit.send(event);
        }
    }

    // ---- requests (control threads) ---------------------------------------------

    /// `epmctl admin start`: checks the policy (and meets its requirement),
    /// then stores the session and adds the user to the group. A user with
    /// a session renews it through the same check.
    pub(crate) fn begin(
        &self,
        caller: u32,
        minutes: u32,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<AdminSessionInfo, Unmet> {
        let entitled = self.entitlement(caller, minutes)?;
        let met = self
            .flows
            .meet(&entitled.requirement(caller, minutes), reason, window)?;
        let group = self.group_of(&entitled.entry)?;
        Ok(self.open_session(entitled, met, group, caller, minutes, reason)?)
    }

    /// Who `caller` is and the admin-session entry the policy in force
    /// gives them, for `minutes`: a refusal is audited and answered as a
    /// verdict.
    fn entitlement(&self, caller: u32, minutes: u32) -> Result<Entitled, Unmet> {
        let decider = self
            .decider
            .upgrade()
            .ok_or_else(|| GrantError::Internal("the daemon is stopping".into()))?;
        let account = epm_os::users::Account::by_uid(caller).ok_or_else(|| {
            GrantError::NotFound(format!("uid {caller} has no account on this machine"))
        })?;
        if caller == 0 {
            return Err(GrantError::BadRequest("root is already an administrator".into()).into());
        }
        let user = account.name.clone();
        let subject = crate::grants::subject::of_user(crate::grants::subject::Asker {
            uid: caller,
            user: user.clone(),
            groups: account.group_names(),
            device_id: decider.device_id().to_owned(),
        });
        let policy = decider.policy();
        let policy_version = policy.engine.version();
        let entry = policy
            .engine
            .admin_session(&subject)
            .map(|m| m.rule.clone());
        let denied = |rule_id: Option<String>, message: String| {
            let mut event = AuditEvent::new(events::DENIED).with_detail("minutes", minutes);
            event.uid = Some(caller);
            event.user = Some(user.clone());
            event.rule_id = rule_id.clone();
            event.reason = Some(message.clone());
            event.policy_version = Some(policy_version);
            self.audit.send(event);
            Unmet::Verdict(Box::new(ElevationVerdict::Denied { rule_id, message }))
        };
        let entry = match entry {
            Some(entry) if entry.allowed => entry,
            Some(entry) => {
                let message = entry.message.clone().unwrap_or_else(|| {
                    "your organization's policy does not allow you admin sessions".into()
                });
                return Err(denied(Some(entry.id), message));
            }
            None => {
                return Err(denied(
                    None,
                    "no admin-session policy applies to you: admin sessions are not allowed".into(),
                ));
            }
        };
        if minutes == 0 || minutes > entry.max_minutes {
            return Err(GrantError::BadRequest(format!(
                "a session is 1 to {} minutes for you; {minutes} asked",
                entry.max_minutes
            ))
            .into());
        }
        Ok(Entitled {
            user,
            entry,
            policy_version,
        })
    }

    /// The group a session of `entry` adds its user to; it must exist
    /// (macOS creates it on first use).
    fn group_of(&self, entry: &AdminSessionRule) -> Result<String, GrantError> {
        let group = entry
            .group
            .clone()
            .unwrap_or_else(|| self.config.group.clone());
        if nix::unistd::Group::from_name(&group)
            .ok()
            .flatten()
            .is_none()
            && !cfg!(target_os = "macos")
        {
            return Err(GrantError::Internal(format!(
                "the admin group {group:?} does not exist on this machine; ask IT to fix the policy or [admin_sessions] group"
            )));
        }
        Ok(group)
    }

    /// Stores the session (renewing the caller's current one in `group`),
    /// adds the user to the group and audits the start.
    fn open_session(
        &self,
        entitled: Entitled,
        met: Met,
        group: String,
        caller: u32,
        minutes: u32,
        reason: Option<&str>,
    ) -> Result<AdminSessionInfo, GrantError> {
        let Entitled {
            user,
            entry,
            policy_version,
        } = entitled;
        let _changes = lock(&self.changes);
        let current = self
            .active()
            .into_iter()
            .find(|s| s.session.uid == caller && s.session.group == group);
        let was_member_before = match &current {
            // A renewal: the first session's answer stands.
            Some(current) => current.session.was_member_before,
            None => self
                .groups
                .is_member(&user, &group)
                .map_err(|e| GrantError::Internal(format!("cannot read group {group}: {e}")))?,
        };
        let baseline = match &current {
            Some(current) => current.session.sudoers_baseline.clone(),
            None => Some(Snapshot::take(&self.config.sudoers_paths).to_json()),
        };
        let now = self.now();
        let expires_at = now + SignedDuration::from_mins(i64::from(minutes));
        let new = NewAdminSession {
            uid: caller,
            user: user.clone(),
            group: group.clone(),
            was_member_before,
            reason: met
                .justification
                .clone()
                .or_else(|| reason.map(str::to_owned)),
            started_at: now,
            expires_at,
            rule_id: Some(entry.id.clone()),
            sudoers_baseline: baseline,
        };
        // Stored first: from here on, a crash leaves a session to end.
        let id = lock(&self.store)
            .insert_admin_session(&new)
            .map_err(|e| GrantError::Internal(format!("cannot store the session: {e}")))?;
        if let Some(current) = &current {
            self.revoke(current, "renewed", false);
        }
        if !was_member_before
            && current.is_none()
            && let Err(error) = self.groups.add(&user, &group)
        {
            let _ = lock(&self.store).revoke_admin_session(id, now, "add_failed");
            return Err(GrantError::Internal(format!(
                "cannot add {user} to {group}: {error}"
            )));
        }
        lock(&self.live).insert(
            id,
            Live {
                deadline: Instant::now() + Duration::from_secs(u64::from(minutes) * 60),
                warned: 0,
            },
        );
        let mut event = AuditEvent::new(events::STARTED)
            .with_detail("session_id", id)
            .with_detail("group", group.as_str())
            .with_detail("minutes", minutes)
            .with_detail("expires_at", expires_at.to_string())
            .with_detail("was_member_before", was_member_before);
        if let Some(current) = &current {
            event = event.with_detail("renews", current.id);
        }
        if let Some(text) = &met.justification {
            event = event.with_detail("justification", text.as_str());
        }
        if let Some(grant) = met.grant_id {
            event = event.with_detail("grant_id", grant);
        }
        event.uid = Some(caller);
        event.user = Some(user);
        event.rule_id = Some(entry.id);
        event.policy_version = Some(policy_version);
        self.audit.send(event);
        let stored = AdminSession {
            id,
            session: new,
            revoked_at: None,
            revoke_reason: None,
        };
        Ok(info(&stored))
    }

    /// `epmctl admin status`: the caller's session, or everyone's.
    pub(crate) fn status(&self, caller: u32, all: bool) -> Vec<AdminSessionInfo> {
        self.active()
            .iter()
            .filter(|s| all || s.session.uid == caller)
            .map(info)
            .collect()
    }

    /// `epmctl admin end`: ends the caller's session now.
    pub(crate) fn end(&self, caller: u32) -> Result<AdminSessionInfo, GrantError> {
        let _changes = lock(&self.changes);
        let Some(session) = self.active().into_iter().find(|s| s.session.uid == caller) else {
            return Err(GrantError::NotFound("you have no admin session".into()));
        };
        if !self.revoke(&session, "ended_by_user", true) {
            return Err(GrantError::Internal(
                "the session could not be ended yet; it is retried every second (see the daemon's log)".into(),
            ));
        }
        let mut ended = info(&session);
        ended.ended_at = Some(self.now());
        ended.end_reason = Some("ended_by_user".into());
        Ok(ended)
    }
}

/// A user the policy in force allows an admin session: the entry that
/// allows it, and that policy's version (for the record).
#[derive(Debug)]
struct Entitled {
    user: String,
    entry: AdminSessionRule,
    policy_version: u64,
}

impl Entitled {
    /// What a session of `minutes` for `caller` must meet first.
    fn requirement(&self, caller: u32, minutes: u32) -> Requirement {
        let entry = &self.entry;
        let action = match entry.require {
            SessionRequirement::None => Action::Allow,
            SessionRequirement::Justification => Action::Justify,
            SessionRequirement::Approval => Action::Approve,
        };
        Requirement {
            uid: caller,
            user: self.user.clone(),
            identity: SubjectIdentity {
                kind: IdentityKind::AdminSession,
                value: minutes.to_string(),
            },
            rule_id: entry.id.clone(),
            action,
            message: entry.message.clone(),
            justification: entry.justification.clone().unwrap_or_default(),
            approval: entry.approval.clone().unwrap_or_default(),
            what: format!("admin session ({minutes} minutes)"),
        }
    }
}

/// Whom sudoers findings are judged for: the user, their uid, their
/// groups (names and ids).
fn account(uid: u32, user: &str) -> sudoers::Account {
    let gids = epm_os::users::Account::by_name(user)
        .map(|entry| entry.groups())
        .unwrap_or_default();
    sudoers::Account {
        user: user.to_owned(),
        uid,
        groups: epm_os::users::group_names(&gids),
        gids,
    }
}

fn info(session: &AdminSession) -> AdminSessionInfo {
    let s = &session.session;
    AdminSessionInfo {
        id: session.id,
        user: s.user.clone(),
        group: s.group.clone(),
        started_at: s.started_at,
        expires_at: s.expires_at,
        reason: s.reason.clone(),
        ended_at: session.revoked_at,
        end_reason: session.revoke_reason.clone(),
        was_member_before: s.was_member_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_changes_use_the_platform_tool() {
        let (program, args) = group_command(GroupChange::Add, "alice", "sudo");
        if cfg!(target_os = "macos") {
            assert_eq!(program, "/usr/sbin/dseditgroup");
            assert_eq!(args, ["-o", "edit", "-a", "alice", "-t", "user", "sudo"]);
        } else {
            assert_eq!(program, "/usr/bin/gpasswd");
            assert_eq!(args, ["--add", "alice", "sudo"]);
        }
        let (_, args) = group_command(GroupChange::Remove, "alice", "sudo");
        assert!(args.contains(&"alice".to_owned()));
    }
}
