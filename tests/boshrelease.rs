//! The BOSH release (`boshrelease/`) and the project's Concourse pipeline (`ci/`), tested with the
//! real BOSH CLI and its template renderer; only what needs a director is stood in for.
//!
//! Which tools: the BOSH CLI is `../shared/tools/bosh` beside the repository when it is there,
//! else the `bosh` on PATH; the renderer is the CLI's own `bosh-erb-renderer.rb`
//! (`../shared/tools/`, or `$BOSH_ERB_RENDERER`). Each test run prints the ones it used.
//!
//! - The release is built as an operator would, in a fresh copy of the repository's tracked files
//!   (a clone holds no untracked or ignored file, and no empty directory): `scripts/add-blob` with
//!   the statically linked binary of `ci/scripts/build-static` (built once per run), then
//!   `scripts/create-release` (dev, and final with a local blobstore), `bosh
//!   inspect-local-release`, and the tarball's job and package compared with the specs.
//! - Every manifest and ops-file combination the READMEs document goes through `bosh int
//!   --vars-store --var-errs`; the locker job's properties it yields are rendered into every
//!   template by the CLI's renderer. The renderer cannot resolve links (a director does), so
//!   the link test computes the provided link from the job spec and gives it to the consumer
//!   through a small `link()` shim: the only stand-in for the director.
//! - The rendered job is laid out under a fake `/var/vcap` in a temp dir with the package
//!   installed from the release tarball by its `packaging` script, prepared by `pre-start` (with
//!   a recording `chown`: there is no vcap user here) and run as the rendered `bpm.yml` says.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

fn stdout_of(command: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(command).stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The tools: bosh, its renderer, Ruby

/// A program on PATH, by name.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The BOSH CLI these tests use: `../shared/tools/bosh` beside the repository, else `bosh` on
/// PATH. Printed once per run (with its version), so a run says which it used.
fn bosh() -> &'static Path {
    static BOSH: OnceLock<PathBuf> = OnceLock::new();
    BOSH.get_or_init(|| {
        let shared = repo().join("../shared/tools/bosh");
        let (path, origin) = if shared.is_file() {
            (
                fs::canonicalize(&shared).expect("bosh path"),
                "../shared/tools/bosh",
            )
        } else if let Some(found) = on_path("bosh") {
            (found, "PATH")
        } else {
            panic!(
                "no BOSH CLI: the release tests need the real `bosh` (../shared/tools/bosh beside \
                 the repository, or on PATH; https://bosh.io/docs/cli-v2-install/)"
            )
        };
        let version = stdout_of(Command::new(&path).arg("--version"));
        eprintln!(
            "boshrelease tests: BOSH CLI {} (from {origin}): {}",
            path.display(),
            version.trim()
        );
        path
    })
}

