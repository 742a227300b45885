//! HTTP calls to the locker server and to a BOSH director, with TLS settings from `source` and
//! retries for what can heal: connection errors, timeouts and 5xx answers are retried with
//! capped exponential backoff and a logged line per retry; everything else (401 included)
//! is returned or fails at once.

use std::time::{Duration, Instant};

use locker_client::{lock_path, wire_duration};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

use crate::lock::{Holding, short_duration};
use crate::log;
use crate::models::Source;

/// Environment variable that sets the first retry delay (tests shrink it).
pub const RETRY_BASE_VARIABLE: &str = "LOCKER_RESOURCE_RETRY_BASE";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{url} answered 401 Unauthorized: the server refused the credentials; check source.username and source.password"
    )]
    Unauthorized { url: String },
    #[error("{method} {url} failed after {attempts} attempts: {reason}")]
    GaveUp {
        method: Method,
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error(
        "{url}: TLS certificate verification failed ({reason}); set source.ca_cert to the CA that signed the server's certificate, or skip_ssl_validation: true"
    )]
    Certificate { url: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// When and how often to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay before the first retry; doubled for each further one.
    pub first: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Tries in all, the first one included.
    pub attempts: u32,
}

impl RetryPolicy {
    /// 0.5 s, 1 s, 2 s, 4 s, then 8 s: about half a minute in all, enough for a server restart.
    pub fn from_env() -> Self {
        let first = std::env::var(RETRY_BASE_VARIABLE)
            .ok()
            .and_then(|text| locker_client::parse_duration(&text).ok())
            .unwrap_or(Duration::from_millis(500));
        RetryPolicy {
            first,
            max: first * 16,
            attempts: 8,
        }
    }

    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// A response worth interpreting: any status but 401 and 5xx.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// The body as JSON, `Null` when it is not JSON.
    pub body: Value,
    /// How long the request took (the last attempt).
    pub elapsed: Duration,
}

impl Reply {
    /// The server's `{"error": ...}`, or the status.
    pub fn error_message(&self) -> String {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| self.status.to_string())
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `locker_uri` without a trailing `/`.
    base: String,
    /// The same without user info, for messages.
    shown_base: String,
    credentials: Option<(String, String)>,
    request_timeout: Duration,
    retry: RetryPolicy,
}

impl Client {
    pub fn new(source: &Source, retry: RetryPolicy) -> Result<Client, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(source.request_timeout)
            .user_agent(concat!("locker-resource/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &source.ca_cert {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                ClientError::Setup(format!("source.ca_cert cannot be read as PEM: {e}"))
            })?;
            if certs.is_empty() {
                return Err(ClientError::Setup(
                    "source.ca_cert holds no certificate".into(),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        if source.skip_ssl_validation {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Setup(format!("cannot set up the HTTP client: {e}")))?;
        let base = source.locker_uri.as_str().trim_end_matches('/').to_string();
        let mut shown = source.locker_uri.clone();
        // Only fails for URLs that cannot have user info, which then have none to hide.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        Ok(Client {
            http,
            base,
            shown_base: shown.as_str().trim_end_matches('/').to_string(),
            credentials: source.credentials.clone(),
            request_timeout: source.request_timeout,
            retry,
        })
    }

