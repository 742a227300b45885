//! Reaching etcd: connect options (TLS, credentials, timeouts) and the store's own runtime.

use super::*;

impl EtcdConnection {
    pub(super) fn options(&self) -> Result<ConnectOptions, String> {
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
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("etcd CA certificate {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.client_cert {
                let cert_pem = std::fs::read(cert)
                    .map_err(|e| format!("etcd client certificate {}: {e}", cert.display()))?;
                let key_pem = std::fs::read(key)
                    .map_err(|e| format!("etcd client key {}: {e}", key.display()))?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// A client per member (see [`members`]), once the cluster answered a linearizable read;
    /// tried a few times.
    pub async fn members(&self) -> Result<Members, String> {
        if self.endpoints.is_empty() {
            return Err("LOCKER_ETCD_ENDPOINTS names no endpoint".into());
        }
        let members = Members::new(&self.endpoints, self.options()?);
        let endpoints = self.endpoints.join(",");
        let meta = format!("{}meta", self.prefix);
        for attempt in 1..=CONNECT_TRIES {
            let probe = members
                .call(REQUEST_TIMEOUT * 2, |mut client| {
                    let meta = meta.clone();
                    async move { client.get(meta, None).await }
                })
                .await;
            let last = match probe {
                Ok(_) => return Ok(members),
                Err(e) => e.to_string(),
            };
            warn!("etcd at {endpoints} not reachable (try {attempt} of {CONNECT_TRIES}): {last}");
            if attempt < CONNECT_TRIES {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                return Err(format!(
                    "cannot reach etcd at {endpoints} after {CONNECT_TRIES} tries: {last}"
                ));
            }
        }
        Err(format!("cannot reach etcd at {endpoints}"))
    }

    /// Connects and proves the cluster answers (a linearizable read), trying a few times.
    pub async fn connect(&self) -> Result<Client, String> {
        if self.endpoints.is_empty() {
            return Err("LOCKER_ETCD_ENDPOINTS names no endpoint".into());
        }
        let options = self.options()?;
        let endpoints = self.endpoints.join(",");
        let mut last = String::new();
        for attempt in 1..=CONNECT_TRIES {
            let probe = async {
                let mut client = Client::connect(&self.endpoints, Some(options.clone())).await?;
                client.get(format!("{}meta", self.prefix), None).await?;
                Ok::<_, etcd_client::Error>(client)
            };
            match tokio::time::timeout(REQUEST_TIMEOUT * 2, probe).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer in time".into(),
            }
            warn!("etcd at {endpoints} not reachable (try {attempt} of {CONNECT_TRIES}): {last}");
            if attempt < CONNECT_TRIES {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Err(format!(
            "cannot reach etcd at {endpoints} after {CONNECT_TRIES} tries: {last}"
        ))
    }
}

/// A runtime of its own for the etcd client, the writer and the watch, so they do not depend
/// on the HTTP server's worker threads.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("etcd")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the etcd client runtime: {e}"))
}
