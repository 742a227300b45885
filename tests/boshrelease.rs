//! The BOSH release (`boshrelease/`) and the project's Concourse pipeline (`ci/`), tested without
//! a BOSH director or CLI, neither of which runs here.
//!
//! Templates are rendered with real ERB by `boshrelease/test/render.rb`, a stand-in for the
//! director's renderer (`p`, `if_p`, `spec`, links). The rendered job is then laid out under a
//! fake `/var/vcap` in a temp dir: the release blob is made by `scripts/add-blob` (with a stub
//! `bosh`), installed by the package's `packaging` script, prepared by the job's `pre-start`,
//! and run as the rendered `bpm.yml` says, with TLS, basic auth and a state file in the original
//! locker's JSON format.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value as Json, json};
use serde_yaml_ng::Value as Yaml;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo() -> PathBuf {
    PathBuf::from(REPO)
}

fn release() -> PathBuf {
    repo().join("boshrelease")
}

fn job_dir() -> PathBuf {
    release().join("jobs/locker")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml_file(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn output_text(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command to completion; panics with its output when it fails.
fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        output_text(&output)
    );
    output
}

// ---------------------------------------------------------------------------------------------
// Rendering through the Ruby harness

/// The `ruby` interpreter. These tests need it: fail loudly, never skip.
fn ruby() -> &'static str {
    let found = Command::new("ruby")
        .arg("--version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "Ruby is missing: the BOSH template tests render ERB with it. Install it \
         (`apt-get install -y ruby`; .ci/run does this on a fresh machine)."
    );
    "ruby"
}

/// A template rendering: the job's properties (nested as in a manifest) and consumed links.
struct Render {
    job: PathBuf,
    properties: Json,
    links: Vec<(String, Json)>,
}

fn render_job(properties: Json) -> Render {
    Render {
        job: job_dir(),
        properties,
        links: Vec::new(),
    }
}

impl Render {
    fn args(&self, dir: &Path) -> Vec<String> {
        let properties = dir.join("properties.json");
        fs::write(&properties, self.properties.to_string()).expect("write properties");
        let mut args = vec![
            release().join("test/render.rb").display().to_string(),
            self.job.display().to_string(),
            "--properties".into(),
            properties.display().to_string(),
        ];
        for (name, link) in &self.links {
            let file = dir.join(format!("link-{name}.json"));
            fs::write(&file, link.to_string()).expect("write link");
            args.push("--link".into());
            args.push(format!("{name}={}", file.display()));
        }
        args
    }

    /// The rendered template, or the renderer's error message.
    fn try_template(&self, template: &str) -> Result<String, String> {
        let dir = common::temp_dir();
        let output = Command::new(ruby())
            .args(self.args(dir.path()))
            .arg(template)
            .output()
            .expect("run render.rb");
        if output.status.success() {
            Ok(String::from_utf8(output.stdout).expect("utf-8 output"))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn template(&self, template: &str) -> String {
        self.try_template(template)
            .unwrap_or_else(|e| panic!("rendering {template} failed: {e}"))
    }

    fn bpm(&self) -> Bpm {
        let text = self.template("bpm.yml.erb");
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("bpm.yml: {e}\n{text}"))
    }

    /// The job's `locker` link as a consumer sees it.
    fn provided_link(&self) -> Json {
        let dir = common::temp_dir();
        let output = run_ok(
            Command::new(ruby())
                .args(self.args(dir.path()))
                .args(["--provided-link", "locker"]),
        );
        serde_json::from_slice(&output.stdout).expect("link JSON")
    }
}

/// The part of bpm's configuration the job uses; unknown keys are refused, so a misspelt key
/// fails here rather than being ignored by bpm.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bpm {
    processes: Vec<BpmProcess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BpmProcess {
    name: String,
    executable: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    persistent_disk: bool,
    limits: Option<BpmLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BpmLimits {
    open_files: Option<u64>,
}

impl Bpm {
    fn process(&self) -> &BpmProcess {
        assert_eq!(self.processes.len(), 1, "one process: {self:?}");
        &self.processes[0]
    }
}

fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The env a deployment with only defaults gets.
fn default_env() -> BTreeMap<String, String> {
    env_of(&[
        ("LOCKER_CONFIG", "/var/vcap/store/locker/locker.yml"),
        ("PORT", "8910"),
        ("LOCKER_LISTEN", "0.0.0.0"),
        ("LOCKER_MAX_WAIT", "60s"),
        ("LOCKER_MAX_WAITERS", "10000"),
        ("RUST_LOG", "info"),
    ])
}

/// The job spec's `templates:` map: template file → destination under /var/vcap/jobs/locker.
fn spec_templates() -> BTreeMap<String, String> {
    let spec = yaml_file(&job_dir().join("spec"));
    serde_yaml_ng::from_value(spec["templates"].clone()).expect("templates map")
}

/// Where a template lands on the VM.
fn destination(template: &str) -> String {
    let templates = spec_templates();
    let to = templates
        .get(template)
        .unwrap_or_else(|| panic!("{template} is not in the job spec"));
    format!("/var/vcap/jobs/locker/{to}")
}

// ---------------------------------------------------------------------------------------------
// Certificates

struct Pki {
    ca: String,
    cert: String,
    key: String,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as the config server would make.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "locker-ca");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server certificate");
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

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
        ("LOCKER_JOURNAL_BYTES", "1048576"),
        ("LOCKER_DEFAULT_TTL", "2h"),
        ("RUST_LOG", "locker=debug"),
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
    ];
    for (properties, message) in cases {
        let error = render_job(json!({ "locker": properties }))
            .try_template("bpm.yml.erb")
            .expect_err(&format!("{properties} must not render"));
        assert!(error.contains(message), "{properties}: {error}");
    }
}

