//! Elevation's decisions: may this user run this command as root (for
//! `epmctl run` and the sudo plugin), and the justification or approval a
//! rule asks for first, met the same way for commands and admin sessions.
//!
//! Unlike an exec, an elevation is asked for by a client that can wait and
//! ask its user, so nothing here is refused "now, prompt later": the
//! client is told what is missing ([`ElevationVerdict`]) and asks again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use epm_ipc::{Command, ElevationVerdict, ElevationVia, Window};
use sha2::Digest as _;

use super::*;
use crate::grants::program;

/// How long the approval window is when the client does not say: an hour,
/// or the rule's longest window if shorter.
const DEFAULT_WINDOW: SignedDuration = SignedDuration::from_secs(60 * 60);

/// What a rule asks of the user before something privileged happens.
#[derive(Debug, Clone)]
pub(crate) struct Requirement {
    /// Who.
    pub uid: u32,
    /// Their name.
    pub user: String,
    /// What a grant must name: the program's digest, or the admin session's
    /// minutes.
    pub identity: SubjectIdentity,
    /// The rule or entry that asks.
    pub rule_id: String,
    /// `Justify` or `Approve`.
    pub action: Action,
    /// The rule's message.
    pub message: Option<String>,
    /// How the reason is checked.
    pub justification: JustificationSpec,
    /// Window limits, for approval.
    pub approval: ApprovalSpec,
    /// What it is about, for people: a program's path, or "admin session".
    pub what: String,
}

/// A requirement met: the grant used, or the justification written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Met {
    /// The approval grant consumed.
    pub grant_id: Option<i64>,
    /// Where the grant came from (`approval`, `offline_code`).
    pub grant_source: Option<&'static str>,
    /// The justification accepted.
    pub justification: Option<String>,
}

/// Not (yet): what the client must do, or why it cannot.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Unmet {
    /// Tell the client.
    Verdict(Box<ElevationVerdict>),
    /// The request itself failed.
    Refused(GrantError),
}

impl Unmet {
    fn verdict(verdict: ElevationVerdict) -> Unmet {
        Unmet::Verdict(Box::new(verdict))
    }
}

impl From<GrantError> for Unmet {
    fn from(error: GrantError) -> Self {
        Unmet::Refused(error)
    }
}

/// An elevation that may go ahead.
#[derive(Debug)]
pub(crate) struct ElevationAllowed {
    /// The deciding rule.
    pub rule_id: Option<String>,
    /// The caller's name.
    pub user: String,
    /// What was met on the way.
    pub met: Met,
    /// What the audit names: the program's canonical path (the edited
    /// files, for sudoedit).
    pub path: String,
    /// The program as checked, for the runner to execute (none for
    /// sudoedit, which runs no program of the user's choice).
    pub program: Option<Program>,
}

/// What the sudo plugin adds to an elevation: the environment sudo will
/// give the command, and for sudoedit the files to edit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SudoRequest<'a> {
    /// `run_envp`, `NAME=value` each.
    pub env: &'a [String],
    /// sudoedit's files.
    pub edit: Option<&'a [String]>,
}

