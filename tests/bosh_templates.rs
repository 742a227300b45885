//! The locker job's templates, rendered by the BOSH CLI's own renderer under many property sets:
//! the env, files and bpm settings each property yields, what is refused at deploy time, the
//! spec's documentation, monit, and the link consumers get (the only stand-in for a director:
//! the renderer cannot resolve links, so the test computes the provided link from the spec).

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::{Value as Json, json};
use serde_yaml_ng::Value as Yaml;

use bosh::*;

#[test]
fn without_auth_or_tls_the_env_holds_only_the_defaults() {
    let bpm = render_job(json!({})).bpm();
    let process = bpm.process();
    assert_eq!(process.name, "locker");
    assert_eq!(process.executable, "/var/vcap/packages/locker/bin/locker");
    assert!(
        process.persistent_disk,
        "the state file lives on the persistent disk"
    );
    assert!(process.args.is_empty(), "settings come from env only");
    assert_eq!(process.env, default_env());
    assert_eq!(
        process.limits.as_ref().and_then(|l| l.open_files),
        Some(65536)
    );
}

#[test]
fn the_original_port_is_the_default() {
    let spec = yaml_file(&job_dir().join("spec"));
    assert_eq!(
        spec["properties"]["locker.port"]["default"],
        Yaml::from(8910)
    );
}

#[test]
fn auth_properties_become_auth_env_verbatim() {
    // Characters YAML or shell quoting could mangle.
    let password = r#"p@ss: "w#rd' \ {x}"#;
    let bpm = render_job(json!({"locker": {"user": "ci user", "password": password}})).bpm();
    let mut expected = default_env();
    expected.insert("AUTH_USER".into(), "ci user".into());
    expected.insert("AUTH_PASS".into(), password.into());
    assert_eq!(bpm.process().env, expected);
}

#[test]
fn tls_properties_become_files_in_the_job_config_and_env_naming_them() {
    let pki = pki();
    let render = render_job(json!({"locker": {"ssl_cert": pki.cert, "ssl_key": pki.key}}));
    let env = render.bpm().process().env.clone();
    assert_eq!(env["SSL_CERT"], destination("certs/server.crt.erb"));
    assert_eq!(env["SSL_KEY"], destination("certs/server.key.erb"));
    assert!(env["SSL_CERT"].starts_with("/var/vcap/jobs/locker/config/certs/"));
    assert!(!env.contains_key("AUTH_USER") && !env.contains_key("AUTH_PASS"));
    assert_eq!(
        render.template("certs/server.crt.erb").trim(),
        pki.cert.trim()
    );
    assert_eq!(
        render.template("certs/server.key.erb").trim(),
        pki.key.trim()
    );
}

#[test]
fn without_tls_the_certificate_files_are_empty_and_unreferenced() {
    let render = render_job(json!({}));
    assert_eq!(render.template("certs/server.crt.erb").trim(), "");
    assert_eq!(render.template("certs/server.key.erb").trim(), "");
    let env = render.bpm().process().env.clone();
    assert!(!env.contains_key("SSL_CERT") && !env.contains_key("SSL_KEY"));
}

#[test]
fn custom_port_address_limits_lease_and_log_level_reach_the_env() {
    let bpm = render_job(json!({"locker": {
        "port": 9443,
        "bind_address": "10.0.0.7",
        "max_wait": "5m",
        "max_waiters": 50,
        "max_locks": 5000,
        "max_requestors": 20,
        "head_timeout": "10s",
        "max_connections": 3000,
        "metrics_max_lock_labels": 250,
        "journal_bytes": 1048576,
        "default_ttl": "2h",
        "log_level": "locker=debug",
    }}))
    .bpm();
    let expected = env_of(&[
        ("LOCKER_CONFIG", "/var/vcap/store/locker/locker.yml"),
        ("PORT", "9443"),
        ("LOCKER_LISTEN", "10.0.0.7"),
        ("LOCKER_MAX_WAIT", "5m"),
        ("LOCKER_MAX_WAITERS", "50"),
        ("LOCKER_MAX_LOCKS", "5000"),
        ("LOCKER_MAX_REQUESTORS", "20"),
        ("LOCKER_HEAD_TIMEOUT", "10s"),
        ("LOCKER_MAX_CONNECTIONS", "3000"),
        ("LOCKER_METRICS_MAX_LOCK_LABELS", "250"),
        ("LOCKER_JOURNAL_BYTES", "1048576"),
        ("LOCKER_DEFAULT_TTL", "2h"),
        ("RUST_LOG", "locker=debug"),
        ("LOCKER_SHUTDOWN_GRACE", "10s"),
    ]);
    assert_eq!(bpm.process().env, expected);
}

