//! `epm-platform devices`: enrolled devices.

use clap::Subcommand;
use epm_api::admin::DeviceInfo;
use epm_api::paths;

use super::{Failure, Remote, client, encode, line, print_json};

#[derive(Debug, Subcommand)]
pub(super) enum DevicesCommand {
    /// List enrolled devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a device: its credentials stop working, its pending and
    /// approved requests are revoked; its audit stays.
    Remove {
        /// Device id.
        device_id: String,
    },
    /// Void a device's credentials now, revoke its pending and approved
    /// requests, and let the next enrollment with a valid token take its id
    /// as a new agent (a reinstalled machine). Without a reset, enrolling an
    /// enrolled device id again needs its current credentials.
    Reset {
        /// Device id.
        device_id: String,
    },
}

/// Runs one `devices` command.
pub(super) async fn run(remote: &Remote, command: DevicesCommand) -> Result<(), Failure> {
    match command {
        DevicesCommand::List { json } => {
            let devices: Vec<DeviceInfo> = client(remote)?.get(paths::ADMIN_DEVICES).await?;
            if json {
                return devices.iter().try_for_each(print_json);
            }
            for d in devices {
                println!(
                    "{}\t{}\tpolicy v{} (agent has {})\tlast check-in {}\taudit acked {} ({} pending)",
                    line(&d.device_id),
                    line(&d.hostname),
                    d.bundle_version,
                    d.policy_version.map_or("none".into(), |v| format!("v{v}")),
                    d.last_checkin.map_or("never".into(), |t| t.to_string()),
                    d.audit_acked_seq,
                    d.outbox_pending
                );
                if d.reset_pending {
                    println!("\t(reset: waits to enroll again)");
                }
            }
            Ok(())
        }
        DevicesCommand::Remove { device_id } => {
            client(remote)?
                .delete(&paths::ADMIN_DEVICE.replace("{device_id}", &encode(&device_id)))
                .await?;
            println!("removed device {device_id}");
            Ok(())
        }
        DevicesCommand::Reset { device_id } => {
            client(remote)?
                .post_empty(&paths::ADMIN_DEVICE_RESET.replace("{device_id}", &encode(&device_id)))
                .await?;
            println!("reset device {device_id}: it enrolls again with an enrollment token");
            Ok(())
        }
    }
}
