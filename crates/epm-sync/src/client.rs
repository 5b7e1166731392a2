//! The HTTPS client: one method per agent route of the API.

use std::path::Path;
use std::time::Duration;

use epm_api::agent::{
    AgentCredentials, AuditAck, AuditUpload, CheckinRequest, CheckinResponse, EnrollRequest,
    EnrollResponse, MAX_REQUEST_WAIT_SECONDS, RequestStatus, RequestSubmit, RequestWait,
    RequestWaitResponse,
};
use epm_api::{ApiErrorBody, CONTENT_TYPE_JSON, MAX_BUNDLE_BYTES, MAX_JSON_BYTES, SignedEnvelope};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long to wait for a TCP + TLS connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take in all, body included: a server that
/// trickles bytes (slow loris) fails here instead of holding the agent.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A 100 000-rule bundle is ~15 MB: give it longer than a JSON call.
const BUNDLE_TIMEOUT_FACTOR: u32 = 4;

/// Why a call to the platform failed. Each names the step (`enroll`,
/// `check-in`, `policy fetch`, `audit upload`, `request submit`,
/// `request status`, `credential rotation`) and the URL.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The `ca_cert` file is missing or holds no certificate.
    #[error("platform CA certificate {path}: {detail}")]
    CaCert {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The platform URL is unusable.
    #[error("platform URL {url:?}: {detail}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// No connection (refused, DNS, TLS handshake: an untrusted certificate
    /// lands here, naming the certificate problem).
    #[error("{step} {url}: cannot connect: {detail}")]
    Connect {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The transport's reason, with its causes.
        detail: String,
    },
    /// The call took longer than allowed.
    #[error(
        "{step} {url}: no complete answer within {}s (the platform is slow or the connection stalled)",
        .timeout.as_secs_f32()
    )]
    Timeout {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The transfer failed after it started.
    #[error("{step} {url}: transfer failed: {detail}")]
    Transfer {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The transport's reason.
        detail: String,
    },
    /// A non-2xx answer; `code` and `message` are the platform's when its
    /// body was an API error.
    #[error("{step} {url}: the platform answered {status}: {message}")]
    Status {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The API error code, when the body had one.
        code: Option<String>,
        /// The API error (message and code), or the start of the body.
        message: String,
    },
    /// The answer is not JSON by its `Content-Type`.
    #[error("{step} {url}: the answer's content type is {found:?}, not application/json")]
    ContentType {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// What the server said.
        found: String,
    },
    /// The answer is larger than the step allows; reading stopped there.
    #[error("{step} {url}: the answer exceeds the limit of {limit} bytes; not read further")]
    TooLarge {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// The answer ends in the middle of its JSON document.
    #[error("{step} {url}: the answer is truncated: {detail}")]
    Truncated {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// serde_json's reason.
        detail: String,
    },
    /// The answer is not the JSON this step expects.
    #[error("{step} {url}: the answer is not valid JSON for this call: {detail}")]
    InvalidJson {
        /// The step.
        step: &'static str,
        /// The URL.
        url: String,
        /// serde_json's reason.
        detail: String,
    },
}

impl SyncError {
    /// The platform's API error code, for a [`SyncError::Status`].
    pub fn api_code(&self) -> Option<&str> {
        match self {
            SyncError::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// HTTP status, for a [`SyncError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            SyncError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Timeouts (configurable so tests do not wait 30 s).
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// TCP + TLS connection.
    pub connect_timeout: Duration,
    /// One JSON request, body included; the policy fetch gets four times this.
    pub request_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// What a policy fetch found.
#[derive(Debug)]
pub enum PolicyFetch {
    /// `304`: the bundle with the given ETag is still current.
    NotModified,
    /// A bundle, not yet verified (see [`crate::accept_bundle`]).
    Bundle {
        /// The signed envelope as received.
        envelope: SignedEnvelope,
        /// Its `ETag`, for the next `If-None-Match`.
        etag: Option<String>,
    },
}

/// The agent's HTTPS client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    base: String,
    options: ClientOptions,
}

/// Reads the pinned CA: a PEM file with at least one certificate.
pub fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, SyncError> {
    let fail = |detail: String| SyncError::CaCert {
        path: path.display().to_string(),
        detail,
    };
    let pem = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let ders = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not PEM: {e}")))?;
    if ders.is_empty() {
        return Err(fail(
            "holds no `BEGIN CERTIFICATE` block (expected the platform's CA in PEM)".into(),
        ));
    }
    ders.iter()
        .map(|der| {
            reqwest::Certificate::from_der(der)
                .map_err(|e| fail(format!("not a usable certificate: {e}")))
        })
        .collect()
}

/// rustls needs one process-wide crypto provider; ring is the one linked.
fn install_crypto_provider() {
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl PlatformClient {
    /// A client for the platform at `url` (`https://host[:port]`) trusting
    /// only the CA in `ca_cert`: the system's roots are not consulted, so a
    /// certificate from any other CA fails the handshake.
    pub fn new(url: &str, ca_cert: &Path, options: ClientOptions) -> Result<Self, SyncError> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(SyncError::Url {
                url: url.to_owned(),
                detail: "must start with https://".into(),
            });
        }
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .https_only(true)
            .connect_timeout(options.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("epmd/", env!("CARGO_PKG_VERSION")));
        for cert in load_ca(ca_cert)? {
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| SyncError::Url {
            url: url.to_owned(),
            detail: format!("cannot build the HTTPS client: {}", chain(&e)),
        })?;
        Ok(Self {
            http,
            base,
            options,
        })
    }

    /// The platform's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `POST /agent/enroll`: a one-time token for credentials.
    pub async fn enroll(&self, request: &EnrollRequest) -> Result<EnrollResponse, SyncError> {
        let call = Call::new(self, "enroll", Method::POST, epm_api::paths::AGENT_ENROLL);
        call.json(self.post(&call, None, request)?).await
    }

    /// `POST /agent/credentials/rotate`: a new secret for the same agent id
    /// and offline key. The current secret keeps working until the new one
    /// is first used, so store the answer before using it.
    pub async fn rotate_credentials(
        &self,
        credentials: &AgentCredentials,
    ) -> Result<AgentCredentials, SyncError> {
        let call = Call::new(
            self,
            "credential rotation",
            Method::POST,
            epm_api::paths::AGENT_ROTATE,
        );
        let request = self
            .request(&call, Some(credentials))
            .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
            .body("{}");
        call.json(request).await
    }

    /// `POST /agent/checkin`.
    pub async fn checkin(
        &self,
        credentials: &AgentCredentials,
        request: &CheckinRequest,
    ) -> Result<CheckinResponse, SyncError> {
        let call = Call::new(
            self,
            "check-in",
            Method::POST,
            epm_api::paths::AGENT_CHECKIN,
        );
        call.json(self.post(&call, Some(credentials), request)?)
            .await
    }

    /// `GET /agent/policy` with `If-None-Match: etag`. The envelope is read
    /// up to [`MAX_BUNDLE_BYTES`] and not verified here.
    pub async fn fetch_policy(
        &self,
        credentials: &AgentCredentials,
        etag: Option<&str>,
    ) -> Result<PolicyFetch, SyncError> {
        let mut call = Call::new(
            self,
            "policy fetch",
            Method::GET,
            epm_api::paths::AGENT_POLICY,
        );
        call.limit = MAX_BUNDLE_BYTES;
        call.timeout = self.options.request_timeout * BUNDLE_TIMEOUT_FACTOR;
        let mut request = self.request(&call, Some(credentials));
        if let Some(etag) = etag
            && let Ok(value) = HeaderValue::from_str(etag)
        {
            request = request.header(IF_NONE_MATCH, value);
        }
        let call = &call;
        call.run(request, |response| async move {
            if response.status() == StatusCode::NOT_MODIFIED {
                return Ok(PolicyFetch::NotModified);
            }
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let envelope = call.read_json(response).await?;
            Ok(PolicyFetch::Bundle { envelope, etag })
        })
        .await
    }

    /// `POST /agent/audit`: one batch; the answer acknowledges the highest
    /// contiguous seq the platform holds.
    pub async fn upload_audit(
        &self,
        credentials: &AgentCredentials,
        upload: &AuditUpload,
    ) -> Result<AuditAck, SyncError> {
        let call = Call::new(
            self,
            "audit upload",
            Method::POST,
            epm_api::paths::AGENT_AUDIT,
        );
        call.json(self.post(&call, Some(credentials), upload)?)
            .await
    }

    /// `POST /agent/requests`: idempotent on the request's `local_id`.
    pub async fn submit_request(
        &self,
        credentials: &AgentCredentials,
        submit: &RequestSubmit,
    ) -> Result<RequestStatus, SyncError> {
        let call = Call::new(
            self,
            "request submit",
            Method::POST,
            epm_api::paths::AGENT_REQUESTS,
        );
        call.json(self.post(&call, Some(credentials), submit)?)
            .await
    }

    /// `POST /agent/requests/wait`: waits up to `wait` (the platform holds
    /// at most [`MAX_REQUEST_WAIT_SECONDS`]) for one of the `pending`
    /// requests to leave pending or one of the `grants` (approved requests
    /// whose grant is in force here) to leave approved; an empty answer
    /// when none did. The call's timeout is `wait` plus the usual request
    /// timeout, so a slow answer is still told from a platform that
    /// stopped answering.
    pub async fn wait_requests(
        &self,
        credentials: &AgentCredentials,
        pending: &[String],
        grants: &[String],
        wait: Duration,
    ) -> Result<RequestWaitResponse, SyncError> {
        let seconds = u32::try_from(wait.as_secs())
            .unwrap_or(u32::MAX)
            .min(MAX_REQUEST_WAIT_SECONDS);
        let mut call = Call::new(
            self,
            "request wait",
            Method::POST,
            epm_api::paths::AGENT_REQUESTS_WAIT,
        );
        call.timeout = Duration::from_secs(u64::from(seconds)) + self.options.request_timeout;
        let body = RequestWait {
            requests: pending.to_vec(),
            grants: grants.to_vec(),
            wait_seconds: seconds,
        };
        call.json(self.post(&call, Some(credentials), &body)?).await
    }

    /// `GET /agent/requests/{id}`.
    pub async fn request_status(
        &self,
        credentials: &AgentCredentials,
        id: &str,
    ) -> Result<RequestStatus, SyncError> {
        let path = epm_api::paths::AGENT_REQUEST.replace("{id}", &encode_segment(id));
        let call = Call::new(self, "request status", Method::GET, &path);
        let request = self.request(&call, Some(credentials));
        call.json(request).await
    }

    fn request(
        &self,
        call: &Call,
        credentials: Option<&AgentCredentials>,
    ) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(call.method.clone(), &call.url)
            .timeout(call.timeout)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE_JSON);
        if let Some(credentials) = credentials {
            request = request.header(AUTHORIZATION, credentials.bearer());
        }
        request
    }

    fn post<T: Serialize>(
        &self,
        call: &Call,
        credentials: Option<&AgentCredentials>,
        body: &T,
    ) -> Result<reqwest::RequestBuilder, SyncError> {
        // Serializing the API's own types does not fail; say so if it does.
        let body = serde_json::to_vec(body).map_err(|e| SyncError::InvalidJson {
            step: call.step,
            url: call.url.clone(),
            detail: format!("cannot serialize the request: {e}"),
        })?;
        Ok(self
            .request(call, credentials)
            .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
            .body(body))
    }
}

