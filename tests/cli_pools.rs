//! `locker pool ...` against the real server on loopback: each subcommand (list, acquire with
//! and without a command, release, add, remove, update) through the real binary, with the
//! server's state checked over the API; and `locker pool import` of a pool-resource repository
//! made with real `git`.

pub mod cli_common;
pub mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use cli_common::{Finished, Holdable, finish, locker, read, run};
use common::{Server, wait_until};

fn get(server: &Server, path: &str) -> common::Reply {
    common::call("GET", &server.url(path), None)
}

/// `GET /pool/{pool}` as JSON (`Null` when the server has no such pool).
fn pool(server: &Server, name: &str) -> Value {
    let reply = get(server, &format!("/pool/{name}"));
    match reply.status {
        200 => reply.json(),
        404 => Value::Null,
        _ => panic!("GET /pool/{name}: {} {}", reply.status, reply.body),
    }
}

/// One item of `GET /pool/{pool}` (`Null` when absent).
fn item(server: &Server, pool_name: &str, name: &str) -> Value {
    pool(server, pool_name)["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// The key an item is claimed under, `None` when unclaimed.
fn holder_key(server: &Server, pool_name: &str, name: &str) -> Option<String> {
    item(server, pool_name, name)["holder"]["key"]
        .as_str()
        .map(str::to_string)
}

/// Adds an unclaimed item over the API.
fn add(server: &Server, pool_name: &str, name: &str, metadata: &str) {
    let reply = common::call(
        "POST",
        &server.url(&format!("/pool/{pool_name}/item/{name}")),
        Some(&json!({ "metadata": metadata }).to_string()),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
}

/// Claims a named item under `key` over the API, at once.
fn claim(server: &Server, pool_name: &str, name: &str, key: &str) {
    let reply = common::call(
        "PUT",
        &server.url(&format!("/pool/{pool_name}/item/{name}/claim")),
        Some(&json!({ "key": key }).to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn waiters(server: &Server, pool_name: &str) -> u64 {
    pool(server, pool_name)["waiters"].as_u64().unwrap_or(0)
}

/// Runs `locker ARGS` to its end and checks its exit code.
fn exits(server: &Server, args: &[&str], code: i32) -> Finished {
    let done = run(&mut locker(server, args));
    assert_eq!(
        done.code,
        Some(code),
        "locker {args:?}\nstdout: {}\nstderr: {}",
        done.stdout,
        done.stderr
    );
    done
}

fn ok(done: &Finished) {
    assert_eq!(
        done.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        done.stdout,
        done.stderr
    );
}

#[test]
fn pool_list_shows_pools_and_items_with_state_holder_and_waiters() {
    let server = Server::start();
    for name in ["env-1", "env-2"] {
        add(&server, "aws", name, "");
    }
    add(&server, "gcp", "g-1", "");
    claim(&server, "aws", "env-1", "deploy-7");
    // A claim waiting for the held item.
    let url = server.url("/pool/aws/item/env-1/claim?wait=20s");
    let waiter = std::thread::spawn(move || {
        common::call("PUT", &url, Some(&json!({"key": "next"}).to_string()))
    });
    wait_until("the claim to queue", || waiters(&server, "aws") == 1);

    let pools = exits(&server, &["pool", "list"], 0);
    let lines: Vec<Vec<&str>> = pools
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["POOL", "ITEMS", "CLAIMED", "WAITERS"],
            vec!["aws", "2", "1", "1"],
            vec!["gcp", "1", "0", "0"],
        ],
        "{}",
        pools.stdout
    );

    let items = exits(&server, &["pool", "list", "aws"], 0);
    let lines: Vec<&str> = items.stdout.lines().collect();
    assert!(lines[0].starts_with("ITEM") && lines[0].contains("CLAIMED BY"));
    let env1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        env1[..4],
        ["env-1", "claimed", "deploy-7", "deploy-7"],
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["env-2", "unclaimed"]
    );
    assert_eq!(
        lines[3], "pool \"aws\": 2 items, 1 claimed, 1 claims waiting",
        "{}",
        items.stdout
    );

    let json_list = run(&mut locker(&server, &["pool", "list", "aws", "--json"]));
    let listed: Value = serde_json::from_str(&json_list.stdout).expect("JSON");
    assert_eq!(listed, pool(&server, "aws"));
    let none = exits(&server, &["pool", "list", "nothing-here"], 0);
    assert_eq!(
        none.stdout.trim(),
        "pool \"nothing-here\" has no items (0 claims waiting)"
    );

    // Let the waiter in, so its thread ends.
    let released = common::call(
        "DELETE",
        &server.url("/pool/aws/item/env-1/claim"),
        Some("{}"),
    );
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(waiter.join().expect("waiter").status, 200);
}

#[test]
fn pool_acquire_without_a_command_prints_the_item_and_keeps_it_claimed() {
    let server = Server::start();
    add(&server, "aws", "env-1", "region: eu-west-1\n");

    let taken = exits(&server, &["pool", "acquire", "aws", "--key", "k1"], 0);
    assert_eq!(taken.stdout, "env-1\n");
    assert!(
        taken
            .stderr
            .contains("locker pool release aws env-1 --key k1"),
        "{}",
        taken.stderr
    );
    let held = item(&server, "aws", "env-1");
    assert_eq!(held["holder"]["key"], "k1", "{held}");
    // No command, no --ttl: no lease, held until released, as in pool-resource.
    assert!(held["holder"]["expires_at"].is_null(), "{held}");

    // Every item is claimed: --wait 0 gives up at once, --wait D after D; both exit 73.
    let at_once = exits(&server, &["pool", "acquire", "aws", "--wait", "0"], 73);
    assert!(
        at_once.stderr.contains("all 1 items are claimed"),
        "{}",
        at_once.stderr
    );
    let later = exits(
        &server,
        &[
            "pool", "acquire", "aws", "--item", "env-1", "--wait", "400ms",
        ],
        73,
    );
    assert!(later.elapsed >= Duration::from_millis(400));
    assert!(later.stderr.contains("key \"k1\""), "{}", later.stderr);
    assert_eq!(holder_key(&server, "aws", "env-1").as_deref(), Some("k1"));

    // --json: the claim with its metadata; --save-metadata writes it to a file.
    add(&server, "aws", "env-2", "region: us-east-1\n");
    let dir = common::temp_dir();
    let saved = dir.path().join("metadata");
    let as_json = exits(
        &server,
        &[
            "pool",
            "acquire",
            "aws",
            "--json",
            "--ttl",
            "1m",
            "--save-metadata",
            saved.to_str().expect("path"),
        ],
        0,
    );
    let claim: Value = serde_json::from_str(&as_json.stdout).expect("JSON");
    assert_eq!(claim["item"], "env-2");
    assert_eq!(claim["metadata"], "region: us-east-1\n");
    assert_eq!(read(&saved), "region: us-east-1\n");
    assert!(item(&server, "aws", "env-2")["holder"]["expires_at"].is_string());

    // A pool without items, an item that does not exist: refused at once (76).
    exits(&server, &["pool", "acquire", "nothing-here"], 76);
    exits(&server, &["pool", "acquire", "aws", "--item", "env-9"], 76);
}

#[test]
fn pool_acquire_runs_the_command_with_the_item_and_its_metadata_and_releases_after() {
    let server = Server::start();
    let metadata = "url: https://env-1.example.com\ntoken: 'it''s'\n";
    add(&server, "aws", "env-1", metadata);
    let dir = common::temp_dir();
    let (seen, from_env, from_file, go) = (
        dir.path().join("seen"),
        dir.path().join("env"),
        dir.path().join("file"),
        dir.path().join("go"),
    );
    let script = format!(
        "echo \"$LOCKER_POOL $LOCKER_POOL_ITEM $LOCKER_POOL_KEY $LOCKER_POOL_GENERATION \
         $LOCKER_POOL_METADATA_FILE\" > {seen}.tmp; printf %s \"$LOCKER_POOL_METADATA\" > {env}; \
         cat \"$LOCKER_POOL_METADATA_FILE\" > {file}; mv {seen}.tmp {seen}; \
         while [ ! -e {go} ]; do sleep 0.05; done; exit 7",
        seen = seen.display(),
        env = from_env.display(),
        file = from_file.display(),
        go = go.display(),
    );
    let started = Instant::now();
    let child = locker(
        &server,
        &[
            "pool", "acquire", "aws", "--key", "run-1", "--", "sh", "-c", &script,
        ],
    )
    .spawn()
    .expect("start");
    wait_until("the command to start", || !read(&seen).is_empty());
    let line = read(&seen);
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..3], ["aws", "env-1", "run-1"], "{line}");
    assert!(fields[3].parse::<u64>().is_ok(), "{line}");
    let metadata_file = fields[4].to_string();
    assert_eq!(read(&from_env), metadata);
    assert_eq!(read(&from_file), metadata);

    // While it runs: claimed under its key, with a lease and the holder info of the client.
    let held = item(&server, "aws", "env-1");
    assert_eq!(held["holder"]["key"], "run-1", "{held}");
    assert!(held["holder"]["expires_at"].is_string(), "{held}");
    assert_eq!(held["holder"]["info"]["client"], "locker pool acquire");

    std::fs::write(&go, "").expect("let the command exit");
    let done = finish(child, started, Duration::from_secs(20));
    assert_eq!(done.code, Some(7), "{}", done.stderr);
    assert_eq!(done.stdout, "", "stdout is the command's");
    assert!(
        done.stderr.contains("claimed item \"env-1\""),
        "{}",
        done.stderr
    );
    assert_eq!(holder_key(&server, "aws", "env-1"), None, "not released");
    assert!(
        !Path::new(&metadata_file).exists(),
        "the metadata file was left behind"
    );
}

#[test]
fn concurrent_pool_acquires_never_share_an_item() {
    let server = Server::start();
    for name in ["env-1", "env-2"] {
        add(&server, "aws", name, "");
    }
    let dir = common::temp_dir();
    let log = dir.path().join("log");
    let script = format!(
        "echo \"enter $LOCKER_POOL_ITEM\" >> {0}; sleep 0.3; echo \"exit $LOCKER_POOL_ITEM\" >> {0}",
        log.display()
    );
    let started = Instant::now();
    let children: Vec<Child> = (0..5)
        .map(|_| {
            locker(
                &server,
                &["pool", "acquire", "aws", "--", "sh", "-c", &script],
            )
            .spawn()
            .expect("start")
        })
        .collect();
    for child in children {
        ok(&finish(child, started, Duration::from_secs(30)));
    }
    let text = read(&log);
    let mut inside: Vec<String> = Vec::new();
    for line in text.lines() {
        let (what, name) = line.split_once(' ').expect("enter/exit ITEM");
        match what {
            "enter" => {
                assert!(
                    !inside.contains(&name.to_string()),
                    "{name} held twice:\n{text}"
                );
                inside.push(name.to_string());
            }
            _ => inside.retain(|n| n != name),
        }
    }
    assert_eq!(text.lines().count(), 10, "{text}");
    // Two items, five runs of 0.3 s: the runs overlapped, each on its own item.
    assert!(started.elapsed() < Duration::from_secs(20));
    for name in ["env-1", "env-2"] {
        assert_eq!(holder_key(&server, "aws", name), None);
    }
}

/// Item "env-1" of pool "aws", for the scenarios `locker pool acquire` shares with
/// `locker lock`.
fn with_item(scenario: fn(&Holdable)) {
    let server = Server::start();
    add(&server, "aws", "env-1", "");
    let server = &server;
    scenario(&Holdable {
        server,
        take: &["pool", "acquire", "aws", "--item", "env-1"],
        named: "item \"env-1\" of pool \"aws\"",
        key: &|| holder_key(server, "aws", "env-1"),
        waiters: &|| waiters(server, "aws"),
        hold: &|key| {
            let url = server.url("/pool/aws/item/env-1/claim");
            let body = json!({ "key": key }).to_string();
            common::call("PUT", &url, Some(&body)).status == 200
        },
        // By name, as pool-resource's release does.
        force_release: &|| {
            let url = server.url("/pool/aws/item/env-1/claim");
            let released = common::call("DELETE", &url, None);
            assert_eq!(released.status, 200, "{}", released.body);
        },
    });
}

#[test]
fn a_signal_while_waiting_for_an_item_stops_at_once_and_holds_nothing() {
    with_item(cli_common::a_signal_while_waiting_stops_at_once_and_holds_nothing);
}

#[test]
fn sigint_is_forwarded_and_the_item_released_after_the_command_exits() {
    with_item(cli_common::sigint_is_forwarded_and_released_after_the_command_exits);
}

#[test]
fn a_lost_item_signals_the_command_and_exits_74() {
    with_item(cli_common::a_lost_holding_signals_the_command_and_exits_74);
}

#[test]
fn pool_add_reads_metadata_from_a_file_stdin_or_the_flag_and_adding_again_changes_nothing() {
    let server = Server::start();
    let dir = common::temp_dir();
    let file = dir.path().join("env-1.yml");
    std::fs::write(&file, "from: file\n").expect("write");
    let from_file = exits(
        &server,
        &[
            "pool",
            "add",
            "aws",
            "env-1",
            "--metadata-file",
            file.to_str().expect("path"),
        ],
        0,
    );
    assert_eq!(
        from_file.stdout.trim(),
        "added item \"env-1\" of pool \"aws\""
    );
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "from: file\n");

    let mut piped = locker(&server, &["pool", "add", "aws", "env-2"]);
    piped.stdin(std::process::Stdio::piped());
    let mut child = piped.spawn().expect("start");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"from: stdin\n").expect("write stdin");
    }
    ok(&finish(child, Instant::now(), Duration::from_secs(20)));
    assert_eq!(item(&server, "aws", "env-2")["metadata"], "from: stdin\n");

    exits(
        &server,
        &["pool", "add", "aws", "env-3", "--metadata", "from: flag"],
        0,
    );
    assert_eq!(item(&server, "aws", "env-3")["metadata"], "from: flag");

    // Again, the same way: nothing changes, and that is success.
    let again = exits(
        &server,
        &["pool", "add", "aws", "env-3", "--metadata", "from: flag"],
        0,
    );
    assert!(again.stdout.contains("nothing changed"), "{}", again.stdout);
    // Otherwise: refused (76), the item as it was.
    exits(
        &server,
        &["pool", "add", "aws", "env-3", "--metadata", "other"],
        76,
    );
    assert_eq!(item(&server, "aws", "env-3")["metadata"], "from: flag");

    // --claimed: added claimed under the key given.
    exits(
        &server,
        &[
            "pool",
            "add",
            "aws",
            "env-4",
            "--claimed",
            "--key",
            "build-9",
            "--metadata",
            "",
        ],
        0,
    );
    assert_eq!(
        holder_key(&server, "aws", "env-4").as_deref(),
        Some("build-9")
    );
    exits(
        &server,
        &[
            "pool",
            "add",
            "aws",
            "env-5",
            "--metadata-file",
            "/nonexistent/file",
        ],
        2,
    );
}

