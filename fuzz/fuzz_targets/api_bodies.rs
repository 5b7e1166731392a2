//! The platform's request bodies and query strings, as its handlers take
//! them (`ApiJson` / `ApiQuery` in epm-platform): parsed by serde like
//! axum's extractors, then `Validate` (epm-api's limits). Also a policy
//! scope (a path parameter) and `printable`, which must leave no
//! disguising character in what it shows.
//!
//! The first byte picks the type; the rest is the body (JSON) or the query
//! string.
#![no_main]

use epm_api::admin::{
    ActivityQuery, AuditQuery, CreateAdmin, CreateEnrollToken, DenyRequest, OfflineCodeRequest,
    PolicyScope, RequestQuery, RevokeRequest, SetPassword, UpdateAdmin,
};
use epm_api::agent::{AuditUpload, CheckinRequest, EnrollRequest, RequestSubmit};
use epm_api::validate::{Validate, is_disguising, printable};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fn body<T: DeserializeOwned + Validate>(bytes: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(bytes)
        && let Err(invalid) = value.validate()
    {
        assert!(!invalid.to_string().is_empty());
    }
}

fn query<T: DeserializeOwned + Validate>(bytes: &[u8]) {
    if let Ok(value) = serde_urlencoded::from_bytes::<T>(bytes)
        && let Err(invalid) = value.validate()
    {
        assert!(!invalid.to_string().is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => body::<EnrollRequest>(rest),
        1 => body::<CheckinRequest>(rest),
        2 => body::<AuditUpload>(rest),
        3 => body::<RequestSubmit>(rest),
        4 => body::<CreateAdmin>(rest),
        5 => body::<UpdateAdmin>(rest),
        6 => body::<SetPassword>(rest),
        7 => body::<CreateEnrollToken>(rest),
        8 => body::<DenyRequest>(rest),
        9 => body::<RevokeRequest>(rest),
        10 => body::<OfflineCodeRequest>(rest),
        11 => query::<RequestQuery>(rest),
        12 => query::<AuditQuery>(rest),
        13 => query::<ActivityQuery>(rest),
        14 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(scope) = text.parse::<PolicyScope>() {
                let again: PolicyScope = scope.to_string().parse().expect("a scope reads back");
                assert_eq!(again.to_string(), scope.to_string());
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let shown = printable(&text);
            assert!(!shown.chars().any(is_disguising));
            assert_eq!(shown.chars().count(), text.chars().count());
        }
    }
});
