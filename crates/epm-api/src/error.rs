use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every 4xx and 5xx response.
///
/// ```json
/// {"error": {"code": "invalid_policy", "message": "rule \"x\": match: must not be empty"}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiErrorBody {
    /// What went wrong.
    pub error: ApiError,
}

/// One error: a stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// Stable, `snake_case`: `unauthorized`, `forbidden`, `not_found`,
    /// `invalid_json`, `invalid_policy`, `too_large`, `conflict`,
    /// `unsupported_media_type`, `invalid_request`, `internal`.
    pub code: String,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
    /// Every problem when there are several (a policy's validation errors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)?;
        for detail in &self.details {
            write!(f, "\n  {detail}")?;
        }
        Ok(())
    }
}
