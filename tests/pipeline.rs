//! The project's Concourse pipeline (`ci/`) and every YAML file and script of the repository's
//! release and pipeline: each parses, scripts are executable, `.ci/run` runs the README's test
//! command, and the pipeline names task files and scripts that exist.

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use serde_yaml_ng::Value as Yaml;

use bosh::*;

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
        "\"openssl|openssl|",
        "\"git|git|",
        "\"../shared/tools/bosh,bosh|none: ",
        "\"${BOSH_ERB_RENDERER:-../shared/tools/bosh-erb-renderer.rb}|none: ",
        "\"root|none: ",
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
