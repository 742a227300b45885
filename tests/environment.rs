//! Environment variables set to the empty string count as unset (BOSH templates and container
//! environments render unset options as `NAME=`), for every variable the binary reads: the
//! server's, listed from its own `--help`, and the client subcommands'.

pub mod common;

use std::process::{Command, Stdio};

/// The variables a `locker ... --help` lists (`[env: NAME...`), read with a clean environment.
fn variables_in_help(args: &[&str]) -> Vec<String> {
    let output = Command::new(common::locker_binary())
        .env_clear()
        .args(args)
        .output()
        .expect("run locker --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let mut names: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_server_variable_set_empty_starts_with_its_default() {
    let mut variables = variables_in_help(&["--help"]);
    // The list, so a change in the help's format cannot make this test vacuous.
    for expected in [
        "PORT",
        "LOCKER_LISTEN",
        "LOCKER_CONFIG",
        "SSL_CERT",
        "SSL_KEY",
        "LOCKER_STORE",
        "LOCKER_ETCD_CA",
        "LOCKER_MAX_WAIT",
        "LOCKER_MAX_WAITERS",
        "LOCKER_DEFAULT_TTL",
        "LOCKER_JOURNAL_BYTES",
        "LOCKER_RECLAIM_INTERVAL",
        "LOCKER_SHUTDOWN_GRACE",
        "AUTH_USER",
        "AUTH_PASS",
    ] {
        assert!(
            variables.iter().any(|v| v == expected),
            "{expected} missing from --help: {variables:?}"
        );
    }
    // Read outside clap: the log filter.
    variables.extend(["RUST_LOG".to_string(), "RUST_LOG_STYLE".to_string()]);
    for variable in &variables {
        let dir = common::temp_dir();
        let mut server = common::server().current_dir(dir.path());
        // The default port 3000, on a loopback address of its own so that nothing else on this
        // machine holds it. (The default state file `locker.yml` lands in `dir`.)
        if variable == "PORT" {
            server = server.env("LOCKER_LISTEN", "127.83.41.7");
        }
        let server = server.env(variable, "").start();
        let reply = common::call("GET", &server.url("/health"), None);
        assert_eq!(reply.status, 200, "{variable}=\"\": {}", reply.body);
        if variable == "PORT" {
            assert!(server.base.ends_with(":3000"), "{}", server.base);
        }
        if variable == "LOCKER_LISTEN" {
            assert!(server.base.contains("0.0.0.0"), "{}", server.base);
        }
        if variable == "LOCKER_CONFIG" {
            let lock = server.lock("x", serde_json::json!({"key": "k"}));
            assert_eq!(lock.status, 200, "{}", lock.body);
            assert!(
                dir.path().join("locker.yml").exists(),
                "LOCKER_CONFIG=\"\" should use the default locker.yml"
            );
        }
    }
}

#[test]
fn every_client_variable_set_empty_counts_as_unset() {
    let server = common::Server::start();
    let variables = variables_in_help(&["locks", "--help"]);
    for expected in [
        "LOCKER_URL",
        "LOCKER_USER",
        "LOCKER_PASSWORD",
        "LOCKER_CA_CERT",
    ] {
        assert!(variables.iter().any(|v| v == expected), "{variables:?}");
    }
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(common::locker_binary());
        command
            .env_clear()
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null());
        command.output().expect("run locker")
    };
    // Every variable but the URL empty at once, the URL given as a flag.
    let mut empty: Vec<(&str, &str)> = variables
        .iter()
        .filter(|v| *v != "LOCKER_URL")
        .map(|v| (v.as_str(), ""))
        .collect();
    empty.extend([("AUTH_USER", ""), ("AUTH_PASS", "")]);
    let output = run(&empty, &["locks", "--url", &server.base]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // An empty LOCKER_URL is the default URL, not "'' is not a URL".
    let output = run(&[("LOCKER_URL", "")], &["locks", "--request-timeout", "2s"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("not a URL"), "{stderr}");
    assert!(
        output.status.success() || stderr.contains("http://127.0.0.1:3000"),
        "{stderr}"
    );
}