#[test]
fn pool_release_needs_the_key_or_force_and_a_wrong_key_exits_76() {
    let server = Server::start();
    add(&server, "aws", "env-1", "");
    claim(&server, "aws", "env-1", "k1");

    exits(&server, &["pool", "release", "aws", "env-1"], 2);
    exits(
        &server,
        &["pool", "release", "aws", "env-1", "--key", "nope"],
        76,
    );
    assert_eq!(holder_key(&server, "aws", "env-1").as_deref(), Some("k1"));

    let released = exits(
        &server,
        &["pool", "release", "aws", "env-1", "--key", "k1"],
        0,
    );
    assert!(
        released.stdout.contains("released item \"env-1\""),
        "{}",
        released.stdout
    );
    assert_eq!(holder_key(&server, "aws", "env-1"), None);

    claim(&server, "aws", "env-1", "k2");
    let forced = exits(
        &server,
        &["pool", "release", "aws", "env-1", "--force", "--json"],
        0,
    );
    let freed: Value = serde_json::from_str(&forced.stdout).expect("JSON");
    assert_eq!(freed["released"], true);
    assert_eq!(freed["previous"]["key"], "k2");
    assert_eq!(holder_key(&server, "aws", "env-1"), None);

    exits(&server, &["pool", "release", "aws", "env-9", "--force"], 76);
}

