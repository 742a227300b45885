//! The release built as an operator would (a fresh clone, `scripts/add-blob` with the static
//! binary, `scripts/create-release`), checked against its specs, and a fake `/var/vcap` to
//! install and run the job in.

use super::*;

/// A temp dir standing in for `/`, holding `var/vcap`.
pub struct FakeVm {
    pub root: tempfile::TempDir,
}

/// A fresh, empty tree.
impl Default for FakeVm {
    fn default() -> FakeVm {
        FakeVm {
            root: crate::common::temp_dir(),
        }
    }
}

impl FakeVm {
    pub fn vcap(&self) -> PathBuf {
        self.root.path().join("var/vcap")
    }

    /// Rewrites every `/var/vcap` path in `text` into the fake tree.
    pub fn rewrite(&self, text: &str) -> String {
        text.replace("/var/vcap", &self.vcap().display().to_string())
    }

    pub fn path(&self, vm_path: &str) -> PathBuf {
        PathBuf::from(self.rewrite(vm_path))
    }

    /// The job's process as bpm starts it from this tree: its executable and its env, paths
    /// rewritten into the tree, on the state file the env names.
    pub fn server(&self, process: &BpmProcess) -> crate::common::ServerBuilder {
        let state_file = self.path(&process.env["LOCKER_CONFIG"]);
        process.env.iter().fold(
            crate::common::server()
                .binary(self.path(&process.executable))
                .state_file(state_file),
            |builder, (name, value)| builder.env(name, self.rewrite(value)),
        )
    }

    /// Renders every job template to its destination, as the BOSH agent would.
    pub fn render_job(&self, render: &Render) {
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
pub struct Stubs {
    pub dir: tempfile::TempDir,
}

impl Stubs {
    pub fn new(scripts: &[(&str, &str)]) -> Stubs {
        let dir = crate::common::temp_dir();
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

    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    pub fn calls(&self) -> Vec<String> {
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
pub fn static_binary() -> &'static Path {
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
pub fn fresh_clone(into: &Path) -> PathBuf {
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
    let git = |args: &[&str]| git(&clone, args);
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "fresh clone"]);
    clone
}

/// Runs `git ARGS` in `repository` as a test user.
pub fn git(repository: &Path, args: &[&str]) -> Output {
    run_ok(
        Command::new("git")
            .current_dir(repository)
            .args([
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@locker.invalid",
            ])
            .args(args),
    )
}

/// Runs a script of the clone with the chosen `bosh` on PATH.
pub fn run_script(clone: &Path, script: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
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
pub fn inspect(tarball: &Path) -> (Json, Vec<String>, Vec<String>) {
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
pub fn untar(tarball: &Path, into: &Path) {
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
pub fn blob_entry(release: &Path) -> (String, String) {
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
pub fn check_tarball(tarball: &Path, version: Option<&str>, into: &Path) -> PathBuf {
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
pub fn compile_package(package: &Path, vm: &FakeVm) -> PathBuf {
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
