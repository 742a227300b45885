//! What can go wrong talking to a locker server, as types: the front ends (CLI, resource) add
//! their own advice (which flag or `source` field to set) and exit codes.

use reqwest::{Method, StatusCode};

/// A client that cannot be set up from its settings.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the CA certificate is not PEM: {0}")]
    CaNotPem(#[source] reqwest::Error),
    #[error("the CA certificate file holds no PEM certificate")]
    CaEmpty,
    #[error("cannot set up the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// A request that got no answer worth interpreting.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// 401: the credentials are wrong or missing. Never retried.
    #[error("{url} answered 401 Unauthorized: the server refused the credentials")]
    Unauthorized { url: String },
    /// The server's TLS certificate was refused. Never retried: it would fail the same way.
    #[error("{method} {url}: TLS certificate verification failed ({cause})")]
    Certificate {
        method: Method,
        url: String,
        cause: String,
    },
    /// No answer: connection refused or reset, timeout, an answer that broke off.
    #[error("{method} {url} failed{}: {cause}", after(*attempts))]
    Transport {
        method: Method,
        url: String,
        attempts: u32,
        cause: String,
    },
    /// A 5xx answer (after the retries the policy allows).
    #[error("{method} {url} failed{}: answered {status}: {message}", after(*attempts))]
    Server {
        method: Method,
        url: String,
        attempts: u32,
        status: StatusCode,
        message: String,
    },
}

fn after(attempts: u32) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

impl Error {
    /// Whether the server could not be reached (as opposed to reached and refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Transport { .. } | Error::Certificate { .. })
    }

    /// The transport failure without the request it came from, e.g. `connection refused`.
    pub fn cause(&self) -> String {
        match self {
            Error::Unauthorized { .. } => "401 Unauthorized".to_string(),
            Error::Certificate { cause, .. } | Error::Transport { cause, .. } => cause.clone(),
            Error::Server {
                status, message, ..
            } => format!("answered {status}: {message}"),
        }
    }
}

/// A transport error with its causes ("error sending request: connection refused"); a timeout
/// says `timed out`.
pub fn describe(error: &reqwest::Error) -> String {
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