#[test]
fn half_configured_auth_or_tls_or_a_bad_port_fails_the_deploy() {
    let cases = [
        (json!({"user": "u"}), "locker.user and locker.password"),
        (json!({"password": "p"}), "locker.user and locker.password"),
        (
            json!({"ssl_cert": "C"}),
            "locker.ssl_cert and locker.ssl_key",
        ),
        (
            json!({"ssl_key": "K"}),
            "locker.ssl_cert and locker.ssl_key",
        ),
        (json!({"port": 0}), "locker.port"),
        (json!({"port": 70000}), "locker.port"),
        (
            json!({"store": "etcd"}),
            "locker.store etcd needs locker.etcd.endpoints",
        ),
        (
            json!({"concourse": {"url": "https://ci", "user": "u"}}),
            "locker.concourse.user and locker.concourse.password",
        ),
        (
            json!({"concourse": {"url": "https://ci", "token": "t", "user": "u", "password": "p"}}),
            "locker.concourse.token or locker.concourse.user/password",
        ),
        (
            json!({"concourse": {"token": "t"}}),
            "locker.concourse.url is not",
        ),
        (json!({"shutdown_grace": "15s"}), "at most 14s"),
        (json!({"shutdown_grace": "1m"}), "at most 14s"),
        (json!({"shutdown_grace": "soon"}), "locker.shutdown_grace"),
    ];
    for (properties, message) in cases {
        let error = render_job(json!({ "locker": properties }))
            .try_template("bpm.yml.erb")
            .expect_err(&format!("{properties} must not render"));
        assert!(error.contains(message), "{properties}: {error}");
    }
}

#[test]
fn reclaiming_and_the_shutdown_grace_reach_the_env() {
    let with_token = render_job(json!({"locker": {
        "concourse": {"url": "https://ci.example.com", "token": "t0k"},
        "reclaim_interval": "30s",
        "shutdown_grace": "5s",
    }}))
    .bpm();
    let mut expected = default_env();
    expected.insert(
        "LOCKER_CONCOURSE_URL".into(),
        "https://ci.example.com".into(),
    );
    expected.insert("LOCKER_CONCOURSE_TOKEN".into(), "t0k".into());
    expected.insert("LOCKER_RECLAIM_INTERVAL".into(), "30s".into());
    expected.insert("LOCKER_SHUTDOWN_GRACE".into(), "5s".into());
    assert_eq!(with_token.process().env, expected);

    let with_user = render_job(json!({"locker": {
        "concourse": {"url": "https://ci", "user": "locker", "password": "p: w"},
    }}))
    .bpm();
    let env = &with_user.process().env;
    assert_eq!(env["LOCKER_CONCOURSE_USER"], "locker");
    assert_eq!(env["LOCKER_CONCOURSE_PASSWORD"], "p: w");
    assert_eq!(env["LOCKER_RECLAIM_INTERVAL"], "60s");
    assert!(!env.contains_key("LOCKER_CONCOURSE_TOKEN"));
}

/// Property sets every template must render under.
fn property_sets() -> Vec<(&'static str, Json)> {
    let pki = pki();
    vec![
        ("defaults", json!({})),
        ("auth", json!({"locker": {"user": "u", "password": "p"}})),
        (
            "tls",
            json!({"locker": {"ssl_cert": pki.cert, "ssl_key": pki.key, "ssl_ca": pki.ca}}),
        ),
        (
            "reclaim",
            json!({"locker": {"concourse": {"url": "https://ci", "user": "u", "password": "p"}}}),
        ),
        (
            "etcd",
            json!({"locker": {"store": "etcd", "etcd": {"endpoints": ["https://e:2379"],
                "ca": pki.ca, "client_cert": pki.cert, "client_key": pki.key}}}),
        ),
        (
            "everything",
            json!({"locker": {"user": "u", "password": "p", "ssl_cert": pki.cert,
                "ssl_key": pki.key, "port": 1234, "bind_address": "127.0.0.1",
                "max_wait": "10s", "max_waiters": 3, "default_ttl": "1m", "log_level": "warn"}}),
        ),
    ]
}

