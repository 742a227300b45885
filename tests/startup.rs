//! Start-up: configuration errors, TLS, version and help.

pub mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;

/// Runs the binary with `env` and `args` and waits for it to exit (it must, within the
/// fixture's deadline).
fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> Output {
    common::server()
        .envs(env)
        .args(args.iter().copied())
        .run_to_exit()
}

fn assert_refuses(env: &[(&str, &str)], mentions: &[&str]) {
    let output = run_to_exit(env, &[]);
    assert!(!output.status.success(), "{env:?} should not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for text in mentions {
        assert!(
            stderr.contains(text),
            "{env:?}: stderr lacks {text:?}:\n{stderr}"
        );
    }
}

#[test]
fn half_configured_auth_is_refused() {
    assert_refuses(&[("AUTH_USER", "admin")], &["AUTH_PASS"]);
    assert_refuses(&[("AUTH_PASS", "pw")], &["AUTH_USER"]);
}

#[test]
fn half_configured_tls_is_refused() {
    assert_refuses(&[("SSL_CERT", "/tmp/cert.pem")], &["SSL_KEY"]);
    assert_refuses(&[("SSL_KEY", "/tmp/key.pem")], &["SSL_CERT"]);
}

/// A self-signed certificate for 127.0.0.1/localhost, written as PEM files in `dir`.
fn write_certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate");
    let cert_pem = certified.cert.pem();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key, cert_pem)
}

#[test]
fn unreadable_or_invalid_tls_files_are_refused_naming_the_file() {
    let dir = common::temp_dir();
    let (cert, key, _) = write_certificate(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM").expect("write");
    let missing = dir.path().join("missing.pem");
    let cert = cert.to_str().expect("path");
    let key = key.to_str().expect("path");
    let garbage = garbage.to_str().expect("path");
    let missing = missing.to_str().expect("path");

    assert_refuses(
        &[("SSL_CERT", missing), ("SSL_KEY", key)],
        &["SSL_CERT", missing],
    );
    assert_refuses(
        &[("SSL_CERT", cert), ("SSL_KEY", missing)],
        &["SSL_KEY", missing],
    );
    assert_refuses(
        &[("SSL_CERT", garbage), ("SSL_KEY", key)],
        &["SSL_CERT", garbage],
    );
    assert_refuses(
        &[("SSL_CERT", cert), ("SSL_KEY", garbage)],
        &["SSL_KEY", garbage],
    );
    // A key file holding a certificate is not a key.
    assert_refuses(&[("SSL_CERT", cert), ("SSL_KEY", cert)], &["SSL_KEY", cert]);
}

#[test]
fn serves_https_with_the_given_certificate() {
    let dir = common::temp_dir();
    let (cert, key, cert_pem) = write_certificate(dir.path());
    let server = common::server().tls(&cert, &key).start();
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );

    let trusted = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("ca"))
        .build()
        .expect("client");
    let reply = common::call_with(
        &trusted,
        "PUT",
        &server.url("/lock/tls"),
        Some(&json!({"key": "k"}).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    // A client that does not trust the certificate cannot talk to it, and plain HTTP fails.
    let untrusting = common::client().get(server.url("/health")).send();
    assert!(untrusting.is_err());
    let plain = server.base.replace("https://", "http://");
    let plain_reply = common::client().get(format!("{plain}/health")).send();
    assert!(plain_reply.map(|r| r.status() != 200).unwrap_or(true));
}

#[test]
fn version_and_help_flags() {
    for flag in ["-v", "--version"] {
        let output = run_to_exit(&[], &[flag]);
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            stdout.contains(env!("CARGO_PKG_VERSION")),
            "{flag}: {stdout}"
        );
    }
    for flag in ["-h", "--help"] {
        let output = run_to_exit(&[], &[flag]);
        assert!(output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        // The etcd flags are there with or without the `etcd` feature: the help is the same.
        for variable in [
            "LOCKER_CONFIG",
            "PORT",
            "AUTH_USER",
            "SSL_CERT",
            "LOCKER_STORE",
            "LOCKER_ETCD_ENDPOINTS",
        ] {
            assert!(
                stdout.contains(variable),
                "{flag} lacks {variable}: {stdout}"
            );
        }
    }
}

/// Built without the `etcd` feature (the default), the etcd backend and the subcommands that
/// only talk to etcd stop at start-up with one line naming the cause and the fix, before any
/// other etcd setting is looked at.
#[test]
#[cfg(not(feature = "etcd"))]
fn a_build_without_the_etcd_feature_refuses_the_etcd_backend() {
    /// Environment, arguments, and what the message names as needing the backend.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let endpoints = ("LOCKER_ETCD_ENDPOINTS", "http://127.0.0.1:1");
    let cases: [Case; 5] = [
        (
            &[("LOCKER_STORE", "etcd"), endpoints],
            &[],
            "LOCKER_STORE=etcd",
        ),
        (&[("LOCKER_STORE", "etcd")], &[], "LOCKER_STORE=etcd"),
        (&[endpoints], &["--store", "etcd"], "LOCKER_STORE=etcd"),
        (&[endpoints], &["import", "state.yml"], "`locker import`"),
        (&[], &["export", "-"], "`locker export`"),
    ];
    for (env, args, what) in cases {
        let output = run_to_exit(env, args);
        assert!(
            !output.status.success(),
            "{env:?} {args:?} should not start"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("locker: "))
            .unwrap_or_else(|| panic!("{env:?} {args:?}: no `locker: ` line:\n{stderr}"));
        for text in [
            what,
            "this locker was built without it",
            "cargo build --release --features etcd",
        ] {
            assert!(
                line.contains(text),
                "{env:?} {args:?}: {line:?} lacks {text:?}"
            );
        }
    }
}

#[test]
fn bad_numbers_and_durations_in_the_environment_are_refused() {
    assert_refuses(&[("PORT", "eighty")], &["eighty"]);
    assert_refuses(&[("LOCKER_MAX_WAIT", "forever")], &["forever"]);
}

#[test]
fn the_listener_queues_a_burst_of_new_connections() {
    let server = common::Server::start();
    let port = server
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
        .expect("port in the base URL");
    // `ss` reports a listening socket's accept-queue limit as Send-Q.
    let output = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&output.stdout);
    let backlog: Vec<u32> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse().ok())
        .collect();
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    // std's bind would give 128; the kernel caps whatever we ask at somaxconn.
    assert_eq!(backlog, vec![2048.min(somaxconn)], "{text}");
}

