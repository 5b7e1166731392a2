//! `epmctl admin`: time-boxed admin sessions. Start one (meeting the
//! policy's justification or approval), see it, end it early.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use epm_ipc::{AdminSessionInfo, Client, ElevationVerdict, Request, Response};
use epm_policy::JustificationSpec;

/// How often a waiting `admin start --wait` asks again.
const POLL: Duration = Duration::from_secs(2);

fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(Client::connect(
        socket,
        concat!("epmctl ", env!("CARGO_PKG_VERSION")),
    )?)
}

/// Asks for a reason on the terminal, within the rule's limits; `None`
/// when there is no terminal to ask on.
fn ask_reason(question: &str, spec: &JustificationSpec) -> anyhow::Result<Option<String>> {
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    for (i, preset) in spec.presets.iter().enumerate() {
        eprintln!("  {}. {preset}", i + 1);
    }
    for _ in 0..3 {
        eprint!("{question} ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim();
        let answer = line
            .parse::<usize>()
            .ok()
            .and_then(|n| spec.presets.get(n.wrapping_sub(1)).cloned())
            .unwrap_or_else(|| line.to_owned());
        match spec.check(&answer) {
            Ok(answer) => return Ok(Some(answer)),
            Err(error) => eprintln!("{error}"),
        }
    }
    anyhow::bail!("no acceptable reason given")
}

fn print_session(session: &AdminSessionInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(session)?);
        return Ok(());
    }
    match (&session.ended_at, &session.end_reason) {
        (Some(at), reason) => println!(
            "Admin session {} of {} ended at {at} ({}).",
            session.id,
            session.user,
            reason.as_deref().unwrap_or("ended")
        ),
        (None, _) => {
            println!(
                "{} is an administrator (group {}) until {}.",
                session.user, session.group, session.expires_at
            );
            if session.was_member_before {
                println!(
                    "  ({} was already in {}; that stays so.)",
                    session.user, session.group
                );
            }
        }
    }
    Ok(())
}

/// `epmctl admin start --minutes N`
pub(crate) fn start(
    socket: &Path,
    minutes: u32,
    mut reason: Option<String>,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket)?;
    let mut announced = false;
    loop {
        let request = Request::AdminStart {
            minutes,
            reason: reason.clone(),
            window: None,
        };
        let verdict = match client.call(&request) {
            Ok(Response::AdminSession(session)) => {
                print_session(&session, json)?;
                if !json {
                    println!("End it early with `epmctl admin end`.");
                    if cfg!(target_os = "linux") {
                        println!(
                            "New logins have the group; in this shell, run `newgrp {}` to use it.",
                            session.group
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Elevation(verdict)) => verdict,
            Ok(other) => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
            Err(epm_ipc::ClientError::Daemon { message, .. }) => {
                eprintln!("epmctl: {message}");
                return Ok(ExitCode::from(1));
            }
            Err(error) => return Err(error.into()),
        };
        match verdict {
            ElevationVerdict::Allowed { .. } => {
                anyhow::bail!("epmd allowed the session but did not start it")
            }
            ElevationVerdict::Denied { message, .. } => {
                eprintln!("epmctl: {message}");
                return Ok(ExitCode::from(1));
            }
            ElevationVerdict::NeedsJustification {
                message,
                justification,
                ..
            }
            | ElevationVerdict::NeedsApproval {
                message,
                justification,
                ..
            } => {
                if reason.is_some() {
                    anyhow::bail!("epmd asked again for a reason it was given");
                }
                if let Some(message) = message {
                    eprintln!("{message}");
                }
                let Some(answer) =
                    ask_reason("Why do you need administrator rights?", &justification)?
                else {
                    eprintln!("epmctl: a reason is required: give it with --reason TEXT");
                    return Ok(ExitCode::from(2));
                };
                reason = Some(answer);
            }
            ElevationVerdict::Pending { request, .. } => {
                if !wait {
                    println!(
                        "Your request {} is pending administrator review. Run `epmctl admin start --minutes {minutes}` again once it is approved, or add --wait.",
                        request.id
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if !announced {
                    eprintln!("Waiting for approval… (Ctrl+C to cancel)");
                    announced = true;
                }
                std::thread::sleep(POLL);
            }
            ElevationVerdict::Rejected {
                request,
                retry_after,
                ..
            } => {
                let why = request
                    .state_reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                eprintln!(
                    "epmctl: your last request was rejected by the administrator{why}. You can ask again after {retry_after}."
                );
                return Ok(ExitCode::from(1));
            }
        }
    }
}

/// `epmctl admin status [--all]`
pub(crate) fn status(socket: &Path, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket)?;
    let sessions = match client.call(&Request::AdminStatus { all }) {
        Ok(Response::AdminSessions { sessions }) => sessions,
        Ok(other) => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
        Err(epm_ipc::ClientError::Daemon { message, .. }) => {
            eprintln!("epmctl: {message}");
            return Ok(ExitCode::from(1));
        }
        Err(error) => return Err(error.into()),
    };
    if json {
        println!("{}", serde_json::to_string(&sessions)?);
    } else if sessions.is_empty() {
        println!("No admin session.");
    }
    if !json {
        for session in &sessions {
            print_session(session, false)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `epmctl admin end`
pub(crate) fn end(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(socket)?;
    match client.call(&Request::AdminEnd) {
        Ok(Response::AdminSession(session)) => {
            print_session(&session, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(other) => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
        Err(epm_ipc::ClientError::Daemon { message, .. }) => {
            eprintln!("epmctl: {message}");
            Ok(ExitCode::from(1))
        }
        Err(error) => Err(error.into()),
    }
}
