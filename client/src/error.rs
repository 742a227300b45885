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
        problem: CertificateProblem,
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
    /// An answer that is not the one the call reads: a 4xx (a route an older server lacks, a
    /// query it refuses), or a body that is not what the route promises. Only the calls that
    /// return a typed answer (the history, the event stream) report it; the others hand every
    /// answer back as a [`crate::Reply`].
    #[error("{method} {url}: the server answered {status}: {message}")]
    Refused {
        method: Method,
        url: String,
        status: StatusCode,
        message: String,
    },
}

/// What the TLS handshake found wrong with the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateProblem {
    /// A CA certificate (basicConstraints CA:TRUE) presented as the server's own.
    CaUsedAsEndEntity,
    /// Not signed by a CA the client trusts.
    UnknownIssuer,
    /// It does not name the host the client connected to.
    WrongName,
    /// Expired, or not valid yet.
    OutsideValidity,
    /// Anything else rustls refused it for.
    Other,
}

impl CertificateProblem {
    /// The certificate problem somewhere in `error`'s causes, if the TLS handshake refused the
    /// server's certificate. Found by type: rustls' error, which the TLS stream reports inside
    /// an I/O error (itself inside another), whose `source` skips what it wraps: so an I/O
    /// error is looked into rather than past.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Option<CertificateProblem> {
        let mut next = Some(error);
        while let Some(cause) = next {
            if let Some(rustls::Error::InvalidCertificate(refusal)) =
                cause.downcast_ref::<rustls::Error>()
            {
                return Some(CertificateProblem::from(refusal));
            }
            next = match cause
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
            {
                Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
                None => cause.source(),
            };
        }
        None
    }
}

impl From<&rustls::CertificateError> for CertificateProblem {
    fn from(refusal: &rustls::CertificateError) -> Self {
        use rustls::CertificateError as E;
        match refusal {
            E::UnknownIssuer => CertificateProblem::UnknownIssuer,
            E::NotValidForName | E::NotValidForNameContext { .. } => CertificateProblem::WrongName,
            E::Expired
            | E::ExpiredContext { .. }
            | E::NotValidYet
            | E::NotValidYetContext { .. } => CertificateProblem::OutsideValidity,
            E::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                CertificateProblem::CaUsedAsEndEntity
            }
            _ => CertificateProblem::Other,
        }
    }
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
            }
            | Error::Refused {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// As the TLS stream reports a refused certificate: rustls' error inside an I/O error.
    fn refused(refusal: rustls::CertificateError) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(refusal),
        )
    }

    #[test]
    fn certificate_problems_are_told_by_type() {
        // As the TLS connector hands it on: wrapped once more.
        let twice = std::io::Error::other(refused(rustls::CertificateError::UnknownIssuer));
        assert_eq!(
            CertificateProblem::of(&twice),
            Some(CertificateProblem::UnknownIssuer)
        );
        use rustls::CertificateError as E;
        let ca = E::Other(rustls::OtherError(Arc::new(
            webpki::Error::CaUsedAsEndEntity,
        )));
        let cases = [
            (ca, CertificateProblem::CaUsedAsEndEntity),
            (E::UnknownIssuer, CertificateProblem::UnknownIssuer),
            (E::NotValidForName, CertificateProblem::WrongName),
            (E::Expired, CertificateProblem::OutsideValidity),
            (E::NotValidYet, CertificateProblem::OutsideValidity),
            (E::BadSignature, CertificateProblem::Other),
        ];
        for (refusal, problem) in cases {
            let error = refused(refusal);
            assert_eq!(CertificateProblem::of(&error), Some(problem), "{error}");
        }
        // Whatever its message says, an error that is no certificate refusal is none.
        let text = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert_eq!(CertificateProblem::of(&text), None);
        let refused_connection = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(CertificateProblem::of(&refused_connection), None);
    }
}
