//! The container images that `ci/scripts/build-images` builds, checked from the outside: the
//! script runs once per test run, each image's OCI layout is unpacked with umoci, and the
//! image's contents run against a real server, as a container runtime would run them: chrooted
//! into the unpacked root filesystem, with the environment, user and entrypoint of the image's
//! config and nothing of the host's.
//!
//! - the resource image: `/opt/resource/check`, `in` and `out` lock and release a lock on a
//!   `locker` server started on a loopback port, and trust the CA bundle the image carries;
//! - the server image: its entrypoint, as its user, serves on a loopback port and keeps its
//!   state file on the image's volume across a restart;
//! - the config (entrypoint, user, port, volume, env, labels and annotations), the files, the
//!   static linkage of the binaries, and the docker-archives (`docker load`, `podman load`).
//!
//! Needs root (chroot, and unpacking with the images' file owners) and Debian's buildah, skopeo,
//! umoci, jq, file, binutils and musl-tools, plus `rustup target add x86_64-unknown-linux-musl`;
//! every missing piece fails the tests with its name. Building the two static release binaries
//! takes minutes the first time.

pub mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{on_path, run_ok, stdout_of};
use serde_json::{Value, json};

/// The `org.opencontainers.image.source` the tests build with (a clone of a local path has no
/// URL of its own).
const SOURCE: &str = "https://example.invalid/locker";

/// The user the server image runs as.
const SERVER_UID: u32 = 65532;

/// Tools the tests and the script need, with the Debian package that has each.
const TOOLS: [(&str, &str); 12] = [
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    ("jq", "jq"),
    ("file", "file"),
    ("strip", "binutils"),
    ("musl-gcc", "musl-tools"),
    ("protoc", "protobuf-compiler"),
    ("chroot", "coreutils"),
    ("timeout", "coreutils"),
    ("tar", "tar"),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One built image: its OCI layout, docker-archive, config and unpacked root filesystem.
struct Image {
    name: String,
    version: String,
    layout: PathBuf,
    archive: PathBuf,
    manifest: Value,
    config: Value,
    rootfs: PathBuf,
    /// Every path in the root filesystem as unpacked, before any test ran in it.
    files: BTreeSet<String>,
}

impl Image {
    /// A value of the image config's `config` object (`Entrypoint`, `User`, ...).
    fn runtime(&self, field: &str) -> &Value {
        &self.config["config"][field]
    }

    /// The image's environment, as `NAME=value` strings.
    fn env(&self) -> Vec<(String, String)> {
        self.runtime("Env")
            .as_array()
            .expect("Env")
            .iter()
            .map(|entry| {
                let (name, value) = entry.as_str().unwrap().split_once('=').expect("NAME=value");
                (name.to_string(), value.to_string())
            })
            .collect()
    }

    /// Path on the host of a path inside the image.
    fn file(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }
}

struct Images {
    resource: Image,
    server: Image,
}

/// The images, built and unpacked once per test run; every test fails with the reason if that
/// did not work.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    match IMAGES.get_or_init(build_and_unpack) {
        Ok(images) => images,
        Err(reason) => panic!("{reason}"),
    }
}

/// Where `tool` is; panics naming it.
fn tool(tool: &str) -> PathBuf {
    on_path(tool).unwrap_or_else(|| panic!("{tool} is not on PATH"))
}

fn build_and_unpack() -> Result<Images, String> {
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| on_path(tool).is_none())
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing tools: {}; ci/scripts/install-image-tools installs them",
            missing.join(", ")
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "these tests chroot into the images' root filesystems and unpack them with \
                    their owners, which needs root"
                .to_string(),
        );
    }
    // The script builds into this run's target directory, so the static binaries are built
    // once and kept between runs.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let target_dir = tmp.parent().expect("target dir");
    let output = tmp.join("images");
    let _ = fs::remove_dir_all(&output);
    let started = Instant::now();
    let built = Command::new("bash")
        .arg(repo().join("ci/scripts/build-images"))
        .arg(&output)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", target_dir)
        .env("IMAGE_SOURCE", SOURCE)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ci/scripts/build-images: {e}"))?;
    if !built.status.success() {
        // The end of its output says why; cargo's progress lines before it do not.
        let stderr = String::from_utf8_lossy(&built.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        return Err(format!(
            "ci/scripts/build-images failed ({}); the last lines of its output:\n{}",
            built.status,
            lines[lines.len().saturating_sub(40)..].join("\n")
        ));
    }
    eprintln!(
        "ci/scripts/build-images took {:?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&built.stdout)
    );
    Ok(Images {
        resource: unpack(&output, "locker-resource")?,
        server: unpack(&output, "locker")?,
    })
}

