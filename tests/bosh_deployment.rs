//! The deployed job: rendered under a fake `/var/vcap` in a temp dir, with the package
//! installed from the release tarball by its `packaging` script, prepared by `pre-start` (with
//! a recording `chown`: there is no vcap user here) and run as the rendered `bpm.yml` says.

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use bosh::*;

#[test]
fn pre_start_hands_the_store_to_vcap_and_locks_the_key_down() {
    let pki = pki();
    let vm = FakeVm::default();
    vm.render_job(&render_job(
        json!({"locker": {"ssl_cert": pki.cert, "ssl_key": pki.key}}),
    ));
    let pre_start = vm.path("/var/vcap/jobs/locker/bin/pre-start");
    let script = vm.rewrite(&read(&pre_start));
    fs::write(&pre_start, script).expect("rewrite pre-start");
    // No vcap user here: a stub chown records what would be handed over.
    let stubs = Stubs::new(&[("chown", "")]);
    run_ok(Command::new(&pre_start).env("PATH", stubs.path_env()));
    let store = vm.path("/var/vcap/store/locker");
    let key = vm.path("/var/vcap/jobs/locker/config/certs/server.key");
    assert!(store.is_dir());
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        stubs.calls(),
        [
            format!("chown -R vcap:vcap {}", store.display()),
            format!("chown vcap:vcap {}", key.display()),
        ]
    );
}

/// A state file in the original Go locker's JSON format: `a` free, `b` held by key `k2`.
const ORIGINAL_STATE: &str =
    r#"{"a": {"locked_by": {"k1": 0}, "key": ""}, "b": {"locked_by": {"k2": 1}, "key": "k2"}}"#;

/// A request body that sends its first bytes, then nothing until the test lets it go: a
/// request in flight when the server is told to stop.
struct StalledBody {
    first: Option<Vec<u8>>,
    release: std::sync::mpsc::Receiver<()>,
}

impl Read for StalledBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(first) = self.first.take() {
            buf[..first.len()].copy_from_slice(&first);
            return Ok(first.len());
        }
        let _ = self.release.recv();
        Err(std::io::Error::other("the test stopped the body"))
    }
}

