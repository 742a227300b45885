//! The connection to the server and the API calls. Every transport failure, 401 and
//! unexpected answer becomes a [`Failure`] with its exit code; the answers a caller must
//! interpret (200, 404, 409, 423 ...) come back as a [`Reply`].

use std::time::Duration;

use locker_client::{CertificateProblem, Client, Error, RetryPolicy, Settings, SetupError};
use serde::Serialize;
use serde_json::Value;

use super::{ConnectionArgs, Failure, exit};

pub use locker_client::Reply;

/// A failure for an answer the caller did not expect.
pub fn refused(reply: &Reply, what: &str) -> Failure {
    Failure::new(
        exit::REFUSED,
        format!(
            "{what}: the server answered {}: {}",
            reply.status,
            reply.error_message()
        ),
    )
}

/// The server, as the CLI reaches it: the shared client, each request tried once (the long-poll
/// loop rides out restarts itself), every error mapped to its exit code.
#[derive(Clone)]
pub struct Connection {
    client: Client,
}

impl Connection {
    pub fn new(args: &ConnectionArgs) -> Result<Connection, Failure> {
        let url = reqwest::Url::parse(args.url.trim()).map_err(|e| {
            Failure::new(
                exit::USAGE,
                format!("--url/LOCKER_URL {:?} is not a URL: {e}", args.url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "--url/LOCKER_URL must be an http:// or https:// URL, not {:?}",
                    args.url
                ),
            ));
        }
        let ca_pem = match &args.ca_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    format!("cannot read the CA certificate {}: {e}", path.display()),
                )
            })?),
            None => None,
        };
        let client = Client::new(Settings {
            url,
            credentials: args.credentials()?,
            ca_pem,
            accept_invalid_certs: false,
            connect_timeout: args.request_timeout.min(Duration::from_secs(10)),
            request_timeout: args.request_timeout,
            user_agent: concat!("locker-cli/", env!("CARGO_PKG_VERSION")).to_string(),
            retry: RetryPolicy::ONCE,
        })
        .map_err(|e| {
            let file = args
                .ca_cert
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let message = match e {
                SetupError::CaNotPem(e) => format!("{file} is not a PEM certificate: {e}"),
                SetupError::CaEmpty => format!("{file} holds no PEM certificate"),
                other => other.to_string(),
            };
            Failure::new(exit::USAGE, message)
        })?;
        Ok(Connection { client })
    }

    /// The shared client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The same connection with another per-request deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Connection {
        Connection {
            client: self.client.quick(timeout),
        }
    }

    /// `DELETE /lock/{name}` (`?force=true` when forced).
    pub async fn release<B: Serialize + ?Sized>(
        &self,
        name: &str,
        body: &B,
        force: bool,
    ) -> Result<Reply, Failure> {
        self.client
            .release(name, body, force)
            .await
            .map_err(|e| self.failure(e))
    }

    /// `GET /lock/{name}`, with `?wait_free=` when asked to wait until it is free.
    pub async fn status(&self, name: &str, wait_free: Option<Duration>) -> Result<Reply, Failure> {
        self.client
            .status(name, wait_free)
            .await
            .map_err(|e| self.failure(e))
    }

    /// `GET /locks`.
    pub async fn locks(&self) -> Result<Value, Failure> {
        let reply = self.client.locks().await.map_err(|e| self.failure(e))?;
        if reply.status != reqwest::StatusCode::OK || !reply.body.is_object() {
            return Err(refused(&reply, "cannot list the locks"));
        }
        Ok(reply.body)
    }

    /// The answer to a call of the shared client, its error mapped to a failure.
    pub async fn answer(
        &self,
        call: impl Future<Output = Result<Reply, Error>>,
    ) -> Result<Reply, Failure> {
        call.await.map_err(|e| self.failure(e))
    }

    /// The failure, with its exit code, for an error of the shared client.
    pub fn failure(&self, error: Error) -> Failure {
        failure(error, self.client.shown_base())
    }
}

