//! Reaching etcd: connect options (TLS, credentials, timeouts) and the store's own runtime.

use super::*;

/// Why etcd could not be reached at start-up (the server, `locker import` and `export`).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file of LOCKER_ETCD_CA, _CERT or _KEY (`what` says which).
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("LOCKER_ETCD_ENDPOINTS names no endpoint")]
    NoEndpoints,
    #[error("cannot reach etcd at {endpoints} after {tries} tries: {last}")]
    Unreachable {
        endpoints: String,
        tries: u32,
        last: ProbeFailure,
    },
    #[error("cannot start the etcd client runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Why one try to reach etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeFailure {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("no answer in time")]
    Timeout,
}

/// Reads a TLS file for the etcd client.
fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl EtcdConnection {
    pub(super) fn options(&self) -> Result<ConnectOptions, ConnectError> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if self.ca.is_some() || self.client_cert.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                let pem = read_file("etcd CA certificate", ca)?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.client_cert {
                let cert_pem = read_file("etcd client certificate", cert)?;
                let key_pem = read_file("etcd client key", key)?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// A client per member (see [`members`]), once the cluster answered a linearizable read;
    /// tried a few times.
    pub async fn members(&self) -> Result<Members, ConnectError> {
        if self.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let members = Members::new(&self.endpoints, self.options()?);
        let meta = format!("{}meta", self.prefix);
        self.tries(|| async {
            members
                .call(REQUEST_TIMEOUT * 2, |mut client| {
                    let meta = meta.clone();
                    async move { client.get(meta, None).await }
                })
                .await?;
            Ok(())
        })
        .await?;
        Ok(members)
    }

    /// Connects and proves the cluster answers (a linearizable read), trying a few times.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        if self.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let options = self.options()?;
        self.tries(|| async {
            let probe = async {
                let mut client = Client::connect(&self.endpoints, Some(options.clone())).await?;
                client.get(format!("{}meta", self.prefix), None).await?;
                Ok::<_, etcd_client::Error>(client)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT * 2, probe).await {
                Ok(answer) => Ok(answer?),
                Err(_) => Err(ProbeFailure::Timeout),
            }
        })
        .await
    }

    /// Runs `probe` until it succeeds, [`CONNECT_TRIES`] times at most, a second apart, with a
    /// warning for each failure.
    async fn tries<T, Probe>(&self, mut probe: impl FnMut() -> Probe) -> Result<T, ConnectError>
    where
        Probe: Future<Output = Result<T, ProbeFailure>>,
    {
        let endpoints = self.endpoints.join(",");
        let mut attempt = 1;
        loop {
            let last = match probe().await {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            warn!("etcd at {endpoints} not reachable (try {attempt} of {CONNECT_TRIES}): {last}");
            if attempt >= CONNECT_TRIES {
                return Err(ConnectError::Unreachable {
                    endpoints,
                    tries: CONNECT_TRIES,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            attempt += 1;
        }
    }
}

/// A runtime of its own for the etcd client, the writer and the watch, so they do not depend
/// on the HTTP server's worker threads.
pub fn runtime() -> Result<tokio::runtime::Runtime, ConnectError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("etcd")
        .enable_all()
        .build()
        .map_err(ConnectError::Runtime)
}
