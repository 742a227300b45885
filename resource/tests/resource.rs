//! The resource binary against the real locker server (and loopback stubs where a real server
//! cannot run here), run exactly as Concourse runs it.

#[path = "../../tests/common/mod.rs"]
pub mod common;
pub mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Stub, build_env, metadata, run, start};

fn source(server: &common::Server, lock: &str) -> Value {
    json!({"locker_uri": server.base, "lock_name": lock})
}

fn out(source: &Value, params: Value) -> Value {
    json!({"source": source, "params": params})
}

/// `GET /lock/{name}` on the real server: the status, or `None` when free.
fn status(server: &common::Server, name: &str) -> Option<Value> {
    let response = common::client()
        .get(server.url(&format!("/lock/{name}")))
        .send()
        .expect("status request");
    match response.status().as_u16() {
        200 => Some(response.json().expect("status JSON")),
        404 => None,
        other => panic!("GET /lock/{name} answered {other}"),
    }
}

#[test]
fn lock_then_a_second_key_waits_and_gets_it_within_a_second_of_the_release() {
    let server = common::Server::start();
    let src = source(&server, "prod");
    let dir = common::temp_dir();

    let first = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "deploy-a", "lock_op": "lock"})),
        &build_env("deploy-a", "7"),
    )
    .json();
    let meta = metadata(&first);
    assert_eq!(meta["lock"], "prod");
    assert_eq!(meta["key"], "deploy-a");
    assert_eq!(meta["locked_by"], "deploy-a");
    assert!(meta["generation"].parse::<u64>().is_ok(), "{meta:?}");
    let held = status(&server, "prod").expect("held");
    assert_eq!(held["key"], "deploy-a");
    assert_eq!(held["info"]["job"], "deploy-a");
    assert_eq!(held["info"]["build_name"], "7");
    assert_eq!(
        held["info"]["build_url"],
        "https://ci.example.com/teams/main/pipelines/deploy-pipeline/jobs/deploy-a/builds/7"
    );

    // A second key waits, long-polling, and says who holds the lock.
    let mut second = start(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "deploy-b", "lock_op": "lock"})),
        &build_env("deploy-b", "3"),
    );
    // Queued on the server (not merely started), and still running.
    common::wait_for_waiters(&server, "prod", 1);
    assert!(second.running(), "the second lock did not wait");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.stderr().contains("is held by key") {
        assert!(
            Instant::now() < deadline,
            "no wait line:\n{}",
            second.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = second.stderr();
    assert!(
        log.contains("is held by key \"deploy-a\"")
            && log.contains("main/deploy-pipeline/deploy-a #7"),
        "the wait line names neither holder nor build:\n{log}"
    );

    let released = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "deploy-a", "lock_op": "unlock"})),
        &build_env("deploy-a", "7"),
    );
    released.json();
    // Handed over by the release (the second run would wait for ever otherwise; the bound is
    // generous, not a speed), and after the first holding: a later generation.
    let second = second.finish(Duration::from_secs(20));
    let second_meta = metadata(&second.json());
    assert_eq!(second_meta["key"], "deploy-b");
    let generation = |m: &std::collections::BTreeMap<String, String>| {
        m["generation"].parse::<u64>().expect("generation")
    };
    assert!(
        generation(&second_meta) > generation(&meta),
        "{second_meta:?}"
    );
    // Long-polled: no "trying again every" sleep loop.
    assert!(
        !second.stderr.contains("trying again every"),
        "{}",
        second.stderr
    );
    assert_eq!(status(&server, "prod").expect("held")["key"], "deploy-b");
}

#[test]
fn unlock_frees_the_lock_and_a_wrong_key_cannot() {
    let server = common::Server::start();
    let src = source(&server, "staging");
    let dir = common::temp_dir();
    let env = build_env("job", "1");
    run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "k", "lock_op": "lock"})),
        &env,
    )
    .json();

    let wrong = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "other", "lock_op": "unlock"})),
        &env,
    );
    let error = wrong.error();
    assert!(error.contains("cannot unlock \"staging\""), "{error}");
    assert!(status(&server, "staging").is_some());

    let response = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "k", "lock_op": "unlock"})),
        &env,
    )
    .json();
    assert_eq!(response["version"], json!({"ref": "free"}));
    assert_eq!(metadata(&response)["lock"], "staging");
    assert!(status(&server, "staging").is_none());
}