/// One call: what every error names, and its limits.
struct Call {
    step: &'static str,
    method: Method,
    url: String,
    limit: usize,
    timeout: Duration,
}

impl Call {
    fn new(client: &PlatformClient, step: &'static str, method: Method, path: &str) -> Self {
        Self {
            step,
            method,
            url: format!("{}{path}", client.base),
            limit: MAX_JSON_BYTES,
            timeout: client.options.request_timeout,
        }
    }

    /// Sends and reads a JSON answer.
    async fn json<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, SyncError> {
        self.run(request, |response| self.read_json(response)).await
    }

    /// Sends, checks the status, and hands a 2xx/304 answer to `read`, the
    /// whole within the call's timeout (reqwest's own timeout covers the
    /// body too; this one also covers our reading of it).
    async fn run<T, F, Fut>(
        &self,
        request: reqwest::RequestBuilder,
        read: F,
    ) -> Result<T, SyncError>
    where
        F: FnOnce(reqwest::Response) -> Fut,
        Fut: Future<Output = Result<T, SyncError>>,
    {
        let work = async {
            let response = request.send().await.map_err(|e| self.transport(&e))?;
            let status = response.status();
            if status.is_success() || status == StatusCode::NOT_MODIFIED {
                read(response).await
            } else {
                Err(self.status_error(response).await)
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.timeout_error()),
        }
    }

