//! `epm-platform policy`: policy documents and their scopes.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use epm_api::admin::{PolicyEntry, PolicyPushed, PolicyScope};
use epm_api::paths;

use super::{Failure, Remote, client, encode, line, other};

#[derive(Debug, Args)]
#[group(multiple = false)]
pub(super) struct ScopeArgs {
    /// For one device.
    #[arg(long)]
    device: Option<String>,
    /// For one user, on the devices that report them.
    #[arg(long)]
    user: Option<String>,
    /// For one group, on the devices with a user in it.
    #[arg(long)]
    group: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> PolicyScope {
        match (&self.device, &self.user, &self.group) {
            (Some(d), _, _) => PolicyScope::Device(d.clone()),
            (_, Some(u), _) => PolicyScope::User(u.clone()),
            (_, _, Some(g)) => PolicyScope::Group(g.clone()),
            _ => PolicyScope::General,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Push a policy document (general when no scope is given); it replaces
    /// that scope's document and reaches agents at their next check-in.
    Push {
        /// The policy document (docs/policy.md).
        file: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the documents.
    List,
    /// Delete a scope's document.
    Delete {
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

/// Runs one `policy` command.
pub(super) async fn run(remote: &Remote, command: PolicyCommand) -> Result<(), Failure> {
    match command {
        PolicyCommand::Push { file, scope } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| other(format!("{}: {e}", file.display())))?;
            let scope = scope.scope();
            let pushed: PolicyPushed = client(remote)?.put_text(&policy_path(&scope), text).await?;
            for warning in &pushed.warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "pushed {} as revision {} ({} rules)",
                pushed.entry.scope, pushed.entry.revision, pushed.entry.rules
            );
            Ok(())
        }
        PolicyCommand::List => {
            let entries: Vec<PolicyEntry> = client(remote)?.get(paths::ADMIN_POLICIES).await?;
            for e in entries {
                println!(
                    "{}\trevision {}\t{} rules\tby {} at {}",
                    line(&e.scope),
                    e.revision,
                    e.rules,
                    line(&e.pushed_by),
                    e.pushed_at
                );
            }
            Ok(())
        }
        PolicyCommand::Delete { scope } => {
            let scope = scope.scope();
            client(remote)?.delete(&policy_path(&scope)).await?;
            println!("deleted {scope}");
            Ok(())
        }
    }
}

fn policy_path(scope: &PolicyScope) -> String {
    paths::ADMIN_POLICY.replace("{scope}", &encode(&scope.to_string()))
}
