//! Outgoing webhooks: each event of a request (created, approved, denied,
//! expired, revoked) is queued in the database in the same transaction as
//! the change ([`crate::db`]), then posted here as JSON to every webhook,
//! signed with HMAC-SHA256 under the webhook's secret, and retried with
//! exponential backoff until delivered or [`MAX_DELIVERY_ATTEMPTS`] tries.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use jiff::Timestamp;
use sha2::Sha256;

use crate::db::{Delivery, MAX_DELIVERY_ATTEMPTS};
use crate::server::AppState;

/// The header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-epm-signature";
/// The header naming the event (`request.created`, …).
pub const EVENT_HEADER: &str = "x-epm-event";
/// The header with the delivery's id (the same on every retry).
pub const DELIVERY_HEADER: &str = "x-epm-delivery";

/// Where the system's CA certificates usually are (Debian, Red Hat,
/// Alpine, macOS): webhooks to HTTPS endpoints trust these.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before try `attempt + 1`: 10 s, 20 s, 40 s … at most an hour.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs((10u64 << attempt.min(9)).min(3600))
}

fn client() -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("epm-platform/", env!("CARGO_PKG_VERSION")));
    for bundle in SYSTEM_CA_BUNDLES {
        if let Ok(pem) = std::fs::read(bundle)
            && let Ok(certificates) = reqwest::Certificate::from_pem_bundle(&pem)
        {
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
            break;
        }
    }
    builder.build().unwrap_or_else(|e| {
        tracing::error!("webhooks: cannot build the HTTPS client ({e}); using defaults");
        reqwest::Client::new()
    })
}

/// Posts one delivery; `Ok(status)` when the endpoint answered 2xx.
async fn send(client: &reqwest::Client, delivery: &Delivery) -> Result<u16, (Option<u16>, String)> {
    let response = client
        .post(&delivery.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, &delivery.event)
        .header(DELIVERY_HEADER, delivery.id.to_string())
        .header(
            SIGNATURE_HEADER,
            signature(&delivery.secret, delivery.body.as_bytes()),
        )
        .body(delivery.body.clone())
        .send()
        .await
        .map_err(|e| (None, e.to_string()))?;
    let status = response.status().as_u16();
    if response.status().is_success() {
        Ok(status)
    } else {
        Err((Some(status), format!("the endpoint answered {status}")))
    }
}

/// Sends what is due, every 2 s, until the process ends.
pub fn spawn(state: Arc<AppState>) {
    tokio::spawn(async move {
        let client = client();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            let db_state = state.clone();
            let due =
                match tokio::task::spawn_blocking(move || db_state.db.due_deliveries(32)).await {
                    Ok(Ok(due)) => due,
                    Ok(Err(e)) => {
                        tracing::error!("webhooks: {e}");
                        continue;
                    }
                    Err(_) => continue,
                };
            for delivery in due {
                let outcome = send(&client, &delivery).await;
                let (status, error, retry_at) = match &outcome {
                    Ok(status) => (Some(*status), None, None),
                    Err((status, error)) => {
                        let attempt = delivery.attempts + 1;
                        let retry_at = (attempt < MAX_DELIVERY_ATTEMPTS).then(|| {
                            Timestamp::now()
                                + jiff::SignedDuration::try_from(backoff(attempt))
                                    .unwrap_or(jiff::SignedDuration::from_secs(3600))
                        });
                        if retry_at.is_none() {
                            tracing::warn!(
                                delivery = delivery.id,
                                url = delivery.url,
                                "webhook delivery given up after {attempt} tries: {error}"
                            );
                        }
                        (*status, Some(error.clone()), retry_at)
                    }
                };
                let db_state = state.clone();
                let id = delivery.id;
                let _ = tokio::task::spawn_blocking(move || {
                    db_state
                        .db
                        .record_delivery(id, status, error.as_deref(), retry_at)
                })
                .await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let sig = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_up_to_an_hour() {
        assert_eq!(backoff(0), Duration::from_secs(10));
        assert_eq!(backoff(1), Duration::from_secs(20));
        assert_eq!(backoff(20), Duration::from_secs(3600));
    }
}
