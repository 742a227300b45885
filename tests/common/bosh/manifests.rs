//! The manifests and ops files the READMEs document, interpolated with `bosh int` and a
//! vars store, and the checks every locker job entry of them must pass.

use super::*;

/// `((name))` and `((name.field))` references in a YAML value, by variable name.
pub fn variable_references(value: &Yaml, found: &mut BTreeSet<String>) {
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
pub fn property_names(value: &Yaml, prefix: &str, found: &mut BTreeSet<String>) {
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

/// Checks a locker job entry of a manifest: known properties, production settings, and
/// variables that are defined (or given with -v).
pub fn check_locker_job(job: &Yaml, defined: &BTreeSet<String>, given: &[&str]) {
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

pub fn variables_of(list: &[Yaml]) -> BTreeMap<String, Yaml> {
    list.iter()
        .map(|v| (v["name"].as_str().expect("name").to_string(), v.clone()))
        .collect()
}

pub fn check_certificate_variables(variables: &BTreeMap<String, Yaml>) {
    assert_eq!(variables["locker_password"]["type"], Yaml::from("password"));
    assert_eq!(variables["locker_ca"]["type"], Yaml::from("certificate"));
    assert_eq!(variables["locker_ca"]["options"]["is_ca"], Yaml::from(true));
    assert_eq!(variables["locker_tls"]["type"], Yaml::from("certificate"));
    assert_eq!(
        variables["locker_tls"]["options"]["ca"],
        Yaml::from("locker_ca")
    );
}

/// A stand-in for the manifest colocate-with-concourse.yml is applied to (concourse-deployment's
/// cluster/concourse.yml, not in this repository): its `db` group, releases and variables.
pub const CONCOURSE_MANIFEST: &str = r#"---
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
pub struct Documented {
    pub name: &'static str,
    /// The manifest, relative to boshrelease/ (or the Concourse stand-in).
    pub manifest: PathBuf,
    pub ops_files: Vec<&'static str>,
    pub vars: Vec<(&'static str, &'static str)>,
    /// The instance group the locker job is in.
    pub group: &'static str,
}

/// Every manifest and ops-file combination boshrelease/README.md and docs/scaling-out.md
/// document, with the values they pass. `locker_host` is 127.0.0.1 so the generated
/// certificate serves the tests' loopback server.
pub fn documented_deployments(dir: &Path) -> Vec<Documented> {
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
pub fn interpolate(deployment: &Documented, dir: &Path) -> Yaml {
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
pub fn locker_properties(manifest: &Yaml, group: &str) -> Json {
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

/// The standalone manifest's locker properties after `bosh int` with a vars store: the
/// password and certificates generated as the config server would (locker_host 127.0.0.1).
pub fn standalone_properties(dir: &Path) -> Json {
    let deployments = documented_deployments(dir);
    let standalone = deployments
        .iter()
        .find(|d| d.name == "standalone")
        .expect("standalone deployment");
    locker_properties(&interpolate(standalone, dir), standalone.group)
}