    async fn read_json<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, SyncError> {
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case(CONTENT_TYPE_JSON) {
            return Err(SyncError::ContentType {
                step: self.step,
                url: self.url.clone(),
                found: content_type.chars().take(100).collect(),
            });
        }
        let body = self.read_body(response, self.limit).await?;
        serde_json::from_slice(&body).map_err(|e| {
            let detail = e.to_string();
            if e.is_eof() {
                SyncError::Truncated {
                    step: self.step,
                    url: self.url.clone(),
                    detail,
                }
            } else {
                SyncError::InvalidJson {
                    step: self.step,
                    url: self.url.clone(),
                    detail,
                }
            }
        })
    }

    /// Reads the body chunk by chunk and stops as soon as it passes
    /// `limit`, so an oversized answer is never all in memory.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, SyncError> {
        let too_large = || SyncError::TooLarge {
            step: self.step,
            url: self.url.clone(),
            limit,
        };
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(
            response
                .content_length()
                .map_or(8192, |l| l as usize)
                .min(limit),
        );
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(&e))? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A non-2xx answer as an error carrying the platform's code and
    /// message when its body is an API error, else the body's first bytes.
    async fn status_error(&self, response: reqwest::Response) -> SyncError {
        let status = response.status();
        // Error bodies are small; a huge one is cut, not read.
        let body = self
            .read_body(response, 64 * 1024)
            .await
            .unwrap_or_default();
        let (code, message) = match serde_json::from_slice::<ApiErrorBody>(&body) {
            Ok(api) => (Some(api.error.code.clone()), api.error.to_string()),
            Err(_) => {
                let text: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                let reason = status.canonical_reason().unwrap_or("error");
                if text.trim().is_empty() {
                    (None, reason.to_owned())
                } else {
                    (None, format!("{reason}: {}", text.trim()))
                }
            }
        };
        SyncError::Status {
            step: self.step,
            url: self.url.clone(),
            status: status.as_u16(),
            code,
            message,
        }
    }

    fn transport(&self, error: &reqwest::Error) -> SyncError {
        // A connection that times out is an unreachable platform, not a
        // stalled answer: checked first.
        if error.is_connect() {
            SyncError::Connect {
                step: self.step,
                url: self.url.clone(),
                detail: chain(error),
            }
        } else if error.is_timeout() {
            self.timeout_error()
        } else if error.is_request() && !error.is_body() {
            SyncError::Connect {
                step: self.step,
                url: self.url.clone(),
                detail: chain(error),
            }
        } else {
            SyncError::Transfer {
                step: self.step,
                url: self.url.clone(),
                detail: chain(error),
            }
        }
    }

    fn timeout_error(&self) -> SyncError {
        SyncError::Timeout {
            step: self.step,
            url: self.url.clone(),
            timeout: self.timeout,
        }
    }
}

/// An error's causes on one line: reqwest's own message ("error sending
/// request for url (…)") repeats the URL the error already names and hides
/// the reason (a refused certificate, a refused connection), so the causes
/// are what is shown, without hyper's "client error (Connect)" wrapper.
fn chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !message.starts_with("client error (") && !parts.iter().any(|p| p.contains(&message)) {
            parts.push(message);
        }
        source = cause.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

/// Percent-encodes a path segment (request ids are the platform's, but a
/// `/` or `?` in one must not change the route).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_segment("req-1_a.b"), "req-1_a.b");
        assert_eq!(encode_segment("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn a_plain_http_url_is_refused() {
        let err = PlatformClient::new(
            "http://x",
            Path::new("/nonexistent"),
            ClientOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("must start with https://"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_is_named() {
        let err = load_ca(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = load_ca(&path).unwrap_err();
        assert!(err.to_string().contains("no `BEGIN CERTIFICATE`"), "{err}");
    }
}
