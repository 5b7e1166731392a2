//! `epmctl admin`: time-boxed admin sessions. Start one (meeting the
//! policy's justification or approval), see it, end it early.

use std::process::ExitCode;

use epm_ipc::{AdminSessionInfo, Client, ElevationVerdict, Endpoint, Request, Response};

use crate::verdicts::Answers;

fn connect(endpoint: &Endpoint) -> anyhow::Result<Client> {
    Ok(Client::connect(
        endpoint,
        concat!("epmctl ", env!("CARGO_PKG_VERSION")),
    )?)
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
    endpoint: &Endpoint,
    minutes: u32,
    reason: Option<String>,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    // An approval is asked for the next hour: the session starts inside it.
    let mut answers = Answers::new(reason, "now".into(), "+1h".into());
    loop {
        let request = Request::AdminStart {
            minutes,
            reason: answers.reason(),
            window: answers.window(),
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
        if let ElevationVerdict::Pending { request, .. } = &verdict
            && !wait
        {
            println!(
                "Your request {} is pending administrator review. Run `epmctl admin start --minutes {minutes}` again once it is approved, or add --wait.",
                request.id
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(code) = answers.answer(&verdict, "An admin session")? {
            return Ok(code);
        }
    }
}

/// `epmctl admin status [--all]`
pub(crate) fn status(endpoint: &Endpoint, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
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
pub(crate) fn end(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
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
