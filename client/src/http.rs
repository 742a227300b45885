//! One HTTP client for the locker API: base URL, basic auth, extra CA certificates, a deadline
//! per request on top of the wait it asks for, and retries of what can heal (connection
//! errors, timeouts, 5xx) with capped exponential backoff. 401 and certificate failures are
//! never retried; every other answer comes back as a [`Reply`] for the caller to interpret.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::duration::wire_duration;
use crate::error::{CertificateProblem, Error, SetupError, describe};
use crate::path::lock_path;

/// When and how often to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry; doubled for each further one.
    pub first: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Tries in all, the first one included.
    pub attempts: u32,
}

impl RetryPolicy {
    /// One try, no retry.
    pub const ONCE: RetryPolicy = RetryPolicy {
        first: Duration::ZERO,
        max: Duration::ZERO,
        attempts: 1,
    };

    /// The delay before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server's URL (`http://` or `https://`, checked by the caller).
    pub url: reqwest::Url,
    /// Basic-auth user and password.
    pub credentials: Option<(String, String)>,
    /// PEM text of CA certificates trusted besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any certificate (the resource's `skip_ssl_validation`).
    pub accept_invalid_certs: bool,
    pub connect_timeout: Duration,
    /// Deadline of one request, on top of any wait it asks the server for.
    pub request_timeout: Duration,
    pub user_agent: String,
    pub retry: RetryPolicy,
}

/// An answer worth interpreting: any status but 401 and 5xx.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// The body as JSON; `Null` when it is not JSON.
    pub body: Value,
    /// How long the request took (its last attempt).
    pub elapsed: Duration,
}

