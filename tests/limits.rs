//! Caps on what an authenticated client can grow (issue 16, item 3): distinct locks
//! (`LOCKER_MAX_LOCKS`) and requestors sharing one holding (`LOCKER_MAX_REQUESTORS`). A refusal
//! is a clear JSON error with its own metric outcome and changes nothing; and `GET /locks`
//! pages (`limit`, `after`, `prefix`, `q`) so a large table can be read a page at a time.
//! Both on the file and the etcd backend.

pub mod common;

use std::collections::BTreeSet;

use serde_json::json;

use common::{Server, call};

const TOO_MANY_LOCKS: &str = "locker_acquires_total{outcome=\"too_many_locks\"}";
const TOO_MANY_REQUESTORS: &str = "locker_acquires_total{outcome=\"too_many_requestors\"}";

#[test]
fn a_new_lock_past_max_locks_gets_503_and_changes_nothing() {
    let server = common::server().env("LOCKER_MAX_LOCKS", "3").start();
    for name in ["a", "b", "c"] {
        let reply = server.lock(name, json!({"key": "k"}));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let refused = server.lock("d", json!({"key": "k"}));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.error().contains("LOCKER_MAX_LOCKS"),
        "{}",
        refused.body
    );
    assert_eq!(server.metric(TOO_MANY_LOCKS), 1.0);
    let names: BTreeSet<String> = server
        .locks()
        .as_object()
        .expect("locks")
        .keys()
        .cloned()
        .collect();
    assert_eq!(names, BTreeSet::from(["a", "b", "c"].map(String::from)));
    // A waiting acquire of a new lock is refused the same way, at once.
    let waited = call(
        "PUT",
        &server.url("/lock/d?wait=30s"),
        Some(r#"{"key":"k"}"#),
    );
    assert_eq!(waited.status, 503, "{}", waited.body);
    // Locks that exist still serve: a reentrant acquire, and a release.
    assert_eq!(server.lock("a", json!({"key": "k"})).status, 200);
    assert_eq!(server.unlock("b", json!({"key": "k"})).status, 200);
    // With a lock gone, a new one fits.
    let reply = server.lock("d", json!({"key": "k"}));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[test]
fn a_new_requestor_past_max_requestors_gets_409_and_changes_nothing() {
    let server = common::server().env("LOCKER_MAX_REQUESTORS", "2").start();
    for requestor in ["job-1", "job-2"] {
        let reply = server.lock("shared", json!({"key": "k", "requestor": requestor}));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let refused = server.lock("shared", json!({"key": "k", "requestor": "job-3"}));
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.error().contains("LOCKER_MAX_REQUESTORS"),
        "{}",
        refused.body
    );
    assert_eq!(server.metric(TOO_MANY_REQUESTORS), 1.0);
    let lock = server.locks()["shared"].clone();
    assert_eq!(lock["locked_by"], json!({"job-1": 1, "job-2": 1}));
    // A requestor already sharing counts up as before; once one leaves, another fits.
    let again = server.lock("shared", json!({"key": "k", "requestor": "job-1"}));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        server
            .unlock("shared", json!({"key": "k", "requestor": "job-2"}))
            .status,
        200
    );
    let reply = server.lock("shared", json!({"key": "k", "requestor": "job-3"}));
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Follows `Link: <...>; rel="next"` from `path`, returning every page's names in order.
fn follow_pages(server: &Server, path: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let mut pages = Vec::new();
    let mut totals = Vec::new();
    let mut next = Some(path.to_string());
    while let Some(path) = next.take() {
        assert!(pages.len() < 20, "the pages never end");
        let reply = call("GET", &server.url(&path), None);
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let names: Vec<String> = reply
            .json()
            .as_object()
            .expect("a name → lock map")
            .keys()
            .cloned()
            .collect();
        pages.push(names);
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        totals.push(header("locker-total").expect("Locker-Total header"));
        next = header("link").map(|link| {
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.split_once(">; rel=\"next\""))
                .expect("a next link")
                .0;
            format!("/{target}")
        });
    }
    (pages, totals)
}

#[test]
fn locks_are_listed_a_page_at_a_time() {
    let server = Server::start();
    let names: Vec<String> = (0..7).map(|i| format!("env-{i}")).collect();
    for name in &names {
        assert_eq!(server.lock(name, json!({"key": "k"})).status, 200);
    }
    server.lock("other", json!({"key": "k", "requestor": "needle-job"}));

    // Pages of 3 cover every lock once, in name order, each saying how many there are.
    let (pages, totals) = follow_pages(&server, "/locks?limit=3");
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(pages.iter().all(|p| p.len() <= 3), "{pages:?}");
    let all: Vec<String> = pages.concat();
    let mut expected = names.clone();
    expected.push("other".into());
    assert_eq!(all, expected);
    assert!(totals.iter().all(|t| t == "8"), "{totals:?}");

    // A prefix narrows the listing, and its pages and total with it.
    let (pages, totals) = follow_pages(&server, "/locks?prefix=env-&limit=5");
    assert_eq!(pages.concat(), names);
    assert_eq!(totals, ["7", "7"]);

    // A search finds a lock by requestor (or key, info, name), ignoring case.
    let (pages, totals) = follow_pages(&server, "/locks?q=NEEDLE&limit=10");
    assert_eq!(pages, [["other"]]);
    assert_eq!(totals, ["1"]);

    // Without paging, the original's listing: every lock.
    assert_eq!(server.locks().as_object().expect("locks").len(), 8);
}

#[test]
fn a_bad_page_size_is_refused_with_json() {
    let server = Server::start();
    for limit in ["0", "10001", "many", "-1"] {
        let reply = call("GET", &server.url(&format!("/locks?limit={limit}")), None);
        assert_eq!(reply.status, 400, "{limit}: {}", reply.body);
        assert!(reply.error().contains("limit"), "{}", reply.body);
    }
}

also_on_etcd!(
    a_new_lock_past_max_locks_gets_503_and_changes_nothing,
    a_new_requestor_past_max_requestors_gets_409_and_changes_nothing,
    locks_are_listed_a_page_at_a_time,
);
