//! Running the resource binary the way Concourse does (request JSON on stdin, the directory in
//! argv, the build's `BUILD_*` variables in the environment), and a tiny loopback HTTP stub for
//! servers that cannot run here. Each test declares it `pub mod support;`: what it does not
//! use is then public API of the test crate, not dead code.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The variables the resource reads, by the names its own code uses.
#[path = "../../src/variables.rs"]
mod variables;

/// Longest any single run of the resource may take in these tests.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The build a resource run belongs to.
pub fn build_env(job: &str, build: &str) -> Vec<(String, String)> {
    [
        ("BUILD_TEAM_NAME", "main"),
        ("BUILD_PIPELINE_NAME", "deploy-pipeline"),
        ("BUILD_JOB_NAME", job),
        ("BUILD_NAME", build),
        ("BUILD_ID", "4242"),
        ("ATC_EXTERNAL_URL", "https://ci.example.com"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A started resource process.
pub struct Running {
    child: Child,
    started: Instant,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What a finished run produced.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "resource failed ({}):\n{}",
            self.status,
            self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// The one-line failure reason; asserts the run failed.
    pub fn error(&self) -> String {
        assert!(
            !self.status.success(),
            "resource succeeded unexpectedly: {}\n{}",
            self.stdout,
            self.stderr
        );
        assert!(self.stdout.trim().is_empty(), "stdout: {:?}", self.stdout);
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected:\n{}", self.stderr);
        errors[0].to_string()
    }
}

/// Starts `locker-resource <command> [dir]` with `request` on stdin.
pub fn start(
    command: &str,
    dir: Option<&Path>,
    request: &Value,
    env: &[(String, String)],
) -> Running {
    let mut process = Command::new(env!("CARGO_BIN_EXE_locker-resource"));
    process.arg(command);
    if let Some(dir) = dir {
        process.arg(dir);
    }
    // None of the resource's variables leaks in from the test's environment.
    for name in variables::BUILD {
        process.env_remove(name);
    }
    // Retries in milliseconds, not seconds.
    process.env(variables::RETRY_BASE, "10ms");
    for (name, value) in env {
        process.env(name, value);
    }
    let mut child = process
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start locker-resource");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(request.to_string().as_bytes())
        .expect("write request");
    drop(stdin);
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let readers = vec![
        collect(child.stdout.take().expect("stdout"), stdout.clone(), None),
        collect(
            child.stderr.take().expect("stderr"),
            stderr.clone(),
            Some(format!("[{command}]")),
        ),
    ];
    Running {
        child,
        started: Instant::now(),
        stdout,
        stderr,
        readers,
    }
}

fn collect(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    echo: Option<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(prefix) = &echo {
                eprintln!("{prefix} {line}");
            }
            let mut text = into.lock().expect("output");
            text.push_str(&line);
            text.push('\n');
        }
    })
}

impl Running {
    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let result = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(result, 0, "kill failed");
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    /// Waits for the end, up to `timeout` (then kills it and fails the test).
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("resource did not finish in {timeout:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Outcome {
            status,
            stdout: self.stdout.lock().expect("stdout").clone(),
            stderr: self.stderr.lock().expect("stderr").clone(),
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the resource to the end.
pub fn run(
    command: &str,
    dir: Option<&Path>,
    request: &Value,
    env: &[(String, String)],
) -> Outcome {
    start(command, dir, request, env).finish(RUN_TIMEOUT)
}

/// Waits until `running`'s stderr contains `text` (10 s at most).
pub fn wait_for_log(running: &Running, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in:\n{}",
            running.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A response's metadata as name → value; asserts every entry is a pair of strings.
pub fn metadata(response: &Value) -> BTreeMap<String, String> {
    response["metadata"]
        .as_array()
        .expect("metadata list")
        .iter()
        .map(|entry| {
            let object = entry.as_object().expect("metadata entry is an object");
            assert_eq!(object.len(), 2, "{entry}");
            (
                entry["name"].as_str().expect("string name").to_string(),
                entry["value"].as_str().expect("string value").to_string(),
            )
        })
        .collect()
}

/// Forwards a request a stub received to the real server at `base` and answers what it
/// answered: a stub in front of the real server, to delay, withhold or record what passes.
/// (The stub keeps only the address: the test owns the server, which is killed when it ends.)
pub fn forward(base: &str, request: &StubRequest) -> (u16, String) {
    let body = Some(request.body.as_str()).filter(|b| !b.is_empty());
    let reply = crate::common::call(&request.method, &format!("{base}{}", request.target), body);
    (reply.status, reply.body)
}

/// A stand-in for Concourse's API: every build's status is `status` (which a test changes), for
/// the server's release of holdings whose build has ended.
pub struct Concourse {
    pub stub: Stub,
    status: Arc<Mutex<&'static str>>,
}

impl Concourse {
    pub fn start(status: &'static str) -> Concourse {
        let status = Arc::new(Mutex::new(status));
        let answer = status.clone();
        let stub = Stub::start(move |request| {
            if request.path().starts_with("/api/v1/builds/") {
                let status = *answer.lock().expect("status");
                (
                    200,
                    serde_json::json!({"id": 1, "status": status}).to_string(),
                )
            } else {
                (404, serde_json::json!({"error": "not found"}).to_string())
            }
        });
        Concourse { stub, status }
    }

    /// What every build's status is from now on.
    pub fn set(&self, status: &'static str) {
        *self.status.lock().expect("status") = status;
    }

    /// The real server, asking this stand-in about builds every 200 ms.
    pub fn server(&self) -> crate::common::Server {
        crate::common::server()
            .env("LOCKER_CONCOURSE_URL", &self.stub.base)
            .env("LOCKER_RECLAIM_INTERVAL", "200ms")
            .start()
    }
}

/// A request the stub received.
#[derive(Debug, Clone)]
pub struct StubRequest {
    pub method: String,
    /// Path with query.
    pub target: String,
    pub body: String,
    pub headers: BTreeMap<String, String>,
}

impl StubRequest {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// A loopback HTTP/1.1 server that answers each request with what `handler` returns
/// (status, JSON body) and records the requests.
pub struct Stub {
    pub base: String,
    pub requests: Arc<Mutex<Vec<StubRequest>>>,
}

impl Stub {
    pub fn start(handler: impl Fn(&StubRequest) -> (u16, String) + Send + Sync + 'static) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub");
        let base = format!("http://{}", listener.local_addr().expect("stub address"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let handler = Arc::new(handler);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let recorded = recorded.clone();
                let handler = handler.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &recorded, &*handler);
                });
            }
        });
        Stub { base, requests }
    }

    pub fn requests(&self) -> Vec<StubRequest> {
        self.requests.lock().expect("requests").clone()
    }
}

fn serve(
    stream: TcpStream,
    recorded: &Mutex<Vec<StubRequest>>,
    handler: &(dyn Fn(&StubRequest) -> (u16, String) + Send + Sync),
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let request = StubRequest {
            method,
            target,
            body: String::from_utf8_lossy(&body).into_owned(),
            headers,
        };
        recorded.lock().expect("requests").push(request.clone());
        let (status, body) = handler(&request);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            423 => "Locked",
            _ => "Status",
        };
        write!(
            writer,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
    }
}