impl Flows {
    /// Meets `requirement` with what the client sent: a justification is
    /// checked and accepted at once; an approval is a grant to consume, a
    /// request to wait for, or a request to file now (when the client sent
    /// its reason).
    pub(crate) fn meet(
        &self,
        requirement: &Requirement,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<Met, Unmet> {
        match requirement.action {
            Action::Justify => {
                let Some(reason) = reason else {
                    return Err(Unmet::verdict(ElevationVerdict::NeedsJustification {
                        rule_id: requirement.rule_id.clone(),
                        message: requirement.message.clone(),
                        justification: requirement.justification.clone(),
                    }));
                };
                let reason = requirement.justification.check(reason).map_err(|e| {
                    self.audit_refusal(
                        "justification_refused",
                        requirement.uid,
                        &requirement.user,
                        &requirement.what,
                        Some(&requirement.rule_id),
                        &e.to_string(),
                    );
                    Unmet::Refused(GrantError::BadRequest(e.to_string()))
                })?;
                Ok(Met {
                    justification: Some(reason),
                    ..Met::default()
                })
            }
            Action::Approve => self.meet_approval(requirement, reason, window),
            Action::Allow | Action::Deny => Ok(Met::default()),
        }
    }

    fn meet_approval(
        &self,
        requirement: &Requirement,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<Met, Unmet> {
        if let Some(used) =
            self.consume_grant(requirement.uid, &requirement.identity, &requirement.rule_id)
        {
            return Ok(Met {
                grant_id: Some(used.id),
                grant_source: Some(used.source),
                justification: None,
            });
        }
        let waiting = |request_id: &str| -> Unmet {
            match self.lock_store().map(|s| s.request(request_id)) {
                Ok(Ok(Some(request))) => Unmet::verdict(ElevationVerdict::Pending {
                    rule_id: requirement.rule_id.clone(),
                    request: request_info(&request),
                }),
                Ok(Ok(None)) => Unmet::Refused(GrantError::Internal(format!(
                    "request {request_id} vanished"
                ))),
                Ok(Err(error)) => internal(error).into(),
                Err(refused) => refused.into(),
            }
        };
        let latest_request = |state: RequestState| {
            self.lock_store().ok().and_then(|s| {
                s.requests(Some(requirement.uid), None)
                    .ok()?
                    .into_iter()
                    .find(|r| same_identity(&r.identity, &requirement.identity) && r.state == state)
            })
        };
        match self.approval_situation(requirement.uid, &requirement.identity) {
            Situation::Blocked(BlockReason::Pending { request_id }) => {
                return Err(waiting(&request_id));
            }
            Situation::Blocked(BlockReason::WindowNotStarted { .. }) => {
                if let Some(ahead) = latest_request(RequestState::Approved) {
                    return Err(waiting(&ahead.id));
                }
            }
            Situation::Blocked(BlockReason::Rejected {
                request_id,
                retry_after,
                ..
            }) => {
                let request = self
                    .lock_store()?
                    .request(&request_id)
                    .map_err(internal)?
                    .ok_or_else(|| internal(format!("request {request_id} vanished")))?;
                return Err(Unmet::verdict(ElevationVerdict::Rejected {
                    rule_id: requirement.rule_id.clone(),
                    request: request_info(&request),
                    retry_after,
                }));
            }
            _ => {}
        }
        let Some(reason) = reason else {
            return Err(Unmet::verdict(ElevationVerdict::NeedsApproval {
                rule_id: requirement.rule_id.clone(),
                message: requirement.message.clone(),
                justification: requirement.justification.clone(),
                max_window_hours: requirement.approval.max_window_hours,
            }));
        };
        let now = self.clock.now();
        let window = window.unwrap_or_else(|| {
            let longest =
                SignedDuration::from_hours(i64::from(requirement.approval.max_window_hours));
            Window {
                start: now,
                end: now + DEFAULT_WINDOW.min(longest),
            }
        });
        let target = Target {
            uid: requirement.uid,
            user: requirement.user.clone(),
            identity: requirement.identity.clone(),
            path: requirement.what.clone(),
            argv: None,
            rule_id: requirement.rule_id.clone(),
            action: Action::Approve,
            justification: requirement.justification.clone(),
            approval: requirement.approval.clone(),
            prompt: None,
        };
        let request = self.file_request(&target, reason, window.start, window.end)?;
        Err(Unmet::verdict(ElevationVerdict::Pending {
            rule_id: requirement.rule_id.clone(),
            request: request_info(&request),
        }))
    }

    /// May `caller` run `command` as `command.run_as`? Decided by the
    /// policy's elevation rules on the program the daemon opens itself
    /// ([`Program::for_elevation`]): on its canonical path (and the
    /// caller's spelling where it is root's alone) and its hash. For the
    /// sudo plugin, `sudo` carries the environment sudo passes and, for
    /// sudoedit, the files. A final answer (allowed, denied) is audited
    /// here, with `via`.
    pub(crate) fn elevate(
        &self,
        caller: u32,
        via: ElevationVia,
        command: &Command,
        sudo: Option<SudoRequest<'_>>,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<ElevationAllowed, Unmet> {
        let decider = self
            .decider
            .upgrade()
            .ok_or_else(|| Unmet::Refused(GrantError::Internal("the daemon is stopping".into())))?;
        if command.argv.is_empty() {
            return Err(Unmet::Refused(GrantError::BadRequest(
                "argv is empty: it holds at least the program's name".into(),
            )));
        }
        let user = self.user_name(caller);
        let ids = Caller::of(caller, decider.names());
        let policy = decider.policy();
        let mut record = ElevationRecord {
            flows: self,
            decider: &decider,
            caller,
            user: &user,
            via,
            command,
            path: command.program.clone(),
            sha256: None,
            edit: None,
        };
        if let Some(files) = sudo.and_then(|s| s.edit) {
            return self.elevate_edit(&mut record, &ids, files, reason, window);
        }
        let program = match Program::for_elevation(&command.program, &ids) {
            Ok(program) => program,
            Err(error) => return Err(record.refuse(None, error.to_string())),
        };
        record.path = program.canonical.clone();
        record.sha256 = Some(program.sha256);
        let mut subject = Subject {
            path: program.canonical.clone(),
            sha256: Some(program.sha256),
            uid: caller,
            user: user.clone(),
            groups: group_names(&decider, &ids.groups),
            device_id: decider.device_id().to_owned(),
            argv: Some(command.argv.clone()),
            ..Subject::default()
        };
        let mut names = vec![program.canonical.clone()];
        names.extend(program::spelled_by_rules(
            &program.canonical,
            policy.engine.elevation_spellings(),
        ));
        let theirs: Vec<String> = program.requested.iter().cloned().collect();
        let decision = decide_on_names(&mut subject, &names, &theirs, |s| {
            policy.engine.evaluate_elevation(s, &command.run_as)
        });
        let rule_id = decision.rule_id.as_deref().map(str::to_owned);
        let message = decision.message.as_deref().map(str::to_owned);
        let program_name = program_name(&program.canonical);
        if decision.action == Action::Deny {
            let text = message.clone().unwrap_or_else(|| match &rule_id {
                Some(_) => format!(
                    "running {program_name} as {} is denied by policy",
                    command.run_as
                ),
                None => format!(
                    "no elevation rule allows running {program_name} as {}",
                    command.run_as
                ),
            });
            return Err(record.deny(&decision, text));
        }
        if let Some(sudo) = sudo {
            let listed = rule_id
                .as_deref()
                .map_or(&[][..], |id| policy.engine.elevation_env(id));
            if let Err(why) = sudo_env_allowed(sudo.env, listed, &command.run_as, caller, &user) {
                return Err(record.deny(&decision, why));
            }
        }
        let identity = grant_identity(&subject)
            .ok_or_else(|| Unmet::Refused(GrantError::Internal("no identity".into())))?;
        let met = self.meet_rule(
            &record,
            &decision,
            identity,
            program.canonical.clone(),
            reason,
            window,
        )?;
        record.allow(&decision, &met);
        Ok(ElevationAllowed {
            rule_id,
            user,
            met,
            path: program.canonical.clone(),
            program: Some(program),
        })
    }

    /// Meets what an elevation rule asks (justification, approval); a
    /// rejection is audited as a denial.
    fn meet_rule(
        &self,
        record: &ElevationRecord<'_>,
        decision: &epm_policy::Decision,
        identity: SubjectIdentity,
        what: String,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<Met, Unmet> {
        let (Some(id), Action::Justify | Action::Approve) = (&decision.rule_id, decision.action)
        else {
            return Ok(Met::default());
        };
        let policy = record.decider.policy();
        let (rule, _) = policy
            .engine
            .elevation_rule(id)
            .ok_or_else(|| Unmet::Refused(GrantError::Internal(format!("rule {id:?} vanished"))))?;
        let requirement = Requirement {
            uid: record.caller,
            user: record.user.to_owned(),
            identity,
            rule_id: id.to_string(),
            action: decision.action,
            message: decision.message.as_deref().map(str::to_owned),
            justification: rule.justification.cloned().unwrap_or_default(),
            approval: rule.approval.cloned().unwrap_or_default(),
            what,
        };
        match self.meet(&requirement, reason, window) {
            Ok(met) => Ok(met),
            Err(Unmet::Verdict(verdict))
                if matches!(*verdict, ElevationVerdict::Rejected { .. }) =>
            {
                record.audit(
                    ELEVATION_DENIED,
                    decision,
                    &Met::default(),
                    Some("rejected by approvers"),
                );
                Err(Unmet::Verdict(verdict))
            }
            Err(unmet) => Err(unmet),
        }
    }

    /// sudoedit: editing `files` as `command.run_as`, decided by the edit
    /// rules on each file's canonical path, never on the editor. Every file
    /// must be allowed; the strictest rule's requirement is met.
    fn elevate_edit(
        &self,
        record: &mut ElevationRecord<'_>,
        ids: &Caller,
        files: &[String],
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<ElevationAllowed, Unmet> {
        let run_as = record.command.run_as.clone();
        if files.is_empty() {
            return Err(record.refuse(None, "sudoedit named no file".into()));
        }
        let mut canonical = Vec::with_capacity(files.len());
        for file in files {
            match crate::grants::program::edit_target(file, ids) {
                Ok(path) => canonical.push(path),
                Err(error) => {
                    record.edit = Some(files.to_vec());
                    return Err(record.refuse(None, error.to_string()));
                }
            }
        }
        record.edit = Some(canonical.clone());
        record.path = canonical.join(" ");
        let policy = record.decider.policy();
        let mut strictest: Option<epm_policy::Decision> = None;
        for path in &canonical {
            let mut subject = Subject {
                path: path.clone(),
                uid: record.caller,
                user: record.user.to_owned(),
                groups: group_names(record.decider, &ids.groups),
                device_id: record.decider.device_id().to_owned(),
                ..Subject::default()
            };
            let mut names = vec![path.clone()];
            names.extend(program::spelled_by_rules(
                path,
                policy.engine.elevation_spellings(),
            ));
            let decision = decide_on_names(&mut subject, &names, &[], |s| {
                policy.engine.evaluate_edit(s, &run_as)
            });
            if decision.action == Action::Deny {
                let text = decision.message.as_deref().map_or_else(
                    || match decision.rule_id {
                        Some(_) => format!("editing {path} as {run_as} is denied by policy"),
                        None => format!("no elevation rule allows editing {path} as {run_as}"),
                    },
                    str::to_owned,
                );
                return Err(record.deny(&decision, text));
            }
            if strictest
                .as_ref()
                .is_none_or(|s| decision.action > s.action)
            {
                strictest = Some(decision);
            }
        }
        let decision = strictest.ok_or_else(|| record.refuse(None, "no file".into()))?;
        let digest = sha2::Sha256::digest(format!("sudoedit\0{run_as}\0{}", canonical.join("\0")));
        let identity = SubjectIdentity {
            kind: epm_store::IdentityKind::Sha256,
            value: epm_policy::Sha256Digest(digest.into()).to_string(),
        };
        let met = self.meet_rule(
            record,
            &decision,
            identity,
            format!("sudoedit {}", canonical.join(" ")),
            reason,
            window,
        )?;
        record.allow(&decision, &met);
        Ok(ElevationAllowed {
            rule_id: decision.rule_id.as_deref().map(str::to_owned),
            user: record.user.to_owned(),
            met,
            path: record.path.clone(),
            program: None,
        })
    }
}

/// One elevation's audit: who, what, through what.
struct ElevationRecord<'a> {
    flows: &'a Flows,
    decider: &'a Decider,
    caller: u32,
    user: &'a str,
    via: ElevationVia,
    command: &'a Command,
    /// The canonical path once known, else what was asked for.
    path: String,
    sha256: Option<epm_policy::Sha256Digest>,
    /// sudoedit's files.
    edit: Option<Vec<String>>,
}

impl ElevationRecord<'_> {
    fn audit(&self, kind: &str, decision: &epm_policy::Decision, met: &Met, why: Option<&str>) {
        let mut event = AuditEvent::new(kind)
            .with_detail("via", self.via.as_str())
            .with_detail("run_as", self.command.run_as.as_str())
            .with_string_list("argv", &self.command.argv);
        if self.path != self.command.program && self.edit.is_none() {
            event = event.with_detail("requested_path", self.command.program.as_str());
        }
        if let Some(files) = &self.edit {
            event = event.with_detail("edit", files.clone());
        }
        event.uid = Some(self.caller);
        event.user = Some(self.user.to_owned());
        event.path = Some(self.path.clone());
        event.sha256 = self.sha256.map(|d| d.to_string());
        event.rule_id = decision.rule_id.as_deref().map(str::to_owned);
        event.action = Some(decision.action.as_str().to_owned());
        event.decision = Some(
            if kind == ELEVATION_ALLOWED {
                "allow"
            } else {
                "deny"
            }
            .into(),
        );
        event.policy_version = Some(decision.policy_version);
        event.device_id = Some(self.decider.device_id().to_owned());
        event.reason = why.map(str::to_owned);
        if let Some(text) = &met.justification {
            event = event.with_detail("justification", text.as_str());
        }
        if let Some(id) = met.grant_id {
            event = event.with_detail("grant_id", id);
        }
        self.flows.audit.send(event);
    }

    fn allow(&self, decision: &epm_policy::Decision, met: &Met) {
        self.audit(ELEVATION_ALLOWED, decision, met, None);
    }

    /// Denied by the policy (or by what sudo would pass): audited, and the
    /// verdict for the client.
    fn deny(&self, decision: &epm_policy::Decision, text: String) -> Unmet {
        self.audit(ELEVATION_DENIED, decision, &Met::default(), Some(&text));
        Unmet::verdict(ElevationVerdict::Denied {
            rule_id: decision.rule_id.as_deref().map(str::to_owned),
            message: text,
        })
    }

    /// Refused before any rule could decide (the program could not be
    /// opened as root's alone, a file to edit is not one): audited as a
    /// denial without a rule.
    fn refuse(&self, rule_id: Option<String>, text: String) -> Unmet {
        let decision = epm_policy::Decision {
            action: Action::Deny,
            rule_id: rule_id.map(Into::into),
            criterion: None,
            scope: None,
            message: None,
            policy_version: self.decider.policy().engine.version(),
        };
        self.deny(&decision, text)
    }
}

/// Evaluates `subject` under each of `names` (the canonical path first,
/// then the rules' own spellings of it) and each of `deny_only` (the
/// caller's spelling, root's too but chosen by the caller): a rule that
/// denies under any of them wins; otherwise the first of `names` a rule
/// decides; otherwise the canonical path's default. An allow never comes
/// from the caller's choice of spelling. `subject.path` ends as the
/// canonical path.
fn decide_on_names(
    subject: &mut Subject,
    names: &[String],
    deny_only: &[String],
    evaluate: impl Fn(&Subject) -> epm_policy::Decision,
) -> epm_policy::Decision {
    let mut decided: Vec<(bool, epm_policy::Decision)> = Vec::new();
    for (name, may_allow) in names
        .iter()
        .map(|n| (n, true))
        .chain(deny_only.iter().map(|n| (n, false)))
    {
        subject.path.clone_from(name);
        decided.push((may_allow, evaluate(subject)));
    }
    if let Some(first) = names.first() {
        subject.path.clone_from(first);
    }
    let chosen = decided
        .iter()
        .find(|(_, d)| d.rule_id.is_some() && d.action == Action::Deny)
        .or_else(|| {
            decided
                .iter()
                .find(|(may_allow, d)| *may_allow && d.rule_id.is_some())
        })
        .or(decided.first())
        .map(|(_, d)| d.clone());
    chosen.unwrap_or_else(|| evaluate(subject))
}

/// Whether sudo may give the command this environment: each variable must
/// be on the shared allow-list with a safe value
/// ([`epm_policy::env::keeps_variable`]), listed by the deciding rule's
/// `env`, or one sudo sets itself with the value it sets (the run-as
/// user's `HOME`, `USER`, `LOGNAME`, `SHELL`, `MAIL`; a `PATH` of
/// directories only root can change; the invoking user in `SUDO_*`).
/// `Err` names the first variable that is none of these.
fn sudo_env_allowed(
    env: &[String],
    listed: &[String],
    run_as: &str,
    caller: u32,
    caller_name: &str,
) -> Result<(), String> {
    let account = nix::unistd::User::from_name(run_as).ok().flatten();
    for entry in env {
        let Some((name, value)) = entry.split_once('=') else {
            return Err(format!("sudo would pass the malformed variable {entry:?}"));
        };
        if sudo_variable_ok(name, value, listed, account.as_ref(), caller, caller_name) {
            continue;
        }
        let shown: String = name.chars().take(64).collect();
        return Err(format!(
            "sudo would pass {shown} to the command, which no elevation rule allows (unset it, or ask IT to list it in the rule's \"env\")"
        ));
    }
    Ok(())
}

fn sudo_variable_ok(
    name: &str,
    value: &str,
    listed: &[String],
    account: Option<&nix::unistd::User>,
    caller: u32,
    caller_name: &str,
) -> bool {
    use epm_policy::env;
    if env::never_passed(name) {
        return false;
    }
    if env::keeps_variable(name, value)
        || (listed.iter().any(|l| l == name) && env::listed_value_ok(value))
    {
        return true;
    }
    let account_says = |field: Option<String>| field.is_some_and(|f| f == value);
    match name {
        "HOME" => account_says(account.map(|a| a.dir.to_string_lossy().into_owned())),
        "USER" | "LOGNAME" => account_says(account.map(|a| a.name.clone())),
        "SHELL" => account_says(account.map(|a| a.shell.to_string_lossy().into_owned())),
        "MAIL" => account.is_some_and(|a| {
            value == format!("/var/mail/{}", a.name)
                || value == format!("/var/spool/mail/{}", a.name)
        }),
        "PATH" => value.split(':').all(root_only_directory),
        "SUDO_USER" => value == caller_name,
        "SUDO_UID" => value == caller.to_string(),
        "SUDO_GID" => !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()),
        "SUDO_COMMAND" => env::listed_value_ok(value),
        _ => false,
    }
}

/// An absolute directory without `..` that only root can change.
fn root_only_directory(dir: &str) -> bool {
    dir.starts_with('/')
        && !dir.split('/').any(|c| c == "..")
        && std::fs::metadata(dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.permissions().mode() & 0o022 == 0)
}

/// Audit event: an elevation may go ahead.
pub(crate) const ELEVATION_ALLOWED: &str = "elevation_allowed";
/// Audit event: an elevation was refused.
pub(crate) const ELEVATION_DENIED: &str = "elevation_denied";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn decision(action: Action, rule: Option<&str>) -> epm_policy::Decision {
        epm_policy::Decision {
            action,
            rule_id: rule.map(Into::into),
            criterion: None,
            scope: None,
            message: None,
            policy_version: 1,
        }
    }

