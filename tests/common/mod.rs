//! Test fixture: runs the real `locker` binary on a free loopback port with a temp state file,
//! forwards its log to the test's output (prefixed), and kills and reaps it when dropped.
//!
//! Shared by the integration tests of every crate in the workspace (`#[path]`-included), so it
//! finds the server binary itself: Cargo's `CARGO_BIN_EXE_locker` in this package, else the
//! `locker` binary beside the test executable's target directory (`cargo test --workspace`
//! builds it before running any test).
#![allow(dead_code)]
// The etcd parts need the server built with the `etcd` feature: they are compiled only with
// `feature = "etcd"` of the including crate. The resource crate has no such feature (there they
// are always compiled out), hence no complaint about an unknown feature name.
#![allow(unexpected_cfgs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long a server may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variables of the server that must not leak in from the test's environment:
/// every one its flags read, from its own `--help` (clap prints `[env: NAME=...]` for each), so a
/// new flag is never missed; and the log filter, which is read outside clap. Asked of the
/// server binary itself, not of a wrapper a test runs it under (`fiu-run`, `strace`).
fn server_variables(binary: &Path) -> &'static [String] {
    static VARIABLES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    VARIABLES.get_or_init(|| {
        let help = Command::new(binary)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} --help: {e}", binary.display()));
        let text = String::from_utf8_lossy(&help.stdout);
        let mut variables: Vec<String> = text
            .split("[env: ")
            .skip(1)
            .filter_map(|rest| rest.split(['=', ']']).next())
            .map(str::to_string)
            .collect();
        assert!(
            variables.len() >= 20 && variables.iter().any(|v| v == "LOCKER_CONFIG"),
            "no environment variables found in the server's --help:\n{text}"
        );
        variables.extend(["RUST_LOG".to_string(), "RUST_LOG_STYLE".to_string()]);
        variables
    })
}

/// Path of the `locker` server binary.
pub fn locker_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_locker") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/locker
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let binary = profile_dir.join("locker");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        binary.display()
    );
    binary
}

/// A temp directory that holds the state file and anything else a test needs on disk.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("locker-test-")
        .tempdir()
        .expect("temp dir")
}

pub struct ServerBuilder {
    binary: PathBuf,
    state_file: Option<PathBuf>,
    env: Vec<(String, String)>,
    args: Vec<String>,
    https: bool,
    current_dir: Option<PathBuf>,
}

impl ServerBuilder {
    /// Runs the server in this directory (relative paths, such as the default state file
    /// `locker.yml`, land there).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_string(), value.into()));
        self
    }

    /// Runs this executable instead of [`locker_binary`] (e.g. a copy installed elsewhere).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = path.into();
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn auth(self, user: &str, password: &str) -> Self {
        self.env("AUTH_USER", user).env("AUTH_PASS", password)
    }

    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.https = true;
        self.env("SSL_CERT", cert.display().to_string())
            .env("SSL_KEY", key.display().to_string())
    }

    #[cfg(feature = "etcd")]
    /// Keeps the locks in this etcd cluster, under a prefix of their own unless one is given
    /// with `.env("LOCKER_ETCD_PREFIX", ..)` (servers sharing a prefix share their locks).
    pub fn etcd(mut self, endpoints: &str) -> Self {
        self.env
            .retain(|(name, _)| name != "LOCKER_STORE" && name != "LOCKER_ETCD_ENDPOINTS");
        self.env("LOCKER_STORE", "etcd")
            .env("LOCKER_ETCD_ENDPOINTS", endpoints)
    }

    /// Starts the server and waits until it listens.
    pub fn start(self) -> Server {
        self.with_own_etcd_prefix().launch()
    }

    /// An etcd server gets a prefix of its own unless one was given. Kept in `env`, so a
    /// restart finds the same locks.
    #[cfg(feature = "etcd")]
    fn with_own_etcd_prefix(self) -> Self {
        let on_etcd = self
            .env
            .iter()
            .any(|(n, v)| n == "LOCKER_STORE" && v == "etcd");
        if on_etcd && !self.env.iter().any(|(n, _)| n == "LOCKER_ETCD_PREFIX") {
            self.env("LOCKER_ETCD_PREFIX", etcd::unique_prefix())
        } else {
            self
        }
    }

    #[cfg(not(feature = "etcd"))]
    fn with_own_etcd_prefix(self) -> Self {
        self
    }

    fn launch(self) -> Server {
        let (dir, state_file) = match self.state_file.clone() {
            Some(path) => (None, path),
            None => {
                let dir = temp_dir();
                let path = dir.path().join("locker.yml");
                (Some(dir), path)
            }
        };
        let mut command = Command::new(&self.binary);
        for name in server_variables(&locker_binary()) {
            command.env_remove(name);
        }
        command
            .env("RUST_LOG", "info")
            .env("LOCKER_CONFIG", &state_file)
            .env("PORT", "0")
            .env("LOCKER_LISTEN", "127.0.0.1");
        for (name, value) in &self.env {
            command.env(name, value);
        }
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start the locker binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_sender, address) = mpsc::channel();
        forward_output(child.stdout.take(), log.clone(), None);
        forward_output(child.stderr.take(), log.clone(), Some(address_sender));
        let deadline = Instant::now() + START_TIMEOUT;
        let address = loop {
            if let Ok(address) = address.recv_timeout(Duration::from_millis(50)) {
                break address;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "server exited before listening ({status}):\n{}",
                    log.lock().expect("log").join("\n")
                );
            }
            if Instant::now() >= deadline {
                // Not left running after the test.
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not start in time:\n{}",
                    log.lock().expect("log").join("\n")
                );
            }
        };
        Server {
            child: Some(child),
            base: address,
            state_file,
            log,
            _dir: dir,
            builder: self,
        }
    }
}

