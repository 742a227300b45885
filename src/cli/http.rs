//! The connection to the server and the API calls. Every transport failure, 401 and
//! unexpected answer becomes a [`Failure`] with its exit code; the answers a caller must
//! interpret (200, 404, 409, 423 ...) come back as a [`Reply`].

use std::time::Duration;

use locker_client::{lock_path, wire_duration};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{ConnectionArgs, Failure, exit};

/// An answer worth interpreting.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// The body as JSON; `Null` when it is not JSON.
    pub body: Value,
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

    /// A failure for an answer the caller did not expect.
    pub fn refused(&self, what: &str) -> Failure {
        Failure::new(
            exit::REFUSED,
            format!(
                "{what}: the server answered {}: {}",
                self.status,
                self.error_message()
            ),
        )
    }
}

#[derive(Clone)]
pub struct Connection {
    http: reqwest::Client,
    /// The URL without a trailing `/`.
    base: String,
    credentials: Option<(String, String)>,
    request_timeout: Duration,
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
        let mut builder = reqwest::Client::builder()
            .connect_timeout(args.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("locker-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    format!("cannot read the CA certificate {}: {e}", path.display()),
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Failure::new(
                    exit::USAGE,
                    format!("{} is not a PEM certificate: {e}", path.display()),
                )
            })?;
            if certs.is_empty() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| {
            Failure::new(exit::USAGE, format!("cannot set up the HTTP client: {e}"))
        })?;
        Ok(Connection {
            http,
            base: url.as_str().trim_end_matches('/').to_string(),
            credentials: args.credentials()?,
            request_timeout: args.request_timeout,
        })
    }

    /// The same connection with another per-request deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Connection {
        Connection {
            request_timeout: timeout,
            ..self.clone()
        }
    }

    /// `PUT /lock/{name}`, asking the server to wait up to `wait`.
    pub async fn acquire(
        &self,
        name: &str,
        body: &Value,
        wait: Option<Duration>,
    ) -> Result<Reply, Failure> {
        let query = wait
            .map(|w| format!("?wait={}", wire_duration(w)))
            .unwrap_or_default();
        self.send(
            Method::PUT,
            &format!("{}{query}", lock_path(name)),
            Some(body),
            wait.unwrap_or_default(),
        )
        .await
    }

    /// `DELETE /lock/{name}` (`?force=true` when forced).
    pub async fn release(&self, name: &str, body: &Value, force: bool) -> Result<Reply, Failure> {
        let query = if force { "?force=true" } else { "" };
        self.send(
            Method::DELETE,
            &format!("{}{query}", lock_path(name)),
            Some(body),
            Duration::ZERO,
        )
        .await
    }

    /// `GET /lock/{name}`, with `?wait_free=` when asked to wait until it is free.
    pub async fn status(&self, name: &str, wait_free: Option<Duration>) -> Result<Reply, Failure> {
        let query = wait_free
            .map(|w| format!("?wait_free={}", wire_duration(w)))
            .unwrap_or_default();
        self.send(
            Method::GET,
            &format!("{}{query}", lock_path(name)),
            None,
            wait_free.unwrap_or_default(),
        )
        .await
    }

    /// `GET /locks`.
    pub async fn locks(&self) -> Result<Value, Failure> {
        let reply = self
            .send(Method::GET, "/locks", None, Duration::ZERO)
            .await?;
        if reply.status != StatusCode::OK || !reply.body.is_object() {
            return Err(reply.refused("cannot list the locks"));
        }
        Ok(reply.body)
    }

    /// One request. 401 and transport errors are failures; 5xx too.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        wait: Duration,
    ) -> Result<Reply, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .timeout(self.request_timeout.saturating_add(wait));
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            let cause = describe(&e);
            let hint = certificate_hint(&cause, &self.base)
                .map(|hint| format!(". {hint}"))
                .unwrap_or_default();
            Failure::new(
                exit::UNREACHABLE,
                format!("cannot reach the server at {}: {cause}{hint}", self.base),
            )
        })?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return Err(Failure::new(
                exit::AUTH,
                format!(
                    "{} refused the credentials (401): set --user/--password or \
                     LOCKER_USER/LOCKER_PASSWORD",
                    self.base
                ),
            ));
        }
        let text = response.text().await.map_err(|e| {
            Failure::new(
                exit::UNREACHABLE,
                format!("{method} {url}: the answer broke off: {}", describe(&e)),
            )
        })?;
        let reply = Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        };
        if status.is_server_error() {
            return Err(reply.refused(&format!("{method} {path}")));
        }
        Ok(reply)
    }
}

/// Where the README shows how to make a certificate that works.
const CERTIFICATE_RECIPE: &str =
    "README, Recipes: \"HTTPS with a certificate of your own\" has the openssl commands";

/// What is wrong with the server's certificate and how to make one that works, when the TLS
/// handshake refused it (`cause` is the error with its causes, as [`describe`] gives it).
fn certificate_hint(cause: &str, base: &str) -> Option<String> {
    let host = reqwest::Url::parse(base)
        .ok()
        .and_then(|url| url.host_str().map(str::to_string))
        .unwrap_or_else(|| base.to_string());
    if cause.contains("CaUsedAsEndEntity") {
        return Some(format!(
            "The server's certificate is a CA certificate (basicConstraints CA:TRUE, which a \
             plain `openssl req -x509` makes), and TLS clients refuse a CA certificate as a \
             server's own. Make a CA, and a server certificate signed by it that names {host} \
             in subjectAltName; give the server the server certificate (SSL_CERT, SSL_KEY) and \
             this client the CA (--ca-cert or LOCKER_CA_CERT). {CERTIFICATE_RECIPE}"
        ));
    }
    if cause.contains("UnknownIssuer") {
        return Some(format!(
            "The server's certificate is not signed by a CA this client trusts: pass the CA \
             certificate that signed it with --ca-cert or LOCKER_CA_CERT. {CERTIFICATE_RECIPE}"
        ));
    }
    if cause.contains("NotValidForName") {
        return Some(format!(
            "The server's certificate does not name {host} in its subjectAltName: connect with a \
             name it has, or give the server a certificate naming {host}. {CERTIFICATE_RECIPE}"
        ));
    }
    if cause.contains("Expired") || cause.contains("NotValidYet") {
        return Some(
            "The server's certificate is outside its validity dates: renew it, or check this \
             machine's clock."
                .to_string(),
        );
    }
    None
}

/// A transport error with its causes.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_refusals_say_what_is_wrong_and_how_to_fix_it() {
        let base = "https://locker.example.com:3000";
        let ca = certificate_hint(
            "client error (Connect): invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))",
            base,
        )
        .expect("hint");
        for text in [
            "CA certificate",
            "openssl req -x509",
            "locker.example.com",
            "--ca-cert",
        ] {
            assert!(ca.contains(text), "{ca} lacks {text}");
        }
        let unknown =
            certificate_hint("invalid peer certificate: UnknownIssuer", base).expect("hint");
        assert!(unknown.contains("--ca-cert"), "{unknown}");
        let name =
            certificate_hint("invalid peer certificate: NotValidForName", base).expect("hint");
        assert!(name.contains("locker.example.com"), "{name}");
        assert_eq!(certificate_hint("Connection refused", base), None);
    }
}