    /// `PUT /lock/{name}`, asking the server to wait up to `wait` for the lock.
    pub async fn acquire(
        &self,
        name: &str,
        body: &Value,
        wait: Option<Duration>,
    ) -> Result<Reply, ClientError> {
        let query = wait
            .map(|w| format!("?wait={}", wire_duration(w)))
            .unwrap_or_default();
        let path = format!("{}{query}", lock_path(name));
        self.locker(Method::PUT, &path, Some(body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /lock/{name}` (with `?force=true` when forced).
    pub async fn release(
        &self,
        name: &str,
        body: &Value,
        force: bool,
    ) -> Result<Reply, ClientError> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("{}{query}", lock_path(name));
        self.locker(Method::DELETE, &path, Some(body), Duration::ZERO)
            .await
    }

    /// A copy that tries each request once, with this deadline: for the clean-up after a
    /// signal, which must finish within a second.
    pub fn quick(&self, timeout: Duration) -> Client {
        Client {
            request_timeout: timeout,
            retry: RetryPolicy {
                attempts: 1,
                ..self.retry
            },
            ..self.clone()
        }
    }

    /// `GET /lock/{name}?wait_free=...`: this server answers when the lock is free or the wait
    /// ran out, with `"free"` in the body; older servers ignore the query and answer at once
    /// (a status without `"free"`, or 404 when free), the original has no such route.
    pub async fn wait_free(&self, name: &str, wait: Duration) -> Result<Reply, ClientError> {
        let path = format!("{}?wait_free={}", lock_path(name), wire_duration(wait));
        self.locker(Method::GET, &path, None, wait).await
    }

    /// The lock's current holding, from `GET /locks`: the one endpoint both this server and the
    /// original Go locker have, and on this server its entries carry the full status.
    pub async fn holding(&self, name: &str) -> Result<Option<Holding>, ClientError> {
        let reply = self
            .locker(Method::GET, "/locks", None, Duration::ZERO)
            .await?;
        if reply.status != StatusCode::OK {
            return Err(ClientError::Setup(format!(
                "GET {}/locks answered {}: {}",
                self.shown_base,
                reply.status,
                reply.error_message()
            )));
        }
        if !reply.body.is_object() {
            return Err(ClientError::Setup(format!(
                "GET {}/locks did not answer a JSON object: is source.locker_uri a locker server?",
                self.shown_base
            )));
        }
        Ok(reply.body.get(name).and_then(Holding::from_entry))
    }

    /// The name of the BOSH director at `url`, from its unauthenticated `GET /info`. Uses the
    /// same TLS settings as the locker: `ca_cert` (which may hold the director's CA too) and
    /// `skip_ssl_validation`.
    pub async fn bosh_director_name(&self, director: &Url) -> Result<String, ClientError> {
        let url = format!("{}/info", director.as_str().trim_end_matches('/'));
        let reply = self
            .send(Method::GET, &url, &url, None, false, Duration::ZERO)
            .await?;
        let name = reply
            .body
            .get("name")
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty());
        match (reply.status, name) {
            (StatusCode::OK, Some(name)) => Ok(name.to_string()),
            (StatusCode::OK, None) => Err(ClientError::Setup(format!(
                "could not determine the BOSH director's name: GET {url} has no \"name\""
            ))),
            (status, _) => Err(ClientError::Setup(format!(
                "could not determine the BOSH director's name: GET {url} answered {status}"
            ))),
        }
    }

    /// A request to the locker server, with credentials.
    async fn locker(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        wait: Duration,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}{path}", self.base);
        let shown = format!("{}{path}", self.shown_base);
        self.send(method, &url, &shown, body, true, wait).await
    }

    /// Sends one request, retrying connection errors, timeouts and 5xx answers.
    async fn send(
        &self,
        method: Method,
        url: &str,
        shown: &str,
        body: Option<&Value>,
        with_credentials: bool,
        wait: Duration,
    ) -> Result<Reply, ClientError> {
        let mut attempt = 1;
        loop {
            let mut request = self
                .http
                .request(method.clone(), url)
                .timeout(self.request_timeout.saturating_add(wait));
            if let (true, Some((user, password))) = (with_credentials, &self.credentials) {
                request = request.basic_auth(user, Some(password));
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let started = Instant::now();
            let failure = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED {
                        return Err(ClientError::Unauthorized {
                            url: shown.to_string(),
                        });
                    }
                    let text = response.text().await.unwrap_or_default();
                    if !status.is_server_error() {
                        return Ok(Reply {
                            status,
                            body: serde_json::from_str(&text).unwrap_or(Value::Null),
                            elapsed: started.elapsed(),
                        });
                    }
                    let message = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| text.trim().chars().take(200).collect());
                    format!("answered {status}: {message}")
                }
                Err(error) => {
                    let reason = describe(&error);
                    // A certificate that fails verification will fail the same way again.
                    if reason.contains("certificate") {
                        return Err(ClientError::Certificate {
                            url: shown.to_string(),
                            reason,
                        });
                    }
                    reason
                }
            };
            if attempt >= self.retry.attempts {
                return Err(ClientError::GaveUp {
                    method,
                    url: shown.to_string(),
                    attempts: attempt,
                    reason: failure,
                });
            }
            let delay = self.retry.delay(attempt);
            log!(
                "{method} {shown} {failure}; retrying in {} (attempt {} of {})",
                humantime::format_duration(delay),
                attempt + 1,
                self.retry.attempts
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A transport error with its causes ("error sending request: connection refused").
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_string()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How long ago `started` was, for log lines.
pub fn since(started: Instant) -> String {
    short_duration(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy {
            first: Duration::from_millis(500),
            max: Duration::from_secs(8),
            attempts: 8,
        };
        let delays: Vec<u64> = (1..8).map(|n| policy.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }
}
