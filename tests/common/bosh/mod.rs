//! What the BOSH release and pipeline tests share, by concern: the repository's paths, running
//! commands, and the tools (here); rendering the job's templates with the BOSH CLI's renderer
//! ([`render`]); the documented manifests ([`manifests`]); building the release and laying the
//! job out on a fake VM ([`release`]). Only those tests compile it, each with
//! `#[path = "common/bosh/mod.rs"] pub mod bosh;` beside `pub mod common;`: the resource crate,
//! which shares `tests/common`, needs none of its dependencies.
//!
//! Which tools: the BOSH CLI is `../shared/tools/bosh` beside the repository when it is there,
//! else the `bosh` on PATH; the renderer is the CLI's own `bosh-erb-renderer.rb`
//! (`../shared/tools/`, or `$BOSH_ERB_RENDERER`). Each test run prints the ones it used.

pub mod manifests;
pub mod release;
pub mod render;

pub use crate::common::process::{on_path, output_text, run_ok, stdout_of};
pub use manifests::*;
pub use release::*;
pub use render::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{Value as Json, json};
use serde_yaml_ng::Value as Yaml;

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

pub fn repo() -> PathBuf {
    PathBuf::from(REPO)
}

pub fn release() -> PathBuf {
    repo().join("boshrelease")
}

pub fn job_dir() -> PathBuf {
    release().join("jobs/locker")
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn yaml_file(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The tools: bosh, its renderer, Ruby

/// The BOSH CLI these tests use: `../shared/tools/bosh` beside the repository, else `bosh` on
/// PATH. Printed once per run (with its version), so a run says which it used.
pub fn bosh() -> &'static Path {
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
pub fn path_with_bosh() -> String {
    format!(
        "{}:{}",
        bosh().parent().expect("bosh dir").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The BOSH CLI's job-template renderer: `$BOSH_ERB_RENDERER`, else
/// `../shared/tools/bosh-erb-renderer.rb` beside the repository. Printed once per run.
pub fn renderer() -> &'static Path {
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
pub fn ruby() -> &'static str {
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

/// Files under `dir` (recursively), skipping build output.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
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
