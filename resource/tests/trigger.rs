//! `source.trigger: released` against the real server: `check` emits one version per release
//! of the resource's lock, in order, and none for acquires or other locks; `in` writes the
//! release's event.

#[path = "../../tests/common/mod.rs"]
pub mod common;
pub mod support;

use serde_json::{Value, json};
use support::{metadata, run};

fn source(server: &common::Server, lock: &str) -> Value {
    json!({"locker_uri": server.base, "lock_name": lock, "trigger": "released"})
}

fn check(source: &Value, version: Option<&Value>) -> Vec<Value> {
    let request = match version {
        Some(version) => json!({"source": source, "version": version}),
        None => json!({"source": source}),
    };
    let answer = run("check", None, &request, &[]).json();
    answer.as_array().expect("a list of versions").clone()
}

fn acquire(server: &common::Server, name: &str, body: Value) {
    let reply = common::call(
        "PUT",
        &server.url(&format!("/lock/{name}")),
        Some(&body.to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn release(server: &common::Server, name: &str, key: &str, force: bool) {
    let (query, body) = match force {
        true => ("?force=true", json!({})),
        false => ("", json!({"key": key})),
    };
    let reply = common::call(
        "DELETE",
        &server.url(&format!("/lock/{name}{query}")),
        Some(&body.to_string()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn kinds(versions: &[Value]) -> Vec<&str> {
    versions
        .iter()
        .map(|v| v["kind"].as_str().unwrap_or("?"))
        .collect()
}

fn ids(versions: &[Value]) -> Vec<u64> {
    versions
        .iter()
        .map(|v| {
            v["event"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("no event id in {v}"))
        })
        .collect()
}

#[test]
fn each_release_of_the_lock_is_one_new_version_in_order() {
    let server = common::Server::start();
    let src = source(&server, "deploy-prod");

    // Nothing released yet: no version, though the lock is held.
    assert!(check(&src, None).is_empty());
    acquire(&server, "deploy-prod", json!({"key": "a"}));
    assert!(check(&src, None).is_empty(), "an acquire made a version");

    release(&server, "deploy-prod", "a", false);
    let first = check(&src, None);
    assert_eq!(kinds(&first), ["released"]);
    let v1 = first[0].clone();
    // Every value a string, as Concourse wants.
    assert!(
        v1.as_object()
            .expect("object")
            .values()
            .all(Value::is_string),
        "{v1}"
    );

    // Nothing since: the previous version alone, as it was.
    assert_eq!(check(&src, Some(&v1)), std::slice::from_ref(&v1));

    // Acquires, another lock's release and a queued waiter make no version.
    acquire(&server, "deploy-prod", json!({"key": "b"}));
    acquire(&server, "staging", json!({"key": "s"}));
    release(&server, "staging", "s", false);
    assert_eq!(check(&src, Some(&v1)), std::slice::from_ref(&v1));

    // One release, one new version; then a forced one.
    release(&server, "deploy-prod", "b", false);
    let after = check(&src, Some(&v1));
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], v1);
    assert_eq!(kinds(&after[1..]), ["released"]);
    let v2 = after[1].clone();

    acquire(&server, "deploy-prod", json!({"key": "c"}));
    release(&server, "deploy-prod", "", true);
    acquire(&server, "deploy-prod", json!({"key": "d"}));
    release(&server, "deploy-prod", "d", false);
    let later = check(&src, Some(&v2));
    assert_eq!(kinds(&later), ["released", "force-released", "released"]);
    let later_ids = ids(&later);
    assert!(later_ids.windows(2).all(|w| w[0] < w[1]), "{later:?}");
    assert!(ids(std::slice::from_ref(&v1))[0] < later_ids[0]);

    // From the first version: both releases since, in order, each once.
    let all = check(&src, Some(&v1));
    assert_eq!(ids(&all[1..]), later_ids);

    // A first check now: the latest release only.
    let latest = check(&src, None);
    assert_eq!(latest, [later[2].clone()]);
}

#[test]
fn an_expired_lease_is_a_release() {
    let server = common::Server::start();
    let src = source(&server, "leased");
    acquire(&server, "leased", json!({"key": "a", "ttl": "1s"}));
    // The server expires it by itself; nothing else changes the lock.
    common::wait_until("the lease to run out", || !check(&src, None).is_empty());
    assert_eq!(kinds(&check(&src, None)), ["expired"]);
}

#[test]
fn in_writes_the_release_event() {
    let server = common::Server::start();
    let src = source(&server, "deploy-prod");
    let info = json!({"team": "main", "pipeline": "deploy", "job": "prod", "build_name": "17"});
    acquire(
        &server,
        "deploy-prod",
        json!({"key": "pipeline-a", "info": info}),
    );
    release(&server, "deploy-prod", "pipeline-a", false);
    let version = check(&src, None).remove(0);

    let dir = common::temp_dir();
    let answer = run(
        "in",
        Some(dir.path()),
        &json!({"source": src, "version": version}),
        &[],
    )
    .json();
    assert_eq!(answer["version"], version);
    let event: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("event.json")).expect("event.json"),
    )
    .expect("event JSON");
    assert_eq!(
        event["id"].to_string(),
        version["event"].as_str().expect("id")
    );
    assert_eq!(event["kind"], "released");
    assert_eq!(event["lock"], "deploy-prod");
    assert_eq!(event["key"], "pipeline-a");
    assert_eq!(event["info"]["build_name"], "17");
    let meta = metadata(&answer);
    assert_eq!(meta["kind"], "released");
    assert_eq!(meta["key"], "pipeline-a");
    assert_eq!(meta["holder_build"], "main/deploy/prod #17");
}

#[test]
fn without_a_trigger_versions_stay_the_locks_states() {
    let server = common::Server::start();
    let plain = json!({"locker_uri": server.base, "lock_name": "deploy-prod"});
    acquire(&server, "deploy-prod", json!({"key": "a"}));
    release(&server, "deploy-prod", "a", false);
    let answer = run("check", None, &json!({"source": plain}), &[]).json();
    assert_eq!(answer, json!([{"ref": "free"}]));
}
