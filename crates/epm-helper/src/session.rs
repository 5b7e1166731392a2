//! The helper's life: register with `epmd` for this user, show what it
//! sends, answer prompts, and come back when the daemon restarts.

use std::collections::HashMap;
use std::time::Duration;

use epm_ipc::{
    BlockReason, Blocked, Client, ClientError, Endpoint, Prompt, PromptKind, Request, RequestInfo,
    Response, UserEvent,
};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use epm_prompt::messages;
use epm_prompt::{
    ApprovalAsk, Backend, JustificationAsk, PromptError, Tone, ask_approval, ask_justification,
};

const TITLE: &str = "Endpoint Privilege Management";
/// How long the helper waits between two tries to reach `epmd`, at most.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);
/// How often the helper wakes to check approved windows that open.
const TICK: Duration = Duration::from_secs(1);

/// What the helper needs to run.
#[derive(Debug)]
pub struct Session {
    /// Where the daemon listens.
    pub endpoint: Endpoint,
    /// Stop after the first disconnection instead of reconnecting (tests).
    pub once: bool,
}

/// An approved window that has not opened yet, to announce when it does.
#[derive(Debug, Clone)]
struct Upcoming {
    program: String,
    start: Timestamp,
    end: Timestamp,
}

/// The helper's memory across events.
#[derive(Debug, Default)]
struct State {
    upcoming: HashMap<String, Upcoming>,
    /// Requests seen approved: when they expire, it is the window that
    /// ended, not a review that never came.
    approved: std::collections::HashSet<String>,
}

impl Session {
    /// Runs until the daemon goes away for good (with `once`) or forever.
    pub fn run(&self, backend: &mut dyn Backend) -> Result<(), ClientError> {
        let mut delay = Duration::from_secs(1);
        let mut state = State::default();
        loop {
            match self.serve(backend, &mut state) {
                Ok(()) => tracing_line("epmd closed the connection"),
                Err(error) => {
                    if self.once {
                        return Err(error);
                    }
                    tracing_line(&format!("cannot talk to epmd: {error}"));
                }
            }
            if self.once {
                return Ok(());
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_RECONNECT_DELAY);
        }
    }

    fn serve(&self, backend: &mut dyn Backend, state: &mut State) -> Result<(), ClientError> {
        let mut events = connect(&self.endpoint)?;
        match events.call(&Request::Subscribe)? {
            Response::Subscribed { uid } => {
                tracing_line(&format!("registered with epmd for uid {uid}"));
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected answer to subscribe: {}",
                    epm_ipc::Message::type_name(&other)
                )));
            }
        }
        events.set_timeout(Some(TICK))?;
        loop {
            announce_open_windows(backend, state, Timestamp::now());
            match events.recv() {
                Ok(Response::Event(event)) => {
                    if let Err(error) = self.handle(backend, state, event) {
                        tracing_line(&format!("cannot show a prompt: {error}"));
                    }
                }
                Ok(other) => tracing_line(&format!(
                    "ignoring an unexpected message: {}",
                    epm_ipc::Message::type_name(&other)
                )),
                Err(ClientError::Frame(epm_ipc::FrameError::TimedOut)) => {}
                Err(ClientError::Closed) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
    }

    fn handle(
        &self,
        backend: &mut dyn Backend,
        state: &mut State,
        event: UserEvent,
    ) -> Result<(), PromptError> {
        match event {
            UserEvent::Prompt(prompt) => self.answer_prompt(backend, &prompt),
            UserEvent::Blocked(blocked) => show_blocked(backend, &blocked),
            UserEvent::RequestChanged(request) => show_request(backend, state, &request),
            UserEvent::AdminSessionEnding {
                session,
                minutes_left,
            } => backend.notify(
                TITLE,
                &messages::admin_session_ending(minutes_left, session.expires_at),
                Tone::Warning,
            ),
            UserEvent::AdminSessionEnded(session) => backend.notify(
                TITLE,
                &messages::admin_session_ended(session.end_reason.as_deref()),
                Tone::Info,
            ),
        }
    }

    fn answer_prompt(&self, backend: &mut dyn Backend, prompt: &Prompt) -> Result<(), PromptError> {
        let request = match prompt.kind {
            PromptKind::Justify => {
                let ask = JustificationAsk {
                    program: prompt.program.clone(),
                    message: prompt.message.clone(),
                    spec: prompt.justification.clone(),
                };
                let Some(reason) = ask_justification(backend, &ask)? else {
                    return Ok(());
                };
                Request::Justify {
                    prompt: Some(prompt.id),
                    path: None,
                    reason,
                }
            }
            PromptKind::Approve => {
                let ask = ApprovalAsk {
                    program: prompt.program.clone(),
                    message: prompt.message.clone(),
                    justification: prompt.justification.clone(),
                    approval: prompt.approval.clone().unwrap_or_default(),
                };
                let Some(answer) =
                    ask_approval(backend, &ask, Timestamp::now(), &TimeZone::system())?
                else {
                    return Ok(());
                };
                Request::RequestApproval {
                    prompt: Some(prompt.id),
                    path: None,
                    reason: answer.justification,
                    start: answer.start,
                    end: answer.end,
                }
            }
        };
        let answer = connect(&self.endpoint).and_then(|mut client| client.call(&request));
        match answer {
            Ok(Response::Justified(justified)) => {
                let relaunched = justified
                    .relaunch
                    .as_deref()
                    .is_some_and(|argv| relaunch(&prompt.path, argv));
                backend.notify(
                    TITLE,
                    &messages::justified(&justified.program, relaunched),
                    Tone::Info,
                )
            }
            Ok(Response::RequestCreated(_)) => backend.notify(TITLE, messages::PENDING, Tone::Info),
            Err(ClientError::Daemon { message, .. }) => {
                backend.notify(TITLE, &epm_prompt::display::shown(&message), Tone::Warning)
            }
            Ok(other) => backend.notify(
                TITLE,
                &format!(
                    "epmd sent an unexpected answer ({})",
                    epm_ipc::Message::type_name(&other)
                ),
                Tone::Warning,
            ),
            Err(error) => backend.notify(
                TITLE,
                &format!("Your answer could not reach the EPM service: {error}"),
                Tone::Warning,
            ),
        }
    }
}

