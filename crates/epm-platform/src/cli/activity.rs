//! `epm-platform activity`: the platform's own audit of admin calls.

use epm_api::admin::ActivityPage;
use epm_api::paths;

use super::{Failure, Remote, client, encode, line, print_json};

/// Prints admin calls (of `admin` only, when given), or with `refused` the
/// counts of refused anonymous and rate-limited calls.
pub(super) async fn run(
    remote: &Remote,
    admin: Option<&str>,
    refused: bool,
    json: bool,
) -> Result<(), Failure> {
    let path = match &admin {
        Some(admin) => format!("{}?admin={}", paths::ADMIN_ACTIVITY, encode(admin)),
        None => paths::ADMIN_ACTIVITY.to_owned(),
    };
    let page: ActivityPage = client(remote)?.get(&path).await?;
    if refused {
        for r in page.refused {
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{} time(s), last {}",
                    r.hour,
                    line(&r.source),
                    line(&r.who),
                    line(&r.call),
                    r.status,
                    r.count,
                    r.last_at
                );
            }
        }
        return Ok(());
    }
    for e in page.entries {
        if json {
            print_json(&e)?;
        } else {
            println!(
                "{}\t{}\t{}\t{}\t{}",
                e.at,
                line(&e.admin),
                line(&e.call),
                e.status,
                line(e.detail.as_deref().unwrap_or(""))
            );
        }
    }
    Ok(())
}