impl Reply {
    /// The server's `{"error": ...}`, else the status.
    pub fn error_message(&self) -> String {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| self.status.to_string())
    }

    /// The body read as `T`, `None` when it does not fit.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        T::deserialize(&self.body).ok()
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The URL without a trailing `/`.
    base: String,
    /// The same without user info, for messages.
    shown_base: String,
    credentials: Option<(String, String)>,
    request_timeout: Duration,
    retry: RetryPolicy,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client, SetupError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .user_agent(settings.user_agent);
        if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(SetupError::CaNotPem)?;
            if certs.is_empty() {
                return Err(SetupError::CaEmpty);
            }
            builder = builder.tls_certs_merge(certs);
        }
        if settings.accept_invalid_certs {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let http = builder.build().map_err(SetupError::Http)?;
        let base = settings.url.as_str().trim_end_matches('/').to_string();
        let mut shown = settings.url.clone();
        // Only fails for URLs that cannot have user info, which then have none to hide.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        Ok(Client {
            http,
            base,
            shown_base: shown.as_str().trim_end_matches('/').to_string(),
            credentials: settings.credentials,
            request_timeout: settings.request_timeout,
            retry: settings.retry,
        })
    }

    /// The server's URL without a trailing `/` or user info, for messages.
    pub fn shown_base(&self) -> &str {
        &self.shown_base
    }

    /// A copy that tries each request once, with this deadline: for renewals and for the
    /// clean-up after a signal, which must finish quickly.
    pub fn quick(&self, timeout: Duration) -> Client {
        Client {
            request_timeout: timeout,
            retry: RetryPolicy::ONCE,
            ..self.clone()
        }
    }

    /// `PUT /lock/{name}`, asking the server to wait up to `wait` for the lock.
    pub async fn acquire<B: Serialize + ?Sized>(
        &self,
        name: &str,
        body: &B,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        let query = wait
            .map(|w| format!("?wait={}", wire_duration(w)))
            .unwrap_or_default();
        let path = format!("{}{query}", lock_path(name));
        self.locker(Method::PUT, &path, Some(body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /lock/{name}` (with `?force=true` when forced).
    pub async fn release<B: Serialize + ?Sized>(
        &self,
        name: &str,
        body: &B,
        force: bool,
    ) -> Result<Reply, Error> {
        let query = if force { "?force=true" } else { "" };
        let path = format!("{}{query}", lock_path(name));
        self.locker(Method::DELETE, &path, Some(body), Duration::ZERO)
            .await
    }

    /// `GET /lock/{name}`, with `?wait_free=` when asked to wait until it is free. A server
    /// that does not know `wait_free` answers at once (the status, without `"free"`).
    pub async fn status(&self, name: &str, wait_free: Option<Duration>) -> Result<Reply, Error> {
        let query = wait_free
            .map(|w| format!("?wait_free={}", wire_duration(w)))
            .unwrap_or_default();
        let path = format!("{}{query}", lock_path(name));
        self.locker::<()>(Method::GET, &path, None, wait_free.unwrap_or_default())
            .await
    }

    /// `GET /locks` (every lock, in one answer: both this server and the original have it).
    pub async fn locks(&self) -> Result<Reply, Error> {
        self.locker::<()>(Method::GET, "/locks", None, Duration::ZERO)
            .await
    }

    /// `GET` of another server's URL, without the locker's credentials (with its TLS
    /// settings).
    pub async fn get_elsewhere(&self, url: &str) -> Result<Reply, Error> {
        self.send::<()>(Method::GET, url, url, None, false, Duration::ZERO)
            .await
    }

    /// A `GET` of `path` on the locker server, with credentials and no deadline (for a stream
    /// that stays open; the caller bounds the wait for its head and for each chunk).
    pub(crate) fn stream_request(&self, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        request
    }

    /// The deadline of one request.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// A request to the locker server, with credentials (`wait`: the long-poll it asks for, on
    /// top of the request's deadline).
    pub(crate) async fn locker<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        wait: Duration,
    ) -> Result<Reply, Error> {
        let url = format!("{}{path}", self.base);
        let shown = format!("{}{path}", self.shown_base);
        self.send(method, &url, &shown, body, true, wait).await
    }

    /// Sends one request, retrying connection errors, timeouts and 5xx answers as the policy
    /// allows, with a line on stderr for each retry.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: &str,
        shown: &str,
        body: Option<&B>,
        with_credentials: bool,
        wait: Duration,
    ) -> Result<Reply, Error> {
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
            let failure = match self.answer(request, &method, shown, started).await? {
                Ok(reply) => return Ok(reply),
                Err(failure) => failure,
            };
            if attempt >= self.retry.attempts {
                return Err(failure.into_error(method, shown.to_string(), attempt));
            }
            let delay = self.retry.delay(attempt);
            eprintln!(
                "{method} {shown} {}; retrying in {} (attempt {} of {})",
                failure.text(),
                humantime::format_duration(delay),
                attempt + 1,
                self.retry.attempts
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// One attempt: a reply, a failure worth retrying, or an error that is final.
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        method: &Method,
        shown: &str,
        started: Instant,
    ) -> Result<Result<Reply, Retryable>, Error> {
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let cause = describe(&error);
                // A certificate that fails verification will fail the same way again.
                if let Some(problem) = CertificateProblem::of(&error) {
                    return Err(Error::Certificate {
                        method: method.clone(),
                        url: shown.to_string(),
                        problem,
                        cause,
                    });
                }
                return Ok(Err(Retryable::Transport(cause)));
            }
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(Error::Unauthorized {
                url: shown.to_string(),
            });
        }
        let text = match response.text().await {
            Ok(text) => text,
            Err(error) => {
                return Ok(Err(Retryable::Transport(format!(
                    "the answer broke off: {}",
                    describe(&error)
                ))));
            }
        };
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_server_error() {
            let message = body
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| Some(text.trim().chars().take(200).collect()))
                .filter(|m: &String| !m.is_empty())
                .unwrap_or_else(|| status.to_string());
            return Ok(Err(Retryable::Server(status, message)));
        }
        Ok(Ok(Reply {
            status,
            body,
            elapsed: started.elapsed(),
        }))
    }
}

/// A failed attempt that another may heal.
enum Retryable {
    Transport(String),
    Server(StatusCode, String),
}

impl Retryable {
    fn text(&self) -> String {
        match self {
            Retryable::Transport(cause) => cause.clone(),
            Retryable::Server(status, message) => format!("answered {status}: {message}"),
        }
    }

    fn into_error(self, method: Method, url: String, attempts: u32) -> Error {
        match self {
            Retryable::Transport(cause) => Error::Transport {
                method,
                url,
                attempts,
                cause,
            },
            Retryable::Server(status, message) => Error::Server {
                method,
                url,
                attempts,
                status,
                message,
            },
        }
    }
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