#[test]
fn the_deployed_job_serves_tls_and_auth_keeps_the_original_locks_and_stops_within_bpms_limit() {
    // The package from a dev release made in a fresh clone.
    let work = common::temp_dir();
    let clone = fresh_clone(work.path());
    run_script(
        &clone,
        "boshrelease/scripts/add-blob",
        &[],
        &[("LOCKER_BINARY", static_binary())],
    );
    run_script(&clone, "boshrelease/scripts/create-release", &[], &[]);
    let package = check_tarball(
        &clone.join("boshrelease/dev_releases/locker-dev.tgz"),
        None,
        &work.path().join("dev"),
    );
    let vm = FakeVm::default();
    compile_package(&package, &vm);

    let properties = standalone_properties(work.path());
    let password = properties["locker"]["password"]
        .as_str()
        .expect("password")
        .to_string();
    let ca_pem = properties["locker"]["ssl_ca"]
        .as_str()
        .expect("CA")
        .to_string();
    let render = render_job(properties);
    vm.render_job(&render);

    // An upgrade from the original release: its state file is already on the persistent disk.
    let bpm = render.bpm();
    let process = bpm.process();
    let state_file = vm.path(&process.env["LOCKER_CONFIG"]);
    assert_eq!(state_file, vm.path("/var/vcap/store/locker/locker.yml"));
    fs::create_dir_all(state_file.parent().unwrap()).expect("store dir");
    fs::write(&state_file, ORIGINAL_STATE).expect("state file");

    // Start it as bpm would, from the fake tree, but on a free loopback port.
    let mut builder = vm.server(process);
    for arg in &process.args {
        builder = builder.arg(vm.rewrite(arg));
    }
    let mut server = builder
        .env("PORT", "0")
        .env("LOCKER_LISTEN", "127.0.0.1")
        .start();
    assert!(server.base.starts_with("https://"), "{}", server.base);

    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA");
    let client = reqwest::blocking::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let locks = |server: &common::Server| -> Json {
        let response = client
            .get(server.url("/locks"))
            .basic_auth("locker", Some(&password))
            .send()
            .expect("GET /locks");
        assert_eq!(response.status(), 200);
        response.json().expect("locks JSON")
    };

    // TLS: trusted through the deployment's generated CA only; plain HTTP gets nowhere.
    let health = client.get(server.url("/health")).send().expect("health");
    assert_eq!(health.status(), 200, "health needs no auth");
    let untrusting = reqwest::blocking::Client::builder()
        .tls_certs_only([])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    assert!(untrusting.get(server.url("/health")).send().is_err());
    let plain = server.base.replacen("https://", "http://", 1);
    let plain_answer = common::client()
        .get(format!("{plain}/health"))
        .send()
        .ok()
        .filter(|r| r.status().is_success());
    assert!(plain_answer.is_none(), "plain HTTP must not be served");

    // Basic auth with the manifest's user and the generated password.
    let anonymous = client.get(server.url("/locks")).send().expect("request");
    assert_eq!(anonymous.status(), 401);
    let wrong = client
        .get(server.url("/locks"))
        .basic_auth("locker", Some("guess"))
        .send()
        .expect("request");
    assert_eq!(wrong.status(), 401);

    // The original's locks: b still held by k2, a free.
    let held = locks(&server);
    assert_eq!(held["b"]["key"], json!("k2"), "{held}");
    assert_eq!(held["b"]["locked_by"]["k2"], json!(1), "{held}");
    assert!(held.get("a").is_none(), "a was free: {held}");

    // `bpm stop` sends SIGTERM and kills 15 s later. With a request stuck in flight the server
    // waits the job's shutdown grace for it, then writes its state and exits, inside that limit.
    let (let_go, stalled) = std::sync::mpsc::channel();
    let stuck = {
        let url = server.url("/lock/stuck");
        let password = password.clone();
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA");
        std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .tls_certs_only([ca])
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client");
            let body = StalledBody {
                first: Some(b"{\"key\":".to_vec()),
                release: stalled,
            };
            let _ = client
                .put(url)
                .basic_auth("locker", Some(&password))
                .header("content-type", "application/json")
                .body(reqwest::blocking::Body::sized(body, 64))
                .send();
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let grace = humantime_secs(&process.env["LOCKER_SHUTDOWN_GRACE"]);
    let stopping = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(15));
    let took = stopping.elapsed();
    eprintln!("boshrelease tests: stopped {took:.1?} after SIGTERM (grace {grace} s)");
    assert!(status.success(), "{status}: {}", server.log());
    assert!(took < Duration::from_secs(15), "{took:?}");
    // It did wait for the stuck request: the grace, not an immediate exit, set the time.
    assert!(
        took >= Duration::from_secs(grace.saturating_sub(1)),
        "{took:?}: the request in flight was not waited for"
    );
    drop(let_go);
    stuck.join().expect("stuck client");

    // The lock survives the restart.
    let server = server.restart();
    assert_eq!(locks(&server)["b"]["key"], json!("k2"));
}

/// Whole seconds of a rendered duration such as "10s".
fn humantime_secs(text: &str) -> u64 {
    text.trim_end_matches('s').parse().expect("seconds")
}

#[test]
fn the_deployed_job_with_defaults_serves_plain_http_without_auth() {
    let vm = FakeVm::default();
    // The package as installed (the TLS test goes through the release tarball); here a link to
    // the test build of the binary will do.
    let package_bin = vm.vcap().join("packages/locker/bin");
    fs::create_dir_all(&package_bin).expect("package dir");
    std::os::unix::fs::symlink(common::locker_binary(), package_bin.join("locker"))
        .expect("link the binary");
    let render = render_job(json!({}));
    vm.render_job(&render);
    let bpm = render.bpm();
    let process = bpm.process();
    let state_file = vm.path(&process.env["LOCKER_CONFIG"]);
    fs::create_dir_all(state_file.parent().unwrap()).expect("store dir");
    fs::write(&state_file, ORIGINAL_STATE).expect("state file");
    let server = vm
        .server(process)
        .env("PORT", "0")
        .env("LOCKER_LISTEN", "127.0.0.1")
        .start();
    assert!(server.base.starts_with("http://"), "{}", server.base);
    let locks: Json = common::client()
        .get(server.url("/locks"))
        .send()
        .expect("GET /locks")
        .json()
        .expect("JSON");
    assert_eq!(locks["b"]["key"], json!("k2"), "{locks}");
}