    #[test]
    fn a_deny_under_any_spelling_wins_and_an_allow_needs_the_real_one() {
        let names = ["/usr/bin/dash".to_owned()];
        let theirs = ["/bin/sh".to_owned()];
        let mut subject = Subject::default();
        let by_name = |s: &Subject| match s.path.as_str() {
            "/bin/sh" => decision(Action::Deny, Some("no-sh")),
            _ => decision(Action::Allow, Some("dash")),
        };
        let chosen = decide_on_names(&mut subject, &names, &theirs, by_name);
        assert_eq!(chosen.rule_id.as_deref(), Some("no-sh"));
        assert_eq!(subject.path, "/usr/bin/dash", "the canonical path stays");
        let only_spelling = |s: &Subject| match s.path.as_str() {
            "/bin/sh" => decision(Action::Allow, Some("sh")),
            _ => decision(Action::Deny, None),
        };
        let chosen = decide_on_names(&mut subject, &names, &theirs, only_spelling);
        assert_eq!(chosen.rule_id, None, "the caller's spelling allows nothing");
        let rules_spelling = ["/usr/bin/dash".to_owned(), "/bin/sh".to_owned()];
        let chosen = decide_on_names(&mut subject, &rules_spelling, &[], only_spelling);
        assert_eq!(
            chosen.rule_id.as_deref(),
            Some("sh"),
            "a rule's own spelling does"
        );
    }