/// PATH with the chosen `bosh` first, for scripts that call `bosh`.
fn path_with_bosh() -> String {
    format!(
        "{}:{}",
        bosh().parent().expect("bosh dir").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The BOSH CLI's job-template renderer: `$BOSH_ERB_RENDERER`, else
/// `../shared/tools/bosh-erb-renderer.rb` beside the repository. Printed once per run.
fn renderer() -> &'static Path {
    static RENDERER: OnceLock<PathBuf> = OnceLock::new();
    RENDERER.get_or_init(|| {
        let path = std::env::var_os("BOSH_ERB_RENDERER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("../shared/tools/bosh-erb-renderer.rb"));
        assert!(
            path.is_file(),
            "no BOSH template renderer at {}: set BOSH_ERB_RENDERER to the bosh CLI's \
             bosh-erb-renderer.rb",
            path.display()
        );
        let path = fs::canonicalize(&path).expect("renderer path");
        eprintln!("boshrelease tests: template renderer {}", path.display());
        path
    })
}

/// The `ruby` interpreter. These tests need it: fail loudly, never skip.
fn ruby() -> &'static str {
    let found = Command::new("ruby")
        .arg("--version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "Ruby is missing: the BOSH template renderer is Ruby. Install it \
         (`apt-get install -y ruby`; ci/scripts/run-tests does this on a fresh machine)."
    );
    "ruby"
}

// ---------------------------------------------------------------------------------------------
// Rendering with the CLI's renderer

/// A job's spec: its templates and its properties' defaults.
fn job_spec(job: &Path) -> Yaml {
    yaml_file(&job.join("spec"))
}

/// The renderer's context for one instance of `job` with the manifest's job `properties`
/// (nested as in a manifest): the fields the CLI fills in (templatescompiler's
/// job_evaluation_context.go), defaults from the job spec.
fn render_context(job: &Path, properties: &Json) -> Json {
    let spec = job_spec(job);
    let mut defaults = serde_json::Map::new();
    for (name, definition) in spec["properties"].as_mapping().into_iter().flatten() {
        let default = definition.get("default").cloned().unwrap_or(Yaml::Null);
        defaults.insert(
            name.as_str().expect("property name").to_string(),
            serde_json::to_value(default).expect("default as JSON"),
        );
    }
    json!({
        "index": 0,
        "id": "b7a5c2de-0a16-4a5e-9a31-5a0c1a1e7b01",
        "az": "z1",
        "bootstrap": true,
        "job": {"name": spec["name"].as_str().expect("job name")},
        "deployment": "locker",
        "address": "10.0.0.5",
        "networks": {"default": {"ip": "10.0.0.5", "default": ["dns", "gateway"]}},
        "global_properties": {},
        "cluster_properties": {},
        "job_properties": properties,
        "default_properties": defaults,
    })
}

/// A `link()` for the renderer, which has none: consumed links come from the JSON file in
/// `$LOCKER_TEST_LINKS` (name → {properties, address}). A stand-in for the director, test only.
const LINK_SHIM: &str = r#"
require 'json'
class TestLink
  attr_reader :address
  def initialize(definition)
    @properties = definition['properties'] || {}
    @address = definition['address']
  end
  def lookup(name)
    name.split('.').reduce(@properties) { |node, key| node.is_a?(Hash) ? node[key] : nil }
  end
  def p(*args)
    names = Array(args[0])
    names.each { |name| value = lookup(name); return value unless value.nil? }
    return args[1] if args.length == 2
    raise "Can't find link property '#{names.join("', or '")}'"
  end
  def if_p(*names)
    values = names.map { |name| lookup(name) }
    return nil if values.any?(&:nil?)
    yield(*values)
  end
end
class TemplateEvaluationContext
  def link(name)
    links = JSON.parse(File.read(ENV.fetch('LOCKER_TEST_LINKS')))
    TestLink.new(links.fetch(name) { raise "Can't find link '#{name}'" })
  end
end
"#;

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
    /// The rendered template, or the renderer's message (the template's `raise`).
    fn try_template(&self, template: &str) -> Result<String, String> {
        let dir = common::temp_dir();
        let context = dir.path().join("context.json");
        fs::write(
            &context,
            render_context(&self.job, &self.properties).to_string(),
        )
        .expect("write context");
        let out = dir.path().join("out");
        let mut command = Command::new(ruby());
        if !self.links.is_empty() {
            let shim = dir.path().join("link_shim.rb");
            fs::write(&shim, LINK_SHIM).expect("write shim");
            let links: serde_json::Map<String, Json> = self.links.iter().cloned().collect();
            let file = dir.path().join("links.json");
            fs::write(&file, Json::Object(links).to_string()).expect("write links");
            command.arg("-r").arg(&shim).env("LOCKER_TEST_LINKS", &file);
        }
        let output = command
            .arg(renderer())
            .arg(&context)
            .arg(self.job.join("templates").join(template))
            .arg(&out)
            .output()
            .expect("run the renderer");
        if output.status.success() {
            Ok(read(&out))
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // "... Error filling in template '...' for locker/0 (line 5: #<RuntimeError: MESSAGE>)"
            Err(stderr
                .lines()
                .find(|line| line.contains("Error filling in template"))
                .unwrap_or(&stderr)
                .to_string())
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

    /// The job's `locker` link as the director would give it to a consumer: the properties the
    /// spec's `provides` lists, with their values (the manifest's, else the defaults), and the
    /// instance's address.
    fn provided_link(&self) -> Json {
        let spec = job_spec(&self.job);
        let provides = spec["provides"]
            .as_sequence()
            .and_then(|links| links.iter().find(|l| l["name"] == "locker"))
            .expect("the job provides a locker link");
        let context = render_context(&self.job, &self.properties);
        let mut properties = json!({});
        for name in provides["properties"]
            .as_sequence()
            .expect("link properties")
        {
            let name = name.as_str().expect("property name");
            let given = name
                .split('.')
                .try_fold(&self.properties, |node, key| node.get(key));
            let value = given
                .cloned()
                .unwrap_or_else(|| context["default_properties"][name].clone());
            if value.is_null() {
                continue;
            }
            let mut node = &mut properties;
            let keys: Vec<&str> = name.split('.').collect();
            for key in &keys[..keys.len() - 1] {
                node = node
                    .as_object_mut()
                    .expect("object")
                    .entry(key.to_string())
                    .or_insert_with(|| json!({}));
            }
            node[keys[keys.len() - 1]] = value;
        }
        json!({"properties": properties, "address": context["address"]})
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
        ("LOCKER_SHUTDOWN_GRACE", "10s"),
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
        "max_locks": 5000,
        "max_requestors": 20,
        "head_timeout": "10s",
        "max_connections": 3000,
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

/// A stand-in for the manifest colocate-with-concourse.yml is applied to (concourse-deployment's
/// cluster/concourse.yml, not in this repository): its `db` group, releases and variables.
const CONCOURSE_MANIFEST: &str = r#"---
name: ((deployment_name))
releases:
- name: concourse
  version: latest
- name: bpm
  version: latest
instance_groups:
- name: web
  instances: 1
  azs: [z1]
  networks: [{name: ((network_name))}]
  stemcell: xenial
  vm_type: default
  jobs:
  - name: bpm
    release: bpm
- name: db
  instances: 1
  azs: [z1]
  networks: [{name: ((network_name))}]
  stemcell: xenial
  vm_type: default
  persistent_disk_type: large
  jobs:
  - name: postgres
    release: postgres
variables:
- name: postgres_password
  type: password
"#;

/// A deployment the READMEs document: a manifest, ops files and `-v` values.
struct Documented {
    name: &'static str,
    /// The manifest, relative to boshrelease/ (or the Concourse stand-in).
    manifest: PathBuf,
    ops_files: Vec<&'static str>,
    vars: Vec<(&'static str, &'static str)>,
    /// The instance group the locker job is in.
    group: &'static str,
}

/// Every manifest and ops-file combination boshrelease/README.md and docs/scaling-out.md
/// document, with the values they pass. `locker_host` is 127.0.0.1 so the generated
/// certificate serves the tests' loopback server.
fn documented_deployments(dir: &Path) -> Vec<Documented> {
    let concourse = dir.join("concourse.yml");
    fs::write(&concourse, CONCOURSE_MANIFEST).expect("write concourse manifest");
    vec![
        Documented {
            name: "standalone",
            manifest: release().join("manifests/locker.yml"),
            ops_files: vec![],
            vars: vec![("locker_host", "127.0.0.1")],
            group: "locker",
        },
        Documented {
            name: "etcd-backed",
            manifest: release().join("manifests/locker.yml"),
            ops_files: vec!["manifests/operations/etcd-backed.yml"],
            vars: vec![
                ("locker_host", "127.0.0.1"),
                (
                    "etcd_endpoints",
                    "[https://10.0.0.5:2379,https://10.0.0.6:2379,https://10.0.0.7:2379]",
                ),
            ],
            group: "locker",
        },
        Documented {
            name: "colocated with Concourse",
            manifest: concourse,
            ops_files: vec!["manifests/operations/colocate-with-concourse.yml"],
            vars: vec![
                ("locker_host", "127.0.0.1"),
                ("network_name", "default"),
                ("deployment_name", "concourse"),
            ],
            group: "db",
        },
    ]
}

/// `bosh int` of a documented deployment with a fresh vars store: variables generated as the
/// config server would, every `((variable))` filled in (`--var-errs` fails on any left).
fn interpolate(deployment: &Documented, dir: &Path) -> Yaml {
    let mut command = Command::new(bosh());
    command
        .current_dir(release())
        .arg("interpolate")
        .arg(&deployment.manifest);
    for ops in &deployment.ops_files {
        command.arg("-o").arg(ops);
    }
    for (name, value) in &deployment.vars {
        command.arg("-v").arg(format!("{name}={value}"));
    }
    command
        .arg("--vars-store")
        .arg(dir.join(format!("{}-vars.yml", deployment.name.replace(' ', "-"))))
        .arg("--var-errs");
    let output = command.output().expect("run bosh int");
    assert!(
        output.status.success(),
        "{}: bosh int failed: {}",
        deployment.name,
        output_text(&output)
    );
    serde_yaml_ng::from_slice(&output.stdout).expect("interpolated manifest")
}

/// The locker job's properties of an interpolated manifest, as JSON for the renderer.
fn locker_properties(manifest: &Yaml, group: &str) -> Json {
    let group = manifest["instance_groups"]
        .as_sequence()
        .and_then(|groups| groups.iter().find(|g| g["name"] == group))
        .unwrap_or_else(|| panic!("no instance group {group}"));
    let job = group["jobs"]
        .as_sequence()
        .and_then(|jobs| jobs.iter().find(|j| j["name"] == "locker"))
        .expect("locker job");
    serde_json::to_value(&job["properties"]).expect("properties as JSON")
}

#[test]
fn every_documented_deployment_interpolates_and_renders_every_template() {
    let dir = common::temp_dir();
    let deployments = documented_deployments(dir.path());
    // Each ops file is in some documented deployment.
    let covered: BTreeSet<&str> = deployments
        .iter()
        .flat_map(|d| d.ops_files.iter().copied())
        .collect();
    for path in files_under(&release().join("manifests/operations")) {
        let relative = path.strip_prefix(release()).unwrap().display().to_string();
        assert!(
            covered.contains(relative.as_str()),
            "{relative} is in no documented deployment"
        );
        let readme = read(&release().join("README.md"));
        assert!(
            readme.contains(&relative),
            "README.md does not mention {relative}"
        );
    }
    for deployment in &deployments {
        let manifest = interpolate(deployment, dir.path());
        let properties = locker_properties(&manifest, deployment.group);
        let render = render_job(properties.clone());
        for template in spec_templates().keys() {
            render
                .try_template(template)
                .unwrap_or_else(|e| panic!("{}: {template}: {e}", deployment.name));
        }
        let env = render.bpm().process().env.clone();
        assert_eq!(env["AUTH_USER"], "locker", "{}", deployment.name);
        assert_eq!(
            env["AUTH_PASS"],
            properties["locker"]["password"].as_str().expect("password"),
            "{}: the generated password",
            deployment.name
        );
        assert!(
            env["SSL_CERT"].ends_with("/server.crt"),
            "{}",
            deployment.name
        );
        assert!(
            render
                .template("certs/server.crt.erb")
                .contains("BEGIN CERTIFICATE"),
            "{}: the generated certificate",
            deployment.name
        );
        let group = manifest["instance_groups"]
            .as_sequence()
            .and_then(|groups| groups.iter().find(|g| g["name"] == deployment.group))
            .expect("group");
        if deployment.name == "etcd-backed" {
            assert_eq!(env["LOCKER_STORE"], "etcd");
            assert_eq!(
                env["LOCKER_ETCD_ENDPOINTS"],
                "https://10.0.0.5:2379,https://10.0.0.6:2379,https://10.0.0.7:2379"
            );
            assert!(env.contains_key("LOCKER_ETCD_CA") && env.contains_key("LOCKER_ETCD_CERT"));
            // The client certificate is signed by the generated etcd CA.
            let ca = properties["locker"]["etcd"]["ca"]
                .as_str()
                .expect("etcd ca");
            assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
            assert!(group.get("persistent_disk").is_none());
            let instances = group["instances"].as_u64().expect("instances");
            let azs = group["azs"].as_sequence().expect("azs").len() as u64;
            assert!(instances > 1 && azs == instances, "{group:?}");
            assert!(!render.bpm().process().persistent_disk);
        } else {
            assert!(!env.contains_key("LOCKER_STORE"), "{}", deployment.name);
            assert!(render.bpm().process().persistent_disk);
        }
    }
}

/// Checks that the etcd client certificate the vars store holds was signed by its etcd CA.
#[test]
fn the_etcd_ops_file_generates_its_ca_and_signs_the_client_certificate_with_it() {
    let dir = common::temp_dir();
    let deployments = documented_deployments(dir.path());
    let etcd = deployments
        .iter()
        .find(|d| d.name == "etcd-backed")
        .expect("etcd deployment");
    interpolate(etcd, dir.path());
    let store = yaml_file(&dir.path().join("etcd-backed-vars.yml"));
    let ca = store["etcd_ca"]["certificate"].as_str().expect("etcd_ca");
    let client = store["locker_etcd_client"]["certificate"]
        .as_str()
        .expect("client certificate");
    assert_eq!(
        store["locker_etcd_client"]["ca"].as_str(),
        Some(ca),
        "locker_etcd_client is signed by etcd_ca"
    );
    let ca_file = dir.path().join("ca.pem");
    let client_file = dir.path().join("client.pem");
    fs::write(&ca_file, ca).expect("write");
    fs::write(&client_file, client).expect("write");
    let verified = stdout_of(
        Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca_file)
            .arg("-purpose")
            .arg("sslclient")
            .arg(&client_file),
    );
    assert!(verified.contains(": OK"), "{verified}");
}

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

/// Commands on PATH that only record their calls (pre-start's `chown`: there is no vcap user
/// here), one line each in `calls.log`.
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

// ---------------------------------------------------------------------------------------------
// The release, built from a fresh clone

/// The statically linked server binary of `ci/scripts/build-static`, built once per test run
/// (minutes with fat LTO the first time; cargo's cache after). The script builds into the
/// repository's target dir, or `$CARGO_TARGET_DIR`.
fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let started = Instant::now();
        let output = run_ok(
            Command::new(repo().join("ci/scripts/build-static"))
                .current_dir(repo())
                .stderr(std::process::Stdio::inherit()),
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let binary = PathBuf::from(stdout.lines().last().expect("the binary's path").trim());
        assert!(binary.is_file(), "{} is missing", binary.display());
        eprintln!(
            "boshrelease tests: built {} in {:.0?}",
            binary.display(),
            started.elapsed()
        );
        binary
    })
}

/// A fresh clone of the repository as it would be committed: its tracked files (as they are in
/// the work tree) in a new git repository, with no ignored file (no blobs, no target/) and no
/// empty directory, as `git clone` gives.
fn fresh_clone(into: &Path) -> PathBuf {
    let clone = into.join("locker");
    let listed = run_ok(
        Command::new("git")
            .current_dir(repo())
            .args(["ls-files", "-z"]),
    );
    for name in listed.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let from = repo().join(&name);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = clone.join(&name);
        fs::create_dir_all(to.parent().unwrap()).expect("mkdir");
        fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {name}: {e}"));
    }
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .current_dir(&clone)
                .args([
                    "-c",
                    "user.name=test",
                    "-c",
                    "user.email=test@locker.invalid",
                ])
                .args(args),
        )
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "fresh clone"]);
    clone
}

