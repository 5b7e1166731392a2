//! `epm-platform enroll-token`: the tokens agents enroll with.

use std::time::Duration;

use clap::Subcommand;
use epm_api::admin::{CreateEnrollToken, EnrollTokenCreated, EnrollTokenInfo};
use epm_api::paths;

use super::{Failure, Remote, client, encode, line, parse_duration, print_json};

#[derive(Debug, Subcommand)]
pub(super) enum EnrollTokenCommand {
    /// Create a token agents enroll with (`[platform] enrollment_token`).
    Create {
        /// How many devices may use it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid: 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (their ids, never the secrets).
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id: it enrolls nothing more.
    Revoke {
        /// The token's id (etk_…), from `create` or `list`.
        id: String,
    },
}

/// Runs one `enroll-token` command.
pub(super) async fn run(remote: &Remote, command: EnrollTokenCommand) -> Result<(), Failure> {
    match command {
        EnrollTokenCommand::Create {
            uses,
            expires,
            json,
        } => {
            let created: EnrollTokenCreated = client(remote)?
                .post(
                    paths::ADMIN_ENROLL_TOKENS,
                    &CreateEnrollToken {
                        uses,
                        expires_in_seconds: expires.as_secs(),
                    },
                )
                .await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.token);
            eprintln!(
                "enrollment token {} for {} device(s), valid until {}",
                created.id, created.uses, created.expires_at
            );
            Ok(())
        }
        EnrollTokenCommand::List { json } => {
            let tokens: Vec<EnrollTokenInfo> =
                client(remote)?.get(paths::ADMIN_ENROLL_TOKENS).await?;
            for t in &tokens {
                if json {
                    print_json(t)?;
                } else {
                    println!(
                        "{}\t{} use(s) left\texpires {}\tby {}{}",
                        t.id,
                        t.uses_left,
                        t.expires_at,
                        line(&t.created_by),
                        t.revoked_by
                            .as_deref()
                            .map(|who| format!("\trevoked by {}", line(who)))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        EnrollTokenCommand::Revoke { id } => {
            client(remote)?
                .post_empty(&paths::ADMIN_ENROLL_TOKEN_REVOKE.replace("{id}", &encode(&id)))
                .await?;
            println!("revoked enrollment token {id}");
            Ok(())
        }
    }
}