#[test]
fn force_unlock_releases_whatever_the_key() {
    let server = common::Server::start();
    let src = source(&server, "env");
    let dir = common::temp_dir();
    let env = build_env("job", "1");
    run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "k", "lock_op": "lock"})),
        &env,
    )
    .json();
    run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "admin", "lock_op": "unlock", "force": true}),
        ),
        &env,
    )
    .json();
    assert!(status(&server, "env").is_none());
}

#[test]
fn shared_key_holds_two_locked_by_and_an_exclusive_key_cannot_join() {
    let server = common::Server::start();
    let src = source(&server, "testbed");
    let dir = common::temp_dir();
    let env = build_env("job", "1");
    for requestor in ["smoke-1", "smoke-2"] {
        let response = run(
            "out",
            Some(dir.path()),
            &out(
                &src,
                json!({"key": "shared", "locked_by": requestor, "lock_op": "lock"}),
            ),
            &env,
        )
        .json();
        assert_eq!(metadata(&response)["locked_by"], requestor);
    }
    let held = status(&server, "testbed").expect("held");
    assert_eq!(held["key"], "shared");
    assert_eq!(held["locked_by"], json!({"smoke-1": 1, "smoke-2": 1}));

    // An exclusive job waits; with wait_timeout it gives up, naming the holder.
    let exclusive = run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "exclusive", "lock_op": "lock", "wait_timeout": "1s"}),
        ),
        &env,
    );
    let error = exclusive.error();
    assert!(
        error.contains("gave up waiting") && error.contains("smoke-1, smoke-2"),
        "{error}"
    );
    assert!(
        exclusive.elapsed < Duration::from_secs(5),
        "{:?}",
        exclusive.elapsed
    );

    // One requestor leaves; the other still holds the lock.
    run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "shared", "locked_by": "smoke-1", "lock_op": "unlock"}),
        ),
        &env,
    )
    .json();
    assert_eq!(
        status(&server, "testbed").expect("held")["locked_by"],
        json!({"smoke-2": 1})
    );
}

#[test]
fn check_and_in_free_and_held() {
    let server = common::Server::start();
    let src = source(&server, "prod");
    let check = |version: Value| -> Value {
        run(
            "check",
            None,
            &json!({"source": src, "version": version}),
            &[],
        )
        .json()
    };

    // Free.
    assert_eq!(check(Value::Null), json!([{"ref": "free"}]));
    let dir = common::temp_dir();
    let got = run(
        "in",
        Some(dir.path()),
        &json!({"source": src, "version": {"ref": "free"}}),
        &[],
    )
    .json();
    assert_eq!(got["version"], json!({"ref": "free"}));
    assert_eq!(metadata(&got)["key"], "");
    let read = |file: &str| std::fs::read_to_string(dir.path().join(file)).expect(file);
    assert_eq!(read("lock"), "");
    assert_eq!(read("locked_by"), "{}");
    assert_eq!(read("metadata.json"), "{}");

    // Held: a new version.
    let put_dir = common::temp_dir();
    let locked = run(
        "out",
        Some(put_dir.path()),
        &out(
            &src,
            json!({"key": "k1", "locked_by": "job-a", "lock_op": "lock"}),
        ),
        &build_env("job-a", "5"),
    )
    .json();
    let held = check(json!({"ref": "free"}));
    let version = held[0].clone();
    assert_ne!(version, json!({"ref": "free"}));
    assert_eq!(held.as_array().map(Vec::len), Some(1));
    // out reported the same version check finds.
    assert_eq!(locked["version"], version);

    // Another lock on the server changing does not change this lock's version.
    run(
        "out",
        Some(put_dir.path()),
        &out(
            &json!({"locker_uri": server.base, "lock_name": "other"}),
            json!({"key": "x", "lock_op": "lock"}),
        ),
        &[],
    )
    .json();
    assert_eq!(check(version.clone()), json!([version]));

    let dir = common::temp_dir();
    let got = run(
        "in",
        Some(dir.path()),
        &json!({"source": src, "version": version}),
        &[],
    )
    .json();
    assert_eq!(got["version"], version);
    let meta = metadata(&got);
    assert_eq!(meta["key"], "k1");
    assert_eq!(meta["locked_by"], "job-a");
    assert!(meta["holder_build"].contains("job-a #5"), "{meta:?}");
    let read = |file: &str| std::fs::read_to_string(dir.path().join(file)).expect(file);
    assert_eq!(read("lock"), "k1");
    assert_eq!(
        serde_json::from_str::<Value>(&read("locked_by")).expect("JSON"),
        json!({"job-a": 1})
    );
    let full: Value = serde_json::from_str(&read("metadata.json")).expect("JSON");
    assert_eq!(full["name"], "prod");
    assert_eq!(full["key"], "k1");
    assert_eq!(full["info"]["job"], "job-a");

    // Another holder joining with the same key is a new version.
    run(
        "out",
        Some(put_dir.path()),
        &out(
            &src,
            json!({"key": "k1", "locked_by": "job-b", "lock_op": "lock"}),
        ),
        &[],
    )
    .json();
    assert_ne!(check(version.clone()), json!([version]));
}