fn run_tool(command: &mut Command) -> Result<Output, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

/// Reads the layout's one manifest and its config, and unpacks the image with umoci (keeping
/// the owners of its files: this runs as root).
fn unpack(output: &Path, name: &str) -> Result<Image, String> {
    let layout = output.join(format!("{name}.oci"));
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .ok_or("index without manifests")?;
    if manifests.len() != 1 {
        return Err(format!(
            "{}: {} manifests, not one",
            layout.display(),
            manifests.len()
        ));
    }
    let version = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .ok_or("the manifest has no tag")?
        .to_string();
    let blob = |digest: &Value| {
        layout
            .join("blobs")
            .join(digest.as_str().unwrap().replacen(':', "/", 1))
    };
    let manifest = read_json(&blob(&manifests[0]["digest"]))?;
    let config = read_json(&blob(&manifest["config"]["digest"]))?;
    let bundle = output.join("unpacked").join(name);
    run_tool(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{version}", layout.display()))
            .arg(&bundle),
    )?;
    Ok(Image {
        name: name.to_string(),
        version,
        archive: output.join(format!("{name}.docker.tar")),
        layout,
        manifest,
        config,
        files: tree(&bundle.join("rootfs")),
        rootfs: bundle.join("rootfs"),
    })
}

/// `version = "..."` of a Cargo.toml's package.
fn cargo_version(manifest: &str) -> String {
    let text = fs::read_to_string(repo().join(manifest)).expect("Cargo.toml");
    text.lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("package version")
        .to_string()
}

/// Every path in a root filesystem, relative, directories with a trailing slash.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let relative = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() && !path.is_symlink() {
                into.insert(format!("{relative}/"));
                walk(root, &path, into);
            } else {
                into.insert(relative);
            }
        }
    }
    let mut paths = BTreeSet::new();
    walk(root, root, &mut paths);
    paths
}

/// The OCI labels (config) and annotations (manifest) every image carries.
fn assert_oci_metadata(image: &Image, title: &str, version: &str) {
    let labels = image.runtime("Labels");
    let annotations = &image.manifest["annotations"];
    for (key, wanted) in [
        ("org.opencontainers.image.title", Some(title)),
        ("org.opencontainers.image.version", Some(version)),
        ("org.opencontainers.image.licenses", Some("Apache-2.0")),
        ("org.opencontainers.image.description", None),
        ("org.opencontainers.image.source", Some(SOURCE)),
        ("org.opencontainers.image.created", None),
    ] {
        for (what, map) in [("label", labels), ("annotation", annotations)] {
            let value = map[key]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no {what} {key}: {map}", image.name));
            assert!(!value.is_empty(), "{}: empty {what} {key}", image.name);
            if let Some(wanted) = wanted {
                assert_eq!(value, wanted, "{}: {what} {key}", image.name);
            }
        }
    }
    assert_eq!(image.version, version, "{}: tag", image.name);
    assert_eq!(image.config["os"], "linux");
    assert_eq!(image.config["architecture"], "amd64");
}

// ---------------------------------------------------------------------------------------------
// The resource image

