//! Talking to a server: a blocking client, requests reduced to what the tests look at, raw
//! bytes over TCP, and waiting for states the server reports (waiters, metrics).

use std::time::{Duration, Instant};

use super::server::Server;

/// A blocking HTTP client with a deadline on every request.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A response reduced to what the tests look at.
pub struct Reply {
    pub status: u16,
    pub reason: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The body as JSON (panics with the body text if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The `error` field of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {}", self.body))
            .to_string()
    }
}

/// Sends one request with an optional raw body; any status is returned, not an error.
pub fn call(method: &str, url: &str, body: Option<&str>) -> Reply {
    call_with(&client(), method, url, body)
}

pub fn call_with(
    client: &reqwest::blocking::Client,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().expect("request sent");
    let status = response.status();
    Reply {
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("").to_string(),
        headers: response.headers().clone(),
        body: response.text().expect("body"),
    }
}

impl Server {
    /// `PUT /lock/{name}` with a JSON body built from `body`.
    pub fn lock(&self, name: &str, body: serde_json::Value) -> Reply {
        call(
            "PUT",
            &self.url(&format!("/lock/{name}")),
            Some(&body.to_string()),
        )
    }

    /// `DELETE /lock/{name}` with a JSON body built from `body`.
    pub fn unlock(&self, name: &str, body: serde_json::Value) -> Reply {
        call(
            "DELETE",
            &self.url(&format!("/lock/{name}")),
            Some(&body.to_string()),
        )
    }

    /// `GET /locks` as JSON.
    pub fn locks(&self) -> serde_json::Value {
        let reply = call("GET", &self.url("/locks"), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.json()
    }
}

/// Sends raw bytes over a plain TCP connection and returns everything the server answers
/// until it closes the connection or goes quiet.
pub fn raw_exchange(server: &Server, request: &[u8]) -> String {
    raw_exchange_within(server, request, Duration::from_secs(5))
}

/// [`raw_exchange`], where the server going quiet for `quiet` ends it. The connection stays
/// open meanwhile: what was sent is all the server gets.
pub fn raw_exchange_within(server: &Server, request: &[u8], quiet: Duration) -> String {
    use std::io::{Read, Write};
    let address = server
        .base
        .strip_prefix("http://")
        .expect("raw exchange needs plain http");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(quiet)).expect("timeout");
    stream.write_all(request).expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                if request_complete(&answer) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether `answer` holds a whole response (headers and a Content-Length body).
fn request_complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..end]
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}

/// Polls `GET /lock/{name}` until its `waiters` count is `count` (10 s at most).
pub fn wait_for_waiters(server: &Server, name: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = call("GET", &server.url(&format!("/lock/{name}")), None);
        if reply.status == 200 && reply.json()["waiters"] == serde_json::json!(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {count} waiter(s): {}",
            reply.body
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Server {
    /// The value of one sample of `/metrics` (name with its labels, as printed), 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let reply = call("GET", &self.url("/metrics"), None);
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply
            .body
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}