#[test]
fn bosh_lock_is_named_after_the_director() {
    // A stand-in for a BOSH director: only its unauthenticated GET /info matters here.
    let director = Stub::start(|request| match request.path() {
        "/info" => (
            200,
            json!({"name": "my-bosh/prod 1", "uuid": "u"}).to_string(),
        ),
        _ => (404, "{}".into()),
    });
    let server = common::Server::start();
    let src = json!({"locker_uri": server.base, "bosh_lock": director.base});
    let dir = common::temp_dir();
    let response = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "deploy", "lock_op": "lock"})),
        &[],
    )
    .json();
    assert_eq!(metadata(&response)["lock"], "my-bosh/prod 1");
    let locks: Value = common::client()
        .get(server.url("/locks"))
        .send()
        .expect("locks")
        .json()
        .expect("JSON");
    assert_eq!(locks["my-bosh/prod 1"]["key"], "deploy");
    let checked = run("check", None, &json!({"source": src}), &[]).json();
    assert_eq!(checked[0], response["version"]);
    assert!(director.requests().iter().all(|r| r.path() == "/info"));
}

#[test]
fn bosh_director_without_a_name_is_a_clear_error() {
    let director = Stub::start(|_| (200, json!({"uuid": "u"}).to_string()));
    let server = common::Server::start();
    let src = json!({"locker_uri": server.base, "bosh_lock": director.base});
    let error = run("check", None, &json!({"source": src}), &[]).error();
    assert!(error.contains("BOSH director's name"), "{error}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, written to `dir`.
fn certificates(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (ca.pem(), cert_path, key_path)
}

#[test]
fn tls_with_ca_cert_and_with_skip_ssl_validation() {
    let dir = common::temp_dir();
    let (ca_pem, cert, key) = certificates(dir.path());
    let server = common::server().tls(&cert, &key).start();
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let put_dir = common::temp_dir();

    let with_ca = json!({"locker_uri": server.base, "lock_name": "tls", "ca_cert": ca_pem});
    run(
        "out",
        Some(put_dir.path()),
        &out(&with_ca, json!({"key": "k", "lock_op": "lock"})),
        &[],
    )
    .json();

    let skipping = json!({"locker_uri": server.base, "lock_name": "tls",
        "skip_ssl_validation": true});
    let checked = run("check", None, &json!({"source": skipping}), &[]).json();
    assert_ne!(checked[0], json!({"ref": "free"}));

    // Neither: the certificate is refused at once, with advice.
    let plain = json!({"locker_uri": server.base, "lock_name": "tls"});
    let refused = run("check", None, &json!({"source": plain}), &[]);
    let error = refused.error();
    assert!(
        error.contains("certificate") && error.contains("ca_cert"),
        "{error}"
    );
    assert!(!refused.stderr.contains("retrying"), "{}", refused.stderr);
}

#[test]
fn wrong_password_fails_at_once_with_a_clear_message() {
    let server = common::server().auth("ci", "s3cret").start();
    let dir = common::temp_dir();
    let params = json!({"key": "k", "lock_op": "lock"});
    let wrong = json!({"locker_uri": server.base, "lock_name": "a", "username": "ci",
        "password": "nope"});
    let outcome = run("out", Some(dir.path()), &out(&wrong, params.clone()), &[]);
    let error = outcome.error();
    assert!(
        error.contains("401") && error.contains("source.username and source.password"),
        "{error}"
    );
    assert!(!outcome.stderr.contains("retrying"), "{}", outcome.stderr);
    assert!(!outcome.stderr.contains("nope"), "the password was logged");

    let right = json!({"locker_uri": server.base, "lock_name": "a", "username": "ci",
        "password": "s3cret"});
    run("out", Some(dir.path()), &out(&right, params), &[]).json();
}

#[test]
fn each_missing_or_contradictory_field_is_its_own_error() {
    // No server: configuration errors are found before any request.
    let good = json!({"locker_uri": "http://127.0.0.1:9", "lock_name": "a"});
    let lock = json!({"key": "k", "lock_op": "lock"});
    let cases = [
        (
            json!({"lock_name": "a"}),
            lock.clone(),
            "source.locker_uri is required",
        ),
        (
            json!({"locker_uri": "http://127.0.0.1:9"}),
            lock.clone(),
            "source.lock_name or source.bosh_lock is required",
        ),
        (
            json!({"locker_uri": "http://127.0.0.1:9", "lock_name": "a", "bosh_lock": "https://d"}),
            lock.clone(),
            "source.lock_name and source.bosh_lock are both set",
        ),
        (
            json!({"locker_uri": "http://127.0.0.1:9", "lock_name": "a", "username": "u"}),
            lock.clone(),
            "source.username is set without source.password",
        ),
        (
            json!({"locker_uri": "http://127.0.0.1:9", "lock_name": "a", "wait_poll": "later"}),
            lock.clone(),
            "source.wait_poll",
        ),
        (
            good.clone(),
            json!({"lock_op": "lock"}),
            "params.key is required",
        ),
        (
            good.clone(),
            json!({"key": "k"}),
            "params.lock_op is required",
        ),
        (
            good.clone(),
            json!({"key": "k", "lock_op": "take"}),
            "params.lock_op must be",
        ),
        (
            good.clone(),
            json!({"key": "k", "lock_op": "lock", "force": true}),
            "params.force applies only to lock_op: unlock",
        ),
        (
            good.clone(),
            json!({"key": "k", "lock_op": "unlock", "ttl": "5m"}),
            "params.ttl applies only to lock_op: lock",
        ),
        (
            good.clone(),
            json!({"key": "k", "lock_op": "unlock", "wait_timeout": "5m"}),
            "params.wait_timeout applies only to lock_op: lock",
        ),
    ];
    let dir = common::temp_dir();
    for (source, params, expected) in cases {
        let outcome = run("out", Some(dir.path()), &out(&source, params.clone()), &[]);
        let error = outcome.error();
        assert!(error.contains(expected), "{source} {params}: {error}");
        assert!(
            outcome.elapsed < Duration::from_secs(5),
            "{expected}: {:?}",
            outcome.elapsed
        );
    }
    let error = run("check", None, &json!({"source": {"lock_name": "a"}}), &[]).error();
    assert!(error.contains("source.locker_uri is required"), "{error}");
    let error = run("check", None, &json!("not a request"), &[]).error();
    assert!(error.contains("not valid JSON"), "{error}");
}

#[test]
fn unknown_fields_warn_but_work() {
    let server = common::Server::start();
    let dir = common::temp_dir();
    let mut src = source(&server, "a");
    src["lock_pool"] = json!("legacy");
    let outcome = run(
        "out",
        Some(dir.path()),
        &out(
            &src,
            json!({"key": "k", "lock_op": "lock", "lock_with": "x"}),
        ),
        &[],
    );
    outcome.json();
    assert!(outcome.stderr.contains("unknown field source.lock_pool"));
    assert!(outcome.stderr.contains("unknown field params.lock_with"));
}

#[test]
fn unreachable_server_is_retried_then_fails() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let src = json!({"locker_uri": format!("http://127.0.0.1:{port}"), "lock_name": "a"});
    let outcome = run("check", None, &json!({"source": src}), &[]);
    let error = outcome.error();
    assert!(error.contains("failed after 8 attempts"), "{error}");
    assert_eq!(
        outcome.stderr.matches("retrying in").count(),
        7,
        "{}",
        outcome.stderr
    );
}

/// A stand-in for the original Go locker: it ignores `?wait`, answers 423 at once twice, then
/// 200, and has only `GET /locks` besides `PUT/DELETE /lock/{name}`.
#[test]
fn falls_back_to_retry_interval_against_a_server_without_long_poll() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let puts = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = puts.clone();
    let stub = Stub::start(
        move |request| match (request.method.as_str(), request.path()) {
            ("PUT", "/lock/legacy") => {
                if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                    (
                        423,
                        json!({"error": "lock legacy is held by other"}).to_string(),
                    )
                } else {
                    (200, json!({"response": "locked"}).to_string())
                }
            }
            ("GET", "/locks") => {
                let holder = if counter.load(Ordering::SeqCst) < 3 {
                    "other"
                } else {
                    "mine"
                };
                (
                    200,
                    json!({"legacy": {"key": holder, "locked_by": {holder: 1}},
                       "released": {"key": "", "locked_by": {"x": 0}}})
                    .to_string(),
                )
            }
            _ => (404, json!({"error": "404 page not found"}).to_string()),
        },
    );
    let src = json!({"locker_uri": stub.base, "lock_name": "legacy", "retry_interval": "400ms"});
    let dir = common::temp_dir();
    let outcome = run(
        "out",
        Some(dir.path()),
        &out(&src, json!({"key": "mine", "lock_op": "lock"})),
        &[],
    );
    let response = outcome.json();
    assert_eq!(puts.load(Ordering::SeqCst), 3);
    let put_targets: Vec<String> = stub
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.target)
        .collect();
    assert_eq!(put_targets[0], "/lock/legacy");
    assert!(
        put_targets[1].starts_with("/lock/legacy?wait="),
        "{put_targets:?}"
    );
    assert!(
        outcome.stderr.contains("no long-poll support"),
        "{}",
        outcome.stderr
    );
    // Slept retry_interval once (after the long-poll that did not wait), not 30 s.
    assert!(
        outcome.elapsed >= Duration::from_millis(400) && outcome.elapsed < Duration::from_secs(5),
        "{:?}",
        outcome.elapsed
    );
    let meta = metadata(&response);
    assert_eq!(meta["generation"], "");
    // Versions against the original server: its /locks entry, no generation.
    let version = response["version"]["ref"]
        .as_str()
        .expect("ref")
        .to_string();
    assert_eq!(version.len(), 16, "{version}");
    let checked = run("check", None, &json!({"source": src}), &[]).json();
    assert_eq!(checked, json!([{"ref": version}]));
    // The original keeps released locks with an empty key: free.
    let released = json!({"locker_uri": stub.base, "lock_name": "released"});
    let checked = run("check", None, &json!({"source": released}), &[]).json();
    assert_eq!(checked, json!([{"ref": "free"}]));
}