#[test]
fn pool_remove_takes_claimed_or_unclaimed_items_unless_a_key_guards_them() {
    let server = Server::start();
    for name in ["env-1", "env-2", "env-3"] {
        add(&server, "aws", name, "");
    }
    exits(&server, &["pool", "remove", "aws", "env-1"], 0);
    assert!(item(&server, "aws", "env-1").is_null());

    claim(&server, "aws", "env-2", "k1");
    exits(
        &server,
        &["pool", "remove", "aws", "env-2", "--key", "other"],
        76,
    );
    assert_eq!(holder_key(&server, "aws", "env-2").as_deref(), Some("k1"));
    let claimed = exits(&server, &["pool", "remove", "aws", "env-2"], 0);
    assert!(
        claimed.stdout.contains("it was claimed under key \"k1\""),
        "{}",
        claimed.stdout
    );
    assert!(item(&server, "aws", "env-2").is_null());

    exits(&server, &["pool", "remove", "aws", "env-2"], 76);
    assert!(!item(&server, "aws", "env-3").is_null());
}

#[test]
fn pool_update_adds_an_absent_item_and_waits_while_it_is_claimed() {
    let server = Server::start();
    exits(
        &server,
        &["pool", "update", "aws", "env-1", "--metadata", "v1"],
        0,
    );
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "v1");

    claim(&server, "aws", "env-1", "k1");
    let update = |wait| {
        [
            "pool",
            "update",
            "aws",
            "env-1",
            "--metadata",
            "v2",
            "--wait",
            wait,
        ]
    };
    exits(&server, &update("0"), 73);
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "v1");

    let started = Instant::now();
    let waiting = locker(&server, &update("20s")).spawn().expect("start");
    server.wait_for_metric("locker_waiting_requests 1");
    assert_eq!(
        item(&server, "aws", "env-1")["metadata"],
        "v1",
        "changed while claimed"
    );
    let released = common::call(
        "DELETE",
        &server.url("/pool/aws/item/env-1/claim"),
        Some(&json!({"key": "k1"}).to_string()),
    );
    assert_eq!(released.status, 200, "{}", released.body);
    let done = finish(waiting, started, Duration::from_secs(20));
    ok(&done);
    assert!(
        done.stdout.contains("updated item \"env-1\""),
        "{}",
        done.stdout
    );
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "v2");
}

