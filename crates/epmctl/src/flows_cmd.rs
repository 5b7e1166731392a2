//! The user's side of the interactive flows, for a terminal: justify a
//! program, ask for approval (online or with an offline code), and list
//! one's requests and grants. The same flows the desktop helper offers,
//! for ssh sessions and anyone without a helper.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use epm_ipc::{Client, Endpoint, GrantInfo, Request, RequestInfo, Response};
use epm_prompt::messages;
use epm_prompt::when::parse_time;
use jiff::Timestamp;
use jiff::tz::TimeZone;

fn connect(endpoint: &Endpoint) -> anyhow::Result<Client> {
    Ok(Client::connect(
        endpoint,
        concat!("epmctl ", env!("CARGO_PKG_VERSION")),
    )?)
}

/// The program as the daemon will see it: absolute, symlinks resolved
/// (the daemon hashes the file, so it must name the file that runs).
fn program_path(program: &Path) -> anyhow::Result<String> {
    let resolved = if program.components().count() == 1 && !program.exists() {
        // A bare name: look it up on PATH, as the shell would.
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
            .with_context(|| format!("{} is not on PATH", program.display()))?
    } else {
        program.to_path_buf()
    };
    let canonical = std::fs::canonicalize(&resolved)
        .with_context(|| format!("cannot find {}", resolved.display()))?;
    canonical
        .into_os_string()
        .into_string()
        .map_err(|_| anyhow::anyhow!("the path {} is not UTF-8", resolved.display()))
}

