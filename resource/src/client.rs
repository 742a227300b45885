//! HTTP calls to the locker server and to a BOSH director through the shared
//! [`locker_client::Client`], with TLS settings from `source` and retries for what can heal:
//! connection errors, timeouts and 5xx answers are retried with capped exponential backoff and
//! a logged line per retry; everything else (401 included) is returned or fails at once. The
//! errors here add the `source` fields to check.

use std::time::{Duration, Instant};

use locker_client::history::HistoryQuery;
use locker_client::wire::{Event, HistoryPage, LockRequest};
use locker_client::{Reply, Settings, SetupError, StatusCode};
use serde_json::Value;
use url::Url;

use crate::lock::{Holding, short_duration};
use crate::models::Source;

pub use locker_client::RetryPolicy;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{url} answered 401 Unauthorized: the server refused the credentials; check source.username and source.password"
    )]
    Unauthorized { url: String },
    #[error(
        "{url}: TLS certificate verification failed ({reason}); set source.ca_cert to the CA that signed the server's certificate, or skip_ssl_validation: true"
    )]
    Certificate { url: String, reason: String },
    /// No answer, or 5xx, after every retry.
    #[error(transparent)]
    GaveUp(locker_client::Error),
    #[error("{0}")]
    Setup(String),
}

impl From<locker_client::Error> for ClientError {
    fn from(error: locker_client::Error) -> Self {
        match error {
            locker_client::Error::Unauthorized { url } => ClientError::Unauthorized { url },
            locker_client::Error::Certificate { url, cause, .. } => {
                ClientError::Certificate { url, reason: cause }
            }
            other => ClientError::GaveUp(other),
        }
    }
}

/// 0.5 s, 1 s, 2 s, 4 s, then 8 s: about half a minute in all, enough for a server restart.
pub fn retry_policy_from_env() -> RetryPolicy {
    let first = std::env::var(crate::variables::RETRY_BASE)
        .ok()
        .and_then(|text| locker_client::parse_duration(&text).ok())
        .unwrap_or(Duration::from_millis(500));
    RetryPolicy {
        first,
        max: first * 16,
        attempts: 8,
    }
}

/// The locker server (and a BOSH director) as the resource reaches them: the shared client,
/// with the TLS settings and credentials from `source`.
#[derive(Clone)]
pub struct Client {
    inner: locker_client::Client,
}

impl Client {
    pub fn new(source: &Source, retry: RetryPolicy) -> Result<Client, ClientError> {
        let inner = locker_client::Client::new(Settings {
            url: source.locker_uri.clone(),
            credentials: source.credentials.clone(),
            ca_pem: source.ca_cert.as_ref().map(|pem| pem.as_bytes().to_vec()),
            accept_invalid_certs: source.skip_ssl_validation,
            connect_timeout: source.request_timeout,
            request_timeout: source.request_timeout,
            user_agent: concat!("locker-resource/", env!("CARGO_PKG_VERSION")).to_string(),
            retry,
        })
        .map_err(|e| {
            ClientError::Setup(match e {
                SetupError::CaNotPem(e) => format!("source.ca_cert cannot be read as PEM: {e}"),
                SetupError::CaEmpty => "source.ca_cert holds no certificate".to_string(),
                other => other.to_string(),
            })
        })?;
        Ok(Client { inner })
    }

    /// The shared client underneath (for the shared acquire loop).
    pub fn shared(&self) -> &locker_client::Client {
        &self.inner
    }

    /// `DELETE /lock/{name}` (with `?force=true` when forced).
    pub async fn release(
        &self,
        name: &str,
        body: &LockRequest,
        force: bool,
    ) -> Result<Reply, ClientError> {
        Ok(self.inner.release(name, body, force).await?)
    }

    /// `GET /lock/{name}?wait_free=...`: this server answers when the lock is free or the wait
    /// ran out, with `"free"` in the body; older servers ignore the query and answer at once
    /// (a status without `"free"`, or 404 when free), the original has no such route.
    pub async fn wait_free(&self, name: &str, wait: Duration) -> Result<Reply, ClientError> {
        Ok(self.inner.status(name, Some(wait)).await?)
    }

    /// `GET /lock/{name}/history?limit=`: the lock's last events, oldest first.
    pub async fn lock_history(&self, name: &str, limit: u64) -> Result<HistoryPage, ClientError> {
        Ok(self.inner.lock_history(name, Some(limit)).await?)
    }

    /// `GET /history?lock=NAME&since=...`, page after page: the lock's events after `since`,
    /// at most `max`, with the last page.
    pub async fn lock_events_after(
        &self,
        name: &str,
        since: u64,
        max: u64,
    ) -> Result<(Vec<Event>, HistoryPage), ClientError> {
        let query = HistoryQuery {
            since,
            lock: Some(name.to_string()),
            ..HistoryQuery::default()
        };
        Ok(self.inner.history_upto(&query, max).await?)
    }

    /// The lock's current holding, from `GET /locks`: the one endpoint both this server and the
    /// original Go locker have, and on this server its entries carry the full status.
    pub async fn holding(&self, name: &str) -> Result<Option<Holding>, ClientError> {
        let reply = self.inner.locks().await?;
        if reply.status != StatusCode::OK {
            return Err(ClientError::Setup(format!(
                "GET {}/locks answered {}: {}",
                self.inner.shown_base(),
                reply.status,
                reply.error_message()
            )));
        }
        if !reply.body.is_object() {
            return Err(ClientError::Setup(format!(
                "GET {}/locks did not answer a JSON object: is source.locker_uri a locker server?",
                self.inner.shown_base()
            )));
        }
        Ok(reply.body.get(name).and_then(Holding::from_entry))
    }

    /// The name of the BOSH director at `url`, from its unauthenticated `GET /info`. Uses the
    /// same TLS settings as the locker: `ca_cert` (which may hold the director's CA too) and
    /// `skip_ssl_validation`.
    pub async fn bosh_director_name(&self, director: &Url) -> Result<String, ClientError> {
        let url = format!("{}/info", director.as_str().trim_end_matches('/'));
        let reply = self.inner.get_elsewhere(&url).await?;
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
}

/// How long ago `started` was, for log lines.
pub fn since(started: Instant) -> String {
    short_duration(started.elapsed())
}