/// Template files under jobs/locker/templates, relative to it.
fn template_files() -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, found: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).expect("read templates") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, base, found);
            } else {
                let relative = path.strip_prefix(base).expect("under templates");
                found.insert(relative.display().to_string());
            }
        }
    }
    let base = job_dir().join("templates");
    let mut found = BTreeSet::new();
    walk(&base, &base, &mut found);
    found
}

#[test]
fn every_template_is_declared_and_renders_under_every_property_set() {
    let declared: BTreeSet<String> = spec_templates().into_keys().collect();
    assert_eq!(
        template_files(),
        declared,
        "template files and the job spec's templates: must match"
    );
    for (name, properties) in property_sets() {
        let render = render_job(properties);
        for template in &declared {
            let text = render
                .try_template(template)
                .unwrap_or_else(|e| panic!("{template} under {name}: {e}"));
            if template.ends_with(".yml.erb") {
                serde_yaml_ng::from_str::<Yaml>(&text)
                    .unwrap_or_else(|e| panic!("{template} under {name} is not YAML: {e}"));
            }
            if text.starts_with("#!") {
                let dir = common::temp_dir();
                let script = dir.path().join("script");
                fs::write(&script, &text).expect("write script");
                run_ok(Command::new("bash").arg("-n").arg(&script));
            }
        }
    }
}

#[test]
fn the_job_spec_documents_every_property_and_keeps_the_original_names() {
    let spec = yaml_file(&job_dir().join("spec"));
    let properties = spec["properties"].as_mapping().expect("properties map");
    // Optional settings: unset means off (no auth, no TLS, no lease), so they have no default.
    let optional = [
        "locker.user",
        "locker.password",
        "locker.ssl_cert",
        "locker.ssl_key",
        "locker.ssl_ca",
        "locker.default_ttl",
        "locker.journal_bytes",
        "locker.max_locks",
        "locker.max_requestors",
        "locker.head_timeout",
        "locker.max_connections",
        "locker.metrics_max_lock_labels",
        "locker.etcd.endpoints",
        "locker.etcd.user",
        "locker.etcd.password",
        "locker.etcd.ca",
        "locker.etcd.client_cert",
        "locker.etcd.client_key",
        "locker.concourse.url",
        "locker.concourse.token",
        "locker.concourse.user",
        "locker.concourse.password",
    ];
    let mut names = BTreeSet::new();
    for (name, definition) in properties {
        let name = name.as_str().expect("property name").to_string();
        let description = definition["description"].as_str().unwrap_or("");
        assert!(
            description.len() > 20,
            "{name} needs a description: {definition:?}"
        );
        let has_default = definition.get("default").is_some();
        assert_eq!(
            has_default,
            !optional.contains(&name.as_str()),
            "{name}: only the optional settings lack a default"
        );
        if !has_default {
            assert!(
                definition.get("example").is_some(),
                "{name} needs an example"
            );
        }
        names.insert(name);
    }
    for original in [
        "locker.port",
        "locker.user",
        "locker.password",
        "locker.ssl_cert",
        "locker.ssl_key",
    ] {
        assert!(names.contains(original), "{original} is missing");
    }
    for newer in [
        "locker.max_wait",
        "locker.max_waiters",
        "locker.max_locks",
        "locker.max_requestors",
        "locker.head_timeout",
        "locker.max_connections",
        "locker.journal_bytes",
        "locker.default_ttl",
        "locker.log_level",
        "locker.bind_address",
        "locker.shutdown_grace",
        "locker.reclaim_interval",
    ] {
        assert!(names.contains(newer), "{newer} is missing");
    }
    let provides = spec["provides"].as_sequence().expect("provides");
    assert_eq!(provides.len(), 1);
    assert_eq!(provides[0]["name"], Yaml::from("locker"));
    assert_eq!(provides[0]["type"], Yaml::from("locker"));
    for property in provides[0]["properties"]
        .as_sequence()
        .expect("link properties")
    {
        let property = property.as_str().expect("name");
        assert!(names.contains(property), "link lists undeclared {property}");
    }
    assert_eq!(
        spec["packages"],
        serde_yaml_ng::from_str::<Yaml>("[locker]").unwrap()
    );
}

#[test]
fn monit_hands_the_process_to_bpm() {
    let monit = read(&job_dir().join("monit"));
    let process = render_job(json!({})).bpm().process().name.clone();
    assert!(monit.contains("check process locker"), "{monit}");
    assert!(
        monit.contains(&format!(
            "with pidfile /var/vcap/sys/run/bpm/locker/{process}.pid"
        )),
        "{monit}"
    );
    assert!(monit.contains("\"/var/vcap/jobs/bpm/bin/bpm start locker\""));
    assert!(monit.contains("\"/var/vcap/jobs/bpm/bin/bpm stop locker\""));
}

