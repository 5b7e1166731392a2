//! `epm-platform audit`: the fleet's audit records.

use clap::Subcommand;
use epm_api::admin::AuditPage;
use epm_api::paths;

use super::{Failure, Remote, client, encode, line};

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Print the newest records; with -f, keep following.
    Tail {
        /// Keep waiting for new records.
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest records first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only this decision: allow, deny, would_deny…
        #[arg(long)]
        decision: Option<String>,
        /// Print each record as the agent wrote it, one JSON per line.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `audit` command.
pub(super) async fn run(remote: &Remote, command: AuditCommand) -> Result<(), Failure> {
    let AuditCommand::Tail {
        follow,
        lines,
        device,
        decision,
        json,
    } = command;
    let client = client(remote)?;
    let mut after: Option<u64> = None;
    let mut first = true;
    loop {
        let mut query = vec![format!("limit={}", if first { lines.max(1) } else { 1000 })];
        if let Some(after) = after {
            query.push(format!("after={after}"));
        }
        if !first {
            query.push("wait=30".into());
        }
        if let Some(device) = &device {
            query.push(format!("device={}", encode(device)));
        }
        if let Some(decision) = &decision {
            query.push(format!("decision={}", encode(decision)));
        }
        let page: AuditPage = client
            .get(&format!("{}?{}", paths::ADMIN_AUDIT, query.join("&")))
            .await?;
        for record in &page.records {
            if json {
                println!("{}", record.record.get());
            } else {
                println!("{}", pretty_record(&record.device_id, record.record.get()));
            }
        }
        after = Some(page.next);
        first = false;
        if !follow {
            return Ok(());
        }
    }
}

fn pretty_record(device: &str, raw: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(raw).unwrap_or_default();
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(line)
            .unwrap_or_default()
    };
    let event = field("event");
    let what = if event == "exec" || event.is_empty() {
        field("decision")
    } else {
        event
    };
    format!(
        "{} {} seq={} {} user={} path={} rule={}",
        field("time"),
        line(device),
        v.get("seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        what,
        field("user"),
        field("path"),
        field("rule_id")
    )
}