// ---- locker pool import ----

/// Runs git in `dir` with a fixed identity and no user or system configuration.
fn git(dir: &Path, args: &[&str]) {
    let output = Command::new("git")
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
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The items of the pool-resource README's example repository, with metadata:
/// (pool, claimed?, item, metadata).
const EXAMPLE: [(&str, bool, &str, &str); 5] = [
    ("aws", false, "env-1", "region: eu-west-1\nvpc: vpc-1\n"),
    ("aws", true, "env-2", "region: us-east-1\nvpc: vpc-2\n"),
    ("ping-pong-tables", false, "north-table", ""),
    (
        "vsphere",
        false,
        "83ed9977-3a10-4c49-a818-2d7a37693da7",
        "{\"datacenter\": \"dc-1\"}",
    ),
    (
        "vsphere",
        true,
        "f3cb3823-a45a-49e8-ab41-e43268494205",
        "{\"datacenter\": \"dc-2\"}",
    ),
];

/// A pool-resource repository shaped like its README's example (`.gitkeep` in every
/// `claimed/` and `unclaimed/`, a README beside the pools), made and committed with git, then
/// cloned: the checkout is what `import` reads.
fn example_repository(dir: &Path) -> std::path::PathBuf {
    let origin = dir.join("origin");
    std::fs::create_dir(&origin).expect("mkdir");
    git(&origin, &["init", "-q"]);
    for pool_name in ["aws", "ping-pong-tables", "vsphere"] {
        for state in ["claimed", "unclaimed"] {
            let state_dir = origin.join(pool_name).join(state);
            std::fs::create_dir_all(&state_dir).expect("mkdir");
            std::fs::write(state_dir.join(".gitkeep"), "").expect("write");
        }
    }
    for (pool_name, claimed, name, metadata) in EXAMPLE {
        let state = if claimed { "claimed" } else { "unclaimed" };
        std::fs::write(origin.join(pool_name).join(state).join(name), metadata).expect("write");
    }
    std::fs::write(origin.join("README.md"), "# our locks\n").expect("write");
    git(&origin, &["add", "-A"]);
    git(
        &origin,
        &["commit", "-q", "-m", "pools as pool-resource keeps them"],
    );
    git(dir, &["clone", "-q", "origin", "checkout"]);
    dir.join("checkout")
}

/// Every pool and item the server has: pool → item → (metadata, holder key).
fn server_pools(server: &Server) -> Value {
    let list = get(server, "/pools").json();
    let mut all = serde_json::Map::new();
    for summary in list["pools"].as_array().expect("pools") {
        let name = summary["name"].as_str().expect("name");
        let items: serde_json::Map<String, Value> = pool(server, name)["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                let name = i["name"].as_str().expect("name").to_string();
                (name, json!([i["metadata"], i["holder"]["key"]]))
            })
            .collect();
        all.insert(name.to_string(), Value::Object(items));
    }
    Value::Object(all)
}