#[test]
fn the_harness_refuses_properties_the_job_does_not_declare() {
    let error = render_job(json!({"locker": {"usr": "u"}}))
        .try_template("bpm.yml.erb")
        .expect_err("a misspelt property must fail");
    assert!(error.contains("locker.usr"), "{error}");
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
        "locker.etcd.endpoints",
        "locker.etcd.user",
        "locker.etcd.password",
        "locker.etcd.ca",
        "locker.etcd.client_cert",
        "locker.etcd.client_key",
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
        "locker.journal_bytes",
        "locker.default_ttl",
        "locker.log_level",
        "locker.bind_address",
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
    let spec_address = "10.0.0.5"; // render.rb's default spec.address

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

// ---------------------------------------------------------------------------------------------
// Manifests

/// `((name))` and `((name.field))` references in a YAML value, by variable name.
fn variable_references(value: &Yaml, found: &mut BTreeSet<String>) {
    match value {
        Yaml::String(text) => {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("((") {
                let end = rest[start..].find("))").expect("unclosed ((") + start;
                let reference = &rest[start + 2..end];
                found.insert(reference.split('.').next().unwrap().to_string());
                rest = &rest[end + 2..];
            }
        }
        Yaml::Sequence(items) => items.iter().for_each(|i| variable_references(i, found)),
        Yaml::Mapping(map) => map.values().for_each(|v| variable_references(v, found)),
        Yaml::Tagged(tagged) => variable_references(&tagged.value, found),
        _ => {}
    }
}

/// Dotted names of the leaves of a manifest's job properties.
fn property_names(value: &Yaml, prefix: &str, found: &mut BTreeSet<String>) {
    match value.as_mapping() {
        Some(map) => {
            for (key, value) in map {
                let key = key.as_str().expect("property key");
                let name = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                property_names(value, &name, found);
            }
        }
        None => {
            found.insert(prefix.to_string());
        }
    }
}

fn declared_properties() -> BTreeSet<String> {
    let spec = yaml_file(&job_dir().join("spec"));
    spec["properties"]
        .as_mapping()
        .expect("properties")
        .keys()
        .map(|k| k.as_str().expect("name").to_string())
        .collect()
}

/// Checks a locker job entry of a manifest: known properties, production settings, and
/// variables that are defined (or given with -v).
fn check_locker_job(job: &Yaml, defined: &BTreeSet<String>, given: &[&str]) {
    assert_eq!(job["release"], Yaml::from("locker"));
    let mut names = BTreeSet::new();
    property_names(&job["properties"], "", &mut names);
    let declared = declared_properties();
    for name in &names {
        assert!(declared.contains(name), "{name} is not a job property");
    }
    for wanted in [
        "locker.user",
        "locker.password",
        "locker.ssl_cert",
        "locker.ssl_key",
    ] {
        assert!(names.contains(wanted), "production wants {wanted}");
    }
    let mut references = BTreeSet::new();
    variable_references(job, &mut references);
    for reference in references {
        assert!(
            defined.contains(&reference) || given.contains(&reference.as_str()),
            "((\"{reference}\")) is neither a variable nor documented as given"
        );
    }
}

fn variables_of(list: &[Yaml]) -> BTreeMap<String, Yaml> {
    list.iter()
        .map(|v| (v["name"].as_str().expect("name").to_string(), v.clone()))
        .collect()
}

fn check_certificate_variables(variables: &BTreeMap<String, Yaml>) {
    assert_eq!(variables["locker_password"]["type"], Yaml::from("password"));
    assert_eq!(variables["locker_ca"]["type"], Yaml::from("certificate"));
    assert_eq!(variables["locker_ca"]["options"]["is_ca"], Yaml::from(true));
    assert_eq!(variables["locker_tls"]["type"], Yaml::from("certificate"));
    assert_eq!(
        variables["locker_tls"]["options"]["ca"],
        Yaml::from("locker_ca")
    );
}

#[test]
fn the_standalone_manifest_deploys_one_locker_with_config_server_credentials() {
    let manifest = yaml_file(&release().join("manifests/locker.yml"));
    let variables = variables_of(manifest["variables"].as_sequence().expect("variables"));
    check_certificate_variables(&variables);
    let groups = manifest["instance_groups"].as_sequence().expect("groups");
    assert_eq!(groups.len(), 1);
    let group = &groups[0];
    assert_eq!(
        group["instances"],
        Yaml::from(1),
        "the locks live on one VM's disk"
    );
    assert!(group.get("persistent_disk").is_some() || group.get("persistent_disk_type").is_some());
    let jobs = group["jobs"].as_sequence().expect("jobs");
    assert!(jobs.iter().any(|j| j["name"] == "bpm"));
    let locker = jobs
        .iter()
        .find(|j| j["name"] == "locker")
        .expect("locker job");
    let defined = variables.keys().cloned().collect();
    check_locker_job(locker, &defined, &["locker_host"]);
    let releases: BTreeSet<_> = manifest["releases"]
        .as_sequence()
        .expect("releases")
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(releases, ["bpm", "locker"].map(String::from).into());
}

#[test]
fn the_ops_file_colocates_locker_on_the_concourse_db_group() {
    let ops = yaml_file(&release().join("manifests/operations/colocate-with-concourse.yml"));
    let ops = ops.as_sequence().expect("a list of operations");
    let by_path: BTreeMap<String, &Yaml> = ops
        .iter()
        .map(|op| {
            assert_eq!(op["type"], Yaml::from("replace"), "{op:?}");
            (op["path"].as_str().expect("path").to_string(), &op["value"])
        })
        .collect();
    // Every path is optional (`?`), so applying the file twice changes nothing.
    for path in by_path.keys() {
        assert!(path.ends_with('?'), "{path}");
    }
    let variables: Vec<Yaml> = by_path
        .iter()
        .filter(|(path, _)| path.starts_with("/variables/"))
        .map(|(_, value)| (*value).clone())
        .collect();
    let variables = variables_of(&variables);
    check_certificate_variables(&variables);
    let locker = by_path["/instance_groups/name=db/jobs/name=locker?"];
    let defined = variables.keys().cloned().collect();
    // locker_host is given with -v; the others are concourse-deployment's own variables.
    check_locker_job(locker, &defined, &["locker_host"]);
    assert_eq!(
        by_path["/instance_groups/name=db/jobs/name=bpm?"]["release"],
        Yaml::from("bpm")
    );
    assert_eq!(
        by_path["/releases/name=locker?"]["name"],
        Yaml::from("locker")
    );
}

/// The standalone manifest's locker properties with the config server's variables filled in.
fn manifest_properties(pki: &Pki, password: &str) -> Json {
    let manifest = yaml_file(&release().join("manifests/locker.yml"));
    let locker = manifest["instance_groups"][0]["jobs"]
        .as_sequence()
        .expect("jobs")
        .iter()
        .find(|j| j["name"] == "locker")
        .expect("locker job")["properties"]
        .clone();
    let mut properties: Json = serde_json::to_value(&locker).expect("properties as JSON");
    fn fill(value: &mut Json, vars: &BTreeMap<&str, &str>) {
        match value {
            Json::String(text) => {
                if let Some(name) = text.strip_prefix("((").and_then(|t| t.strip_suffix("))")) {
                    let filled = vars
                        .get(name)
                        .unwrap_or_else(|| panic!("no value for (({name}))"));
                    *text = filled.to_string();
                }
            }
            Json::Object(map) => map.values_mut().for_each(|v| fill(v, vars)),
            Json::Array(items) => items.iter_mut().for_each(|v| fill(v, vars)),
            _ => {}
        }
    }
    let vars = BTreeMap::from([
        ("locker_password", password),
        ("locker_tls.certificate", pki.cert.as_str()),
        ("locker_tls.private_key", pki.key.as_str()),
        ("locker_tls.ca", pki.ca.as_str()),
    ]);
    fill(&mut properties, &vars);
    properties
}

// ---------------------------------------------------------------------------------------------
// The job on a fake /var/vcap

/// A temp dir standing in for `/`, holding `var/vcap`.
struct FakeVm {
    root: tempfile::TempDir,
}

impl FakeVm {
    fn new() -> FakeVm {
        FakeVm {
            root: common::temp_dir(),
        }
    }

    fn vcap(&self) -> PathBuf {
        self.root.path().join("var/vcap")
    }

    /// Rewrites every `/var/vcap` path in `text` into the fake tree.
    fn rewrite(&self, text: &str) -> String {
        text.replace("/var/vcap", &self.vcap().display().to_string())
    }

    fn path(&self, vm_path: &str) -> PathBuf {
        PathBuf::from(self.rewrite(vm_path))
    }

    /// Renders every job template to its destination, as the BOSH agent would.
    fn render_job(&self, render: &Render) {
        for (template, _) in spec_templates() {
            let target = self.path(&destination(&template));
            fs::create_dir_all(target.parent().unwrap()).expect("job dir");
            fs::write(&target, render.template(&template)).expect("write template");
            let mode = if target.starts_with(self.vcap().join("jobs/locker/bin")) {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
        }
    }
}

/// Stub commands on PATH: each call is recorded as one line in `calls.log`.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new(scripts: &[(&str, &str)]) -> Stubs {
        let dir = common::temp_dir();
        let log = dir.path().join("calls.log");
        fs::write(&log, "").expect("log");
        for (name, body) in scripts {
            let path = dir.path().join(name);
            let script = format!(
                "#!/usr/bin/env bash\nset -euo pipefail\necho \"{name} $*\" >> '{}'\n{body}\n",
                log.display()
            );
            fs::write(&path, script).expect("stub");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Stubs { dir }
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn calls(&self) -> Vec<String> {
        read(&self.dir.path().join("calls.log"))
            .lines()
            .map(String::from)
            .collect()
    }
}

/// A stand-in for the bosh CLI's blob commands: `add-blob` copies the file under blobs/ and
/// lists it in config/blobs.yml; the rest only record their arguments.
const BOSH_STUB: &str = r#"
case "$1" in
  add-blob)
    mkdir -p "blobs/$(dirname "$3")"
    cp "$2" "blobs/$3"
    printf '%s:\n  size: %s\n' "$3" "$(stat -c %s "$2")" >> config/blobs.yml
    ;;
esac
"#;

/// A copy of the release's scripts, config and packages to run the blob scripts in.
fn release_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("boshrelease");
    for part in ["scripts", "config", "packages/locker"] {
        let to = copy.join(part);
        fs::create_dir_all(&to).expect("mkdir");
        for entry in fs::read_dir(release().join(part)).expect("read") {
            let from = entry.expect("entry").path();
            fs::copy(&from, to.join(from.file_name().unwrap())).expect("copy");
        }
    }
    copy
}