#[test]
fn the_link_gives_consumers_the_url_credentials_and_ca() {
    let consumer = release().join("test/consumer");
    let pki = pki();
    let spec_address = "10.0.0.5"; // render_context's address

    let secured = render_job(json!({"locker": {"user": "u", "password": "p",
        "ssl_cert": pki.cert, "ssl_key": pki.key, "ssl_ca": pki.ca, "port": 9000}}));
    let link = secured.provided_link();
    assert!(
        link["properties"]["locker"].get("ssl_key").is_none(),
        "the private key stays private: {link}"
    );
    let rendered = Render {
        job: consumer.clone(),
        properties: json!({}),
        links: vec![("locker".into(), link)],
    }
    .template("locker.json.erb");
    let settings: Json = serde_json::from_str(&rendered).expect("consumer JSON");
    assert_eq!(
        settings,
        json!({"url": format!("https://{spec_address}:9000"), "tls": true,
            "username": "u", "password": "p", "ca_cert": pki.ca})
    );

    let open = render_job(json!({})).provided_link();
    let rendered = Render {
        job: consumer,
        properties: json!({}),
        links: vec![("locker".into(), open)],
    }
    .template("locker.json.erb");
    let settings: Json = serde_json::from_str(&rendered).expect("consumer JSON");
    assert_eq!(
        settings,
        json!({"url": format!("http://{spec_address}:8910"), "tls": false})
    );
}

#[test]
fn etcd_properties_become_etcd_env_and_drop_the_persistent_disk() {
    let pki = pki();
    let render = render_job(json!({"locker": {
        "store": "etcd",
        "etcd": {
            "endpoints": ["https://10.0.0.5:2379", "https://10.0.0.6:2379"],
            "user": "locker",
            "password": "p w",
            "ca": pki.ca,
            "client_cert": pki.cert,
            "client_key": pki.key,
        },
    }}));
    let bpm = render.bpm();
    let process = bpm.process();
    assert!(!process.persistent_disk, "etcd needs no persistent disk");
    let mut expected = default_env();
    for (name, value) in [
        ("LOCKER_STORE", "etcd".to_string()),
        (
            "LOCKER_ETCD_ENDPOINTS",
            "https://10.0.0.5:2379,https://10.0.0.6:2379".to_string(),
        ),
        ("LOCKER_ETCD_PREFIX", "/locker/".to_string()),
        ("LOCKER_ETCD_USER", "locker".to_string()),
        ("LOCKER_ETCD_PASSWORD", "p w".to_string()),
        ("LOCKER_ETCD_CA", destination("certs/etcd-ca.crt.erb")),
        ("LOCKER_ETCD_CERT", destination("certs/etcd-client.crt.erb")),
        ("LOCKER_ETCD_KEY", destination("certs/etcd-client.key.erb")),
    ] {
        expected.insert(name.to_string(), value);
    }
    assert_eq!(process.env, expected);
    assert_eq!(
        render.template("certs/etcd-ca.crt.erb").trim(),
        pki.ca.trim()
    );
    assert_eq!(
        render.template("certs/etcd-client.key.erb").trim(),
        pki.key.trim()
    );
    // Only what is set reaches the env.
    let bare =
        render_job(json!({"locker": {"store": "etcd", "etcd": {"endpoints": ["http://e:2379"]}}}));
    let env = bare.bpm().process().env.clone();
    assert_eq!(env["LOCKER_ETCD_ENDPOINTS"], "http://e:2379");
    assert!(!env.contains_key("LOCKER_ETCD_CA") && !env.contains_key("LOCKER_ETCD_USER"));
    assert!(
        !render_job(json!({}))
            .bpm()
            .process()
            .env
            .contains_key("LOCKER_STORE")
    );
    for (properties, message) in [
        (json!({"store": "etcd"}), "locker.etcd.endpoints"),
        (json!({"store": "zookeeper"}), "locker.store"),
        (
            json!({"store": "etcd", "etcd": {"endpoints": ["e"], "user": "u"}}),
            "locker.etcd.user",
        ),
    ] {
        let error = render_job(json!({ "locker": properties }))
            .try_template("bpm.yml.erb")
            .expect_err(&format!("{properties} must not render"));
        assert!(error.contains(message), "{properties}: {error}");
    }
}