fn import(server: &Server, dir: &Path, extra: &[&str]) -> Finished {
    let mut args = vec!["pool", "import", dir.to_str().expect("path")];
    args.extend_from_slice(extra);
    run(&mut locker(server, &args))
}

#[test]
fn import_dry_run_prints_what_it_would_do_and_changes_nothing() {
    let server = Server::start();
    let dir = common::temp_dir();
    let checkout = example_repository(dir.path());
    let dry = import(&server, &checkout, &["--dry-run"]);
    ok(&dry);
    for (pool_name, claimed, name, _) in EXAMPLE {
        let line = format!("would add pool {pool_name:?} item {name:?}: ");
        let said = dry
            .stdout
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("no {line:?} in {}", dry.stdout));
        let state = if claimed {
            "claimed under key \"imported-from-git\""
        } else {
            "unclaimed"
        };
        assert!(said.contains(state), "{said}");
    }
    assert!(
        dry.stdout
            .contains("dry run, nothing changed: would add 5 items to 3 pools"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        server_pools(&server),
        json!({}),
        "a dry run changed the server"
    );
}

#[test]
fn import_brings_in_a_pool_resource_repository_and_a_second_import_changes_nothing() {
    let server = Server::start();
    let dir = common::temp_dir();
    let checkout = example_repository(dir.path());
    let first = import(&server, &checkout, &[]);
    ok(&first);
    assert!(
        first
            .stdout
            .contains("added 5 items to 3 pools; 0 already there"),
        "{}",
        first.stdout
    );
    let mut expected = serde_json::Map::new();
    for (pool_name, claimed, name, metadata) in EXAMPLE {
        let key = if claimed {
            json!("imported-from-git")
        } else {
            Value::Null
        };
        expected
            .entry(pool_name)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(name.to_string(), json!([metadata, key]));
    }
    let expected = Value::Object(expected);
    assert_eq!(server_pools(&server), expected);
    // .gitkeep, .git and the README are not items or pools.
    assert!(!first.stdout.contains(".gitkeep") && !first.stdout.contains("README"));

    let second = import(&server, &checkout, &[]);
    ok(&second);
    assert!(
        second
            .stdout
            .contains("added 0 items to 3 pools; 5 already there, 0 differ"),
        "{}",
        second.stdout
    );
    assert_eq!(
        second.stdout.matches("unchanged pool").count(),
        5,
        "{}",
        second.stdout
    );
    assert_eq!(server_pools(&server), expected);
}