/// Basic auth sends `user:password`: a user name with a colon could never log in.
#[test]
fn a_user_name_with_a_colon_is_refused_at_start_up() {
    let output = run_to_exit(&[("AUTH_USER", "ci:bot"), ("AUTH_PASS", "pw")], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("locker: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("AUTH_USER") && lines[0].contains("':'"),
        "{stderr}"
    );
    // A colon in the password is fine.
    let server = common::server().auth("ci-bot", "p:w").start();
    let reply = common::client()
        .get(server.url("/locks"))
        .basic_auth("ci-bot", Some("p:w"))
        .send()
        .expect("request");
    assert_eq!(reply.status(), 200);
}

/// The Quick start's defaults (every interface, no auth) serve anyone on the network: say so.
#[test]
fn all_interfaces_without_auth_logs_a_warning() {
    const WARNING: &str = "basic auth is off and the server accepts connections on all interfaces";
    let open = common::server().env("LOCKER_LISTEN", "0.0.0.0").start();
    let log = open.log();
    let line = log
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains("AUTH_USER") && line.contains("LOCKER_LISTEN"),
        "{line}"
    );
    // The log lines before "listening on" are all in by now: absent means never logged.
    let with_auth = common::server()
        .env("LOCKER_LISTEN", "0.0.0.0")
        .auth("admin", "secret")
        .start();
    assert!(!with_auth.log().contains(WARNING), "{}", with_auth.log());
    let loopback = common::server().env("LOCKER_LISTEN", "127.0.0.1").start();
    assert!(!loopback.log().contains(WARNING), "{}", loopback.log());
    assert!(
        loopback.log().contains("basic auth off"),
        "{}",
        loopback.log()
    );
}
