//! The pool mode (`source.pool`) of the resource binary against the real locker server, run
//! as Concourse runs it: each build a directory holding its steps' directories by name, `out`
//! given that directory, the `get` Concourse runs after every `put` into the put step's
//! directory with the version the put answered, and the `BUILD_*` variables of the build.
//! The README pipelines of concourse/pool-resource run here step by step with only `source`
//! changed.

#[path = "../../tests/common/mod.rs"]
pub mod common;
pub mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Concourse, Outcome, Running, Stub, forward, metadata, run, start, wait_for_log};

/// The `source` of a pool resource on `server`: what replaces pool-resource's `uri`,
/// `branch` and `private_key`.
fn source(server: &common::Server, pool: &str) -> Value {
    json!({"locker_uri": server.base, "pool": pool})
}

/// One build of a job: its directory (one directory per step, by name) and its environment.
struct Build {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    source: Value,
}

impl Build {
    fn new(source: &Value, job: &str, build_id: &str) -> Build {
        let env = [
            ("BUILD_TEAM_NAME", "main"),
            ("BUILD_PIPELINE_NAME", "environments"),
            ("BUILD_JOB_NAME", job),
            ("BUILD_NAME", "1"),
            ("BUILD_ID", build_id),
            ("ATC_EXTERNAL_URL", "https://ci.example.com"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Build {
            dir: common::temp_dir(),
            env,
            source: source.clone(),
        }
    }

    fn request(&self, params: Value) -> Value {
        json!({"source": self.source, "params": params})
    }

    /// Runs `out` with `params`.
    fn out(&self, params: Value) -> Outcome {
        run(
            "out",
            Some(self.dir.path()),
            &self.request(params),
            &self.env,
        )
    }

    /// Starts `out` with `params` in the background.
    fn start_out(&self, params: Value) -> Running {
        start(
            "out",
            Some(self.dir.path()),
            &self.request(params),
            &self.env,
        )
    }

    /// `put: STEP` with `params`: `out`, then the `get` Concourse runs after it into the
    /// step's directory. Returns the put's response.
    fn put(&self, step: &str, params: Value) -> Value {
        let response = self.out(params).json();
        self.get(step, &response["version"]).json();
        response
    }

    /// `get: STEP` of `version`: `in` into a fresh directory for the step (Concourse gives
    /// every get its own, which then stands for the step's name in the build).
    fn get(&self, step: &str, version: &Value) -> Outcome {
        let _ = std::fs::remove_dir_all(self.step(step));
        let request = json!({"source": self.source, "version": version, "params": {}});
        run("in", Some(&self.step(step)), &request, &self.env)
    }

    fn step(&self, step: &str) -> PathBuf {
        self.dir.path().join(step)
    }

    /// A step's `name` and `metadata` files, as a task reads them.
    fn item(&self, step: &str) -> (String, String) {
        let read = |file: &str| {
            std::fs::read_to_string(self.step(step).join(file))
                .unwrap_or_else(|e| panic!("{step}/{file}: {e}"))
        };
        (read("name"), read("metadata"))
    }

    /// A step's `claim.json`, if written.
    fn claim_file(&self, step: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.step(step).join("claim.json")).ok()?;
        Some(serde_json::from_str(&text).expect("claim.json is JSON"))
    }

    /// A directory as a task writes it for `add`, `update` ...: `name` and `metadata` only.
    fn task_output(&self, step: &str, name: &str, metadata: &str) {
        let dir = self.step(step);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("name"), format!("{name}\n")).expect("name");
        std::fs::write(dir.join("metadata"), metadata).expect("metadata");
    }
}

