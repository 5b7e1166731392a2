//! What `epmctl run` and `epmctl admin start` do with the daemon's
//! verdicts: say no, ask for a reason (or take `--reason`), ask for a
//! window, wait for approvers; one loop for both.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use epm_ipc::{ElevationVerdict, Window};
use epm_policy::{ApprovalSpec, JustificationSpec};
use epm_prompt::display::shown_line;
use epm_prompt::messages;
use epm_prompt::when::parse_time;
use epm_prompt::{self as prompt, JustificationAsk, Terminal};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// How often a request waiting for approvers is asked about again.
const PENDING_RETRY: Duration = Duration::from_secs(2);

/// What the user has told the daemon so far.
pub(crate) struct Answers {
    reason: Option<String>,
    window: Option<Window>,
    from: String,
    until: String,
    sent_reason: bool,
    told_waiting: bool,
}

impl Answers {
    /// `reason`, `from` and `until` as given on the command line.
    pub(crate) fn new(reason: Option<String>, from: String, until: String) -> Answers {
        Answers {
            reason,
            window: None,
            from,
            until,
            sent_reason: false,
            told_waiting: false,
        }
    }

    /// The reason to send.
    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.clone()
    }

    /// The approval window to send.
    pub(crate) fn window(&self) -> Option<Window> {
        self.window
    }

    /// Prepares the next request from the daemon's verdict; `Some`: stop
    /// with that exit status.
    pub(crate) fn answer(
        &mut self,
        verdict: &ElevationVerdict,
        program: &str,
    ) -> anyhow::Result<Option<ExitCode>> {
        match verdict {
            ElevationVerdict::Allowed { .. } => {
                anyhow::bail!("epmd allowed it but did not start it")
            }
            ElevationVerdict::Denied { message, .. } => {
                eprintln!("epmctl: {}", shown_line(message));
                Ok(Some(ExitCode::from(1)))
            }
            ElevationVerdict::NeedsJustification {
                message,
                justification,
                ..
            } => {
                if self.sent_reason {
                    anyhow::bail!("epmd asked again for a reason after accepting one");
                }
                let Some(reason) = self.reason_for(program, message.as_deref(), justification)?
                else {
                    return Ok(Some(cancelled()));
                };
                self.reason = Some(reason);
                self.sent_reason = true;
                Ok(None)
            }
            ElevationVerdict::NeedsApproval {
                message,
                justification,
                max_window_hours,
                ..
            } => {
                if self.window.is_some() {
                    anyhow::bail!("epmd asked again for approval after a request was sent");
                }
                let now = Timestamp::now();
                let zone = TimeZone::system();
                let start = parse_time(&self.from, now, &zone).context("--from")?;
                let end = parse_time(&self.until, now, &zone).context("--until")?;
                let spec = ApprovalSpec {
                    max_window_hours: *max_window_hours,
                    ..ApprovalSpec::default()
                };
                if let Err(problem) = spec.check_window(start, end, now) {
                    anyhow::bail!("the window (--from, --until): {problem}");
                }
                let Some(reason) = self.reason_for(program, message.as_deref(), justification)?
                else {
                    return Ok(Some(cancelled()));
                };
                self.reason = Some(reason);
                self.window = Some(Window { start, end });
                Ok(None)
            }
            ElevationVerdict::Pending { request, .. } => {
                if !self.told_waiting {
                    eprintln!("{}", messages::waiting_for_approval(&request.id));
                    eprintln!(
                        "The window asked for: {} to {}.",
                        request.start, request.end
                    );
                    self.told_waiting = true;
                }
                std::thread::sleep(PENDING_RETRY);
                Ok(None)
            }
            ElevationVerdict::Rejected {
                request,
                retry_after,
                ..
            } => {
                eprintln!(
                    "epmctl: {}",
                    messages::request_rejected(request.state_reason.as_deref(), *retry_after)
                );
                Ok(Some(ExitCode::from(1)))
            }
        }
    }

    /// `--reason` if it satisfies the rule, else asked on the terminal.
    fn reason_for(
        &self,
        program: &str,
        message: Option<&str>,
        spec: &JustificationSpec,
    ) -> anyhow::Result<Option<String>> {
        if let Some(reason) = &self.reason {
            match spec.check(reason) {
                Ok(reason) => return Ok(Some(reason)),
                Err(problem) => eprintln!("epmctl: --reason: {problem}"),
            }
        }
        let mut terminal = Terminal::open_tty().map_err(|_| {
            anyhow::anyhow!("this command needs a reason: give it with --reason TEXT")
        })?;
        let ask = JustificationAsk {
            program: program.to_owned(),
            message: message.map(str::to_owned),
            spec: spec.clone(),
        };
        Ok(prompt::ask_justification(&mut terminal, &ask)?)
    }
}

fn cancelled() -> ExitCode {
    eprintln!("epmctl: cancelled");
    ExitCode::from(1)
}
