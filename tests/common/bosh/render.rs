//! Rendering the locker job's templates with the BOSH CLI's renderer, as a director would
//! (links aside: a small shim stands in for them), and reading what they say.

use super::*;

// ---------------------------------------------------------------------------------------------
// Rendering with the CLI's renderer

/// A job's spec: its templates and its properties' defaults.
pub fn job_spec(job: &Path) -> Yaml {
    yaml_file(&job.join("spec"))
}

/// The renderer's context for one instance of `job` with the manifest's job `properties`
/// (nested as in a manifest): the fields the CLI fills in (templatescompiler's
/// job_evaluation_context.go), defaults from the job spec.
pub fn render_context(job: &Path, properties: &Json) -> Json {
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
pub const LINK_SHIM: &str = r#"
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
pub struct Render {
    pub job: PathBuf,
    pub properties: Json,
    pub links: Vec<(String, Json)>,
}

pub fn render_job(properties: Json) -> Render {
    Render {
        job: job_dir(),
        properties,
        links: Vec::new(),
    }
}

impl Render {
    /// The rendered template, or the renderer's message (the template's `raise`).
    pub fn try_template(&self, template: &str) -> Result<String, String> {
        let dir = crate::common::temp_dir();
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

    pub fn template(&self, template: &str) -> String {
        self.try_template(template)
            .unwrap_or_else(|e| panic!("rendering {template} failed: {e}"))
    }

    pub fn bpm(&self) -> Bpm {
        let text = self.template("bpm.yml.erb");
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("bpm.yml: {e}\n{text}"))
    }

    /// The job's `locker` link as the director would give it to a consumer: the properties the
    /// spec's `provides` lists, with their values (the manifest's, else the defaults), and the
    /// instance's address.
    pub fn provided_link(&self) -> Json {
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
pub struct Bpm {
    pub processes: Vec<BpmProcess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpmProcess {
    pub name: String,
    pub executable: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub persistent_disk: bool,
    pub limits: Option<BpmLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpmLimits {
    pub open_files: Option<u64>,
}

impl Bpm {
    pub fn process(&self) -> &BpmProcess {
        assert_eq!(self.processes.len(), 1, "one process: {self:?}");
        &self.processes[0]
    }
}

pub fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The env a deployment with only defaults gets.
pub fn default_env() -> BTreeMap<String, String> {
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
pub fn spec_templates() -> BTreeMap<String, String> {
    let spec = yaml_file(&job_dir().join("spec"));
    serde_yaml_ng::from_value(spec["templates"].clone()).expect("templates map")
}

/// Where a template lands on the VM.
pub fn destination(template: &str) -> String {
    let templates = spec_templates();
    let to = templates
        .get(template)
        .unwrap_or_else(|| panic!("{template} is not in the job spec"));
    format!("/var/vcap/jobs/locker/{to}")
}

// ---------------------------------------------------------------------------------------------
// Certificates

pub struct Pki {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as the config server would make.
pub fn pki() -> Pki {
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

pub fn declared_properties() -> BTreeSet<String> {
    let spec = yaml_file(&job_dir().join("spec"));
    spec["properties"]
        .as_mapping()
        .expect("properties")
        .keys()
        .map(|k| k.as_str().expect("name").to_string())
        .collect()
}