    #[test]
    fn sudo_may_pass_what_run_keeps_and_what_it_sets_itself() {
        let root = [
            "HOME=/root",
            "USER=root",
            "LOGNAME=root",
            "MAIL=/var/mail/root",
            "PATH=/usr/sbin:/usr/bin",
            "TERM=xterm",
            "LANG=C.UTF-8",
            "SUDO_USER=alice",
            "SUDO_UID=1000",
            "SUDO_GID=1000",
            "SUDO_COMMAND=/usr/bin/id -u",
        ]
        .map(str::to_owned);
        assert_eq!(sudo_env_allowed(&root, &[], "root", 1000, "alice"), Ok(()));
        for bad in [
            "LD_PRELOAD=/home/alice/x.so",
            "PATH=/tmp:/usr/bin",
            "HOME=/home/alice",
            "SUDO_USER=root",
            "BASH_ENV=/home/alice/rc",
            "PYTHONPATH=/home/alice",
            "TERM=../x",
        ] {
            let error =
                sudo_env_allowed(&[bad.to_owned()], &[], "root", 1000, "alice").unwrap_err();
            let name = bad.split('=').next().unwrap();
            assert!(error.contains(name), "{error}");
        }
        let listed = ["JAVA_HOME".to_owned(), "LD_PRELOAD".to_owned()];
        assert!(
            sudo_env_allowed(
                &["JAVA_HOME=/usr/lib/jvm".into()],
                &listed,
                "root",
                1000,
                "alice"
            )
            .is_ok()
        );
        assert!(
            sudo_env_allowed(&["LD_PRELOAD=/x.so".into()], &listed, "root", 1000, "alice").is_err(),
            "never, even listed"
        );
    }
}
