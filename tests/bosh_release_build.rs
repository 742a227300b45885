//! The release built as an operator would, in a fresh copy of the repository's tracked files (a
//! clone holds no untracked or ignored file, and no empty directory): `scripts/add-blob` with
//! the statically linked binary of `ci/scripts/build-static` (built once per test binary), then
//! `scripts/create-release` (dev, and final with a local blobstore), `bosh
//! inspect-local-release`, and the tarball's job and package compared with the specs; and the
//! pipeline's own dev-release task.

#[path = "common/bosh/mod.rs"]
pub mod bosh;
pub mod common;

use std::fs;
use std::process::Command;

use bosh::*;

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
    let git = |args: &[&str]| git(&clone, args);
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
    let vm = FakeVm::default();
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