/// Runs `/opt/resource/<command> [dir]` chrooted into the resource image, with the image's
/// environment plus a build's `BUILD_*` variables, `request` on stdin; stdout, stderr.
fn resource(command: &str, dir: Option<&str>, request: &Value) -> (bool, String, String) {
    let image = &images().resource;
    let mut process = Command::new(tool("timeout"));
    process
        .args(["--signal=KILL", "60"])
        .arg(tool("chroot"))
        .arg(&image.rootfs)
        .arg(format!("/opt/resource/{command}"))
        .args(dir)
        .env_clear()
        .envs(image.env())
        .envs([
            ("BUILD_TEAM_NAME", "main"),
            ("BUILD_PIPELINE_NAME", "images"),
            ("BUILD_JOB_NAME", "deploy"),
            ("BUILD_NAME", "12"),
            ("BUILD_ID", "4242"),
            ("ATC_EXTERNAL_URL", "https://ci.example.com"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = process.spawn().expect("run chroot");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .expect("write the request");
    let output = child.wait_with_output().expect("wait for the resource");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // timeout(1) and chroot(1) exit with 124 to 127 for themselves: out of time, chroot failed,
    // the command could not run; the resource exits with 0 or 1.
    assert!(
        !matches!(output.status.code(), Some(124..=127) | None),
        "chroot {} /opt/resource/{command} did not run ({}): {stderr}",
        image.rootfs.display(),
        output.status
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

/// The resource's JSON answer; panics with its stderr if it failed.
fn resource_json(command: &str, dir: Option<&str>, request: &Value) -> Value {
    let (ok, stdout, stderr) = resource(command, dir, request);
    assert!(ok, "/opt/resource/{command} failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"))
}

/// A fresh directory inside the resource image's root filesystem, as its path in there.
fn resource_dir(name: &str) -> String {
    let path = format!("/tmp/{name}");
    let host = images().resource.file(&path);
    let _ = fs::remove_dir_all(&host);
    fs::create_dir_all(&host).expect("dir in the rootfs");
    path
}

#[test]
fn resource_image_config_files_and_labels() {
    let image = &images().resource;
    assert_oci_metadata(
        image,
        "locker-resource",
        &cargo_version("resource/Cargo.toml"),
    );
    // Concourse runs the scripts as root, by path; the image needs no entrypoint.
    assert!(
        image.runtime("User").as_str().unwrap_or("").is_empty(),
        "{}",
        image.config
    );
    assert!(image.runtime("Entrypoint").is_null(), "{}", image.config);

    let expected: BTreeSet<String> = [
        "etc/",
        "etc/ssl/",
        "etc/ssl/certs/",
        "etc/ssl/certs/ca-certificates.crt",
        "opt/",
        "opt/resource/",
        "opt/resource/check",
        "opt/resource/in",
        "opt/resource/out",
        "opt/resource/locker-resource",
        "tmp/",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(image.files, expected, "no shell, nothing else");
    for command in ["check", "in", "out"] {
        let script = image.file(&format!("/opt/resource/{command}"));
        assert_eq!(
            fs::read_link(&script).expect("a symlink"),
            Path::new("locker-resource")
        );
    }
    let binary = fs::metadata(image.file("/opt/resource/locker-resource")).unwrap();
    assert_eq!(binary.permissions().mode() & 0o777, 0o755);
    assert_eq!((binary.uid(), binary.gid()), (0, 0));
    // The CA bundle of the build host (another test appends a CA to the unpacked copy).
    let bundle = fs::read(image.file("/etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(bundle.starts_with(&fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap()));
    assert!(image.layout.join("oci-layout").is_file());
}

#[test]
fn resource_image_checks_gets_and_puts_a_lock_on_a_real_server() {
    let server = common::Server::start();
    let source = json!({"locker_uri": server.base, "lock_name": "from-image"});

    let versions = resource_json("check", None, &json!({"source": source}));
    assert_eq!(versions, json!([{"ref": "free"}]));

    let put_dir = resource_dir("put");
    let locked = resource_json(
        "out",
        Some(&put_dir),
        &json!({"source": source, "params": {"key": "deploy", "lock_op": "lock"}}),
    );
    let held = &server.locks()["from-image"];
    assert_eq!(held["key"], "deploy", "{held}");
    assert_eq!(
        held["info"]["build_name"], "12",
        "the build from BUILD_*: {held}"
    );

    let versions = resource_json("check", None, &json!({"source": source}));
    assert_eq!(versions, json!([locked["version"].clone()]));
    assert_ne!(locked["version"], json!({"ref": "free"}));

    let get_dir = resource_dir("get");
    let got = resource_json(
        "in",
        Some(&get_dir),
        &json!({"source": source, "version": locked["version"]}),
    );
    assert_eq!(got["version"], locked["version"]);
    let lock_file = images().resource.file(&format!("{get_dir}/lock"));
    assert_eq!(fs::read_to_string(lock_file).unwrap(), "deploy");

    resource_json(
        "out",
        Some(&put_dir),
        &json!({"source": source, "params": {"key": "deploy", "lock_op": "unlock"}}),
    );
    assert!(server.locks().get("from-image").is_none(), "released");
    let versions = resource_json("check", None, &json!({"source": source}));
    assert_eq!(versions, json!([{"ref": "free"}]));
}

/// A CA and a certificate for 127.0.0.1 signed by it, written to `dir`.
fn certificates(dir: &Path) -> (String, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    fs::write(&cert_path, cert.pem()).expect("write cert");
    fs::write(&key_path, key.serialize_pem()).expect("write key");
    (ca.pem(), cert_path, key_path)
}

/// The image's static binary trusts the CA bundle at the path the image puts it: an HTTPS
/// server's certificate is refused until its CA is added to the (unpacked copy of the) bundle.
#[test]
fn resource_image_trusts_the_ca_bundle_it_carries() {
    let dir = common::temp_dir();
    let (ca, cert, key) = certificates(dir.path());
    let server = common::server().tls(&cert, &key).start();
    let request = json!({"source": {"locker_uri": server.base, "lock_name": "tls"}});

    let (ok, _, stderr) = resource("check", None, &request);
    assert!(!ok && stderr.contains("certificate"), "{stderr}");

    let bundle = images().resource.file("/etc/ssl/certs/ca-certificates.crt");
    let mut file = fs::OpenOptions::new().append(true).open(bundle).unwrap();
    writeln!(file, "{ca}").unwrap();
    drop(file);
    assert_eq!(
        resource_json("check", None, &request),
        json!([{"ref": "free"}])
    );
}

// ---------------------------------------------------------------------------------------------
// The server image

#[test]
fn server_image_config_files_and_labels() {
    let image = &images().server;
    assert_oci_metadata(image, "locker", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        image.runtime("Entrypoint"),
        &json!(["/usr/local/bin/locker"])
    );
    assert!(image.runtime("Cmd").is_null(), "{}", image.config);
    assert_eq!(
        image.runtime("User"),
        &json!(format!("{SERVER_UID}:{SERVER_UID}"))
    );
    assert_eq!(image.runtime("ExposedPorts"), &json!({"3000/tcp": {}}));
    assert_eq!(image.runtime("Volumes"), &json!({"/var/lib/locker": {}}));
    let env = image.env();
    for wanted in [
        ("LOCKER_CONFIG", "/var/lib/locker/locker.yml"),
        ("LOCKER_LISTEN", "0.0.0.0"),
        ("PORT", "3000"),
    ] {
        assert!(
            env.contains(&(wanted.0.to_string(), wanted.1.to_string())),
            "{wanted:?} in {env:?}"
        );
    }

    let expected: BTreeSet<String> = [
        "etc/",
        "etc/ssl/",
        "etc/ssl/certs/",
        "etc/ssl/certs/ca-certificates.crt",
        "tmp/",
        "usr/",
        "usr/local/",
        "usr/local/bin/",
        "usr/local/bin/locker",
        "var/",
        "var/lib/",
        "var/lib/locker/",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(image.files, expected, "no shell, nothing else");
    let state_dir = fs::metadata(image.file("/var/lib/locker")).unwrap();
    assert_eq!((state_dir.uid(), state_dir.gid()), (SERVER_UID, SERVER_UID));
    let var_lib = fs::metadata(image.file("/var/lib")).unwrap();
    assert_eq!(
        (var_lib.uid(), var_lib.gid()),
        (0, 0),
        "only the volume is the user's"
    );
}

/// Starts the server image's entrypoint (and command) chrooted into its root filesystem, as its
/// user, with exactly the image's environment except `PORT=0` (a free port, which the log
/// names); the state file is the one on the image's volume.
fn start_server_image() -> common::Server {
    let image = &images().server;
    let user = image.runtime("User").as_str().unwrap();
    let mut builder = common::server()
        .binary("/usr/bin/env")
        .state_file(image.file("/var/lib/locker/locker.yml"))
        .arg("-i");
    for (name, value) in image.env() {
        let value = if name == "PORT" {
            "0".to_string()
        } else {
            value
        };
        builder = builder.arg(format!("{name}={value}"));
    }
    builder = builder
        .arg(tool("chroot").display().to_string())
        .arg(format!("--userspec={user}"))
        .arg(image.rootfs.display().to_string());
    for part in [image.runtime("Entrypoint"), image.runtime("Cmd")] {
        for arg in part.as_array().into_iter().flatten() {
            builder = builder.arg(arg.as_str().unwrap());
        }
    }
    let mut server = builder.start();
    assert!(
        server.base.starts_with("http://0.0.0.0:"),
        "listens on all interfaces: {}",
        server.base
    );
    server.base = server.base.replace("0.0.0.0", "127.0.0.1");
    server
}

#[test]
fn server_image_serves_as_its_user_and_keeps_its_state_on_the_volume() {
    let image = &images().server;
    let state_file = image.file("/var/lib/locker/locker.yml");
    let _ = fs::remove_file(&state_file);
    let server = start_server_image();
    let health = common::call("GET", &server.url("/health"), None);
    assert_eq!(health.status, 200, "{}", health.body);
    let reply = server.lock("prod", json!({"key": "deploy", "requestor": "deploy"}));
    assert_eq!(reply.status, 200, "{}", reply.body);

    let state = fs::metadata(&state_file).expect("the state file is on the volume");
    assert_eq!(state.uid(), SERVER_UID, "written by the image's user");
    assert!(fs::read_to_string(&state_file).unwrap().contains("prod"));
    let pid = server.pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|id| id == SERVER_UID.to_string()),
        "the server runs as {SERVER_UID}: {uid_line}"
    );

    // SIGTERM (what `docker stop` sends) stops it cleanly; a new container on the same volume
    // finds the lock.
    let mut server = server;
    server.signal(libc::SIGTERM);
    let exit = server.wait_exit(Duration::from_secs(40));
    assert!(exit.success(), "{exit}\n{}", server.log());
    let server = start_server_image();
    assert_eq!(server.locks()["prod"]["key"], "deploy");
}

// ---------------------------------------------------------------------------------------------
// Both

#[test]
fn image_binaries_are_statically_linked() {
    let images = images();
    for binary in [
        images.resource.file("/opt/resource/locker-resource"),
        images.server.file("/usr/local/bin/locker"),
    ] {
        let output = Command::new("file")
            .arg("-b")
            .arg(&binary)
            .output()
            .expect("run file");
        let kind = String::from_utf8_lossy(&output.stdout);
        assert!(
            (kind.contains("statically linked") || kind.contains("static-pie linked"))
                && !kind.contains("interpreter"),
            "{}: {kind}",
            binary.display()
        );
    }
}

#[test]
fn docker_archives_name_the_images_and_carry_their_labels() {
    let images = images();
    for image in [&images.resource, &images.server] {
        let listing = Command::new("tar")
            .arg("-tf")
            .arg(&image.archive)
            .output()
            .expect("run tar");
        assert!(listing.status.success(), "{}", image.archive.display());
        let listing = String::from_utf8_lossy(&listing.stdout);
        let manifest = Command::new("tar")
            .arg("-xOf")
            .arg(&image.archive)
            .arg("manifest.json")
            .output()
            .expect("run tar");
        assert!(
            manifest.status.success(),
            "{} has no manifest.json",
            image.archive.display()
        );
        let manifest: Value = serde_json::from_slice(&manifest.stdout).expect("manifest.json");
        let entry = &manifest.as_array().expect("a list")[..];
        assert_eq!(entry.len(), 1, "{manifest}");
        // skopeo writes the name fully qualified; `docker load` lists it as NAME:VERSION.
        assert_eq!(
            entry[0]["RepoTags"],
            json!([format!(
                "docker.io/library/{}:{}",
                image.name, image.version
            )])
        );
        for file in std::iter::once(&entry[0]["Config"])
            .chain(entry[0]["Layers"].as_array().expect("Layers"))
        {
            let file = file.as_str().unwrap();
            assert!(
                listing.lines().any(|l| l == file),
                "{file} not in the archive"
            );
        }
        // What `docker load` reads back: the same config, labels included.
        let inspected = run_ok(
            Command::new("skopeo")
                .args(["--insecure-policy", "inspect", "--config"])
                .arg(format!("docker-archive:{}", image.archive.display())),
        );
        let config: Value = serde_json::from_slice(&inspected.stdout).expect("config");
        assert_eq!(config["config"]["Labels"], *image.runtime("Labels"));
        assert_eq!(config["config"]["Entrypoint"], *image.runtime("Entrypoint"));
    }
}

#[test]
fn docker_archives_load_into_podman() {
    let images = images();
    // A store of its own: nothing is left in the machine's, and no daemon is needed.
    let store = common::temp_dir();
    let podman = |args: &[&str]| {
        stdout_of(
            Command::new("podman")
                .arg("--storage-driver=vfs")
                .arg("--root")
                .arg(store.path().join("root"))
                .arg("--runroot")
                .arg(store.path().join("run"))
                .args(args),
        )
    };
    for image in [&images.resource, &images.server] {
        let archive = image.archive.display().to_string();
        let loaded = podman(&["load", "-i", &archive]);
        let name = format!("docker.io/library/{}:{}", image.name, image.version);
        assert!(loaded.contains(&name), "{loaded}");
        let entrypoint = podman(&[
            "image",
            "inspect",
            &name,
            "--format",
            "{{json .Config.Entrypoint}}",
        ]);
        let entrypoint: Value = serde_json::from_str(entrypoint.trim()).expect("entrypoint JSON");
        assert_eq!(entrypoint, *image.runtime("Entrypoint"), "{name}");
    }
}