/// Runs a script of the clone with the chosen `bosh` on PATH.
fn run_script(clone: &Path, script: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(clone.join(script));
    command
        .current_dir(clone)
        .args(args)
        .env("PATH", path_with_bosh());
    for (name, value) in env {
        command.env(name, value);
    }
    run_ok(&mut command)
}

/// `bosh inspect-local-release --json`: the jobs and packages tables, as name → version.
fn inspect(tarball: &Path) -> (Json, Vec<String>, Vec<String>) {
    let output = stdout_of(
        Command::new(bosh())
            .args(["inspect-local-release", "--json"])
            .arg(tarball),
    );
    let report: Json = serde_json::from_str(&output).expect("inspect JSON");
    let names = |table: &Json| -> Vec<String> {
        table["Rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| {
                row["job"]
                    .as_str()
                    .or(row["package"].as_str())
                    .expect("name")
            })
            .map(|name| name.split('/').next().unwrap().to_string())
            .collect()
    };
    let tables = report["Tables"].as_array().expect("tables");
    let jobs = tables
        .iter()
        .find(|t| t["Rows"][0].get("job").is_some())
        .expect("jobs table");
    let packages = tables
        .iter()
        .find(|t| t["Rows"][0].get("package").is_some())
        .expect("packages table");
    (report.clone(), names(jobs), names(packages))
}

