//! `epm-platform offline-code`: answering an agent's offline challenge.

use epm_api::admin::{OfflineCodeRequest, OfflineCodeResponse};
use epm_api::paths;

use super::{Failure, Remote, client, line};

/// Asks the platform for the code that answers `challenge` from `device`.
pub(super) async fn run(remote: &Remote, device: String, challenge: String) -> Result<(), Failure> {
    let answer: OfflineCodeResponse = client(remote)?
        .post(
            paths::ADMIN_OFFLINE_CODES,
            &OfflineCodeRequest {
                device_id: device,
                challenge,
            },
        )
        .await?;
    let what = format!(
        "{} on {} to run {} {} (rule {}) from {} until {}",
        line(&answer.user),
        line(&answer.device_id),
        line(&answer.identity.kind),
        line(&answer.identity.value),
        line(&answer.rule_id),
        answer.window.start,
        answer.window.end
    );
    match &answer.code {
        Some(code) => {
            println!("{code}");
            eprintln!("allows {what}, once");
        }
        None => eprintln!(
            "approved at your level; level {} of {} waits: its approvers run the same command (or `requests approve {}`), then the code is given. It will allow {what}",
            answer.current_level,
            answer.levels.len(),
            answer.request_id
        ),
    }
    Ok(())
}
