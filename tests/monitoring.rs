//! The monitoring that ships in `docs/monitoring/`: the alert rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), every alert is tested both firing and silent,
//! the Grafana dashboard and the rules query only series a running server exports, and a real
//! Prometheus (our own instance: a free loopback port, a temp config and TSDB) loads the rules,
//! scrapes a running server and finds the hold, wait and health series.
//!
//! The ops file for a prometheus-boshrelease deployment is interpolated by the real BOSH CLI.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`; `ci/scripts/run-tests`
//! installs it). The package's own service is never used.

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, call};
use serde_json::{Value, json};
use serde_yaml_ng::Value as Yaml;

/// How long a series may take to reach Prometheus (1 s scrapes on a loaded machine).
const SERIES_DEADLINE: Duration = Duration::from_secs(90);

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring")
}

/// A Prometheus tool, which must be installed: a missing one fails the test.
fn tool(name: &str) -> PathBuf {
    common::on_path(name).unwrap_or_else(|| {
        panic!("{name} is not on PATH: install the Debian package prometheus (ci/scripts/run-tests does)")
    })
}

fn read_yaml(name: &str) -> Yaml {
    let path = monitoring_dir().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Each rule of alerts.yml as (alert name, expression).
fn alert_rules() -> Vec<(String, String)> {
    let rules: Vec<(String, String)> = read_yaml("alerts.yml")["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_sequence().expect("rules").iter())
        .map(|rule| {
            let name = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr").to_string();
            (name, expr)
        })
        .collect();
    assert!(rules.len() >= 7, "{rules:?}");
    rules
}

fn read_dashboard() -> Value {
    let path = monitoring_dir().join("grafana-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard: its panels' targets (rows included), its
/// annotations' and its variables' queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, into: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query" | "definition", Value::String(text))
                            if !text.is_empty() && text != "prometheus" =>
                        {
                            into.push(text.clone())
                        }
                        _ => walk(value, into),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, into)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    walk(dashboard, &mut queries);
    queries
}

/// The `locker_...` metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(found) = expr[i..].find("locker_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(expr[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// The sample names in an exposition text.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Makes `server` hold, queue for, grant, refuse, time out, release and hold again `name`, so
/// every family that needs an operation or a holding to appear has one.
fn exercise(server: &Server, name: &str) {
    assert_eq!(server.lock(name, json!({"key": "first"})).status, 200);
    let waiter = {
        let url = server.url(&format!("/lock/{name}?wait=30s"));
        std::thread::spawn(move || call("PUT", &url, Some(r#"{"key":"second"}"#)))
    };
    common::wait_for_waiters(server, name, 1);
    assert_eq!(server.lock(name, json!({"key": "refused"})).status, 423);
    let timed_out = call(
        "PUT",
        &server.url(&format!("/lock/{name}?wait=100ms")),
        Some(r#"{"key":"late"}"#),
    );
    assert_eq!(timed_out.status, 423, "{}", timed_out.body);
    assert_eq!(server.unlock(name, json!({"key": "first"})).status, 200);
    let granted = waiter.join().expect("waiter thread");
    assert_eq!(granted.status, 200, "{}", granted.body);
    assert_eq!(server.unlock(name, json!({"key": "second"})).status, 200);
    // Held again, for the series that exist only while a lock is held.
    assert_eq!(server.lock(name, json!({"key": "again"})).status, 200);
}

fn scrape(server: &Server) -> String {
    let reply = call("GET", &server.url("/metrics"), None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

#[test]
fn the_alert_rules_pass_promtool_check() {
    let output = common::stdout_of(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(monitoring_dir().join("alerts.yml")),
    );
    let expected = format!("SUCCESS: {} rules found", alert_rules().len());
    assert!(output.contains(&expected), "{output}");
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let output = common::stdout_of(
        Command::new(tool("promtool"))
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(monitoring_dir()),
    );
    assert!(output.contains("SUCCESS"), "{output}");
}

#[test]
fn every_alert_is_tested_both_firing_and_silent() {
    let tests = read_yaml("alerts_test.yml");
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"]
            .as_sequence()
            .expect("alert_rule_test")
        {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let firing = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|alerts| !alerts.is_empty());
            if firing {
                fired.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for (alert, _) in alert_rules() {
        assert!(fired.contains(&alert), "{alert} is never tested firing");
        assert!(silent.contains(&alert), "{alert} is never tested silent");
    }
}

/// Series that only a server on the shared etcd store exports.
const ETCD_ONLY: &[&str] = &["locker_replicas"];

#[test]
fn the_dashboard_and_the_alerts_query_only_series_the_server_exports() {
    let dashboard = read_dashboard();
    assert_eq!(dashboard["title"], "locker");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queried = BTreeSet::new();
    for query in dashboard_queries(&dashboard) {
        queried.extend(metric_names(&query));
    }
    for (_, expr) in alert_rules() {
        queried.extend(metric_names(&expr));
    }
    for name in [
        "locker_hold_seconds_bucket",
        "locker_wait_seconds_bucket",
        "locker_hold_age_seconds",
        "locker_oldest_waiter_seconds",
        "locker_store_ready",
        "locker_state_write_failures_total",
        "locker_replicas",
    ] {
        assert!(
            queried.contains(name),
            "nothing queries {name}: {queried:?}"
        );
    }

    // The file store (which keeps the history that feeds the hold and wait histograms), and
    // the etcd store (the only one with replicas) when this build has it.
    let server = Server::start();
    exercise(&server, "dashboard");
    let mut exported = exported_names(&scrape(&server));
    #[cfg(feature = "etcd")]
    {
        let server = common::server()
            .etcd(&common::etcd::shared().endpoints())
            .start();
        exercise(&server, "dashboard");
        server.wait_for_metric("locker_replicas 1");
        let on_etcd = exported_names(&scrape(&server));
        for name in ETCD_ONLY {
            assert!(on_etcd.contains(*name), "{name} not on etcd: {on_etcd:?}");
            assert!(!exported.contains(*name), "{name} on the file store too");
        }
        exported.extend(on_etcd);
    }
    // Without the etcd backend in this build, its own series cannot be scraped here.
    #[cfg(not(feature = "etcd"))]
    exported.extend(ETCD_ONLY.iter().map(|name| name.to_string()));
    let missing: Vec<&String> = queried.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
}

/// Our own Prometheus: a temp dir with its config and TSDB, a free loopback port; killed and
/// reaped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every second as job "locker", with
    /// `rules` loaded, and waits until it is ready.
    fn start(target: &str, rules: &Path) -> Prometheus {
        // A port found free may be taken before Prometheus binds it: try again then.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free loopback port")
                .port();
            let dir = common::temp_dir();
            let config = dir.path().join("prometheus.yml");
            fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                     rule_files:\n  - {rules}\n\
                     scrape_configs:\n  - job_name: locker\n    static_configs:\n      \
                     - targets: ['{target}']\n",
                    rules = rules.display()
                ),
            )
            .expect("write prometheus.yml");
            let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
            let child = Command::new(tool("prometheus"))
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut prometheus = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                dir,
            };
            if prometheus.wait_ready() {
                return prometheus;
            }
            assert!(
                prometheus.log().contains("address already in use"),
                "prometheus stopped:\n{}",
                prometheus.log()
            );
        }
        panic!("no free port for prometheus in 5 tries");
    }

    /// Waits until `/-/ready` answers 200: true; false if Prometheus exited first.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = common::client();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let ready = client
                .get(format!("{}/-/ready", self.url))
                .timeout(Duration::from_secs(5))
                .send();
            if ready.is_ok_and(|r| r.status().is_success()) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` as JSON; panics unless Prometheus says success.
    fn api_get(&self, path: &str) -> Value {
        let reply = call("GET", &format!("{}/api/v1/{path}", self.url), None);
        let body = reply.json();
        assert_eq!(body["status"], "success", "{path}: {}", reply.body);
        body["data"].clone()
    }

    /// An instant query: the `data` of Prometheus's answer; panics on an error answer (a
    /// query Prometheus cannot parse or evaluate).
    fn query(&self, query: &str) -> Value {
        let reply = common::client()
            .post(format!("{}/api/v1/query", self.url))
            .form(&[("query", query)])
            .send()
            .expect("query prometheus");
        let text = reply.text().expect("answer");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{query}: not JSON ({e}): {text}"));
        assert_eq!(body["status"], "success", "{query}: {text}");
        body["data"].clone()
    }

    /// Polls until every query has a non-empty result; fails with what each last returned.
    fn wait_for_series(&self, queries: &[&str]) {
        let deadline = Instant::now() + SERIES_DEADLINE;
        loop {
            let answers: Vec<(&str, Value)> = queries
                .iter()
                .map(|query| (*query, self.query(query)["result"].clone()))
                .collect();
            let empty: Vec<&(&str, Value)> = answers
                .iter()
                .filter(|(_, result)| result.as_array().is_none_or(Vec::is_empty))
                .collect();
            if empty.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never had {empty:?}\nall answers: {answers:?}\ntargets: {}\n{}",
                self.api_get("targets"),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_loads_the_rules_scrapes_a_server_and_sees_holds_and_waits() {
    // Long waits allowed, so the waiter is still queued however long Prometheus takes.
    let server = common::server().env("LOCKER_MAX_WAIT", "600s").start();
    assert_eq!(
        server.lock("monitored", json!({"key": "first"})).status,
        200
    );
    let waiter = {
        let url = server.url("/lock/monitored?wait=600s");
        std::thread::spawn(move || call("PUT", &url, Some(r#"{"key":"second"}"#)))
    };
    common::wait_for_waiters(&server, "monitored", 1);

    let target = server.base.strip_prefix("http://").expect("plain http");
    let prometheus = Prometheus::start(target, &monitoring_dir().join("alerts.yml"));

    // The shipped rules are loaded, every alert of them.
    let groups = prometheus.api_get("rules")["groups"].clone();
    let loaded: BTreeSet<String> = groups
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|rule| rule["name"].as_str().map(str::to_string))
        .collect();
    for (alert, _) in alert_rules() {
        assert!(loaded.contains(&alert), "{alert} not loaded: {groups}");
    }

    // A lock held and a request waiting for it.
    prometheus.wait_for_series(&[
        r#"up{job="locker"} == 1"#,
        r#"locker_store_ready{job="locker"} == 1"#,
        r#"locker_hold_age_seconds{job="locker",lock="monitored"} > 0"#,
        r#"locker_oldest_waiter_seconds{job="locker"} > 0"#,
        r#"locker_waiters{job="locker"} == 1"#,
        // What the dashboard's job variable lists.
        r#"locker_build_info{job="locker"}"#,
    ]);

    // The holding ends, the waiter gets the lock and gives it back: a wait and two holds.
    assert_eq!(
        server.unlock("monitored", json!({"key": "first"})).status,
        200
    );
    let granted = waiter.join().expect("waiter thread");
    assert_eq!(granted.status, 200, "{}", granted.body);
    assert_eq!(
        server.unlock("monitored", json!({"key": "second"})).status,
        200
    );
    prometheus.wait_for_series(&[
        r#"locker_hold_seconds_count{job="locker",lock="monitored"} == 2"#,
        r#"locker_wait_seconds_count{job="locker",lock="monitored"} == 1"#,
        r#"locker_wait_seconds_sum{job="locker",lock="monitored"} > 0"#,
        r#"locker_oldest_waiter_seconds{job="locker"} == 0"#,
    ]);
    let age = prometheus.query(r#"locker_hold_age_seconds{job="locker",lock="monitored"}"#);
    assert_eq!(age["result"], json!([]), "no holding left: {age}");

    // Every query of the dashboard is one Prometheus evaluates (with Grafana's variables
    // filled in as Grafana would).
    for query in dashboard_queries(&read_dashboard()) {
        if query.starts_with("label_values(") {
            continue;
        }
        let query = query
            .replace("$__rate_interval", "1m")
            .replace("$job", "locker");
        prometheus.query(&query);
    }
}

/// A prometheus-boshrelease deployment reduced to what the ops file touches.
const PROMETHEUS_DEPLOYMENT: &str = "\
name: prometheus
instance_groups:
- name: prometheus2
  jobs:
  - name: prometheus2
    release: prometheus
    properties:
      prometheus:
        scrape_configs:
        - job_name: prometheus
          static_configs:
          - targets: [localhost:9090]
";

#[test]
fn the_bosh_ops_file_loads_the_rules_and_adds_the_scrape_job_to_prometheus_boshrelease() {
    let dir = common::temp_dir();
    let manifest = dir.path().join("prometheus.yml");
    fs::write(&manifest, PROMETHEUS_DEPLOYMENT).expect("write manifest");
    let text = common::stdout_of(
        Command::new(bosh::bosh())
            .arg("interpolate")
            .arg(&manifest)
            .arg("-o")
            .arg(monitoring_dir().join("prometheus-boshrelease.yml"))
            .arg("-l")
            .arg(monitoring_dir().join("alerts.yml"))
            .args(["-v", "locker_address=q-s0.locker.default.locker.bosh"])
            .args(["-v", "locker_password=from-the-config-server"])
            .args(["-v", "locker_tls={ca: the-ca}"])
            .arg("--var-errs"),
    );
    let deployment: Yaml = serde_yaml_ng::from_str(&text).expect("interpolated manifest");
    let prometheus = &deployment["instance_groups"][0]["jobs"][0]["properties"]["prometheus"];
    assert_eq!(
        prometheus["custom_rules"],
        read_yaml("alerts.yml")["groups"],
        "the rules as shipped"
    );
    let jobs = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape configs");
    assert_eq!(jobs.len(), 2, "the deployment's own job kept: {text}");
    let locker = &jobs[1];
    assert_eq!(locker["job_name"].as_str(), Some("locker"));
    assert_eq!(locker["scheme"].as_str(), Some("https"));
    assert_eq!(
        locker["static_configs"][0]["targets"][0].as_str(),
        Some("q-s0.locker.default.locker.bosh:8910")
    );
    assert_eq!(
        locker["basic_auth"]["password"].as_str(),
        Some("from-the-config-server")
    );
    assert_eq!(locker["tls_config"]["ca"].as_str(), Some("the-ca"));
}