/// Unpacks a (gzipped) tarball into `into`.
fn untar(tarball: &Path, into: &Path) {
    fs::create_dir_all(into).expect("mkdir");
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball)
            .arg("-C")
            .arg(into),
    );
}

/// The locker blob's entry in config/blobs.yml: (name, sha).
fn blob_entry(release: &Path) -> (String, String) {
    let blobs = yaml_file(&release.join("config/blobs.yml"));
    let entries = blobs.as_mapping().expect("blobs map");
    assert_eq!(entries.len(), 1, "one blob: {blobs:?}");
    let (name, entry) = entries.iter().next().unwrap();
    (
        name.as_str().expect("name").to_string(),
        entry["sha"].as_str().expect("sha").to_string(),
    )
}

/// Checks a release tarball against the job and package specs of the release it came from,
/// and returns its locker package unpacked into `into`.
fn check_tarball(tarball: &Path, version: Option<&str>, into: &Path) -> PathBuf {
    let (report, jobs, packages) = inspect(tarball);
    assert_eq!(jobs, ["locker"], "{report}");
    assert_eq!(packages, ["locker"], "{report}");
    let unpacked = into.join("release");
    untar(tarball, &unpacked);
    let manifest = yaml_file(&unpacked.join("release.MF"));
    assert_eq!(manifest["name"], Yaml::from("locker"));
    if let Some(version) = version {
        assert_eq!(manifest["version"], Yaml::from(version));
    }

    // The job: templates, packages and properties as jobs/locker/spec says.
    let job = into.join("job");
    untar(&unpacked.join("jobs/locker.tgz"), &job);
    let job_manifest = yaml_file(&job.join("job.MF"));
    let spec = yaml_file(&job_dir().join("spec"));
    for key in ["name", "templates", "packages", "properties", "provides"] {
        assert_eq!(job_manifest[key], spec[key], "job.MF {key}");
    }
    for template in spec_templates().keys() {
        assert_eq!(
            read(&job.join("templates").join(template)),
            read(&job_dir().join("templates").join(template)),
            "{template}"
        );
    }
    assert_eq!(read(&job.join("monit")), read(&job_dir().join("monit")));

    // The package: its spec's files (the blob) and the packaging script.
    let package = into.join("package");
    untar(&unpacked.join("packages/locker.tgz"), &package);
    let package_spec = yaml_file(&release().join("packages/locker/spec"));
    assert_eq!(package_spec["files"].as_sequence().map(Vec::len), Some(1));
    let blob = format!(
        "locker/locker-{}-linux-amd64.tgz",
        env!("CARGO_PKG_VERSION")
    );
    assert!(package.join(&blob).is_file(), "the package holds {blob}");
    assert_eq!(
        read(&package.join("packaging")),
        read(&release().join("packages/locker/packaging"))
    );
    package
}

