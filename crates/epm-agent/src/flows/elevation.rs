//! Elevation's decisions: may this user run this command as root (for
//! `epmctl run` and the sudo plugin), and the justification or approval a
//! rule asks for first, met the same way for commands and admin sessions.
//!
//! Unlike an exec, an elevation is asked for by a client that can wait and
//! ask its user, so nothing here is refused "now, prompt later": the
//! client is told what is missing ([`ElevationVerdict`]) and asks again.

use std::path::Path;

use epm_ipc::{Command, ElevationVerdict, ElevationVia, Window};

use super::*;

/// How long the approval window is when the client does not say: an hour,
/// or the rule's longest window if shorter.
const DEFAULT_WINDOW: SignedDuration = SignedDuration::from_secs(60 * 60);

/// What a rule asks of the user before something privileged happens.
#[derive(Debug, Clone)]
pub struct Requirement {
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
pub struct Met {
    /// The approval grant consumed.
    pub grant_id: Option<i64>,
    /// Where the grant came from (`approval`, `offline_code`).
    pub grant_source: Option<&'static str>,
    /// The justification accepted.
    pub justification: Option<String>,
}

/// Not (yet): what the client must do, or why it cannot.
#[derive(Debug, Clone, PartialEq)]
pub enum Unmet {
    /// Tell the client.
    Verdict(Box<ElevationVerdict>),
    /// The request itself failed.
    Refused(ErrorCode, String),
}

impl Unmet {
    /// As the answer on the socket.
    pub fn into_response(self) -> Response {
        match self {
            Unmet::Verdict(verdict) => Response::Elevation(*verdict),
            Unmet::Refused(code, message) => Response::error(code, message),
        }
    }
}

impl Unmet {
    fn verdict(verdict: ElevationVerdict) -> Unmet {
        Unmet::Verdict(Box::new(verdict))
    }
}

impl From<Refused> for Unmet {
    fn from((code, message): Refused) -> Self {
        Unmet::Refused(code, message)
    }
}

/// An elevation that may go ahead.
#[derive(Debug, Clone)]
pub struct ElevationAllowed {
    /// The deciding rule.
    pub rule_id: Option<String>,
    /// The caller's name.
    pub user: String,
    /// What was met on the way.
    pub met: Met,
}

impl Flows {
    /// Meets `requirement` with what the client sent: a justification is
    /// checked and accepted at once; an approval is a grant to consume, a
    /// request to wait for, or a request to file now (when the client sent
    /// its reason).
    pub fn meet(
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
                let reason = requirement
                    .justification
                    .check(reason)
                    .map_err(|e| Unmet::Refused(ErrorCode::BadRequest, e.to_string()))?;
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
                Ok(Ok(None)) => Unmet::Refused(
                    ErrorCode::Internal,
                    format!("request {request_id} vanished"),
                ),
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
    /// policy's elevation rules on the file the daemon hashes itself; a
    /// final answer (allowed, denied) is audited here, with `via`.
    pub fn elevate(
        &self,
        caller: u32,
        via: ElevationVia,
        command: &Command,
        reason: Option<&str>,
        window: Option<Window>,
    ) -> Result<ElevationAllowed, Unmet> {
        let decider = self
            .decider
            .upgrade()
            .ok_or_else(|| Unmet::Refused(ErrorCode::Internal, "the daemon is stopping".into()))?;
        if command.argv.is_empty() {
            return Err(Unmet::Refused(
                ErrorCode::BadRequest,
                "argv is empty: it holds at least the program's name".into(),
            ));
        }
        let user = self.user_name(caller);
        let (identity, mut subject) = self.command_subject(&decider, caller, &user, command)?;
        subject.argv = Some(command.argv.clone());
        let policy = decider.policy();
        let decision = policy.engine.evaluate_elevation(&subject, &command.run_as);
        let rule_id = decision.rule_id.as_deref().map(str::to_owned);
        let message = decision.message.as_deref().map(str::to_owned);
        let audit = |kind: &str, met: &Met, why: Option<&str>| {
            let mut event = AuditEvent::new(kind)
                .with_detail("via", via.as_str())
                .with_detail("run_as", command.run_as.as_str())
                .with_string_list("argv", &command.argv);
            event.uid = Some(caller);
            event.user = Some(user.clone());
            event.path = Some(command.program.clone());
            event.sha256 = subject.sha256.map(|d| d.to_string());
            event.rule_id = rule_id.clone();
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
            event.device_id = Some(decider.device_id().to_owned());
            event.reason = why.map(str::to_owned);
            if let Some(text) = &met.justification {
                event = event.with_detail("justification", text.as_str());
            }
            if let Some(id) = met.grant_id {
                event = event.with_detail("grant_id", id);
            }
            self.audit.send(event);
        };
        let program = program_name(&command.program);
        if decision.action == Action::Deny {
            let text = message.clone().unwrap_or_else(|| match &rule_id {
                Some(_) => format!(
                    "running {program} as {} is denied by policy",
                    command.run_as
                ),
                None => format!(
                    "no elevation rule allows running {program} as {}",
                    command.run_as
                ),
            });
            audit(ELEVATION_DENIED, &Met::default(), Some(&text));
            return Err(Unmet::verdict(ElevationVerdict::Denied {
                rule_id,
                message: text,
            }));
        }
        let met = match (&rule_id, decision.action) {
            (Some(id), Action::Justify | Action::Approve) => {
                let (rule, _) = policy.engine.elevation_rule(id).ok_or_else(|| {
                    Unmet::Refused(ErrorCode::Internal, format!("rule {id:?} vanished"))
                })?;
                let requirement = Requirement {
                    uid: caller,
                    user: user.clone(),
                    identity,
                    rule_id: id.clone(),
                    action: decision.action,
                    message: message.clone(),
                    justification: rule.justification.cloned().unwrap_or_default(),
                    approval: rule.approval.cloned().unwrap_or_default(),
                    what: command.program.clone(),
                };
                match self.meet(&requirement, reason, window) {
                    Ok(met) => met,
                    Err(Unmet::Verdict(verdict))
                        if matches!(*verdict, ElevationVerdict::Rejected { .. }) =>
                    {
                        audit(
                            ELEVATION_DENIED,
                            &Met::default(),
                            Some("rejected by approvers"),
                        );
                        return Err(Unmet::Verdict(verdict));
                    }
                    Err(unmet) => return Err(unmet),
                }
            }
            _ => Met::default(),
        };
        audit(ELEVATION_ALLOWED, &met, None);
        Ok(ElevationAllowed { rule_id, user, met })
    }

    /// The subject of an elevation: the program the daemon hashes itself.
    /// Any regular file with an execute bit: the caller need not be able to
    /// run it, since root will.
    fn command_subject(
        &self,
        decider: &Decider,
        caller: u32,
        user: &str,
        command: &Command,
    ) -> Result<(SubjectIdentity, Subject), Unmet> {
        let path = &command.program;
        let admit = |meta: &std::fs::Metadata, _groups: &[u32]| {
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err((ErrorCode::BadRequest, format!("{path} is not a program")));
            }
            // The file is hashed now and run a moment later by path: only a
            // file nobody but root can replace is the file that will run.
            only_root_can_change(Path::new(path)).map_err(|why| {
                (
                    ErrorCode::Forbidden,
                    format!(
                        "{path} is not run as root: {why}; install it where only root can change it (e.g. /usr/local/bin)"
                    ),
                )
            })
        };
        Ok(self.hashed_subject(decider, caller, user, path, admit)?)
    }
}

/// Why a file someone other than root could replace (or change) is not
/// one to run as root: the file itself, then every directory up to `/`,
/// must belong to root and be writable by no one else.
fn only_root_can_change(path: &Path) -> Result<(), String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot resolve it: {e}"))?;
    let mut next = Some(real.as_path());
    while let Some(current) = next {
        let meta = std::fs::metadata(current)
            .map_err(|e| format!("cannot read {}: {e}", current.display()))?;
        let mode = meta.permissions().mode();
        if meta.uid() != 0 {
            return Err(format!(
                "{} belongs to uid {}",
                current.display(),
                meta.uid()
            ));
        }
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by others than root (mode {:o})",
                current.display(),
                mode & 0o7777
            ));
        }
        next = current.parent();
    }
    Ok(())
}

/// Audit event: an elevation may go ahead.
pub const ELEVATION_ALLOWED: &str = "elevation_allowed";
/// Audit event: an elevation was refused.
pub const ELEVATION_DENIED: &str = "elevation_denied";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::only_root_can_change;

    #[test]
    fn only_files_root_alone_controls_are_run_as_root() {
        assert!(only_root_can_change(std::path::Path::new("/bin/sh")).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        // /tmp is world-writable (sticky or not, anyone can swap names).
        let why = only_root_can_change(&tool).unwrap_err();
        assert!(why.contains("writable by others"), "{why}");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = only_root_can_change(&tool).unwrap_err();
        assert!(why.contains("tool is writable"), "{why}");
    }
}