/// Matches a BOSH package `files:` glob with one `*`.
fn glob_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        Some((prefix, suffix)) => {
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
                && !name[prefix.len()..name.len() - suffix.len()].contains('/')
        }
        None => pattern == name,
    }
}

/// Makes the blob with scripts/add-blob from the test's server binary and installs it into the
/// fake VM with the package's packaging script, as a BOSH compilation VM would. Returns the
/// blob's name.
fn install_package(vm: &FakeVm) -> String {
    let work = common::temp_dir();
    let copy = release_copy(work.path());
    // An earlier version's blob, which add-blob must replace.
    fs::write(
        copy.join("config/blobs.yml"),
        "locker/locker-0.0.1-linux-amd64.tgz:\n  size: 1\n",
    )
    .expect("blobs.yml");
    let bosh = Stubs::new(&[("bosh", BOSH_STUB)]);
    run_ok(
        Command::new(copy.join("scripts/add-blob"))
            .env("PATH", bosh.path_env())
            .env("LOCKER_BINARY", common::locker_binary()),
    );
    let version = env!("CARGO_PKG_VERSION");
    let blob = format!("locker/locker-{version}-linux-amd64.tgz");
    let calls = bosh.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        calls[0],
        "bosh remove-blob locker/locker-0.0.1-linux-amd64.tgz"
    );
    assert!(
        calls[1].starts_with("bosh add-blob ") && calls[1].ends_with(&format!(" {blob}")),
        "{calls:?}"
    );

    // The package spec must pick the blob up.
    let package = yaml_file(&release().join("packages/locker/spec"));
    let files = package["files"].as_sequence().expect("files");
    assert!(
        files
            .iter()
            .any(|f| glob_matches(f.as_str().unwrap_or(""), &blob)),
        "packages/locker/spec files: {files:?} do not match {blob}"
    );

    // Compilation: the package's files at their paths in a scratch dir, then `packaging`.
    let compile = common::temp_dir();
    fs::create_dir_all(compile.path().join("locker")).expect("mkdir");
    fs::copy(copy.join("blobs").join(&blob), compile.path().join(&blob)).expect("blob");
    let target = vm.vcap().join("packages/locker");
    fs::create_dir_all(&target).expect("package dir");
    run_ok(
        Command::new(release().join("packages/locker/packaging"))
            .current_dir(compile.path())
            .env("BOSH_INSTALL_TARGET", &target),
    );
    blob
}

