//! A real etcd cluster on loopback ports with temporary data directories, for the etcd
//! backend's tests. Needs the `etcd` binary (Debian's `etcd-server`, which `ci/scripts/run-tests` installs).
//!
//! Members die with the thread that started them (PR_SET_PDEATHSIG), so a failed or finished
//! test never leaves an etcd behind; [`shared`] starts its cluster from a thread that lives as
//! long as the test process.
//!
//! Also what the etcd test files share: [`serial`], [`replicas`] over one prefix,
//! [`spawn_waiter`], and [`locker_command`] for `locker import` and `locker export`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::http::call;
use super::server::{Server, server};

/// How long a cluster may take to elect a leader and answer.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// A prefix of its own for one server of the shared cluster.
pub fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "/test-{}-{}/",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test at a time: a test binary's tests share two cores with etcd and the replicas.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `count` replicas sharing one fresh prefix of `cluster`.
pub fn replicas(cluster: &EtcdCluster, count: usize) -> Vec<Server> {
    replicas_with(cluster, count, &[]).1
}

/// `count` replicas sharing one fresh prefix of `cluster`, with `env` set; and the prefix.
pub fn replicas_with(
    cluster: &EtcdCluster,
    count: usize,
    env: &[(&str, &str)],
) -> (String, Vec<Server>) {
    let prefix = unique_prefix();
    let servers = (0..count)
        .map(|_| {
            server()
                .etcd(&cluster.endpoints())
                .env("LOCKER_ETCD_PREFIX", prefix.clone())
                .envs(env)
                .start()
        })
        .collect();
    (prefix, servers)
}

/// A waiting acquire of `name` with `key` for up to `wait`, in a thread; (key, status) comes
/// back on `done`.
pub fn spawn_waiter(
    server: &Server,
    name: &str,
    key: &str,
    wait: &str,
    done: &mpsc::Sender<(String, u16)>,
) {
    let url = server.url(&format!("/lock/{name}?wait={wait}"));
    let body = serde_json::json!({"key": key}).to_string();
    let key = key.to_string();
    let done = done.clone();
    std::thread::spawn(move || {
        let reply = call("PUT", &url, Some(&body));
        let _ = done.send((key, reply.status));
    });
}

/// Runs `locker <args>` (`import`, `export`) against `prefix` of the shared cluster.
pub fn locker_command(prefix: &str, args: &[&str]) -> std::process::Output {
    let output = server()
        .env("LOCKER_ETCD_ENDPOINTS", shared().endpoints())
        .env("LOCKER_ETCD_PREFIX", prefix)
        .args(args.iter().copied())
        .run_to_exit();
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// The cluster shared by the tests of one test process (each server uses its own prefix).
pub fn shared() -> &'static EtcdCluster {
    static SHARED: OnceLock<EtcdCluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (sender, cluster) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(EtcdCluster::start(3));
            // The members die with this thread: keep it until the process exits.
            loop {
                std::thread::park();
            }
        });
        let cluster: EtcdCluster = cluster.recv().expect("the shared etcd cluster started");
        if let Ok(mut dir) = SHARED_DIR.lock() {
            *dir = Some(cluster.dir.path().to_path_buf());
        }
        // SAFETY: registers a plain function to run at exit(3).
        unsafe { libc::atexit(remove_shared_dir) };
        cluster
    })
}

/// The shared cluster's data directory, removed when the test process exits.
static SHARED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn remove_shared_dir() {
    if let Ok(dir) = SHARED_DIR.lock()
        && let Some(dir) = dir.as_ref()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The `etcd` binary, or a test failure saying how to get it.
fn etcd_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = Path::new(dir).join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the etcd binary is missing: install Debian's etcd-server \
         (apt-get install etcd-server), as ci/scripts/run-tests does"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Removes data directories of test processes that are gone (the shared cluster's directory
/// outlives its process).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("locker-etcd-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one answers.
    pub fn start(size: usize) -> EtcdCluster {
        remove_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("locker-etcd-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir for etcd");
        let mut members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                log: Arc::new(Mutex::new(Vec::new())),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("locker-test-{}", members[0].peer_port);
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            initial_cluster,
            token,
            dir,
        };
        for member in &mut members {
            cluster.spawn(member);
        }
        cluster.members = members;
        for i in 0..size {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&self, member: &mut Member) {
        let data = self.dir.path().join(&member.name);
        let mut command = Command::new(etcd_binary());
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(member.endpoint())
            .arg("--advertise-client-urls")
            .arg(member.endpoint())
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", member.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", member.peer_port))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) in the child between fork and exec; async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start etcd");
        if let Some(stderr) = child.stderr.take() {
            let log = member.log.clone();
            let name = member.name.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[etcd {name}] {line}");
                    if let Ok(mut log) = log.lock() {
                        log.push(line);
                    }
                }
            });
        }
        member.child = Some(child);
    }

    /// Comma-separated client URLs of every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until member `i` answers a linearizable health check.
    pub fn wait_healthy(&self, i: usize) {
        let url = format!("{}/health", self.members[i].endpoint());
        let client = super::client();
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            if let Ok(response) = client.get(&url).timeout(Duration::from_secs(2)).send()
                && let Ok(body) = response.text()
                && body.contains("\"health\":\"true\"")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {} did not become healthy",
                self.members[i].name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that is the Raft leader now.
    pub fn leader(&self) -> usize {
        let client = super::client();
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            for (i, member) in self.members.iter().enumerate() {
                if !member.is_running() {
                    continue;
                }
                let status = client
                    .post(format!("{}/v3/maintenance/status", member.endpoint()))
                    .body("{}")
                    .timeout(Duration::from_secs(2))
                    .send()
                    .and_then(|r| r.json::<serde_json::Value>());
                if let Ok(status) = status
                    && status["leader"].is_string()
                    && status["leader"] == status["header"]["member_id"]
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let mut member = std::mem::replace(
            &mut self.members[i],
            Member {
                name: String::new(),
                client_port: 0,
                peer_port: 0,
                child: None,
                log: Arc::new(Mutex::new(Vec::new())),
            },
        );
        self.spawn(&mut member);
        self.members[i] = member;
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
