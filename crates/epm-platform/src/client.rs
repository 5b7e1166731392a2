//! The admin CLI's REST client: only the platform's CA is trusted, and a
//! refusal carries the platform's own error code and message.

use std::time::Duration;

use epm_api::{ApiError, ApiErrorBody};
/// The whole chain of an error's causes, where rustls and hyper say what
/// went wrong (one definition, the database's: [`epm_platform_db::error_chain`]).
pub use epm_platform_db::error_chain;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad local setup (URL, CA file, token).
    #[error("{0}")]
    Setup(String),
    /// The platform could not be reached or answered garbage.
    #[error("{url}: {message}")]
    Transport {
        /// The URL called.
        url: String,
        /// What happened, with the underlying cause.
        message: String,
    },
    /// The platform said no.
    #[error("{message} ({code}, HTTP {status}){details}", message = error.message, code = error.code,
        details = error.details.iter().map(|d| format!("\n  {d}")).collect::<String>())]
    Refused {
        /// HTTP status.
        status: u16,
        /// The platform's error.
        error: ApiError,
    },
}

/// A client of the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl AdminClient {
    /// A client for `url` trusting only the CA in `ca_pem`.
    pub fn new(
        url: &str,
        ca_pem: &[u8],
        token: Option<String>,
    ) -> Result<AdminClient, ClientError> {
        crate::install_crypto_provider();
        if !url.starts_with("https://") {
            return Err(ClientError::Setup(format!(
                "--url {url}: the platform speaks HTTPS only (https://host:port)"
            )));
        }
        let ca = reqwest::Certificate::from_pem(ca_pem).map_err(|e| {
            ClientError::Setup(format!("the CA file is not a PEM certificate: {e}"))
        })?;
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError::Setup(error_chain(&e)))?;
        Ok(AdminClient {
            http,
            base: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `POST path` with an empty JSON object, for an answer without a body
    /// (204).
    pub async fn post_empty(&self, path: &str) -> Result<(), ClientError> {
        let request = self
            .request(Method::POST, path)?
            .json(&serde_json::json!({}));
        self.send_no_body(path, request).await
    }

    /// `PUT path` with a JSON body, for an answer without a body (204).
    pub async fn put_no_content<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<(), ClientError> {
        let request = self.request(Method::PUT, path)?.json(body);
        self.send_no_body(path, request).await
    }

    /// `PUT path` with JSON text sent as is.
    pub async fn put_text<T: DeserializeOwned>(
        &self,
        path: &str,
        body: String,
    ) -> Result<T, ClientError> {
        let request = self
            .request(Method::PUT, path)?
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.finish(path, request).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        let request = self.request(Method::DELETE, path)?;
        self.send_no_body(path, request).await
    }

    async fn send_no_body(
        &self,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(), ClientError> {
        let url = format!("{}{path}", self.base);
        let response = request.send().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            message: error_chain(&e),
        })?;
        if response.status().is_success() {
            return Ok(());
        }
        Err(refusal(
            response.status(),
            &response.bytes().await.unwrap_or_default(),
        ))
    }

    fn request(&self, method: Method, path: &str) -> Result<reqwest::RequestBuilder, ClientError> {
        let token = self.token.as_deref().ok_or_else(|| {
            ClientError::Setup(
                "EPM_ADMIN_TOKEN is not set: export the token `epm-platform admin create` printed"
                    .into(),
            )
        })?;
        Ok(self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let mut request = self.request(method, path)?;
        if let Some(body) = body {
            request = request.json(body);
        }
        self.finish(path, request).await
    }

    async fn finish<T: DeserializeOwned>(
        &self,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let transport = |message: String| ClientError::Transport {
            url: url.clone(),
            message,
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport(error_chain(&e)))?;
        if !status.is_success() {
            return Err(refusal(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| transport(format!("the answer is not what this CLI expects ({e}); is the CLI the same version as the platform?")))
    }
}

fn refusal(status: StatusCode, body: &[u8]) -> ClientError {
    let error = serde_json::from_slice::<ApiErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| ApiError {
            code: "http_error".into(),
            message: format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
            details: Vec::new(),
        });
    ClientError::Refused {
        status: status.as_u16(),
        error,
    }
}