#[test]
fn the_blob_scripts_feed_the_package_and_the_release_tarball() {
    let vm = FakeVm::new();
    install_package(&vm);
    let installed = vm.vcap().join("packages/locker/bin/locker");
    let output = run_ok(Command::new(&installed).arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("locker {}", env!("CARGO_PKG_VERSION"))
    );

    // create-release: a dev tarball by default, a final release with --final VERSION.
    let work = common::temp_dir();
    let copy = release_copy(work.path());
    let bosh = Stubs::new(&[("bosh", "")]);
    let create = |args: &[&str]| {
        Command::new(copy.join("scripts/create-release"))
            .args(args)
            .env("PATH", bosh.path_env())
            .output()
            .expect("run create-release")
    };
    let refused = create(&[]);
    assert!(!refused.status.success(), "no blob yet must be refused");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("add-blob"));
    fs::write(
        copy.join("config/blobs.yml"),
        "locker/locker-1.2.3-linux-amd64.tgz:\n  size: 1\n",
    )
    .expect("blobs.yml");
    assert!(create(&[]).status.success());
    let tarball = work.path().join("out/locker-1.2.3.tgz");
    assert!(
        create(&["--final", "1.2.3", tarball.to_str().unwrap()])
            .status
            .success()
    );
    assert_eq!(
        bosh.calls(),
        [
            format!(
                "bosh create-release --force --tarball {}",
                copy.join("dev_releases/locker-dev.tgz").display()
            ),
            format!(
                "bosh create-release --final --version 1.2.3 --tarball {}",
                tarball.display()
            ),
        ]
    );
}