/// The failure, with its exit code, for an error of the shared client talking to `base`.
pub fn failure(error: Error, base: &str) -> Failure {
    match error {
        Error::Unauthorized { .. } => Failure::new(
            exit::AUTH,
            format!(
                "{base} refused the credentials (401): set --user/--password or \
                 LOCKER_USER/LOCKER_PASSWORD"
            ),
        ),
        Error::Transport { cause, .. } => Failure::new(
            exit::UNREACHABLE,
            format!("cannot reach the server at {base}: {cause}"),
        ),
        Error::Certificate { problem, cause, .. } => {
            let hint = certificate_hint(problem, base)
                .map(|hint| format!(". {hint}"))
                .unwrap_or_default();
            Failure::new(
                exit::UNREACHABLE,
                format!("cannot reach the server at {base}: {cause}{hint}"),
            )
        }
        Error::Server {
            method,
            url,
            status,
            message,
            ..
        }
        | Error::Refused {
            method,
            url,
            status,
            message,
        } => {
            let path = url.strip_prefix(base).unwrap_or(&url);
            Failure::new(
                exit::REFUSED,
                format!("{method} {path}: the server answered {status}: {message}"),
            )
        }
    }
}

/// Where the README shows how to make a certificate that works.
const CERTIFICATE_RECIPE: &str =
    "README, Recipes: \"HTTPS with a certificate of your own\" has the openssl commands";

/// What is wrong with the server's certificate and how to make one that works, when the TLS
/// handshake refused it.
fn certificate_hint(problem: CertificateProblem, base: &str) -> Option<String> {
    let host = reqwest::Url::parse(base)
        .ok()
        .and_then(|url| url.host_str().map(str::to_string))
        .unwrap_or_else(|| base.to_string());
    match problem {
        CertificateProblem::CaUsedAsEndEntity => Some(format!(
            "The server's certificate is a CA certificate (basicConstraints CA:TRUE, which a \
             plain `openssl req -x509` makes), and TLS clients refuse a CA certificate as a \
             server's own. Make a CA, and a server certificate signed by it that names {host} \
             in subjectAltName; give the server the server certificate (SSL_CERT, SSL_KEY) and \
             this client the CA (--ca-cert or LOCKER_CA_CERT). {CERTIFICATE_RECIPE}"
        )),
        CertificateProblem::UnknownIssuer => Some(format!(
            "The server's certificate is not signed by a CA this client trusts: pass the CA \
             certificate that signed it with --ca-cert or LOCKER_CA_CERT. {CERTIFICATE_RECIPE}"
        )),
        CertificateProblem::WrongName => Some(format!(
            "The server's certificate does not name {host} in its subjectAltName: connect with a \
             name it has, or give the server a certificate naming {host}. {CERTIFICATE_RECIPE}"
        )),
        CertificateProblem::OutsideValidity => Some(
            "The server's certificate is outside its validity dates: renew it, or check this \
             machine's clock."
                .to_string(),
        ),
        CertificateProblem::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_refusals_say_what_is_wrong_and_how_to_fix_it() {
        let base = "https://locker.example.com:3000";
        let ca = certificate_hint(CertificateProblem::CaUsedAsEndEntity, base).expect("hint");
        for text in [
            "CA certificate",
            "openssl req -x509",
            "locker.example.com",
            "--ca-cert",
        ] {
            assert!(ca.contains(text), "{ca} lacks {text}");
        }
        let unknown = certificate_hint(CertificateProblem::UnknownIssuer, base).expect("hint");
        assert!(unknown.contains("--ca-cert"), "{unknown}");
        let name = certificate_hint(CertificateProblem::WrongName, base).expect("hint");
        assert!(name.contains("locker.example.com"), "{name}");
        assert_eq!(certificate_hint(CertificateProblem::Other, base), None);
    }
}