fn connect(endpoint: &Endpoint) -> Result<Client, ClientError> {
    Client::connect(endpoint, concat!("epm-helper ", env!("CARGO_PKG_VERSION")))
}

/// Starts the program again with its original arguments, as this user.
fn relaunch(path: &str, argv: &[String]) -> bool {
    std::process::Command::new(path)
        .args(argv.iter().skip(1))
        .stdin(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

fn show_blocked(backend: &mut dyn Backend, blocked: &Blocked) -> Result<(), PromptError> {
    let text = match &blocked.because {
        BlockReason::Denied => messages::denied(&blocked.program, blocked.message.as_deref()),
        BlockReason::Pending { .. } => messages::PENDING.to_owned(),
        BlockReason::Rejected { reason, .. } => match reason {
            Some(reason) => format!(
                "{} ({})",
                messages::REJECTED,
                epm_prompt::display::shown_line(reason)
            ),
            None => messages::REJECTED.to_owned(),
        },
        BlockReason::WindowNotStarted { start } => messages::window_not_started(*start),
        BlockReason::WindowExpired => messages::WINDOW_EXPIRED.to_owned(),
        BlockReason::PromptOpen => return Ok(()),
    };
    backend.notify(TITLE, &text, Tone::Warning)
}

fn show_request(
    backend: &mut dyn Backend,
    state: &mut State,
    request: &RequestInfo,
) -> Result<(), PromptError> {
    let now = Timestamp::now();
    let (text, tone) = match request.state.as_str() {
        "approved" => {
            state.approved.insert(request.id.clone());
            if request.start > now {
                state.upcoming.insert(
                    request.id.clone(),
                    Upcoming {
                        program: request.program.clone(),
                        start: request.start,
                        end: request.end,
                    },
                );
                (messages::window_not_started(request.start), Tone::Info)
            } else {
                (
                    messages::can_run_now(&request.program, request.end),
                    Tone::Info,
                )
            }
        }
        "denied" => match &request.state_reason {
            Some(reason) => (
                format!(
                    "{} ({})",
                    messages::REJECTED,
                    epm_prompt::display::shown_line(reason)
                ),
                Tone::Warning,
            ),
            None => (messages::REJECTED.to_owned(), Tone::Warning),
        },
        "expired" if state.approved.contains(&request.id) => {
            (messages::WINDOW_EXPIRED.to_owned(), Tone::Warning)
        }
        "expired" => (messages::EXPIRED_UNREVIEWED.to_owned(), Tone::Warning),
        "revoked" => (messages::REVOKED.to_owned(), Tone::Warning),
        "pending" => (messages::PENDING.to_owned(), Tone::Info),
        // Used: the user just ran it; nothing to say.
        _ => return Ok(()),
    };
    if request.state != "approved" {
        state.upcoming.remove(&request.id);
    }
    backend.notify(TITLE, &text, tone)
}

/// Says "you can run it now" for each approved window that has opened.
fn announce_open_windows(backend: &mut dyn Backend, state: &mut State, now: Timestamp) {
    let opened: Vec<String> = state
        .upcoming
        .iter()
        .filter(|(_, u)| u.start <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in opened {
        if let Some(upcoming) = state.upcoming.remove(&id)
            && upcoming.end > now
        {
            let text = messages::can_run_now(&upcoming.program, upcoming.end);
            if let Err(error) = backend.notify(TITLE, &text, Tone::Info) {
                tracing_line(&format!("cannot show a message: {error}"));
            }
        }
    }
}

/// The helper's own log line, on stderr (launchd keeps it).
fn tracing_line(text: &str) {
    eprintln!("epm-helper: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use epm_prompt::Scripted;

    fn request(state: &str, start: Timestamp) -> RequestInfo {
        RequestInfo {
            id: "r1".into(),
            user: "alice".into(),
            program: "nc".into(),
            path: "/usr/bin/nc".into(),
            identity: "sha256:00".into(),
            rule_id: "nc".into(),
            justification: "x".into(),
            start,
            end: start + jiff::SignedDuration::from_hours(1),
            state: state.into(),
            state_reason: None,
            submitted: true,
            created_at: start,
            updated_at: start,
        }
    }

    #[test]
    fn an_approved_window_ahead_is_announced_when_it_opens() {
        let mut backend = Scripted::default();
        let mut state = State::default();
        let start = Timestamp::now() + jiff::SignedDuration::from_hours(2);
        show_request(&mut backend, &mut state, &request("approved", start)).unwrap();
        announce_open_windows(&mut backend, &mut state, Timestamp::now());
        assert_eq!(backend.transcript().len(), 1, "not yet");
        announce_open_windows(
            &mut backend,
            &mut state,
            start + jiff::SignedDuration::from_secs(1),
        );
        let shown = backend.transcript().join("\n");
        assert!(shown.contains("has not started"), "{shown}");
        assert!(shown.contains("You can run it now"), "{shown}");
    }

    #[test]
    fn an_expired_approval_is_not_called_unreviewed() {
        let mut backend = Scripted::default();
        let mut state = State::default();
        let start = Timestamp::now() - jiff::SignedDuration::from_hours(2);
        show_request(&mut backend, &mut state, &request("approved", start)).unwrap();
        show_request(&mut backend, &mut state, &request("expired", start)).unwrap();
        show_request(
            &mut backend,
            &mut State::default(),
            &request("expired", start),
        )
        .unwrap();
        let shown = backend.transcript();
        assert!(shown[1].contains(messages::WINDOW_EXPIRED), "{shown:?}");
        assert!(shown[2].contains(messages::EXPIRED_UNREVIEWED), "{shown:?}");
    }

    /// Which of the backend's ways of showing something each text took.
    #[derive(Default)]
    struct Kinds(Vec<(&'static str, String)>);

    impl Backend for Kinds {
        fn entry(
            &mut self,
            _title: &str,
            text: &str,
            _choices: &[String],
            _default: &str,
        ) -> Result<Option<String>, PromptError> {
            self.0.push(("entry", text.to_owned()));
            let answers = self.0.iter().filter(|(k, _)| *k == "entry").count();
            Ok(Some(
                if answers == 1 { "no" } else { "a good reason" }.to_owned(),
            ))
        }
        fn message(&mut self, _title: &str, text: &str, _tone: Tone) -> Result<(), PromptError> {
            self.0.push(("message", text.to_owned()));
            Ok(())
        }
        fn notify(&mut self, _title: &str, text: &str, _tone: Tone) -> Result<(), PromptError> {
            self.0.push(("notify", text.to_owned()));
            Ok(())
        }
    }

    #[test]
    fn news_is_a_notification_and_a_bad_answer_a_message() {
        let mut backend = Kinds::default();
        let start = Timestamp::now() - jiff::SignedDuration::from_hours(1);
        show_request(
            &mut backend,
            &mut State::default(),
            &request("approved", start),
        )
        .unwrap();
        let blocked = Blocked {
            program: "nc".into(),
            path: "/usr/bin/nc".into(),
            rule_id: None,
            message: Some("Ask IT".into()),
            because: BlockReason::Denied,
        };
        show_blocked(&mut backend, &blocked).unwrap();
        let ask = JustificationAsk {
            program: "nc".into(),
            message: None,
            spec: epm_policy::JustificationSpec {
                min_length: 5,
                ..Default::default()
            },
        };
        ask_justification(&mut backend, &ask).unwrap().unwrap();
        let kinds: Vec<&str> = backend.0.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            ["notify", "notify", "entry", "message", "entry"],
            "{:?}",
            backend.0
        );
    }
}