/// Installs an unpacked package as a BOSH compilation VM would: `packaging` run in the
/// package's files with BOSH_INSTALL_TARGET.
fn compile_package(package: &Path, vm: &FakeVm) -> PathBuf {
    let target = vm.vcap().join("packages/locker");
    fs::create_dir_all(&target).expect("package dir");
    run_ok(
        Command::new("bash")
            .arg("packaging")
            .current_dir(package)
            .env("BOSH_INSTALL_TARGET", &target),
    );
    target.join("bin/locker")
}

#[test]
fn the_release_builds_from_a_fresh_clone_with_the_real_cli() {
    let binary = static_binary();
    let work = common::temp_dir();
    let clone = fresh_clone(work.path());
    let release = clone.join("boshrelease");

    // A blob of an earlier version, which add-blob must replace.
    let old = work.path().join("old.tgz");
    fs::write(&old, "old").expect("write");
    run_ok(
        Command::new(bosh())
            .current_dir(&release)
            .arg("add-blob")
            .arg(&old)
            .arg("locker/locker-0.0.1-linux-amd64.tgz"),
    );
    run_script(
        &clone,
        "boshrelease/scripts/add-blob",
        &[],
        &[("LOCKER_BINARY", binary)],
    );
    let (blob, sha) = blob_entry(&release);
    assert_eq!(
        blob,
        format!(
            "locker/locker-{}-linux-amd64.tgz",
            env!("CARGO_PKG_VERSION")
        )
    );
    // Reproducible: the same binary, added again, is the same blob.
    run_script(
        &clone,
        "boshrelease/scripts/add-blob",
        &[],
        &[("LOCKER_BINARY", binary)],
    );
    assert_eq!(blob_entry(&release), (blob.clone(), sha.clone()));

    // A dev release, from the uncommitted blobs.yml.
    run_script(&clone, "boshrelease/scripts/create-release", &[], &[]);
    let dev = release.join("dev_releases/locker-dev.tgz");
    check_tarball(&dev, None, &work.path().join("dev"));

    // A final release into a local blobstore, as the pipeline's ship job does it with S3.
    let blobstore = work.path().join("blobstore");
    fs::create_dir_all(&blobstore).expect("blobstore");
    fs::write(
        release.join("config/final.yml"),
        format!(
            "---\nname: locker\nblobstore:\n  provider: local\n  options:\n    blobstore_path: {}\n",
            blobstore.display()
        ),
    )
    .expect("final.yml");
    run_ok(
        Command::new(bosh())
            .current_dir(&release)
            .arg("upload-blobs"),
    );
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .current_dir(&clone)
                .args([
                    "-c",
                    "user.name=test",
                    "-c",
                    "user.email=test@locker.invalid",
                ])
                .args(args),
        )
    };
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "blob"]);
    let final_tarball = work.path().join("out/locker-1.2.3.tgz");
    run_script(
        &clone,
        "boshrelease/scripts/create-release",
        &["--final", "1.2.3", final_tarball.to_str().unwrap()],
        &[],
    );
    let package = check_tarball(&final_tarball, Some("1.2.3"), &work.path().join("final"));
    assert!(release.join("releases/locker/locker-1.2.3.yml").is_file());
    assert!(fs::read_dir(&blobstore).expect("blobstore").count() > 0);

    // The package installs the static binary, which runs without any libc of the stemcell.
    let vm = FakeVm::new();
    let installed = compile_package(&package, &vm);
    let version = stdout_of(Command::new(&installed).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("locker {}", env!("CARGO_PKG_VERSION"))
    );
    let file = stdout_of(Command::new("file").arg("-L").arg(&installed));
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "{file}"
    );
    assert!(!file.contains("interpreter"), "{file}");
    let ldd = Command::new("ldd").arg(&installed).output().expect("ldd");
    let ldd = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "{ldd}"
    );
}