#[test]
fn pre_start_hands_the_store_to_vcap_and_locks_the_key_down() {
    let pki = pki();
    let vm = FakeVm::new();
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

#[test]
fn the_deployed_job_serves_tls_and_auth_and_keeps_the_original_locks() {
    let pki = pki();
    let password = "s3cret: \"generated\"";
    let vm = FakeVm::new();
    install_package(&vm);
    let render = render_job(manifest_properties(&pki, password));
    vm.render_job(&render);

    // An upgrade from the original release: its state file is already on the persistent disk.
    let bpm = render.bpm();
    let process = bpm.process();
    let state_file = vm.path(&process.env["LOCKER_CONFIG"]);
    assert_eq!(state_file, vm.path("/var/vcap/store/locker/locker.yml"));
    fs::create_dir_all(state_file.parent().unwrap()).expect("store dir");
    fs::write(&state_file, ORIGINAL_STATE).expect("state file");

    // Start it as bpm would, from the fake tree, but on a free loopback port.
    let mut builder = common::server()
        .binary(vm.path(&process.executable))
        .state_file(&state_file);
    for (name, value) in &process.env {
        builder = builder.env(name, vm.rewrite(value));
    }
    for arg in &process.args {
        builder = builder.arg(vm.rewrite(arg));
    }
    let mut server = builder
        .env("PORT", "0")
        .env("LOCKER_LISTEN", "127.0.0.1")
        .start();
    assert!(server.base.starts_with("https://"), "{}", server.base);

    let ca = reqwest::Certificate::from_pem(pki.ca.as_bytes()).expect("CA");
    let client = reqwest::blocking::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let locks = |server: &common::Server| -> Json {
        let response = client
            .get(server.url("/locks"))
            .basic_auth("locker", Some(password))
            .send()
            .expect("GET /locks");
        assert_eq!(response.status(), 200);
        response.json().expect("locks JSON")
    };

    // TLS: trusted through the deployment's CA only; plain HTTP gets nowhere.
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

    // Basic auth with the manifest's user and the config server's password.
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

    // bpm stops with SIGTERM and kills after 20 s; the lock survives the restart.
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    let server = server.restart();
    assert_eq!(locks(&server)["b"]["key"], json!("k2"));
}

#[test]
fn the_deployed_job_with_defaults_serves_plain_http_without_auth() {
    let vm = FakeVm::new();
    // The package as installed (the TLS test goes through add-blob and packaging, which take
    // seconds to compress a debug binary; here a link to it will do).
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
    let mut builder = common::server()
        .binary(vm.path(&process.executable))
        .state_file(&state_file);
    for (name, value) in &process.env {
        builder = builder.env(name, vm.rewrite(value));
    }
    let server = builder
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

// ---------------------------------------------------------------------------------------------
// YAML and scripts everywhere

/// Files under `dir` (recursively), skipping build output.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(
                    name.as_str(),
                    "blobs" | "dev_releases" | ".dev_builds" | ".blobs"
                ) {
                    pending.push(path);
                }
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_yaml_file_of_the_release_and_the_pipeline_parses() {
    let mut parsed = 0;
    for dir in [release(), repo().join("ci")] {
        for path in files_under(&dir) {
            let name = path.file_name().unwrap().to_string_lossy();
            // Job and package specs are YAML without an extension.
            if name.ends_with(".yml") || name.ends_with(".yaml") || name == "spec" {
                let value = yaml_file(&path);
                assert!(!value.is_null(), "{} is empty", path.display());
                parsed += 1;
            }
        }
    }
    // final.yml, blobs.yml, 3 specs, 2 manifests, pipeline, 4 task files.
    assert!(parsed >= 12, "only {parsed} YAML files found");
}

#[test]
fn every_script_is_executable_and_parses() {
    let mut scripts: Vec<PathBuf> = files_under(&repo().join("ci/scripts"));
    scripts.extend(files_under(&release().join("scripts")));
    scripts.push(release().join("packages/locker/packaging"));
    scripts.push(repo().join(".ci/run"));
    for script in scripts {
        let mode = fs::metadata(&script)
            .expect("metadata")
            .permissions()
            .mode();
        assert!(
            mode & 0o111 == 0o111,
            "{} is not executable",
            script.display()
        );
        let text = read(&script);
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{}",
            script.display()
        );
        run_ok(Command::new("bash").arg("-n").arg(&script));
    }
    ruby();
    run_ok(
        Command::new(ruby())
            .arg("-c")
            .arg(release().join("test/render.rb")),
    );
}

