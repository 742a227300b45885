//! Every manifest and ops-file combination the READMEs document goes through `bosh int
//! --vars-store --var-errs`; the locker job's properties it yields are rendered into every
//! template by the CLI's renderer, and the READMEs name every property and manifest.

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;

use serde_yaml_ng::Value as Yaml;

use bosh::*;

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
