//! The server fixture: runs the real `locker` binary on a free loopback port with a temp state
//! file and a scrubbed environment, forwards its log to the test's output (prefixed), and kills
//! and reaps it when dropped; and the backend (file or etcd) the servers of a test use.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

#[cfg(feature = "etcd")]
use super::etcd;
use super::http::call;
use super::process::wait_exit_within;

/// How long a server may take to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server that must stop by itself may take (an unreachable etcd is tried for
/// several seconds).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(40);

/// Environment variables of the server that must not leak in from the test's environment:
/// every one its flags read, from clap's own definition of them (the server's `Args` and its
/// subcommands), so a new flag is never missed; and the log filter, which is read outside clap.
fn server_variables() -> &'static [String] {
    static VARIABLES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    VARIABLES.get_or_init(|| {
        let mut variables = locker::config::env_variables(
            &<locker::config::Args as clap::CommandFactory>::command(),
        );
        assert!(
            variables.iter().any(|v| v == "LOCKER_CONFIG"),
            "no LOCKER_CONFIG among the server's variables: {variables:?}"
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

#[derive(Clone)]
pub struct ServerBuilder {
    binary: PathBuf,
    state_file: Option<PathBuf>,
    env: Vec<(String, String)>,
    args: Vec<String>,
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

    pub fn tls(self, cert: &Path, key: &Path) -> Self {
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

    /// Sets each of `env`, as [`Self::env`] does one.
    pub fn envs(self, env: &[(&str, &str)]) -> Self {
        env.iter()
            .fold(self, |builder, (name, value)| builder.env(name, *value))
    }

    /// Runs the server expecting it to stop by itself (a refused start-up, `--help`, `locker
    /// import`, ...) within [`EXIT_TIMEOUT`]: its exit status and output. One that keeps
    /// running is killed, and the test fails.
    pub fn run_to_exit(self) -> Output {
        let (mut command, _dir, _) = self.command();
        let mut child = command.spawn().expect("start the locker binary");
        wait_exit_within(
            &mut child,
            EXIT_TIMEOUT,
            "the server (it should have stopped by itself)",
        );
        child.wait_with_output().expect("output")
    }

    /// The command that runs the server: every variable of the server scrubbed from the test's
    /// environment, then the fixture's (a free loopback port, the state file, `info` logs) and
    /// the builder's. Also the temp dir holding the state file unless one was given.
    fn command(&self) -> (Command, Option<tempfile::TempDir>, PathBuf) {
        let (dir, state_file) = match self.state_file.clone() {
            Some(path) => (None, path),
            None => {
                let dir = temp_dir();
                let path = dir.path().join("locker.yml");
                (Some(dir), path)
            }
        };
        let mut command = Command::new(&self.binary);
        for name in server_variables() {
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
        (command, dir, state_file)
    }

    fn launch(self) -> Server {
        let (mut command, dir, state_file) = self.command();
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
        let builder = self.builder.clone().state_file(self.state_file.clone());
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