#[test]
fn ci_run_installs_ruby_and_runs_the_test_command() {
    let run = read(&repo().join(".ci/run"));
    assert!(run.contains("command -v ruby"), "{run}");
    assert_eq!(
        run.trim_end().lines().last(),
        Some("cargo test --workspace --locked")
    );
}

// ---------------------------------------------------------------------------------------------
// The pipeline

/// Visits every step of a build plan, nested ones included.
fn visit_steps<'a>(steps: &'a [Yaml], visit: &mut dyn FnMut(&'a Yaml)) {
    for step in steps {
        visit(step);
        for nested in [
            "do",
            "try",
            "ensure",
            "on_success",
            "on_failure",
            "on_abort",
            "on_error",
        ] {
            match step.get(nested) {
                Some(Yaml::Sequence(inner)) => visit_steps(inner, visit),
                Some(single @ Yaml::Mapping(_)) => visit_steps(std::slice::from_ref(single), visit),
                _ => {}
            }
        }
        match step.get("in_parallel") {
            Some(Yaml::Sequence(inner)) => visit_steps(inner, visit),
            Some(parallel @ Yaml::Mapping(_)) => {
                visit_steps(parallel["steps"].as_sequence().expect("steps"), visit)
            }
            _ => {}
        }
    }
}

#[test]
fn the_pipeline_references_task_files_and_scripts_that_exist() {
    let pipeline = yaml_file(&repo().join("ci/pipeline.yml"));
    let resources: BTreeMap<String, String> = pipeline["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name").to_string(),
                r["type"].as_str().expect("type").to_string(),
            )
        })
        .collect();
    let jobs = pipeline["jobs"].as_sequence().expect("jobs");
    let job_names: BTreeSet<&str> = jobs.iter().map(|j| j["name"].as_str().unwrap()).collect();
    for wanted in ["test", "build-images", "build-bosh-release", "ship"] {
        assert!(job_names.contains(wanted), "no {wanted} job");
    }
    assert_eq!(resources["version"], "semver");
    assert_eq!(resources["locker"], "git");

    let mut task_files = BTreeSet::new();
    for job in jobs {
        let name = job["name"].as_str().unwrap();
        // Artifacts in order: what gets fetch and what tasks output.
        let mut artifacts: BTreeSet<String> = BTreeSet::new();
        let plan = job["plan"].as_sequence().expect("plan");
        visit_steps(plan, &mut |step| {
            if let Some(get) = step.get("get").and_then(Yaml::as_str) {
                let resource = step.get("resource").and_then(Yaml::as_str).unwrap_or(get);
                assert!(
                    resources.contains_key(resource),
                    "{name}: no resource {resource}"
                );
                for passed in step
                    .get("passed")
                    .and_then(Yaml::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        job_names.contains(passed.as_str().unwrap()),
                        "{name}: {passed:?}"
                    );
                }
                artifacts.insert(get.to_string());
            }
            if let Some(put) = step.get("put").and_then(Yaml::as_str) {
                assert!(resources.contains_key(put), "{name}: no resource {put}");
                // Params that name files must name fetched or produced artifacts.
                if let Some(params) = step.get("params").and_then(Yaml::as_mapping) {
                    for (key, value) in params {
                        let (Some(key), Some(value)) = (key.as_str(), value.as_str()) else {
                            continue;
                        };
                        if [
                            "image",
                            "repository",
                            "name",
                            "tag",
                            "version",
                            "additional_tags",
                        ]
                        .contains(&key)
                        {
                            let artifact = value.split('/').next().unwrap();
                            assert!(
                                artifacts.contains(artifact),
                                "{name}: put {put} {key}: {value} needs artifact {artifact}"
                            );
                        }
                    }
                }
            }
            if step.get("task").is_some() {
                let file = step["file"].as_str().expect("tasks come from files");
                let (input, path) = file.split_once('/').expect("input/path");
                assert_eq!(
                    input, "locker",
                    "{name}: task files live in this repository"
                );
                assert!(artifacts.contains(input), "{name}: {file} before get");
                let task_path = repo().join(path);
                assert!(task_path.is_file(), "{name}: {file} does not exist");
                let task = yaml_file(&task_path);
                for wanted in task["inputs"].as_sequence().into_iter().flatten() {
                    let optional = wanted.get("optional") == Some(&Yaml::from(true));
                    let input = wanted["name"].as_str().unwrap();
                    assert!(
                        optional || artifacts.contains(input),
                        "{name}: {file} needs input {input}"
                    );
                }
                for output in task["outputs"].as_sequence().into_iter().flatten() {
                    artifacts.insert(output["name"].as_str().unwrap().to_string());
                }
                task_files.insert(path.to_string());
            }
        });
    }

    // Every task file, referenced or not, runs a script that exists and is executable, or a
    // command of its image.
    let on_disk: BTreeSet<String> = files_under(&repo().join("ci/tasks"))
        .iter()
        .map(|p| p.strip_prefix(repo()).unwrap().display().to_string())
        .collect();
    assert_eq!(
        task_files, on_disk,
        "task files the pipeline uses vs. ci/tasks"
    );
    for file in &on_disk {
        let task = yaml_file(&repo().join(file));
        assert_eq!(task["platform"], Yaml::from("linux"), "{file}");
        assert!(
            task["image_resource"]["source"]["repository"].is_string(),
            "{file}"
        );
        let path = task["run"]["path"].as_str().expect("run.path");
        match path.split_once('/') {
            Some(("locker", script)) => {
                let script = repo().join(script);
                let mode = fs::metadata(&script)
                    .unwrap_or_else(|_| panic!("{file}: {} is missing", script.display()))
                    .permissions()
                    .mode();
                assert!(
                    mode & 0o111 == 0o111,
                    "{file}: {} is not executable",
                    script.display()
                );
            }
            Some(_) => panic!("{file}: {path} is outside the repository input"),
            None => {} // a command of the task's image, e.g. oci-build-task's `build`
        }
    }

    // The images are built by ci/scripts/build-images (tests/images.rs runs it), and both are
    // pushed from its docker-archives.
    let images = yaml_file(&repo().join("ci/tasks/build-images.yml"));
    assert_eq!(
        images["run"]["path"],
        Yaml::from("locker/ci/scripts/build-images-task")
    );
    let task_script = fs::read_to_string(repo().join("ci/scripts/build-images-task")).unwrap();
    assert!(task_script.contains("locker/ci/scripts/build-images \"${PWD}/images\""));
    let mut pushed = BTreeSet::new();
    for job in jobs {
        visit_steps(job["plan"].as_sequence().unwrap(), &mut |step| {
            if let Some(image) = step.get("params").and_then(|p| p.get("image")) {
                pushed.insert(image.as_str().unwrap().to_string());
            }
        });
    }
    assert_eq!(
        pushed,
        BTreeSet::from([
            "images/locker-resource.docker.tar".to_string(),
            "images/locker.docker.tar".to_string()
        ])
    );
    // ship triggers on the version, from commits that went through both builds.
    let ship = jobs.iter().find(|j| j["name"] == "ship").unwrap();
    let mut version_trigger = false;
    visit_steps(ship["plan"].as_sequence().unwrap(), &mut |step| {
        if step.get("get") == Some(&Yaml::from("version")) {
            version_trigger = step.get("trigger") == Some(&Yaml::from(true));
        }
    });
    assert!(version_trigger, "ship runs on a version bump");
}

