//! Commands that talk to the running daemon over its control socket (or, on macOS, its XPC service).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use epm_audit::{AuditRecord, Decision};
use epm_ipc::{Client, Endpoint, Request, Response};

fn connect(endpoint: &Endpoint) -> anyhow::Result<Client> {
    Ok(Client::connect(
        endpoint,
        concat!("epmctl ", env!("CARGO_PKG_VERSION")),
    )?)
}

/// `epmctl status`
pub(crate) fn status(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    let Response::Status(report) = client.call(&Request::Status)? else {
        anyhow::bail!("epmd sent an unexpected answer to status");
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &report.counters;
    let hit_rate = match c.cache_hits + c.cache_misses {
        0 => "n/a".to_owned(),
        total => format!("{:.1} %", c.cache_hits as f64 * 100.0 / total as f64),
    };
    let us = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.0} µs"));
    println!(
        "epmd {} on {}, up {}",
        report.daemon_version,
        report.device_id,
        uptime(report.uptime_secs)
    );
    println!("  mode:        {} (fail {})", report.mode, report.fail_mode);
    println!(
        "  policy:      version {} from {}, {} rules, loaded {}",
        report.policy.version,
        report.policy.source,
        report.policy.rule_count,
        report.policy.loaded_at
    );
    println!(
        "  execs:       {} seen, {} allowed, {} denied, {} would deny (monitor)",
        c.execs_seen, c.allowed, c.denied, c.would_deny
    );
    println!(
        "  cache:       {hit_rate} hits ({} hits, {} misses)",
        c.cache_hits, c.cache_misses
    );
    println!("  queue:       {} of {}", c.queue_depth, c.queue_capacity);
    println!(
        "  fail mode:   {} answers ({} overflow, {} over a user's share, {} over a user's hashing budget, {} changing files, {} panics)",
        c.fail_mode_answers,
        c.overflow,
        c.over_share,
        c.hash_budget,
        c.unstable_content,
        c.worker_panics
    );
    println!(
        "  latency:     p50 {}, p99 {}, max {}",
        us(report.latency_us.p50),
        us(report.latency_us.p99),
        us(report.latency_us.max)
    );
    println!(
        "  audit:       last seq {}, {} awaiting upload ({}), {} dropped",
        report.audit_last_seq,
        report.audit_outbox_pending,
        bytes(report.audit_outbox_bytes),
        c.audit_dropped
    );
    if let Some(hook) = &report.kernel_hook {
        println!("  kernel hook: {} ({})", hook.state, hook.detail);
        if hook.unrecorded_refusals > 0 {
            println!(
                "               {} execs refused unrecorded (event buffer full)",
                hook.unrecorded_refusals
            );
        }
        for exposure in &hook.exposures {
            match exposure.state.as_str() {
                "covered" => println!(
                    "  exposure:    {}: covered by the kernel hook",
                    exposure.name
                ),
                state => println!(
                    "  exposure:    {}: {state} (closed by: {})",
                    exposure.name, exposure.setting
                ),
            }
        }
    }
    match &report.platform {
        None => println!("  platform:    none (standalone)"),
        Some(p) => {
            println!("  platform:    {}", p.url);
            println!(
                "  agent id:    {}",
                p.agent_id.as_deref().unwrap_or("not enrolled")
            );
            let last = match (&p.last_sync_at, p.last_ok) {
                (Some(at), Some(true)) => format!("{at}: ok"),
                (Some(at), _) => format!("{at}: FAILED"),
                _ => "not yet".to_owned(),
            };
            println!("  last sync:   {last}");
            if let Some(result) = &p.last_result {
                println!("               {result}");
            }
            println!(
                "  next sync:   {}",
                p.next_sync_at.as_deref().unwrap_or("pending")
            );
            println!("  acked seq:   {}", p.acked_seq);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

/// `epmctl sync`
pub(crate) fn sync(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    // The daemon answers within about a minute (or says the sync goes on).
    client.set_timeout(Some(std::time::Duration::from_secs(90)))?;
    let outcome = match client.call(&Request::Sync)? {
        Response::Synced(outcome) => outcome,
        _ => anyhow::bail!("epmd sent an unexpected answer to sync"),
    };
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if outcome.ok {
        println!("sync ok: {}", outcome.message);
    } else if outcome.running {
        eprintln!("epmctl: sync still running: {}", outcome.message);
    } else {
        eprintln!("epmctl: sync failed: {}", outcome.message);
    }
    Ok(if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `epmctl policy show`
pub(crate) fn policy_show(endpoint: &Endpoint, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    let Response::Policy(info) = client.call(&Request::PolicyShow)? else {
        anyhow::bail!("epmd sent an unexpected answer to policy show");
    };
    let document = info.document.clone().unwrap_or_default();
    if json {
        println!("{document}");
    } else {
        eprintln!(
            "# version {} from {}, {} rules, loaded {}",
            info.version, info.source, info.rule_count, info.loaded_at
        );
        let pretty = serde_json::from_str::<serde_json::Value>(&document)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(document);
        println!("{pretty}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `epmctl policy explain PATH` against the live policy.
pub(crate) fn policy_explain(
    endpoint: &Endpoint,
    path: &Path,
    sha256: Option<String>,
    user: Option<String>,
    groups: Option<Vec<String>>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    let Response::Explanation(e) = client.call(&Request::PolicyExplain {
        path: path.to_string_lossy().into_owned(),
        sha256,
        user,
        groups,
    })?
    else {
        anyhow::bail!("epmd sent an unexpected answer to policy explain");
    };
    crate::explain::print_explanation(path, &e, "live, from epmd", json);
    Ok(ExitCode::SUCCESS)
}

/// What `audit tail` shows.
pub(crate) struct TailOptions {
    pub(crate) lines: u32,
    pub(crate) follow: bool,
    pub(crate) decision: Option<String>,
    pub(crate) user: Option<String>,
}

/// `epmctl audit tail`
pub(crate) fn audit_tail(
    endpoint: &Endpoint,
    options: TailOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(endpoint)?;
    if options.follow {
        client.wait_forever();
    }
    client.send(&Request::AuditTail {
        lines: options.lines,
        follow: options.follow,
        decision: options.decision,
        user: options.user,
    })?;
    let stdout = std::io::stdout();
    let color = !json && stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = stdout.lock();
    loop {
        match client.recv()? {
            Response::AuditRecords { lines } => {
                for line in lines {
                    let text = if json { line } else { pretty(&line, color) };
                    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                        // The reader went away (`| head`): not an error.
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            Response::End => return Ok(ExitCode::SUCCESS),
            other => anyhow::bail!("epmd sent an unexpected answer to audit tail: {other:?}"),
        }
    }
}

/// Makes text from a record safe to print: file names are chosen by users,
/// and an escape sequence or newline in one must not reach an admin's
/// terminal as anything but visible text.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(char::escape_debug)
        .collect::<String>()
        .replace("\\\"", "\"")
}

/// One record as an aligned line: time, decision, user, path, rule, reason.
fn pretty(line: &str, color: bool) -> String {
    let Ok(record) = AuditRecord::parse(line) else {
        return line.to_owned();
    };
    let e = &record.event;
    let decision = e.decision.as_deref().unwrap_or("-");
    let known = Decision::parse(decision);
    let paint = |code: &str, text: String| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    let decision_cell = format!("{decision:<10}");
    let decision_cell = match known {
        Some(Decision::Deny) => paint("1;31", decision_cell),
        Some(Decision::WouldDeny) => paint("33", decision_cell),
        Some(Decision::Allow) => paint("32", decision_cell),
        None => decision_cell,
    };
    let time = record
        .time
        .get(..19)
        .unwrap_or(&record.time)
        .replace('T', " ");
    let subject = match (&e.path, &e.event) {
        (Some(path), _) => printable(path),
        (None, event) => format!("[{}]", printable(event)),
    };
    let mut text = format!(
        "{:>7} {time} {decision_cell} {:<12} {subject}",
        record.seq,
        printable(e.user.as_deref().unwrap_or("-")),
    );
    if let Some(rule) = &e.rule_id {
        text.push_str(&format!("  rule={}", printable(rule)));
    }
    if let Some(reason) = &e.reason
        && (e.rule_id.is_none() || known != Some(Decision::Allow))
    {
        text.push_str(&paint("2", format!("  ({})", printable(reason))));
    }
    text
}

/// `epmctl audit verify [FILE]`: local files, no daemon needed.
pub(crate) fn audit_verify(target: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let result = if target.is_dir() {
        epm_audit::verify_dir(target)
    } else {
        // A single file: verify it, and the rotated files before it when it
        // is the live log, so a deletion across files is caught.
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let live = target
            .file_name()
            .is_some_and(|n| n == epm_audit::LIVE_FILE);
        if !target.exists() {
            anyhow::bail!("no audit log at {}", target.display());
        }
        if live {
            // The whole log, consistent while the daemon rotates it.
            epm_audit::log_files(dir).with_context(|| format!("cannot list {}", dir.display()))?;
            epm_audit::verify_dir(dir)
        } else {
            epm_audit::verify_files(&[target.to_owned()])
        }
    };
    match result {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "intact": true, "files": report.files, "records": report.records,
                        "first_seq": report.first_seq, "last_seq": report.last_seq,
                        "starts_at_genesis": report.starts_at_genesis,
                    })
                );
            } else {
                let range = match (report.first_seq, report.last_seq) {
                    (Some(first), Some(last)) => format!("seq {first}..={last}"),
                    _ => "no records".to_owned(),
                };
                let origin = if report.starts_at_genesis || report.records == 0 {
                    ""
                } else {
                    " (older files were rotated away; the chain is checked from the first kept record)"
                };
                println!(
                    "intact: {} records in {} files, {range}{origin}",
                    report.records, report.files
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(epm_audit::VerifyError::Broken(broken)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "intact": false,
                        "file": broken.file.as_ref().map(|f| f.display().to_string()),
                        "line": broken.line, "seq": broken.seq, "problem": broken.to_string(),
                    })
                );
            } else {
                println!("BROKEN: {broken}");
            }
            Ok(ExitCode::from(1))
        }
        Err(epm_audit::VerifyError::Io(error)) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_newlines_in_records_print_as_visible_text() {
        let shown = printable("/tmp/evil\x1b]0;owned\x07\nfake line");
        assert!(
            !shown.contains('\x1b') && !shown.contains('\n') && !shown.contains('\x07'),
            "{shown}"
        );
        assert_eq!(printable("/usr/bin/ls"), "/usr/bin/ls");
        assert_eq!(printable("rule \"x\""), "rule \"x\"");
    }
}
