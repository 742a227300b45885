//! The etcd members one server talks to: a client per member, and one member in use at a time.
//!
//! etcd-client spreads requests over every endpoint through one balanced tonic channel, and that
//! channel keeps choosing a member that cannot be connected to: with one member of three killed,
//! about a third of the requests failed, for as long as the member stayed down (issue 16).
//! Here each member has a client of its own and every call goes to the member in use. A call
//! that could not connect never reached etcd, so it is tried again on the next member until the
//! call's deadline; any other failure (no answer in time, "no leader" from a member cut off from
//! the others) moves later calls to the next member and is answered as it is.

use std::error::Error as _;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Pause before trying the members again once each of them failed to connect.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Whether an etcd error means the request never left this process: the connection to the
/// member (TCP, or the TLS handshake) could not be made. tonic marks those with
/// [`tonic::ConnectError`] in the error's source chain.
pub fn is_connect_error(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The failure of a call that got no answer before its deadline.
fn no_answer() -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer in time",
    ))
}

pub struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// One client per member, made at its first use (making one may fail: with a user, it
    /// asks the member for a token).
    clients: Vec<Mutex<Option<Client>>>,
    /// Index of the member in use.
    current: AtomicUsize,
    /// When a call last succeeded.
    last_success: Mutex<Option<Instant>>,
}

impl Members {
    /// No connection is made here; see [`Members::call`].
    pub fn new(endpoints: &[String], options: ConnectOptions) -> Members {
        Members {
            endpoints: endpoints.to_vec(),
            options,
            clients: endpoints.iter().map(|_| Mutex::new(None)).collect(),
            current: AtomicUsize::new(0),
            last_success: Mutex::new(None),
        }
    }

    fn count(&self) -> usize {
        self.endpoints.len().max(1)
    }

    /// The member in use and its client.
    pub async fn pinned(&self) -> Result<(usize, Client), etcd_client::Error> {
        let i = self.current.load(Ordering::Relaxed) % self.count();
        let Some(endpoint) = self.endpoints.get(i) else {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoint".into()));
        };
        if let Some(client) = self.clients[i].lock().clone() {
            return Ok((i, client));
        }
        let client = Client::connect([endpoint], Some(self.options.clone())).await?;
        *self.clients[i].lock() = Some(client.clone());
        Ok((i, client))
    }

    /// Moves later calls off member `i` (unless another call already did).
    pub fn failed(&self, i: usize) {
        let next = (i + 1) % self.count();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Records that a call through member `i` was answered.
    pub fn succeeded(&self) {
        *self.last_success.lock() = Some(Instant::now());
    }

    /// Whether a call was answered within `within`.
    pub fn answered_within(&self, within: Duration) -> bool {
        self.last_success
            .lock()
            .is_some_and(|at| at.elapsed() <= within)
    }

    /// Runs `call` on the member in use, within `timeout`. A call that could not connect is
    /// tried on the next member (it never reached etcd); once every member failed to connect,
    /// after a short pause, round again, until the deadline.
    pub async fn call<T, F, Fut>(
        &self,
        timeout: Duration,
        mut call: F,
    ) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + timeout;
        let mut refused = 0;
        // The last refusal, answered rather than "no answer" when time runs out while retrying.
        let mut last: Option<etcd_client::Error> = None;
        loop {
            let (i, result) = match tokio::time::timeout_at(deadline, self.pinned()).await {
                Err(_) => return Err(last.unwrap_or_else(no_answer)),
                Ok(Err(e)) => (self.current.load(Ordering::Relaxed) % self.count(), Err(e)),
                Ok(Ok((i, client))) => {
                    match tokio::time::timeout_at(deadline, call(client)).await {
                        Ok(result) => (i, result),
                        Err(_) => {
                            self.failed(i);
                            return Err(last.unwrap_or_else(no_answer));
                        }
                    }
                }
            };
            match result {
                Ok(value) => {
                    self.succeeded();
                    return Ok(value);
                }
                Err(e) => {
                    self.failed(i);
                    if !is_connect_error(&e) || Instant::now() >= deadline {
                        return Err(e);
                    }
                    refused += 1;
                    if refused % self.count() == 0 {
                        tokio::time::sleep_until(deadline.min(Instant::now() + CONNECT_RETRY))
                            .await;
                    }
                    last = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback address nothing listens on.
    fn closed_endpoint() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        format!("http://{address}")
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_and_every_member_is_tried() {
        let endpoints = vec![closed_endpoint(), closed_endpoint()];
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
        let members = Members::new(&endpoints, options);
        let mut tried = Vec::new();
        let result = members
            .call(Duration::from_millis(300), |mut client| {
                tried.push(members.current.load(Ordering::Relaxed));
                async move { client.get("k", None).await }
            })
            .await;
        let error = result.expect_err("nothing listens");
        assert!(is_connect_error(&error), "{error}");
        assert!(tried.contains(&0) && tried.contains(&1), "{tried:?}");
        assert!(!members.answered_within(Duration::from_secs(60)));
    }
}