// ---------------------------------------------------------------------------------------------
// The etcd backend

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

#[test]
fn the_etcd_ops_file_runs_several_instances_on_etcd() {
    let ops = yaml_file(&release().join("manifests/operations/etcd-backed.yml"));
    let ops = ops.as_sequence().expect("a list of operations");
    let manifest = yaml_file(&release().join("manifests/locker.yml"));
    let value_at = |path: &str| -> Yaml {
        ops.iter()
            .find(|op| op["path"].as_str() == Some(path))
            .map(|op| op["value"].clone())
            .unwrap_or_else(|| panic!("no operation on {path}"))
    };
    assert!(value_at("/instance_groups/name=locker/instances").as_u64() > Some(1));
    assert_eq!(
        value_at("/instance_groups/name=locker/jobs/name=locker/properties/locker/store?"),
        Yaml::from("etcd")
    );
    let etcd = value_at("/instance_groups/name=locker/jobs/name=locker/properties/locker/etcd?");
    assert!(etcd["endpoints"].is_string() && etcd["ca"].is_string());
    // The paths it replaces or removes without `?` exist in the manifest it is made for.
    let group = manifest["instance_groups"]
        .as_sequence()
        .and_then(|groups| groups.iter().find(|g| g["name"] == "locker"))
        .expect("locker instance group");
    for key in ["instances", "persistent_disk", "azs"] {
        assert!(group.get(key).is_some(), "{key}");
    }
}