#[test]
fn the_pipeline_task_creates_a_dev_release_from_a_fresh_clone() {
    let binary = static_binary();
    let root = common::temp_dir();
    let clone = fresh_clone(root.path());
    for dir in ["compiled", "release", "final-repo"] {
        fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    fs::copy(binary, root.path().join("compiled/locker")).expect("copy binary");
    run_ok(
        Command::new(clone.join("ci/scripts/create-bosh-release"))
            .current_dir(root.path())
            .env("PATH", path_with_bosh())
            .env_remove("FINAL"),
    );
    let commit =
        stdout_of(
            Command::new("git")
                .current_dir(&clone)
                .args(["rev-parse", "--short", "HEAD"]),
        );
    let tarball = root
        .path()
        .join(format!("release/locker-dev-{}.tgz", commit.trim()));
    check_tarball(&tarball, None, &root.path().join("check"));
    assert_eq!(
        read(&root.path().join("release/name")).trim(),
        format!("locker dev {}", commit.trim())
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

/// The standalone manifest's locker properties after `bosh int` with a vars store: the
/// password and certificates generated as the config server would (locker_host 127.0.0.1).
fn standalone_properties(dir: &Path) -> Json {
    let deployments = documented_deployments(dir);
    let standalone = deployments
        .iter()
        .find(|d| d.name == "standalone")
        .expect("standalone deployment");
    locker_properties(&interpolate(standalone, dir), standalone.group)
}

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
    let vm = FakeVm::new();
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
    let vm = FakeVm::new();
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
}

#[test]
fn ci_run_runs_exactly_the_readme_test_command() {
    let run = read(&repo().join(".ci/run"));
    assert_eq!(
        run.trim_end().lines().last(),
        Some(r#"exec "$(dirname "$0")/../ci/scripts/run-tests""#),
        "{run}"
    );
    let readme = read(&repo().join("README.md"));
    assert!(
        readme.contains("\n    ci/scripts/run-tests\n"),
        "README lacks the test command"
    );
    // It installs (or names) what the tests need, then checks and tests everything.
    let script = read(&repo().join("ci/scripts/run-tests"));
    for text in [
        "set -euo pipefail",
        "\"ruby|ruby|",
        "\"protoc|protobuf-compiler|",
        "\"etcd|etcd-server|",
        "\"chromedriver|chromium-driver|",
        "\"fiu-run|fiu-utils|",
        "\"musl-gcc|musl-tools|",
        "\"file|file|",
        "rustup target add x86_64-unknown-linux-musl",
        "apt-get install",
        "cargo fmt --all -- --check",
        "cargo clippy --workspace --all-targets --locked --all-features -- -D warnings",
        "cargo test --workspace --locked --all-features",
    ] {
        assert!(script.contains(text), "run-tests lacks {text:?}");
    }
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
    // It generates the CA its client certificate is signed by.
    let etcd_ca = value_at("/variables/name=etcd_ca?");
    assert_eq!(etcd_ca["type"], Yaml::from("certificate"));
    assert_eq!(etcd_ca["options"]["is_ca"], Yaml::from(true));
    let client = value_at("/variables/name=locker_etcd_client?");
    assert_eq!(client["options"]["ca"], Yaml::from("etcd_ca"));
}

#[test]
fn the_readme_documents_every_property_and_manifest() {
    let readme = read(&release().join("README.md"));
    for name in declared_properties() {
        // A row names it whole (`locker.etcd.ca`) or by its last part after its group
        // (`locker.ssl_cert`, `locker.ssl_key` → `ssl_key`).
        let last = name.rsplit('.').next().unwrap();
        assert!(
            readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{last}`")),
            "boshrelease/README.md does not document {name}"
        );
    }
    for path in files_under(&release().join("manifests")) {
        let relative = path.strip_prefix(release()).unwrap().display().to_string();
        assert!(
            readme.contains(&relative),
            "README.md layout misses {relative}"
        );
    }
    assert!(!readme.contains("test/render.rb"), "the harness is gone");
}
