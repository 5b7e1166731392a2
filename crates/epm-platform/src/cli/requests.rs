//! `epm-platform requests`: approval requests.

use clap::Subcommand;
use epm_api::admin::{AdminRequest, DenyRequest, RevokeRequest};
use epm_api::agent::RequestState;
use epm_api::paths;

use super::{Failure, Remote, client, encode, line, print_json};

#[derive(Debug, Subcommand)]
pub(super) enum RequestsCommand {
    /// List requests, newest first.
    List {
        /// Only this state: pending, approved, denied, expired, revoked, used.
        #[arg(long)]
        state: Option<RequestState>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve at your level.
    Approve {
        /// Request id.
        id: String,
    },
    /// Deny, with a reason the user reads.
    Deny {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Withdraw an approval.
    Revoke {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs one `requests` command.
pub(super) async fn run(remote: &Remote, command: RequestsCommand) -> Result<(), Failure> {
    let client = client(remote)?;
    let show = |r: &AdminRequest| {
        println!(
            "{}\t{}\t{}\t{}\trule {}\t{} {}\t{}..{}\tlevel {}/{}\t{}",
            r.id,
            r.state,
            line(&r.device_id),
            line(&r.user),
            line(&r.rule_id),
            r.subject.identity.kind,
            line(&r.subject.path),
            r.window.start,
            r.window.end,
            r.current_level,
            r.levels.len(),
            line(&r.justification)
        )
    };
    match command {
        RequestsCommand::List {
            state,
            device,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(state) = state {
                query.push(format!("state={state}"));
            }
            if let Some(device) = device {
                query.push(format!("device={}", encode(&device)));
            }
            let path = if query.is_empty() {
                paths::ADMIN_REQUESTS.to_owned()
            } else {
                format!("{}?{}", paths::ADMIN_REQUESTS, query.join("&"))
            };
            let requests: Vec<AdminRequest> = client.get(&path).await?;
            for r in &requests {
                if json {
                    print_json(r)?;
                } else {
                    show(r);
                }
            }
            Ok(())
        }
        RequestsCommand::Approve { id } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &encode(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            show(&r);
            Ok(())
        }
        RequestsCommand::Deny { id, reason } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_DENY.replace("{id}", &encode(&id)),
                    &DenyRequest { reason },
                )
                .await?;
            show(&r);
            Ok(())
        }
        RequestsCommand::Revoke { id, reason } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_REVOKE.replace("{id}", &encode(&id)),
                    &RevokeRequest { reason },
                )
                .await?;
            show(&r);
            Ok(())
        }
    }
}