/// Forwards a child's output line by line to the test output and a shared log; on stderr,
/// reports the address from the "listening on" line.
fn forward_output(
    stream: Option<impl std::io::Read + Send + 'static>,
    log: Arc<Mutex<Vec<String>>>,
    address: Option<mpsc::Sender<String>>,
) {
    let Some(stream) = stream else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if let (Some(sender), Some(at)) = (&address, line.find("listening on ")) {
                let url = line[at + "listening on ".len()..].trim().to_string();
                let _ = sender.send(url);
            }
            if let Ok(mut log) = log.lock() {
                log.push(line);
            }
        }
    });
}

/// A running server. Killed (SIGKILL) and reaped when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` (or https).
    pub base: String,
    pub state_file: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
    builder: ServerBuilder,
}

/// A server with default settings, to be adjusted before `start()`. Its backend is the file,
/// or etcd inside [`with_backend`]`(Backend::Etcd, ..)`.
pub fn server() -> ServerBuilder {
    let builder = ServerBuilder {
        binary: locker_binary(),
        state_file: None,
        env: Vec::new(),
        args: Vec::new(),
        https: false,
        current_dir: None,
    };
    match backend() {
        Backend::File => builder,
        #[cfg(feature = "etcd")]
        Backend::Etcd => builder.etcd(&etcd::shared().endpoints()),
    }
}

/// Where the servers a test starts keep their locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    File,
    #[cfg(feature = "etcd")]
    Etcd,
}

thread_local! {
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::File) };
}

/// The backend of servers started by [`server`] on this thread.
pub fn backend() -> Backend {
    BACKEND.with(|b| b.get())
}

/// Runs a test with servers of the given backend.
pub fn with_backend(backend: Backend, test: fn()) {
    BACKEND.with(|b| b.set(backend));
    test();
}

/// Runs each named test (a plain `fn()`, usually also a `#[test]` of its own against the file
/// backend) once more against the etcd backend, as `on_etcd::<name>`: one contract for both.
/// Only with the `etcd` feature (the server needs it); without, the file tests run alone.
#[macro_export]
macro_rules! also_on_etcd {
    ($($test:ident),* $(,)?) => {
        #[cfg(feature = "etcd")]
        mod on_etcd {
            $(
                #[test]
                fn $test() {
                    $crate::common::with_backend($crate::common::Backend::Etcd, super::$test);
                }
            )*
        }
    };
}

#[cfg(feature = "etcd")]
pub mod etcd;

impl Server {
    pub fn start() -> Server {
        server().start()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("server is running")
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// How many lines of the server's log so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits (up to 20 s, generous for a loaded machine) until at least `count` lines of the
    /// server's log contain `needle`: the event itself, not a sleep that hopes it happened.
    pub fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_count(needle) < count {
            assert!(
                Instant::now() < deadline,
                "the server never logged {needle:?} {count} time(s):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 20 s) until `GET /metrics` has a line equal to `line` (e.g.
    /// `locker_waiters 1`): a state the server reports, rather than a sleep.
    pub fn wait_for_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = call("GET", &self.url("/metrics"), None).body;
            if metrics.lines().any(|l| l == line) {
                return;
            }
            assert!(Instant::now() < deadline, "never saw {line:?}:\n{metrics}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let result = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(result, 0, "kill failed");
    }

    /// Waits for the server to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for server") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same state file and settings.
    pub fn restart(mut self) -> Server {
        self.kill();
        let dir = self._dir.take();
        let builder = ServerBuilder {
            binary: self.builder.binary.clone(),
            state_file: Some(self.state_file.clone()),
            env: self.builder.env.clone(),
            args: self.builder.args.clone(),
            https: self.builder.https,
            current_dir: self.builder.current_dir.clone(),
        };
        let mut server = builder.start();
        server._dir = dir;
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

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
    use std::io::{Read, Write};
    let address = server
        .base
        .strip_prefix("http://")
        .expect("raw exchange needs plain http");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
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