#[test]
fn items_claimed_in_git_are_imported_claimed_and_released_by_name() {
    let server = Server::start();
    let dir = common::temp_dir();
    let checkout = example_repository(dir.path());
    ok(&import(&server, &checkout, &[]));
    let env2 = item(&server, "aws", "env-2");
    assert_eq!(env2["claimed"], true, "{env2}");
    assert_eq!(env2["holder"]["key"], "imported-from-git");
    assert_eq!(env2["holder"]["info"]["client"], "locker pool import");
    assert!(env2["holder"]["expires_at"].is_null(), "{env2}");
    // Claimed: a pipeline acquiring from the pool gets the unclaimed item, not this one.
    let taken = exits(&server, &["pool", "acquire", "aws", "--wait", "0"], 0);
    assert_eq!(taken.stdout.trim(), "env-1");

    // The holding pipeline's `release:` step knows only `name` and `metadata`: a release
    // without a key, by name (the resource's own step, end to end: resource/tests/pools.rs
    // `an_item_claimed_in_git_and_imported_is_released_by_the_holding_pipelines_release_step`).
    let released = common::call("DELETE", &server.url("/pool/aws/item/env-2/claim"), None);
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(released.json()["previous"]["key"], "imported-from-git");
    assert_eq!(holder_key(&server, "aws", "env-2"), None);
    // ... and from a shell, by its key.
    let vsphere = "f3cb3823-a45a-49e8-ab41-e43268494205";
    exits(
        &server,
        &[
            "pool",
            "release",
            "vsphere",
            vsphere,
            "--key",
            "imported-from-git",
        ],
        0,
    );
    assert_eq!(holder_key(&server, "vsphere", vsphere), None);
}