/// The reason from `--reason`, or asked on the terminal.
fn reason_or_ask(reason: Option<String>, program: &str) -> anyhow::Result<String> {
    if let Some(reason) = reason {
        return Ok(reason);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("give the reason with --reason TEXT");
    }
    eprint!("Why do you need to run {program}? ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// Sends a request; a refusal from the daemon is `Ok(Err(message))`, so it
/// can end with exit status 1 rather than 2.
fn call(client: &mut Client, request: &Request) -> anyhow::Result<Result<Response, String>> {
    match client.call(request) {
        Ok(response) => Ok(Ok(response)),
        Err(epm_ipc::ClientError::Daemon { message, .. }) => Ok(Err(message)),
        Err(error) => Err(error.into()),
    }
}

/// A refusal from the daemon: its message, exit status 1.
fn refused(message: &str) -> ExitCode {
    eprintln!("epmctl: {message}");
    ExitCode::from(1)
}

/// `epmctl justify PROGRAM --reason TEXT`
pub(crate) fn justify(
    endpoint: &Endpoint,
    program: &Path,
    reason: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let path = program_path(program)?;
    let reason = reason_or_ask(reason, &path)?;
    let mut client = connect(endpoint)?;
    match call(
        &mut client,
        &Request::Justify {
            prompt: None,
            path: Some(path),
            reason,
        },
    )? {
        Ok(Response::Justified(justified)) => {
            if json {
                println!("{}", serde_json::to_string(&justified)?);
            } else {
                println!("{}", messages::justified(&justified.program, false));
                println!(
                    "  (grant {}, valid until {})",
                    justified.grant.id, justified.grant.not_after
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => Ok(refused(&message)),
        other => anyhow::bail!("epmd sent an unexpected answer to justify: {other:?}"),
    }
}

/// What `epmctl request` was asked to do.
pub(crate) struct RequestOptions {
    pub(crate) program: Option<std::path::PathBuf>,
    pub(crate) reason: Option<String>,
    pub(crate) from: String,
    pub(crate) until: String,
    pub(crate) offline: bool,
    pub(crate) code: Option<String>,
}

/// `epmctl request …`
pub(crate) fn request(
    endpoint: &Endpoint,
    options: RequestOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(code) = options.code {
        return offline_code(endpoint, code, json);
    }
    let program = options
        .program
        .context("name the program to request, or give --code CODE")?;
    let path = program_path(&program)?;
    let now = Timestamp::now();
    let zone = TimeZone::system();
    let start = parse_time(&options.from, now, &zone).context("--from")?;
    let end = parse_time(&options.until, start, &zone).context("--until")?;
    let reason = reason_or_ask(options.reason, &path)?;
    let mut client = connect(endpoint)?;
    if options.offline {
        return match call(
            &mut client,
            &Request::OfflineChallenge {
                path,
                reason,
                start,
                end,
            },
        )? {
            Ok(Response::Challenge {
                challenge,
                device_id,
            }) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"challenge": challenge, "device_id": device_id})
                    );
                } else {
                    println!("Read this challenge to your administrator:\n\n  {challenge}\n");
                    println!(
                        "They answer it with:  epm-platform offline-code --device {device_id} CHALLENGE"
                    );
                    println!("Then enter their code:  epmctl request --code XXXXX-XXXXX");
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(message) => Ok(refused(&message)),
            other => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
        };
    }
    match call(
        &mut client,
        &Request::RequestApproval {
            prompt: None,
            path: Some(path),
            reason,
            start,
            end,
        },
    )? {
        Ok(Response::RequestCreated(request)) => {
            if json {
                println!("{}", serde_json::to_string(&request)?);
            } else {
                println!(
                    "Request {} for {} sent for approval (window {} to {}).",
                    request.id, request.program, request.start, request.end
                );
                println!("{}", messages::PENDING);
                println!("See its state with: epmctl requests");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => Ok(refused(&message)),
        other => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
    }
}

fn offline_code(endpoint: &Endpoint, code: String, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    match call(&mut client, &Request::OfflineCode { code })? {
        Ok(Response::Granted(grant)) => {
            if json {
                println!("{}", serde_json::to_string(&grant)?);
            } else {
                println!(
                    "Code accepted: you may run it {} time(s) from {} until {}.",
                    grant.uses_left, grant.not_before, grant.not_after
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => Ok(refused(&message)),
        other => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
    }
}

/// `epmctl requests [--all]`
pub(crate) fn requests(endpoint: &Endpoint, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    match call(&mut client, &Request::ListRequests { all })? {
        Ok(Response::Requests { requests }) => {
            if json {
                println!("{}", serde_json::to_string(&requests)?);
            } else if requests.is_empty() {
                println!("No requests.");
            } else {
                for request in &requests {
                    print_request(request, all);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => Ok(refused(&message)),
        other => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
    }
}

fn print_request(request: &RequestInfo, with_user: bool) {
    let who = if with_user {
        format!(" ({})", request.user)
    } else {
        String::new()
    };
    let state = match request.state.as_str() {
        "pending" if !request.submitted => "pending (not yet sent: the platform is unreachable)",
        other => other,
    };
    println!(
        "{}  {}{}  {}",
        request.id,
        epm_prompt::display::shown_line(&request.program),
        who,
        state
    );
    println!("    window {} to {}", request.start, request.end);
    println!(
        "    reason: {}",
        epm_prompt::display::shown_line(&request.justification)
    );
    if let Some(why) = &request.state_reason {
        println!(
            "    {}: {}",
            request.state,
            epm_prompt::display::shown_line(why)
        );
    }
    if let Some(message) = state_message(request, Timestamp::now()) {
        println!("    {message}");
    }
}

/// The seed product's words for a request's state.
pub(crate) fn state_message(request: &RequestInfo, now: Timestamp) -> Option<String> {
    Some(match request.state.as_str() {
        "pending" => messages::PENDING.to_owned(),
        "denied" => messages::REJECTED.to_owned(),
        "revoked" => messages::REVOKED.to_owned(),
        "used" => messages::WINDOW_EXPIRED.to_owned(),
        "expired" => messages::EXPIRED_UNREVIEWED.to_owned(),
        "approved" if request.start > now => messages::window_not_started(request.start),
        "approved" if request.end <= now => messages::WINDOW_EXPIRED.to_owned(),
        "approved" => messages::can_run_now(&request.program, request.end),
        _ => return None,
    })
}

/// `epmctl grants [--all]`
pub(crate) fn grants(endpoint: &Endpoint, all: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    match call(&mut client, &Request::ListGrants { all })? {
        Ok(Response::Grants { grants }) => {
            if json {
                println!("{}", serde_json::to_string(&grants)?);
            } else if grants.is_empty() {
                println!("No grants.");
            } else {
                for grant in &grants {
                    print_grant(grant);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(message) => Ok(refused(&message)),
        other => anyhow::bail!("epmd sent an unexpected answer: {other:?}"),
    }
}

fn print_grant(grant: &GrantInfo) {
    let program = grant.path.as_deref().unwrap_or(&grant.identity);
    println!(
        "{}  {}  {} ({} left, from {})",
        grant.id,
        epm_prompt::display::shown_line(program),
        grant.user,
        grant.uses_left,
        grant.source
    );
    println!("    valid {} to {}", grant.not_before, grant.not_after);
}