#[test]
fn server_errors_are_retried_with_a_line_per_retry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = AtomicUsize::new(0);
    let stub = Stub::start(move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) < 2 {
            (503, json!({"error": "state file unavailable"}).to_string())
        } else {
            (200, "{}".to_string())
        }
    });
    let src = json!({"locker_uri": stub.base, "lock_name": "a"});
    let outcome = run("check", None, &json!({"source": src}), &[]);
    assert_eq!(outcome.json(), json!([{"ref": "free"}]));
    assert_eq!(
        outcome.stderr.matches("retrying in").count(),
        2,
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("state file unavailable"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn in_writes_info_as_an_object_for_a_holding_without_info() {
    let server = common::Server::start();
    assert_eq!(server.lock("bare", json!({"key": "k"})).status, 200);
    let src = source(&server, "bare");
    let versions = run("check", None, &json!({"source": src, "version": null}), &[]).json();
    let dir = common::temp_dir();
    run(
        "in",
        Some(dir.path()),
        &json!({"source": src, "version": versions[0]}),
        &[],
    )
    .json();
    #[derive(serde::Deserialize)]
    struct Typed {
        info: std::collections::HashMap<String, String>,
        holders: Vec<TypedHolder>,
    }
    #[derive(serde::Deserialize)]
    struct TypedHolder {
        info: std::collections::HashMap<String, String>,
    }
    let written = std::fs::read_to_string(dir.path().join("metadata.json")).expect("metadata.json");
    let typed: Typed = serde_json::from_str(&written).expect(&written);
    assert!(typed.info.is_empty() && typed.holders[0].info.is_empty());
}