#[test]
fn import_reports_an_item_that_differs_on_the_server_and_leaves_it_as_it_is() {
    let server = Server::start();
    let dir = common::temp_dir();
    let checkout = example_repository(dir.path());
    // Before the import: env-1 with other metadata, north-table claimed by a build.
    add(&server, "aws", "env-1", "region: moved\n");
    add(&server, "ping-pong-tables", "north-table", "");
    claim(&server, "ping-pong-tables", "north-table", "build-42");
    let done = import(&server, &checkout, &[]);
    assert_eq!(done.code, Some(76), "{}\n{}", done.stdout, done.stderr);
    assert!(
        done.stdout
            .contains("differs pool \"aws\" item \"env-1\": the server has other metadata"),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout
            .contains("differs pool \"ping-pong-tables\" item \"north-table\": the server has it claimed (key \"build-42\")"),
        "{}",
        done.stdout
    );
    assert!(done.stdout.contains("added 3 items"), "{}", done.stdout);
    assert!(done.stderr.contains("2 items differ"), "{}", done.stderr);
    // Left as they were; the rest imported.
    assert_eq!(item(&server, "aws", "env-1")["metadata"], "region: moved\n");
    assert_eq!(
        holder_key(&server, "ping-pong-tables", "north-table").as_deref(),
        Some("build-42")
    );
    assert_eq!(
        holder_key(&server, "aws", "env-2").as_deref(),
        Some("imported-from-git")
    );
}