/// `POST /pool/{pool}/item/{item}`: adds an unclaimed item.
fn add(server: &common::Server, pool: &str, item: &str, metadata: &str) {
    let reply = common::call(
        "POST",
        &server.url(&format!("/pool/{pool}/item/{item}")),
        Some(&json!({ "metadata": metadata }).to_string()),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
}

/// `GET /pool/{pool}/item/{item}`; `None` when it does not exist.
fn item(server: &common::Server, pool: &str, item: &str) -> Option<Value> {
    let reply = common::call(
        "GET",
        &server.url(&format!("/pool/{pool}/item/{item}")),
        None,
    );
    match reply.status {
        200 => Some(reply.json()),
        404 => None,
        other => panic!("GET item answered {other}: {}", reply.body),
    }
}

/// The key an item is claimed under; `None` when unclaimed. Panics when the item is gone.
fn holder_key(server: &common::Server, pool: &str, name: &str) -> Option<String> {
    let found = item(server, pool, name).unwrap_or_else(|| panic!("no item {name}"));
    found["holder"]["key"].as_str().map(str::to_string)
}

/// Claims an item over the API under `key`, at once.
fn claim_as(server: &common::Server, pool: &str, item: &str, key: &str) {
    let reply = common::call(
        "PUT",
        &server.url(&format!("/pool/{pool}/item/{item}/claim")),
        Some(&json!({ "key": key }).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Releases an item over the API, whoever holds it.
fn release_by_name(server: &common::Server, pool: &str, item: &str) {
    let reply = common::call(
        "DELETE",
        &server.url(&format!("/pool/{pool}/item/{item}/claim")),
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Polls `GET /pool/{pool}` until `count` claims wait (10 s at most).
fn wait_for_pool_waiters(server: &common::Server, pool: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = common::call("GET", &server.url(&format!("/pool/{pool}")), None);
        if reply.status == 200 && reply.json()["waiters"] == json!(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {count} waiting claim(s): {}",
            reply.body
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pool of pool-resource's README (`aws` with `env-1` and `env-2`), with metadata.
fn aws_pool(server: &common::Server) {
    add(server, "aws", "env-1", "url: https://env-1.example.com\n");
    add(server, "aws", "env-2", "url: https://env-2.example.com\n");
}

/// pool-resource's README, "Example Concourse Configuration": `deploy-aws` acquires
/// (`put: aws-environments, params: {acquire: true}`); `test-aws` gets that version with
/// `passed: [deploy-aws]` and releases it (`put: aws-environments, params: {release:
/// aws-environments}`).
#[test]
fn readme_acquire_then_release_in_a_later_job_with_passed() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");

    // deploy-aws: put acquire, then the get Concourse runs after it.
    let deploy = Build::new(&src, "deploy-aws", "101");
    let put = deploy.put("aws-environments", json!({"acquire": true}));
    let version = put["version"].clone();
    let (name, contents) = deploy.item("aws-environments");
    let acquired = name.trim().to_string();
    assert!(["env-1", "env-2"].contains(&acquired.as_str()), "{name:?}");
    assert_eq!(
        name,
        format!("{acquired}\n"),
        "name as pool-resource writes it"
    );
    assert_eq!(contents, format!("url: https://{acquired}.example.com\n"));
    let meta = metadata(&put);
    assert_eq!(meta["lock_name"], acquired);
    assert_eq!(meta["pool_name"], "aws");
    // Held on the server under this claim's key, with the build as holder info.
    let held = item(&server, "aws", &acquired).expect("item");
    assert_eq!(held["claimed"], true);
    assert_eq!(held["holder"]["key"], version["key"]);
    assert_eq!(held["holder"]["info"]["job"], "deploy-aws");
    assert_eq!(
        held["holder"]["generation"].to_string(),
        version["generation"].as_str().expect("generation")
    );
    assert!(
        version["key"]
            .as_str()
            .expect("key")
            .starts_with("https://ci.example.com/builds/101 claim "),
        "{version}"
    );
    let other = if acquired == "env-1" {
        "env-2"
    } else {
        "env-1"
    };
    assert_eq!(holder_key(&server, "aws", other), None);

    // test-aws: get with passed (the version deploy-aws put), then release that directory.
    let test = Build::new(&src, "test-aws", "102");
    let got = test.get("aws-environments", &version).json();
    assert_eq!(got["version"], version);
    assert_eq!(
        test.item("aws-environments"),
        deploy.item("aws-environments")
    );
    let claim = test.claim_file("aws-environments").expect("claim.json");
    assert_eq!(claim["key"], version["key"]);
    assert_eq!(claim["item"], acquired.as_str());
    let released = test.put("aws-environments", json!({"release": "aws-environments"}));
    assert_eq!(metadata(&released)["lock_name"], acquired);
    assert_eq!(metadata(&released)["claimed"], "false");
    assert_eq!(holder_key(&server, "aws", &acquired), None);
    // The get after the release writes the released item, without a claim.
    assert_eq!(test.item("aws-environments").0, format!("{acquired}\n"));
    assert_eq!(test.claim_file("aws-environments"), None);
}

/// pool-resource's README, "Managing multiple locks": two acquires from one pool with custom
/// step names, released by step name.
#[test]
fn readme_two_acquires_with_custom_step_names_then_both_released() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");
    let build = Build::new(&src, "test-multi-aws", "201");
    let first = build.put("environment-1", json!({"acquire": true}));
    let second = build.put("environment-2", json!({"acquire": true}));
    let one = build.item("environment-1").0.trim().to_string();
    let two = build.item("environment-2").0.trim().to_string();
    assert_ne!(one, two, "both acquires got the same item");
    assert_ne!(first["version"]["key"], second["version"]["key"]);
    assert_eq!(
        holder_key(&server, "aws", &one).as_ref(),
        first["version"]["key"]
            .as_str()
            .map(str::to_string)
            .as_ref()
    );
    assert_eq!(
        holder_key(&server, "aws", &two).as_ref(),
        second["version"]["key"]
            .as_str()
            .map(str::to_string)
            .as_ref()
    );

    build.put("aws-environments", json!({"release": "environment-1"}));
    assert_eq!(holder_key(&server, "aws", &one), None);
    assert!(
        holder_key(&server, "aws", &two).is_some(),
        "releasing environment-1 released environment-2 too"
    );
    build.put("aws-environments", json!({"release": "environment-2"}));
    assert_eq!(holder_key(&server, "aws", &two), None);
}

/// pool-resource's README, "Claiming a specific lock from a pool, and releasing".
#[test]
fn readme_claiming_a_specific_item_then_releasing_it() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");
    let build = Build::new(&src, "test-specific-aws", "301");
    let put = build.put("specific-aws-env", json!({"claim": "env-1"}));
    assert_eq!(put["version"]["item"], "env-1");
    assert_eq!(build.item("specific-aws-env").0, "env-1\n");
    assert!(holder_key(&server, "aws", "env-1").is_some());
    assert_eq!(holder_key(&server, "aws", "env-2"), None);

    build.put("aws-environments", json!({"release": "specific-aws-env"}));
    assert_eq!(holder_key(&server, "aws", "env-1"), None);
}

#[test]
fn claim_of_a_held_item_waits_and_gets_it_when_released() {
    let server = common::Server::start();
    aws_pool(&server);
    claim_as(&server, "aws", "env-1", "someone");
    let build = Build::new(&source(&server, "aws"), "deploy", "401");
    let mut waiting = build.start_out(json!({"claim": "env-1"}));
    wait_for_pool_waiters(&server, "aws", 1);
    wait_for_log(
        &waiting,
        "item \"env-1\" of pool \"aws\" is claimed by key \"someone\"",
    );
    assert!(waiting.running(), "the claim did not wait");
    // env-2 is free, but a claim of env-1 does not take it.
    assert_eq!(holder_key(&server, "aws", "env-2"), None);

    release_by_name(&server, "aws", "env-1");
    let response = waiting.finish(Duration::from_secs(20)).json();
    assert_eq!(response["version"]["item"], "env-1");
    assert_eq!(
        holder_key(&server, "aws", "env-1").as_deref(),
        response["version"]["key"].as_str()
    );
}

#[test]
fn acquire_waits_in_line_and_gets_the_item_released() {
    let server = common::Server::start();
    aws_pool(&server);
    claim_as(&server, "aws", "env-1", "a");
    claim_as(&server, "aws", "env-2", "b");
    let build = Build::new(&source(&server, "aws"), "deploy", "501");
    let mut waiting = build.start_out(json!({"acquire": true}));
    wait_for_pool_waiters(&server, "aws", 1);
    wait_for_log(
        &waiting,
        "pool \"aws\" has no free item: 2 of 2 item(s) claimed",
    );
    assert!(waiting.running(), "the acquire did not wait");

    release_by_name(&server, "aws", "env-2");
    let outcome = waiting.finish(Duration::from_secs(20));
    let response = outcome.json();
    assert_eq!(response["version"]["item"], "env-2");
    assert_eq!(holder_key(&server, "aws", "env-1").as_deref(), Some("a"));
    // Long-polled, not a sleep loop.
    assert!(
        !outcome.stderr.contains("answered at once"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn wait_timeout_gives_up_naming_the_holders() {
    let server = common::Server::start();
    add(&server, "aws", "env-1", "");
    claim_as(&server, "aws", "env-1", "a");
    let build = Build::new(&source(&server, "aws"), "deploy", "601");
    for params in [
        json!({"acquire": true, "wait_timeout": "1s"}),
        json!({"claim": "env-1", "wait_timeout": "1s"}),
    ] {
        let outcome = build.out(params.clone());
        let error = outcome.error();
        assert!(error.contains("gave up waiting for"), "{params}: {error}");
        assert!(error.contains("params.wait_timeout"), "{error}");
        assert!(
            error.contains("key \"a\""),
            "the holder is not named: {error}"
        );
        assert!(
            outcome.elapsed >= Duration::from_secs(1),
            "{:?}",
            outcome.elapsed
        );
    }
    assert_eq!(holder_key(&server, "aws", "env-1").as_deref(), Some("a"));
    wait_for_pool_waiters(&server, "aws", 0);
}

/// A directory with only `name` and `metadata` (a task's output, or what pool-resource
/// pipelines have for items claimed in git): `release` acts by name, whoever holds the item.
/// A plain `get` of a version `check` found writes such a directory too.
#[test]
fn release_of_a_directory_with_only_name_and_metadata_acts_by_name() {
    let server = common::Server::start();
    aws_pool(&server);
    claim_as(&server, "aws", "env-1", "claimed-in-git");
    let build = Build::new(&source(&server, "aws"), "unlock", "701");
    build.task_output("env", "env-1", "anything");
    let response = build.put("aws-environments", json!({"release": "env"}));
    assert_eq!(metadata(&response)["lock_name"], "env-1");
    assert_eq!(holder_key(&server, "aws", "env-1"), None);

    // check → plain get (the item claimed last) → release by name.
    claim_as(&server, "aws", "env-2", "other-pipeline");
    let checked = run("check", None, &json!({"source": build.source}), &build.env).json();
    let version = checked[0].clone();
    assert_eq!(version["item"], "env-2", "{checked}");
    build.get("latest", &version).json();
    assert_eq!(build.item("latest").0, "env-2\n");
    assert_eq!(build.claim_file("latest"), None);
    build.put("aws-environments", json!({"release": "latest"}));
    assert_eq!(holder_key(&server, "aws", "env-2"), None);
}

/// Runs `git ARGS` in `dir` with a fixed identity and no signing; panics with its output if it
/// fails.
fn git(dir: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Pool Keeper",
            "-c",
            "user.email=pools@example.com",
        ])
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("git is missing ({e}): install Debian's git"));
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        common::output_text(&output)
    );
}

/// Moving from pool-resource: a pool kept in git (`aws/claimed/env-2`, `aws/unclaimed/env-1`)
/// is imported with `locker pool import` from a clone, and the pipeline that claimed `env-2`
/// in git releases it with its `release:` step, whose directory (written by pool-resource's
/// `in`) holds only `name` and `metadata`: the imported claim, under the import's key, is
/// released by name.
#[test]
fn an_item_claimed_in_git_and_imported_is_released_by_the_holding_pipelines_release_step() {
    let server = common::Server::start();
    let dir = common::temp_dir();
    let origin = dir.path().join("origin");
    for (state, name, metadata) in [
        ("unclaimed", "env-1", "region: eu-west-1\n"),
        ("claimed", "env-2", "region: us-east-1\n"),
    ] {
        let state_dir = origin.join("aws").join(state);
        std::fs::create_dir_all(&state_dir).expect("mkdir");
        std::fs::write(state_dir.join(".gitkeep"), "").expect("write");
        std::fs::write(state_dir.join(name), metadata).expect("write");
    }
    git(&origin, &["init", "-q"]);
    git(&origin, &["add", "-A"]);
    git(&origin, &["commit", "-q", "-m", "claiming: env-2"]);
    git(dir.path(), &["clone", "-q", "origin", "checkout"]);
    let checkout = dir.path().join("checkout");

    let imported = std::process::Command::new(common::locker_binary())
        .env_remove("LOCKER_USER")
        .env_remove("LOCKER_PASSWORD")
        .env_remove("LOCKER_CA_CERT")
        .env("LOCKER_URL", &server.base)
        .args(["pool", "import"])
        .arg(&checkout)
        .output()
        .expect("run locker pool import");
    assert!(
        imported.status.success(),
        "{}",
        common::output_text(&imported)
    );
    assert_eq!(
        holder_key(&server, "aws", "env-2").as_deref(),
        Some("imported-from-git")
    );
    assert_eq!(holder_key(&server, "aws", "env-1"), None);

    // The holding pipeline's step directory, as pool-resource's `in` wrote it from git.
    let build = Build::new(&source(&server, "aws"), "test-aws", "801");
    let metadata_in_git =
        std::fs::read_to_string(checkout.join("aws/claimed/env-2")).expect("metadata");
    build.task_output("aws-environments", "env-2", &metadata_in_git);
    let response = build.put("aws-environments", json!({"release": "aws-environments"}));
    assert_eq!(metadata(&response)["lock_name"], "env-2");
    assert_eq!(metadata(&response)["claimed"], "false");
    assert_eq!(holder_key(&server, "aws", "env-2"), None, "still claimed");
    assert_eq!(
        item(&server, "aws", "env-2").expect("env-2")["metadata"],
        "region: us-east-1\n"
    );
}

/// With the `claim.json` locker's `in` wrote, `release` acts only while the item is held by
/// that claim: once it was released and claimed by someone else, the release fails and says
/// so, and the other holder keeps the item.
#[test]
fn release_with_claim_json_checks_the_key() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");
    let first = Build::new(&src, "deploy", "801");
    let put = first.put("env", json!({"claim": "env-1"}));
    let key = put["version"]["key"].as_str().expect("key").to_string();
    // Released behind its back (a force release, a lease) and claimed by someone else.
    release_by_name(&server, "aws", "env-1");
    claim_as(&server, "aws", "env-1", "someone-else");

    let error = first.out(json!({"release": "env"})).error();
    assert!(error.contains("cannot release item \"env-1\""), "{error}");
    assert!(error.contains("held by another claim"), "{error}");
    assert!(
        error.contains(&key),
        "the directory's key is not named: {error}"
    );
    assert_eq!(
        holder_key(&server, "aws", "env-1").as_deref(),
        Some("someone-else")
    );

    // The same directory, its item released meanwhile: not claimed, as pool-resource says.
    release_by_name(&server, "aws", "env-1");
    let error = first.out(json!({"release": "env"})).error();
    assert!(error.contains("it is not claimed"), "{error}");
}

#[test]
fn remove_takes_claimed_and_unclaimed_items_and_checks_claim_json() {
    let server = common::Server::start();
    for name in ["env-1", "env-2", "env-3", "env-4"] {
        add(&server, "aws", name, "");
    }
    let src = source(&server, "aws");
    let build = Build::new(&src, "teardown", "901");
    // Unclaimed, by name.
    build.task_output("one", "env-1", "");
    let response = build.put("aws-environments", json!({"remove": "one"}));
    assert_eq!(item(&server, "aws", "env-1"), None);
    assert_eq!(metadata(&response)["lock_name"], "env-1");
    // The get after a removal writes nothing, as pool-resource's does for a lock that is gone.
    assert!(!build.step("aws-environments").join("name").exists());
    // Claimed by someone, by name.
    claim_as(&server, "aws", "env-2", "someone");
    build.task_output("two", "env-2", "");
    build.put("aws-environments", json!({"remove": "two"}));
    assert_eq!(item(&server, "aws", "env-2"), None);
    // Claimed by this directory's claim.
    build.put("mine", json!({"claim": "env-3"}));
    build.put("aws-environments", json!({"remove": "mine"}));
    assert_eq!(item(&server, "aws", "env-3"), None);
    // A claim.json of a claim that has ended, the item held by another key: refused.
    build.put("stale", json!({"claim": "env-4"}));
    release_by_name(&server, "aws", "env-4");
    claim_as(&server, "aws", "env-4", "someone-else");
    let error = build.out(json!({"remove": "stale"})).error();
    assert!(error.contains("cannot remove item \"env-4\""), "{error}");
    assert!(item(&server, "aws", "env-4").is_some());
    // Nothing there: fails.
    let error = build.out(json!({"remove": "one"})).error();
    assert!(error.contains("env-1"), "{error}");
}

#[test]
fn add_and_add_claimed_then_release_the_added_claim() {
    let server = common::Server::start();
    add(&server, "aws", "env-1", "");
    let build = Build::new(&source(&server, "aws"), "create-env", "1001");
    build.task_output("new-env", "env-9", "url: https://env-9\n");
    let response = build.put("aws-environments", json!({"add": "new-env"}));
    let added = item(&server, "aws", "env-9").expect("added");
    assert_eq!(added["metadata"], "url: https://env-9\n");
    assert_eq!(added["claimed"], false);
    assert_eq!(metadata(&response)["lock_name"], "env-9");
    assert_eq!(build.item("aws-environments").1, "url: https://env-9\n");
    // The same again: nothing changes; other metadata: refused.
    build.put("aws-environments", json!({"add": "new-env"}));
    build.task_output("changed", "env-9", "other");
    let error = build.out(json!({"add": "changed"})).error();
    assert!(error.contains("cannot add item \"env-9\""), "{error}");
    assert_eq!(
        item(&server, "aws", "env-9").expect("kept")["metadata"],
        "url: https://env-9\n"
    );

    // add_claimed: claimed by this build; the get after it writes the claim; releasing it
    // checks the key.
    build.task_output("claimed-env", "env-10", "m");
    let response = build.put("claimed-env-step", json!({"add_claimed": "claimed-env"}));
    let key = response["version"]["key"].as_str().expect("a claim's key");
    assert_eq!(holder_key(&server, "aws", "env-10").as_deref(), Some(key));
    assert_eq!(
        build.claim_file("claimed-env-step").expect("claim.json")["key"],
        key
    );
    build.put("aws-environments", json!({"release": "claimed-env-step"}));
    assert_eq!(holder_key(&server, "aws", "env-10"), None);
    // A directory without metadata cannot be added.
    let dir = build.step("no-metadata");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("name"), "env-11\n").expect("name");
    let error = build.out(json!({"add": "no-metadata"})).error();
    assert!(error.contains("params.add: cannot read"), "{error}");
    assert!(error.contains("metadata"), "{error}");
}

#[test]
fn update_waits_while_claimed_and_adds_when_absent() {
    let server = common::Server::start();
    add(&server, "aws", "env-1", "old");
    claim_as(&server, "aws", "env-1", "someone");
    let build = Build::new(&source(&server, "aws"), "refresh", "1101");
    build.task_output("fresh", "env-1", "new");
    let mut waiting = build.start_out(json!({"update": "fresh"}));
    wait_for_log(
        &waiting,
        "item \"env-1\" of pool \"aws\" is claimed by key \"someone\"",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(waiting.running(), "the update did not wait");
    assert_eq!(
        item(&server, "aws", "env-1").expect("item")["metadata"],
        "old"
    );

    release_by_name(&server, "aws", "env-1");
    let response = waiting.finish(Duration::from_secs(20)).json();
    assert_eq!(
        item(&server, "aws", "env-1").expect("item")["metadata"],
        "new"
    );
    assert_eq!(metadata(&response)["lock_name"], "env-1");

    build.task_output("absent", "env-2", "added by update");
    build.out(json!({"update": "absent"})).json();
    let added = item(&server, "aws", "env-2").expect("added");
    assert_eq!(
        (added["metadata"].as_str(), added["claimed"].as_bool()),
        (Some("added by update"), Some(false))
    );
}

#[test]
fn check_waits_until_unclaimed_and_fails_at_once_on_a_missing_item() {
    let server = common::Server::start();
    aws_pool(&server);
    claim_as(&server, "aws", "env-1", "someone");
    let build = Build::new(&source(&server, "aws"), "after-env", "1201");
    build.task_output("env", "env-1", "");
    let mut waiting = build.start_out(json!({"check": "env"}));
    wait_for_log(&waiting, "is claimed by key \"someone\"");
    std::thread::sleep(Duration::from_millis(200));
    assert!(waiting.running(), "check did not wait");
    release_by_name(&server, "aws", "env-1");
    let response = waiting.finish(Duration::from_secs(20)).json();
    assert_eq!(metadata(&response)["claimed"], "false");

    // Unclaimed already: at once.
    build.out(json!({"check": "env"})).json();
    // An item that does not exist: fails at once, with a message.
    build.task_output("missing", "env-7", "");
    let outcome = build.out(json!({"check": "missing"}));
    let error = outcome.error();
    assert!(error.contains("env-7"), "{error}");
    assert!(error.contains("404"), "{error}");
    assert!(
        outcome.elapsed < Duration::from_secs(5),
        "{:?}",
        outcome.elapsed
    );
}

#[test]
fn check_unclaimed_waits_until_a_concurrent_claim() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");
    let watcher = Build::new(&src, "watch", "1301");
    watcher.task_output("env", "env-2", "");
    let mut waiting = watcher.start_out(json!({"check_unclaimed": "env"}));
    wait_for_log(&waiting, "item \"env-2\" of pool \"aws\" is unclaimed");
    std::thread::sleep(Duration::from_millis(200));
    assert!(waiting.running(), "check_unclaimed did not wait");

    let claimer = Build::new(&src, "deploy", "1302");
    let claimed = claimer.put("env", json!({"claim": "env-2"}));
    let response = waiting.finish(Duration::from_secs(20)).json();
    assert_eq!(metadata(&response)["claimed"], "true");
    assert_eq!(
        metadata(&response)["key"],
        claimed["version"]["key"].as_str().expect("key")
    );
    // Claimed already: at once; missing: fails.
    watcher.out(json!({"check_unclaimed": "env"})).json();
    watcher.task_output("missing", "nope", "");
    let error = watcher.out(json!({"check_unclaimed": "missing"})).error();
    assert!(error.contains("nope"), "{error}");
}

#[test]
fn check_emits_a_new_version_when_the_pool_changes() {
    let server = common::Server::start();
    let src = source(&server, "aws");
    let check = |version: Option<&Value>| -> Vec<Value> {
        let mut request = json!({ "source": src });
        if let Some(version) = version {
            request["version"] = version.clone();
        }
        let answer = run("check", None, &request, &[]).json();
        answer.as_array().expect("a list").clone()
    };
    // No items yet: no version.
    assert!(check(None).is_empty());
    add(&server, "aws", "env-1", "a");
    let first = check(None);
    assert_eq!(first.len(), 1);
    let v1 = first[0].clone();
    // Unchanged: the version given comes back.
    assert_eq!(check(Some(&v1)), std::slice::from_ref(&v1));

    let mut seen = vec![v1.clone()];
    let mut previous = v1;
    let changes: [&dyn Fn(); 4] = [
        &|| claim_as(&server, "aws", "env-1", "k"),
        &|| release_by_name(&server, "aws", "env-1"),
        &|| add(&server, "aws", "env-2", ""),
        &|| {
            let reply = common::call(
                "PUT",
                &server.url("/pool/aws/item/env-2"),
                Some(&json!({"metadata": "changed"}).to_string()),
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
        },
    ];
    for (n, change) in changes.iter().enumerate() {
        change();
        let now = check(Some(&previous));
        assert_eq!(now.len(), 1);
        assert_ne!(
            now[0]["ref"], previous["ref"],
            "change {n} made no new version"
        );
        assert!(!seen.contains(&now[0]), "change {n}: {} again", now[0]);
        seen.push(now[0].clone());
        previous = now[0].clone();
    }
    // A claim names the claimed item; a put's version is the one check then keeps.
    let build = Build::new(&src, "deploy", "1401");
    let put = build.put("env", json!({"claim": "env-2"}));
    assert_eq!(check(Some(&put["version"])), [put["version"].clone()]);
    assert_ne!(put["version"]["ref"], previous["ref"]);
    let fresh = check(None);
    assert_eq!(fresh[0]["item"], "env-2");
    assert_eq!(fresh[0]["ref"], put["version"]["ref"]);
}

/// pool-resource fails a get of a claim that has ended ("lock instance is no longer
/// acquired"); so does this, saying what became of the item.
#[test]
fn get_of_a_claim_that_has_ended_fails() {
    let server = common::Server::start();
    aws_pool(&server);
    let src = source(&server, "aws");
    let deploy = Build::new(&src, "deploy", "1501");
    let put = deploy.put("env", json!({"claim": "env-1"}));
    release_by_name(&server, "aws", "env-1");
    let test = Build::new(&src, "test", "1502");
    let error = test.get("env", &put["version"]).error();
    assert!(
        error.contains("no longer held by the claim of this version"),
        "{error}"
    );
    assert!(error.contains("unclaimed"), "{error}");
    assert!(!test.step("env").join("name").exists());
}

/// Stopped by a signal while waiting: exits at once, and never becomes the holder.
#[test]
fn sigterm_while_acquiring_leaves_nothing_claimed() {
    let server = common::Server::start();
    add(&server, "aws", "env-1", "");
    claim_as(&server, "aws", "env-1", "holder");
    let build = Build::new(&source(&server, "aws"), "deploy", "1601");
    let waiting = build.start_out(json!({"acquire": true}));
    wait_for_pool_waiters(&server, "aws", 1);
    wait_for_log(&waiting, "has no free item");
    waiting.signal(libc::SIGTERM);
    let outcome = waiting.finish(Duration::from_secs(20));
    let error = outcome.error();
    assert!(
        error.contains("stopped by SIGTERM while claiming an item of pool \"aws\""),
        "{error}"
    );
    wait_for_pool_waiters(&server, "aws", 0);
    release_by_name(&server, "aws", "env-1");
    assert_eq!(holder_key(&server, "aws", "env-1"), None);
}

/// A grant that raced with the signal (granted by the server, the answer not yet read) is
/// found by the claim's key and given back. A stub in front of the real server forwards the
/// claim but holds back the answer.
#[test]
fn a_grant_raced_by_sigterm_is_given_back() {
    let server = common::Server::start();
    add(&server, "aws", "env-1", "");
    add(&server, "aws", "env-2", "");
    let base = server.base.clone();
    let stub = Stub::start(move |request| {
        let answer = forward(&base, request);
        if request.method == "PUT" && request.path().ends_with("/claim") {
            // Granted on the server; the answer never arrives.
            std::thread::sleep(Duration::from_secs(30));
        }
        answer
    });
    let src = json!({"locker_uri": stub.base, "pool": "aws"});
    let build = Build::new(&src, "deploy", "1701");
    let waiting = build.start_out(json!({"acquire": true}));
    let deadline = Instant::now() + Duration::from_secs(10);
    let granted = loop {
        let held: Vec<String> = ["env-1", "env-2"]
            .into_iter()
            .filter(|name| holder_key(&server, "aws", name).is_some())
            .map(str::to_string)
            .collect();
        if let [one] = held.as_slice() {
            break one.clone();
        }
        assert!(Instant::now() < deadline, "never granted: {held:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    waiting.signal(libc::SIGTERM);
    let outcome = waiting.finish(Duration::from_secs(20));
    let error = outcome.error();
    assert!(
        error.contains("a grant may have raced with the signal"),
        "{error}"
    );
    assert!(
        error.contains(&format!("released item \"{granted}\"")),
        "{error}"
    );
    assert!(
        outcome.elapsed < Duration::from_secs(10),
        "{:?}",
        outcome.elapsed
    );
    assert_eq!(holder_key(&server, "aws", &granted), None);
}

/// `ttl` and `release_when_build_ends` (locker's additions to pool-resource's params) reach
/// the server with the claim, with the build as holder info, and take effect: the item
/// claimed with `release_when_build_ends` is released once Concourse (a stand-in answering
/// every build's status: started, then aborted) says its build ended; the other is kept. A
/// forwarding stub in front of the server records what the resource sends.
#[test]
fn ttl_and_release_when_build_ends_reach_the_server_and_take_effect() {
    let concourse = Concourse::start("started");
    let server = concourse.server();
    add(&server, "aws", "env-1", "");
    add(&server, "aws", "env-2", "");
    let base = server.base.clone();
    let recorder = Stub::start(move |request| forward(&base, request));
    let src = json!({"locker_uri": recorder.base, "pool": "aws"});
    let claims = || -> Vec<Value> {
        recorder
            .requests()
            .into_iter()
            .filter(|r| r.method == "PUT" && r.path().ends_with("/claim"))
            .map(|r| serde_json::from_str(&r.body).expect("claim body"))
            .collect()
    };

    // env-1 with a lease only: kept whatever becomes of the build.
    let leased = Build::new(&src, "deploy", "1801");
    leased.put("env", json!({"claim": "env-1", "ttl": "1h"}));
    let sent = claims();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0]["ttl"], "3600s", "{}", sent[0]);
    assert!(
        sent[0].get("release_when_build_ends").is_none(),
        "{}",
        sent[0]
    );
    assert_eq!(sent[0]["info"]["build_id"], "1801");
    let held = item(&server, "aws", "env-1").expect("item");
    assert!(held["holder"]["expires_at"].is_string(), "no lease: {held}");
    assert_eq!(held["holder"]["info"]["job"], "deploy");

    // env-2 released when its build ends.
    let ending = Build::new(&src, "deploy", "1802");
    ending.put(
        "env",
        json!({"claim": "env-2", "release_when_build_ends": true}),
    );
    let sent = claims();
    assert_eq!(sent[1]["release_when_build_ends"], true, "{}", sent[1]);
    assert!(sent[1].get("ttl").is_none(), "{}", sent[1]);
    // Kept while the build runs (the server asks Concourse every 200 ms).
    let asked = concourse.stub.requests().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while concourse.stub.requests().len() < asked + 2 {
        assert!(
            Instant::now() < deadline,
            "the server never asked Concourse"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(holder_key(&server, "aws", "env-2").is_some());
    concourse.set("aborted");
    let deadline = Instant::now() + Duration::from_secs(20);
    while holder_key(&server, "aws", "env-2").is_some() {
        assert!(
            Instant::now() < deadline,
            "env-2 was kept after its build ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        holder_key(&server, "aws", "env-1").is_some(),
        "env-1 (no release_when_build_ends) was released too"
    );
}

#[test]
fn configuration_errors_fail_at_once_with_the_field() {
    let src = json!({"locker_uri": "http://127.0.0.1:9", "pool": "aws"});
    let build = Build::new(&src, "job", "1901");
    build.task_output("env", "env-1", "");
    let cases = [
        (json!({}), "one of acquire: true, claim, release"),
        (
            json!({"key": "k", "lock_op": "lock"}),
            "one of acquire: true",
        ),
        (
            json!({"acquire": true, "release": "env"}),
            "params.acquire and params.release are both set",
        ),
        (
            json!({"release": "env", "ttl": "1h"}),
            "params.ttl applies only",
        ),
        (json!({"release": "nowhere"}), "params.release: cannot read"),
    ];
    for (params, expected) in cases {
        let outcome = build.out(params.clone());
        let error = outcome.error();
        assert!(error.contains(expected), "{params}: {error}");
        assert!(
            outcome.elapsed < Duration::from_secs(5),
            "{params}: {:?}",
            outcome.elapsed
        );
    }
    let both = json!({"locker_uri": "http://127.0.0.1:9", "pool": "aws", "lock_name": "a"});
    let error = run("check", None, &json!({"source": both}), &[]).error();
    assert!(
        error.contains("source.pool and source.lock_name are both set"),
        "{error}"
    );
}

/// A locker without the pool API (404 everywhere) is named as such, not taken for an empty
/// pool.
#[test]
fn a_server_without_pools_is_a_clear_error() {
    let stub = Stub::start(|_| (404, json!({"error": "not found"}).to_string()));
    let src = json!({"locker_uri": stub.base, "pool": "aws"});
    let error = run("check", None, &json!({"source": src}), &[]).error();
    assert!(
        error.contains("has no pools (GET /pools answered 404)"),
        "{error}"
    );
}
