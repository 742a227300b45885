//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs), driven over WebDriver against a real server with held locks and a waiter.
//! The page follows the server's live events (`GET /events`); behind a proxy that refuses them
//! it falls back to polling.

pub mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const XSS_NAME: &str = "<img src=x onerror=alert(1)>";

/// chromedriver on a free loopback port; killed when dropped.
struct Driver(Child, u16);

impl Driver {
    fn start() -> Driver {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(tool).exists(),
                "{tool} is missing: install Debian's chromium and chromium-driver (.ci/run does)"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver(child, port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("browser session")
}

/// Names of the rows the dashboard shows, waiting until `expected` holds (or time runs out).
async fn shown_rows(client: &Client, expected: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = serde_json::from_value(
            client
                .execute(
                    "return [...document.querySelectorAll('#locks tbody tr[data-lock]')].map(r => r.dataset.lock)",
                    vec![],
                )
                .await
                .expect("read rows"),
        )
        .expect("names");
        if expected(&names) || Instant::now() > deadline {
            return names;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the button of class `class` in the row of lock `name`, waiting (up to 10 s) for it to
/// be there. Found and clicked in one script: the page re-renders its table every 2 s, so an
/// element found in one WebDriver call may be gone (stale) by the next.
async fn click_row_button(client: &Client, name: &str, class: &str) {
    const CLICK: &str = "for (const row of document.querySelectorAll('#locks tbody tr')) {
        if (row.dataset.lock === arguments[0]) {
          const button = row.querySelector('button.' + arguments[1]);
          if (button) { button.click(); return true; }
        }
      }
      return false;";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clicked = client
            .execute(CLICK, vec![json!(name), json!(class)])
            .await
            .expect("click script");
        if clicked == json!(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {class} button in the row of {name}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_filters_and_force_releases_locks_in_a_real_browser() {
    // The server fixture and its blocking HTTP client must not run on the async workers.
    let server = blocking(|| {
        let server = common::Server::start();
        let build_url = "https://ci.example.com/teams/main/pipelines/deploy/jobs/prod/builds/42";
        let info = json!({"team": "main", "pipeline": "deploy", "job": "prod", "build": "42", "build_url": build_url});
        let held = [
            (
                "deploy-prod",
                json!({"key": "build-42", "requestor": "prod-job", "info": info, "ttl": "2h"}),
            ),
            ("test-bed", json!({"key": "shared", "requestor": "suite-a"})),
            (
                XSS_NAME,
                json!({"key": "<b>key</b>", "info": {"team": "<script>alert(2)</script>"}}),
            ),
        ];
        for (name, body) in &held {
            let encoded = name
                .replace('<', "%3C")
                .replace('>', "%3E")
                .replace(' ', "%20");
            let reply = server.lock(&encoded, body.clone());
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
        server.lock("test-bed", json!({"key": "shared", "requestor": "suite-b"}));
        // A waiter on test-bed.
        let waiter_url = server.url("/lock/test-bed?wait=60s");
        std::thread::spawn(move || {
            common::call("PUT", &waiter_url, Some(r#"{"key":"exclusive"}"#))
        });

        server
    });
    let build_url = "https://ci.example.com/teams/main/pipelines/deploy/jobs/prod/builds/42";
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client.goto(&server.url("/")).await.expect("open dashboard");

    // The rows are there, the waiter is counted, and holder info links to the build.
    let rows = shown_rows(&client, |r| r.len() == 3).await;
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["<img src=x onerror=alert(1)>", "deploy-prod", "test-bed"]
    );
    let page: serde_json::Value = client
        .execute(
            "const rows = {}; for (const r of document.querySelectorAll('#locks tbody tr')) { \
               rows[r.dataset.lock] = [...r.cells].map(c => c.textContent); } \
             const link = document.querySelector('tr[data-lock=\"deploy-prod\"] a'); \
             return {rows, link: link && link.href, links: document.querySelectorAll('#locks a').length, images: document.querySelectorAll('img').length, \
                     scripts: document.querySelectorAll('script').length};",
            vec![],
        )
        .await
        .expect("read page");
    assert_eq!(page["link"], build_url);
    assert_eq!(page["links"], 1, "only holders with a build URL are links");
    assert_eq!(page["rows"]["deploy-prod"][2], "prod-job");
    assert!(
        page["rows"]["deploy-prod"][3]
            .as_str()
            .expect("holder")
            .contains("main / deploy / prod / 42")
    );
    assert!(
        page["rows"]["test-bed"][2]
            .as_str()
            .expect("requestors")
            .contains("suite-a")
    );
    // User data shows as text and runs nothing: no element was made from it, no alert opened.
    assert_eq!(page["rows"][XSS_NAME][0], XSS_NAME);
    assert_eq!(page["rows"][XSS_NAME][1], "<b>key</b>");
    assert_eq!(page["images"], 0);
    assert_eq!(page["scripts"], 1, "only the dashboard's own script");
    assert!(client.get_alert_text().await.is_err(), "an alert opened");
    let test_bed_waiters: serde_json::Value = client
        .execute(
            "return document.querySelector('tr[data-lock=\"test-bed\"] td[data-label=\"Waiters\"]').textContent",
            vec![],
        )
        .await
        .expect("waiters");
    assert_eq!(test_bed_waiters, "1");

    let screenshot = client.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, screenshot).expect("save screenshot");
    eprintln!("dashboard screenshot saved to {}", path.display());

    // The filter narrows the table.
    let filter = client
        .find(Locator::Css("#filter"))
        .await
        .expect("filter box");
    filter.send_keys("deploy").await.expect("type");
    let filtered = shown_rows(&client, |r| r == ["deploy-prod"]).await;
    assert_eq!(filtered, ["deploy-prod"]);
    filter.clear().await.expect("clear");
    filter.send_keys("suite-b").await.expect("type");
    // (The search runs on the server once typing pauses: wait for its answer, not any one row.)
    assert_eq!(
        shown_rows(&client, |r| r == ["test-bed"]).await,
        ["test-bed"]
    );
    filter.clear().await.expect("clear");
    // Clearing fires no input event in every driver; type and delete a character to be sure.
    filter.send_keys(" ").await.expect("type");
    assert_eq!(shown_rows(&client, |r| r.len() == 3).await.len(), 3);

    // Force release asks first; cancelling keeps the lock.
    click_row_button(&client, "deploy-prod", "force").await;
    click_row_button(&client, "deploy-prod", "cancel").await;
    assert!(blocking(|| server.locks()).get("deploy-prod").is_some());
    // Confirming releases it and the row goes away.
    click_row_button(&client, "deploy-prod", "force").await;
    assert!(
        blocking(|| server.locks()).get("deploy-prod").is_some(),
        "released before confirmation"
    );
    click_row_button(&client, "deploy-prod", "confirm").await;
    let after = shown_rows(&client, |r| !r.contains(&"deploy-prod".to_string())).await;
    assert!(!after.contains(&"deploy-prod".to_string()), "{after:?}");
    assert!(blocking(|| server.locks()).get("deploy-prod").is_none());

    // Readable on a phone: the table turns into cards with labelled lines.
    client.set_window_size(390, 844).await.expect("resize");
    let header_hidden: serde_json::Value = client
        .execute(
            "return getComputedStyle(document.querySelector('#locks thead')).display",
            vec![],
        )
        .await
        .expect("style");
    assert_eq!(header_hidden, "none");
    let phone = client.screenshot().await.expect("screenshot");
    std::fs::write(path.with_file_name("dashboard-phone.png"), phone).expect("save");
    client.close().await.expect("close browser");
    blocking(move || drop(server));
}

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

#[test]
fn dashboard_assets_are_served_with_a_strict_content_security_policy() {
    let server = common::Server::start();
    for (path, content_type) in [
        ("/", "text/html"),
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let reply = common::call("GET", &server.url(path), None);
        assert_eq!(reply.status, 200, "{path}");
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with(content_type), "{path}");
        assert!(header("content-security-policy").contains("script-src 'self'"));
    }
    let guarded = common::server().auth("u", "p").start();
    assert_eq!(common::call("GET", &guarded.url("/"), None).status, 401);
}

/// Basic-auth credentials of the servers below, with characters that must be percent-encoded
/// in a URL's userinfo.
const USER: &str = "dash-user";
const PASS: &str = "p@ss:w rd";

/// `user:pass@` for a URL, percent-encoded.
fn userinfo() -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let encode = |text| utf8_percent_encode(text, NON_ALPHANUMERIC);
    format!("{}:{}@", encode(USER), encode(PASS))
}

/// An authenticated request from the test (not the browser) to `server`.
fn authed(
    server: &common::Server,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> common::Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = common::client()
        .request(method, server.url(path))
        .basic_auth(USER, Some(PASS));
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().expect("request sent");
    common::Reply {
        status: response.status().as_u16(),
        reason: response.status().to_string(),
        headers: response.headers().clone(),
        body: response.text().expect("body"),
    }
}

/// A server behind basic auth holding one lock with build info and one without any.
fn guarded_server_with_two_locks() -> common::Server {
    let server = common::server().auth(USER, PASS).start();
    let info = json!({"team": "main", "pipeline": "deploy", "job": "prod", "build": "7"});
    for (name, body) in [
        (
            "with-info",
            json!({"key": "k1", "requestor": "prod-job", "info": info}),
        ),
        ("without-info", json!({"key": "k2"})),
    ] {
        let reply = authed(&server, "PUT", &format!("/lock/{name}"), Some(body));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    server
}

/// Opens the dashboard at `page` (a URL with credentials in it): both locks of
/// [`guarded_server_with_two_locks`] show with no error, and a force release from the page
/// releases one on the server.
async fn dashboard_lists_and_releases_at(page: &str, server: &common::Server) {
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client.goto(page).await.expect("open dashboard");

    let mut rows = shown_rows(&client, |r| r.len() == 2).await;
    rows.sort();
    let state: serde_json::Value = client
        .execute(
            "const error = document.getElementById('error'); \
             const holder = (n) => document.querySelector(`tr[data-lock=\"${n}\"] td[data-label=\"Holder\"]`); \
             return {hidden: error.hidden, error: error.textContent, \
                     withInfo: holder('with-info') && holder('with-info').textContent, \
                     withoutInfo: holder('without-info') && holder('without-info').textContent, \
                     locksLink: document.querySelector('footer a').href};",
            vec![],
        )
        .await
        .expect("read page");
    assert_eq!(rows, ["with-info", "without-info"], "page: {state}");
    assert_eq!(state["hidden"], true, "error banner: {}", state["error"]);
    assert_eq!(state["withInfo"], "main / deploy / prod / 7");
    assert_eq!(state["withoutInfo"], "—");
    // The footer's link to GET /locks stays under the page's own path.
    let page_dir = page.rsplit_once('/').expect("page path").0;
    assert_eq!(state["locksLink"], format!("{page_dir}/locks"));

    click_row_button(&client, "without-info", "force").await;
    click_row_button(&client, "without-info", "confirm").await;
    let after = shown_rows(&client, |r| r == ["with-info"]).await;
    let error: serde_json::Value = client
        .execute(
            "return document.getElementById('error').textContent",
            vec![],
        )
        .await
        .expect("error text");
    assert_eq!(after, ["with-info"], "error banner: {error}");
    let locks = blocking(|| authed(server, "GET", "/locks", None));
    assert_eq!(locks.status, 200, "{}", locks.body);
    let names: Vec<String> = locks
        .json()
        .as_object()
        .expect("locks")
        .keys()
        .cloned()
        .collect();
    assert_eq!(names, ["with-info"], "released on the server");
    client.close().await.expect("close browser");
}

/// A bookmark with credentials (`http://user:pass@host/`): fetch refuses any URL with
/// userinfo, which a relative URL inherits from such a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_opened_with_credentials_in_the_url() {
    let server = blocking(guarded_server_with_two_locks);
    let page = server
        .base
        .replacen("http://", &format!("http://{}", userinfo()), 1)
        + "/";
    dashboard_lists_and_releases_at(&page, &server).await;
    blocking(move || drop(server));
}

/// Behind a reverse proxy that serves the server under `/locker/` (and credentials in the
/// URL too): every request of the page must stay under that prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_works_under_a_reverse_proxy_path_prefix() {
    let server = blocking(guarded_server_with_two_locks);
    let upstream = server
        .base
        .strip_prefix("http://")
        .expect("http")
        .to_string();
    let port = prefix_proxy(upstream, "/locker", None).await;
    let page = format!("http://{}127.0.0.1:{port}/locker/", userinfo());
    dashboard_lists_and_releases_at(&page, &server).await;
    blocking(move || drop(server));
}

/// What a proxy saw of the requests it held back by a delay: those whose path starts with one
/// of `prefixes`. Paths starting with one of `refused` it answers 404 (`/events`: the page
/// then falls back to polling). Its `/events` streams end when `cut` is notified, and new ones
/// wait while `hold_events` is true.
struct SlowRequests {
    prefixes: Vec<&'static str>,
    refused: Vec<&'static str>,
    delay: Duration,
    asked: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    most_at_once: std::sync::atomic::AtomicUsize,
    cut: tokio::sync::Notify,
    hold_events: tokio::sync::watch::Sender<bool>,
}

impl Default for SlowRequests {
    fn default() -> Self {
        SlowRequests {
            prefixes: Vec::new(),
            refused: Vec::new(),
            delay: Duration::ZERO,
            asked: Default::default(),
            in_flight: Default::default(),
            most_at_once: Default::default(),
            cut: tokio::sync::Notify::new(),
            hold_events: tokio::sync::watch::channel(false).0,
        }
    }
}

/// A reverse proxy on a free loopback port: `{prefix}/x` goes to `upstream` as `/x`, anything
/// else is a 404. It asks both sides to close after one exchange, so it only ever rewrites a
/// request's first line and then copies bytes both ways. With `slow`, every request for one of
/// its paths waits its delay before it is passed on, and is counted as open while it waits: two
/// requests of a page at once always overlap there, while the end of an exchange (the last
/// bytes of an answer, the browser closing the connection) may come after the browser has
/// already sent its next request.
async fn prefix_proxy(
    upstream: String,
    prefix: &'static str,
    slow: Option<std::sync::Arc<SlowRequests>>,
) -> u16 {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let port = listener.local_addr().expect("proxy address").port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let slow = slow.clone();
            tokio::spawn(async move {
                let mut browser = BufReader::new(socket);
                let mut head = String::new();
                browser.read_line(&mut head).await.ok()?;
                let mut parts = head.split(' ');
                let (method, target) = (parts.next()?, parts.next()?);
                let refused = |path: &str| {
                    slow.as_ref()
                        .is_some_and(|s| s.refused.iter().any(|r| path.starts_with(r)))
                };
                let Some(path) = target
                    .strip_prefix(prefix)
                    .filter(|p| p.starts_with('/') && !refused(p))
                else {
                    let refusal =
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    return browser.write_all(refusal.as_bytes()).await.ok();
                };
                let mut request = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
                loop {
                    let mut line = String::new();
                    if browser.read_line(&mut line).await.ok()? == 0 {
                        return None;
                    }
                    if !line.to_ascii_lowercase().starts_with("connection:") {
                        request.push_str(&line);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let events = slow.clone().filter(|_| path.starts_with("/events"));
                if let Some(events) = &events {
                    let mut held = events.hold_events.subscribe();
                    let _ = held.wait_for(|hold| !*hold).await;
                }
                let slow = slow.filter(|s| s.prefixes.iter().any(|p| path.starts_with(p)));
                if let Some(slow) = &slow {
                    slow.asked.fetch_add(1, SeqCst);
                    let now = slow.in_flight.fetch_add(1, SeqCst) + 1;
                    slow.most_at_once.fetch_max(now, SeqCst);
                    tokio::time::sleep(slow.delay).await;
                    slow.in_flight.fetch_sub(1, SeqCst);
                }
                let mut server = tokio::net::TcpStream::connect(&upstream).await.ok();
                if let Some(server) = &mut server
                    && server.write_all(request.as_bytes()).await.is_ok()
                {
                    let copy = tokio::io::copy_bidirectional(&mut browser, server);
                    match &events {
                        Some(events) => {
                            tokio::select! {
                                _ = copy => {}
                                () = events.cut.notified() => {}
                            }
                        }
                        None => {
                            let _ = copy.await;
                        }
                    }
                }
                Some(())
            });
        }
    });
    port
}

/// A large table: the page fetches one page of locks (the first 200), says how many there
/// are, shows more on request and searches on the server; and, polling because the proxy
/// refuses the live events (every 2 s: `?poll=2`), however slow `GET /locks` is, the page never
/// has two of them open at once (they used to pile up every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_a_large_table_and_never_polls_twice_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    const LOCKS: usize = 450;
    let server = blocking(|| {
        let server = common::Server::start();
        for i in 0..LOCKS {
            let reply = server.lock(&format!("env-{i:04}"), json!({"key": "k"}));
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
        let reply = server.lock("zz-special", json!({"key": "k", "requestor": "needle-job"}));
        assert_eq!(reply.status, 200, "{}", reply.body);
        server
    });
    let upstream = server
        .base
        .strip_prefix("http://")
        .expect("http")
        .to_string();
    // Slower than the page's 2 s refresh: a timer that does not wait would overlap.
    let slow = std::sync::Arc::new(SlowRequests {
        prefixes: vec!["/locks"],
        refused: vec!["/events"],
        delay: Duration::from_millis(2500),
        ..SlowRequests::default()
    });
    let port = prefix_proxy(upstream, "/locker", Some(slow.clone())).await;
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client
        .goto(&format!("http://127.0.0.1:{port}/locker/?poll=2"))
        .await
        .expect("open dashboard");
    let summary = || async {
        client
            .execute(
                "return document.getElementById('summary').textContent",
                vec![],
            )
            .await
            .expect("summary")
    };

    let rows = shown_rows(&client, |r| r.len() == 200).await;
    assert_eq!(rows.len(), 200, "one page of rows");
    assert_eq!(rows[0], "env-0000");
    let text = summary().await;
    assert!(
        text.as_str()
            .is_some_and(|t| t.starts_with("451 lock(s) held, 200 shown")),
        "{text}"
    );
    // "Show more" adds a page.
    client
        .find(Locator::Css("#more"))
        .await
        .expect("show more")
        .click()
        .await
        .expect("click");
    assert_eq!(shown_rows(&client, |r| r.len() == 400).await.len(), 400);
    // The search runs on the server: it finds a lock far past the rows fetched.
    client
        .find(Locator::Css("#filter"))
        .await
        .expect("filter box")
        .send_keys("NEEDLE")
        .await
        .expect("type");
    assert_eq!(
        shown_rows(&client, |r| r == ["zz-special"]).await,
        ["zz-special"]
    );

    // Let several refreshes go by (each takes 2.5 s, then 2 s until the next).
    let asked = slow.asked.load(SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow.asked.load(SeqCst) < asked + 3 {
        assert!(Instant::now() < deadline, "the page stopped refreshing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slow.most_at_once.load(SeqCst), 1, "overlapping GET /locks");
    let mode = client
        .execute("return document.getElementById('mode').textContent", vec![])
        .await
        .expect("mode");
    assert!(
        mode.as_str()
            .is_some_and(|m| m.starts_with("Refreshed every 2 s")),
        "{mode}"
    );
    client.close().await.expect("close browser");
    blocking(move || drop(server));
}

/// Metadata that would run or draw something if it ever reached the page as HTML.
const HOSTILE_METADATA: &str =
    "<script>alert(3)</script>\n<img src=x onerror=alert(4)>\n<b>bold</b> & <!-- -->";
const ENV_1_METADATA: &str = "region: eu-west-1\nurl: https://env-1.example.com\nuser: ci\n";
const POOL_BUILD_URL: &str =
    "https://ci.example.com/teams/main/pipelines/envs/jobs/deploy/builds/42";

/// What the page shows of its pools: per listed pool whether it is open, its summary line and,
/// per item row, each cell's text by its label, the holder's link and the metadata's state; the
/// section's summary line, the error banner, and how many images and scripts the page holds.
const POOLS_STATE: &str = "const pools = {};
    for (const d of document.querySelectorAll('#pool-list details.pool')) {
      const items = {};
      for (const r of d.querySelectorAll('tbody tr')) {
        const cells = {};
        for (const c of r.cells) cells[c.dataset.label] = c.textContent;
        const link = r.querySelector('td[data-label=\"Holder\"] a');
        cells.link = link && link.href;
        const meta = r.querySelector('details.metadata');
        cells.metadataOpen = meta ? meta.open : null;
        cells.metadataSummary = meta ? meta.querySelector('summary').textContent : null;
        cells.metadataText = meta ? meta.querySelector('pre').textContent : null;
        cells.metadataMarked = meta ? meta.dataset.marked === 'yes' : null;
        items[r.dataset.item] = cells;
      }
      pools[d.dataset.pool] = {open: d.open, summary: d.querySelector(':scope > summary').textContent,
                               rows: d.querySelectorAll('tbody tr').length, items};
    }
    const error = document.getElementById('error');
    return {pools, shown: !document.getElementById('pools').hidden,
            summary: document.getElementById('pools-summary').textContent,
            error: error.hidden ? null : error.textContent,
            images: document.querySelectorAll('img').length,
            scripts: document.querySelectorAll('script').length};";

/// The page's pools (see [`POOLS_STATE`]) once `expected` holds; panics naming `what` with the
/// last state seen if it does not within `timeout`.
async fn wait_for_pools(
    client: &Client,
    what: &str,
    timeout: Duration,
    expected: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let state = client
            .execute(POOLS_STATE, vec![])
            .await
            .expect("read pools");
        if expected(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {state:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the summary of pool `pool` (opening or closing it) or, with `item`, of that item's
/// metadata; with `mark`, marks that metadata's element instead, to tell later whether it is
/// still the same element. Found and acted on in one script, waiting (up to 10 s) for it.
async fn on_pool(client: &Client, pool: &str, item: Option<&str>, mark: bool) {
    const ACT: &str = "const [pool, item, mark] = arguments;
      for (const d of document.querySelectorAll('#pool-list details.pool')) {
        if (d.dataset.pool !== pool) continue;
        if (item === null) { d.querySelector(':scope > summary').click(); return true; }
        for (const r of d.querySelectorAll('tbody tr')) {
          const meta = r.dataset.item === item && r.querySelector('details.metadata');
          if (meta && mark) { meta.dataset.marked = 'yes'; return true; }
          if (meta) { meta.querySelector('summary').click(); return true; }
        }
      }
      return false;";
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .execute(ACT, vec![json!(pool), json!(item), json!(mark)])
        .await
        .expect("pool script")
        != json!(true)
    {
        assert!(
            Instant::now() < deadline,
            "no pool {pool} (item {item:?}) on the page"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server behind basic auth with a lock and two pools: `aws` holds `env-1` (claimed with
/// build info and a lease, and a claim of it queued behind) and `env-2` (unclaimed, with
/// [`HOSTILE_METADATA`]); `gcp` holds `gke-1`. Items are added through the HTTP API. The
/// queued claim's thread answers its status once granted.
fn server_with_pools() -> (common::Server, std::thread::JoinHandle<u16>) {
    let server = common::server()
        .auth(USER, PASS)
        .env("LOCKER_MAX_WAIT", "300s")
        .start();
    let info = json!({"team": "main", "pipeline": "envs", "job": "deploy", "build": "42",
                      "build_url": POOL_BUILD_URL});
    // The two flags are spelled out: the server reads `claim` as a strict `wire::LockRequest`,
    // which (for now) refuses a claim without them.
    let claim = json!({"key": "build-42", "requestor": "deploy-job", "ttl": "2h", "info": info,
                       "release_when_build_ends": false, "renew": false});
    for (path, body) in [
        (
            "/pool/aws/item/env-1",
            json!({"metadata": ENV_1_METADATA, "claim": claim}),
        ),
        (
            "/pool/aws/item/env-2",
            json!({"metadata": HOSTILE_METADATA}),
        ),
        (
            "/pool/gcp/item/gke-1",
            json!({"metadata": "project: ci-gke\n"}),
        ),
    ] {
        let reply = authed(&server, "POST", path, Some(body));
        assert_eq!(reply.status, 201, "{path}: {}", reply.body);
    }
    let lock = json!({"key": "build-41", "requestor": "prod-job",
                      "info": {"team": "main", "pipeline": "deploy", "job": "prod", "build": "41"}});
    let reply = authed(&server, "PUT", "/lock/deploy-prod", Some(lock));
    assert_eq!(reply.status, 200, "{}", reply.body);

    let url = server.url("/pool/aws/item/env-1/claim?wait=300s");
    let queued = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(330))
            .build()
            .expect("http client")
            .put(url)
            .basic_auth(USER, Some(PASS))
            .body(json!({"key": "queued", "requestor": "next-job"}).to_string())
            .send()
            .expect("queued claim answered")
            .status()
            .as_u16()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pools = authed(&server, "GET", "/pools", None);
        if pools.json()["pools"][0]["waiters"] == json!(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "claim never queued: {}",
            pools.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, queued)
}

/// The pools section in Chromium, opened with credentials in the URL: pools listed closed
/// with their counts, an opened pool's items with state, holder and lease, metadata as text
/// (closed until asked for, and never run), claims and releases through the API shown on the
/// next refresh, the filter box narrowing pools by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_pools_their_items_and_changes_in_a_real_browser() {
    let (server, queued) = blocking(server_with_pools);
    let page = server
        .base
        .replacen("http://", &format!("http://{}", userinfo()), 1)
        + "/";
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client.goto(&page).await.expect("open dashboard");
    let ten = Duration::from_secs(10);

    // Both pools are listed, closed: their counts only, no items fetched or shown.
    let state = wait_for_pools(&client, "both pools", ten, |s| {
        s["pools"]["aws"].is_object() && s["pools"]["gcp"].is_object()
    })
    .await;
    assert_eq!(state["error"], json!(null));
    assert_eq!(state["shown"], true);
    assert_eq!(
        state["summary"],
        "2 pools, 1 of 3 items claimed, 1 queued claim"
    );
    assert_eq!(
        state["pools"]["aws"]["summary"],
        "aws 1 of 2 items claimed 1 queued claim"
    );
    assert_eq!(
        state["pools"]["gcp"]["summary"],
        "gcp 0 of 1 item claimed 0 queued claims"
    );
    for pool in ["aws", "gcp"] {
        assert_eq!(state["pools"][pool]["open"], false);
        assert_eq!(state["pools"][pool]["rows"], 0);
    }

    // Opened, a pool shows its items.
    on_pool(&client, "aws", None, false).await;
    let state = wait_for_pools(&client, "the items of aws", ten, |s| {
        s["pools"]["aws"]["rows"] == 2
    })
    .await;
    let env1 = &state["pools"]["aws"]["items"]["env-1"];
    assert_eq!(env1["State"], "claimed", "{env1}");
    assert_eq!(env1["Key"], "build-42");
    assert_eq!(env1["Requestors"], "deploy-job");
    assert_eq!(env1["Holder"], "main / envs / deploy / 42");
    assert_eq!(env1["link"], POOL_BUILD_URL);
    let text = |cell: &str| env1[cell].as_str().unwrap_or_default().to_string();
    assert!(text("Claimed for").ends_with('s'), "{env1}");
    assert!(text("Lease left").starts_with("1h"), "{env1}");
    assert!(text("Generation").parse::<u64>().is_ok(), "{env1}");
    assert_eq!(env1["metadataOpen"], false);
    assert_eq!(env1["metadataText"], ENV_1_METADATA);
    assert_eq!(
        env1["metadataSummary"],
        format!("3 lines, {} bytes", ENV_1_METADATA.len())
    );
    let env2 = &state["pools"]["aws"]["items"]["env-2"];
    assert_eq!(env2["State"], "unclaimed", "{env2}");
    for cell in ["Key", "Requestors", "Holder", "Claimed for", "Lease left"] {
        assert_eq!(env2[cell], "—", "{cell}: {env2}");
    }
    // Metadata is text: as stored, and nothing in it became an element or ran.
    assert_eq!(env2["metadataText"], HOSTILE_METADATA);
    assert_eq!(state["images"], 0);
    assert_eq!(state["scripts"], 1, "only the dashboard's own script");
    assert!(client.get_alert_text().await.is_err(), "an alert opened");
    assert_eq!(state["pools"]["gcp"]["rows"], 0, "gcp was not opened");

    // Opened metadata stays open (the same element) across refreshes.
    on_pool(&client, "aws", Some("env-1"), false).await;
    on_pool(&client, "aws", Some("env-1"), true).await;
    let state = wait_for_pools(&client, "env-1's metadata open", ten, |s| {
        s["pools"]["aws"]["items"]["env-1"]["metadataOpen"] == true
    })
    .await;
    assert_eq!(
        state["pools"]["aws"]["items"]["env-1"]["metadataMarked"],
        true
    );
    let screenshot = client.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-pools.png");
    std::fs::write(&path, screenshot).expect("save screenshot");
    eprintln!("dashboard screenshot saved to {}", path.display());

    // A claim through the API shows on the next refresh.
    blocking(|| {
        let claim = json!({"key": "nightly", "requestor": "nightly-job"});
        let reply = authed(&server, "PUT", "/pool/aws/item/env-2/claim", Some(claim));
        assert_eq!(reply.status, 200, "{}", reply.body);
    });
    let state = wait_for_pools(&client, "env-2 claimed", ten, |s| {
        s["pools"]["aws"]["items"]["env-2"]["Key"] == "nightly"
    })
    .await;
    assert_eq!(state["pools"]["aws"]["items"]["env-2"]["State"], "claimed");
    assert_eq!(
        state["pools"]["aws"]["summary"],
        "aws 2 of 2 items claimed 1 queued claim"
    );
    // A release hands env-1 to the queued claim: new holder, no queue.
    blocking(|| {
        let reply = authed(
            &server,
            "DELETE",
            "/pool/aws/item/env-1/claim",
            Some(json!({"key": "build-42"})),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    });
    let state = wait_for_pools(&client, "env-1 handed to the queued claim", ten, |s| {
        s["pools"]["aws"]["items"]["env-1"]["Key"] == "queued"
            && s["summary"] == "2 pools, 2 of 3 items claimed, 0 queued claims"
    })
    .await;
    let env1 = &state["pools"]["aws"]["items"]["env-1"];
    assert_eq!(env1["Requestors"], "next-job", "{env1}");
    assert_eq!(env1["Holder"], "—");
    assert_eq!(env1["link"], json!(null));
    assert_eq!(env1["Lease left"], "no expiry");
    assert_eq!(
        (env1["metadataOpen"].clone(), env1["metadataMarked"].clone()),
        (json!(true), json!(true)),
        "metadata redrawn though unchanged"
    );
    assert_eq!(blocking(|| queued.join()).expect("queued claim"), 200);
    // And a release to no one shows the item unclaimed again.
    blocking(|| {
        let reply = authed(&server, "DELETE", "/pool/aws/item/env-2/claim", None);
        assert_eq!(reply.status, 200, "{}", reply.body);
    });
    wait_for_pools(&client, "env-2 unclaimed", ten, |s| {
        s["pools"]["aws"]["items"]["env-2"]["State"] == "unclaimed"
    })
    .await;

    // The filter box narrows pools by name, ignoring case; cleared, aws is still open.
    let filter = client
        .find(Locator::Css("#filter"))
        .await
        .expect("filter box");
    filter.send_keys("GC").await.expect("type");
    let state = wait_for_pools(&client, "only gcp", ten, |s| {
        s["pools"].as_object().is_some_and(|p| p.len() == 1) && s["pools"]["gcp"].is_object()
    })
    .await;
    assert!(
        state["summary"]
            .as_str()
            .is_some_and(|t| t.ends_with(", 1 matching")),
        "{state}"
    );
    filter.clear().await.expect("clear");
    filter.send_keys(" ").await.expect("type");
    wait_for_pools(&client, "both pools again, aws open", ten, |s| {
        s["pools"]["gcp"].is_object() && s["pools"]["aws"]["rows"] == 2
    })
    .await;

    // On a phone, items become cards too.
    client.set_window_size(390, 844).await.expect("resize");
    let head: serde_json::Value = client
        .execute(
            "return getComputedStyle(document.querySelector('#pool-list thead')).display",
            vec![],
        )
        .await
        .expect("style");
    assert_eq!(head, "none");
    let phone = client.screenshot().await.expect("screenshot");
    std::fs::write(path.with_file_name("dashboard-pools-phone.png"), phone).expect("save");
    client.close().await.expect("close browser");
    blocking(move || drop(server));
}

/// Polling (the proxy refuses the live events; every 2 s: `?poll=2`), however slow the server,
/// a refresh asks one thing at a time (the locks, the pools, then each opened pool) and the next
/// refresh waits for it: the page never has two of them open at once, even when a pool is
/// opened while a refresh is under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_polls_locks_and_pools_one_request_at_a_time() {
    use std::sync::atomic::Ordering::SeqCst;
    let server = blocking(|| {
        let server = common::Server::start();
        let item = common::call(
            "POST",
            &server.url("/pool/aws/item/env-1"),
            Some(r#"{"metadata": "region: eu-west-1"}"#),
        );
        assert_eq!(item.status, 201, "{}", item.body);
        let reply = server.lock("deploy-prod", json!({"key": "k"}));
        assert_eq!(reply.status, 200, "{}", reply.body);
        server
    });
    let upstream = server
        .base
        .strip_prefix("http://")
        .expect("http")
        .to_string();
    // 1.2 s a request: a refresh of the locks, the pools and one opened pool takes 3.6 s, longer
    // than the 2 s between refreshes, and any two requests at once would be seen.
    let slow = std::sync::Arc::new(SlowRequests {
        prefixes: vec!["/locks", "/pool"],
        refused: vec!["/events"],
        delay: Duration::from_millis(1200),
        ..SlowRequests::default()
    });
    let port = prefix_proxy(upstream, "/locker", Some(slow.clone())).await;
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client
        .goto(&format!("http://127.0.0.1:{port}/locker/?poll=2"))
        .await
        .expect("open dashboard");

    let long = Duration::from_secs(30);
    wait_for_pools(&client, "the pool", long, |s| s["pools"]["aws"].is_object()).await;
    on_pool(&client, "aws", None, false).await;
    let state = wait_for_pools(&client, "its item", long, |s| {
        s["pools"]["aws"]["rows"] == 1
    })
    .await;
    assert_eq!(
        state["pools"]["aws"]["items"]["env-1"]["State"],
        "unclaimed"
    );
    assert_eq!(state["error"], json!(null));

    // Let two more refreshes go by (three requests each).
    let asked = slow.asked.load(SeqCst);
    let deadline = Instant::now() + Duration::from_secs(40);
    while slow.asked.load(SeqCst) < asked + 6 {
        assert!(Instant::now() < deadline, "the page stopped refreshing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slow.most_at_once.load(SeqCst), 1, "two requests at once");
    client.close().await.expect("close browser");
    blocking(move || drop(server));
}

/// What the page shows live: whether its event stream is open, its mode line, each lock row's
/// cell texts, and of the opened `deploy-prod` who waits (keys, front first, and each line's
/// text) and its last events (kind, key and duration, newest first); the error banner.
const LIVE_STATE: &str = "const rows = {};
    for (const r of document.querySelectorAll('#locks tbody tr[data-lock]')) {
      rows[r.dataset.lock] = [...r.cells].map(c => c.textContent);
    }
    const detail = document.querySelector('tr.detail[data-detail=\"deploy-prod\"]');
    const waiters = detail ? [...detail.querySelectorAll('.queue li')] : [];
    const history = detail ? [...detail.querySelectorAll('table.history tbody tr')].map(r =>
      ({kind: r.dataset.kind, key: r.cells[2].textContent, duration: r.cells[4].textContent})) : [];
    const error = document.getElementById('error');
    return {live: document.body.dataset.live, mode: document.getElementById('mode').textContent,
            rows, detail: !!detail, queue: waiters.map(li => li.dataset.key),
            queueText: waiters.map(li => li.textContent), history,
            queueNote: detail ? detail.querySelector('.queue').textContent : null,
            error: error.hidden ? null : error.textContent};";

/// The page's live state (see [`LIVE_STATE`]) once `expected` holds; panics naming `what` with
/// the last state seen if it does not within 15 s.
async fn wait_for_live(
    client: &Client,
    what: &str,
    expected: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let state = client.execute(LIVE_STATE, vec![]).await.expect("read page");
        if expected(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {state:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A waiting acquire of `deploy-prod` by `key` (requestor `requestor`) in a thread, answered
/// with its status; returns once the server counts `position` waiters.
fn queue_for_deploy_prod(
    server: &common::Server,
    key: &str,
    requestor: &str,
    position: u64,
) -> std::thread::JoinHandle<u16> {
    let url = server.url("/lock/deploy-prod?wait=60s");
    let body = json!({"key": key, "requestor": requestor, "info": {"job": requestor}});
    let waiter = std::thread::spawn(move || {
        common::client()
            .put(url)
            .basic_auth(USER, Some(PASS))
            .body(body.to_string())
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    common::wait_until(&format!("{position} waiter(s) on deploy-prod"), || {
        authed(server, "GET", "/lock/deploy-prod", None).json()["waiters"] == json!(position)
    });
    waiter
}

/// The page follows `GET /events`: opened with credentials in the URL (EventSource, like fetch,
/// refuses a URL with userinfo) behind a proxy that counts `GET /locks`, a lock taken and a
/// waiter served through the API show on the page with no `GET /locks` between, also across a
/// dropped stream (the browser resumes it with Last-Event-ID). An opened lock shows who waits,
/// front first, and its last events with how long the holdings were held and the requests
/// waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_follows_live_events_and_shows_who_waits_and_the_history() {
    use std::sync::atomic::Ordering::SeqCst;
    let (server, first, second) = blocking(|| {
        let server = common::server().auth(USER, PASS).start();
        // A holding that ended: the history has how long it was held.
        let taken = authed(
            &server,
            "PUT",
            "/lock/deploy-prod",
            Some(json!({"key": "build-41"})),
        );
        assert_eq!(taken.status, 200, "{}", taken.body);
        let freed = authed(
            &server,
            "DELETE",
            "/lock/deploy-prod",
            Some(json!({"key": "build-41"})),
        );
        assert_eq!(freed.status, 200, "{}", freed.body);
        let body = json!({"key": "build-42", "requestor": "prod-job"});
        let taken = authed(&server, "PUT", "/lock/deploy-prod", Some(body));
        assert_eq!(taken.status, 200, "{}", taken.body);
        let first = queue_for_deploy_prod(&server, "pipeline-b", "build-18", 1);
        let second = queue_for_deploy_prod(&server, "pipeline-c", "build-3", 2);
        (server, first, second)
    });
    let upstream = server
        .base
        .strip_prefix("http://")
        .expect("http")
        .to_string();
    // No delay: the proxy only counts the page's GET /locks.
    let counted = std::sync::Arc::new(SlowRequests {
        prefixes: vec!["/locks"],
        ..SlowRequests::default()
    });
    let port = prefix_proxy(upstream, "/locker", Some(counted.clone())).await;
    let driver = Driver::start();
    let profile = common::temp_dir();
    let client = browser(&driver, profile.path()).await;
    client
        .goto(&format!("http://{}127.0.0.1:{port}/locker/", userinfo()))
        .await
        .expect("open dashboard");

    let state = wait_for_live(&client, "the live page with deploy-prod", |s| {
        s["live"] == "true" && s["rows"]["deploy-prod"].is_array()
    })
    .await;
    assert!(
        state["mode"]
            .as_str()
            .is_some_and(|m| m.starts_with("Live")),
        "{state:#}"
    );
    assert_eq!(state["rows"]["deploy-prod"][7], "2", "waiters: {state:#}");

    // Opened, the lock shows who waits, front first, and its last events.
    const OPEN: &str =
        "const b = document.querySelector('tr[data-lock=\"deploy-prod\"] button.lock-name');
        if (!b) return false; b.click(); return true;";
    assert_eq!(
        client.execute(OPEN, vec![]).await.expect("open"),
        json!(true)
    );
    let state = wait_for_live(&client, "the queue and the history", |s| {
        s["queue"] == json!(["pipeline-b", "pipeline-c"])
            && s["history"]
                .as_array()
                .is_some_and(|h| h.iter().any(|e| e["kind"] == "released"))
    })
    .await;
    assert_eq!(state["error"], json!(null), "{state:#}");
    let ahead = state["queueText"][0].as_str().unwrap_or_default();
    assert!(
        ahead.contains("build-18") && ahead.contains("waiting for"),
        "{state:#}"
    );
    let released = state["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["kind"] == "released"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(released["key"], "build-41", "{state:#}");
    assert!(
        released["duration"]
            .as_str()
            .is_some_and(|d| d.starts_with("held for ")),
        "{state:#}"
    );

    // Changes through the API show with no GET /locks between them and the page.
    let polls = counted.asked.load(SeqCst);
    assert!(
        polls >= 1,
        "the page's GET /locks go through the counting proxy"
    );
    blocking(|| {
        let taken = authed(&server, "PUT", "/lock/hotfix", Some(json!({"key": "hf"})));
        assert_eq!(taken.status, 200, "{}", taken.body);
        let freed = authed(
            &server,
            "DELETE",
            "/lock/deploy-prod",
            Some(json!({"key": "build-42", "requestor": "prod-job"})),
        );
        assert_eq!(freed.status, 200, "{}", freed.body);
    });
    let state = wait_for_live(&client, "hotfix, and pipeline-b served", |s| {
        s["rows"]["hotfix"].is_array()
            && s["rows"]["deploy-prod"][1] == "pipeline-b"
            && s["queue"] == json!(["pipeline-c"])
            && s["history"].as_array().is_some_and(|h| {
                h.iter()
                    .any(|e| e["kind"] == "acquired" && e["key"] == "pipeline-b")
            })
    })
    .await;
    assert_eq!(counted.asked.load(SeqCst), polls, "GET /locks was polled");
    assert_eq!(state["rows"]["deploy-prod"][7], "1", "waiters: {state:#}");
    let history = state["history"].as_array().cloned().unwrap_or_default();
    let served = history
        .iter()
        .find(|e| e["kind"] == "acquired" && e["key"] == "pipeline-b")
        .cloned()
        .unwrap_or_default();
    assert!(
        served["duration"]
            .as_str()
            .is_some_and(|d| d.starts_with("waited for ")),
        "{state:#}"
    );
    let ended = history
        .iter()
        .find(|e| e["kind"] == "released" && e["key"] == "build-42")
        .cloned()
        .unwrap_or_default();
    assert!(
        ended["duration"]
            .as_str()
            .is_some_and(|d| d.starts_with("held for ")),
        "{state:#}"
    );
    assert_eq!(state["error"], json!(null), "{state:#}");

    // The last waiter served, nobody waits.
    blocking(|| {
        let freed = authed(
            &server,
            "DELETE",
            "/lock/deploy-prod",
            Some(json!({"key": "pipeline-b", "requestor": "build-18"})),
        );
        assert_eq!(freed.status, 200, "{}", freed.body);
    });
    let state = wait_for_live(&client, "nobody waiting", |s| {
        s["rows"]["deploy-prod"][1] == "pipeline-c" && s["queue"] == json!([])
    })
    .await;
    assert!(
        state["queueNote"]
            .as_str()
            .is_some_and(|t| t.contains("Nobody waits.")),
        "{state:#}"
    );
    assert_eq!(counted.asked.load(SeqCst), polls, "GET /locks was polled");

    // A dropped stream resumes where it stopped: a change made while it is down (its
    // reconnection held at the proxy) shows once it is back, still without GET /locks.
    counted.hold_events.send_replace(true);
    counted.cut.notify_waiters();
    wait_for_live(&client, "the stream down", |s| s["live"] == "false").await;
    blocking(|| {
        let taken = authed(
            &server,
            "PUT",
            "/lock/while-away",
            Some(json!({"key": "wa"})),
        );
        assert_eq!(taken.status, 200, "{}", taken.body);
    });
    counted.hold_events.send_replace(false);
    let state = wait_for_live(&client, "the change made while the stream was down", |s| {
        s["live"] == "true" && s["rows"]["while-away"].is_array()
    })
    .await;
    assert_eq!(state["rows"]["while-away"][1], "wa", "{state:#}");
    assert_eq!(counted.asked.load(SeqCst), polls, "GET /locks was polled");
    let screenshot = client.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-live.png");
    std::fs::write(&path, screenshot).expect("save screenshot");
    eprintln!("dashboard screenshot saved to {}", path.display());
    client.close().await.expect("close browser");
    assert_eq!(blocking(|| first.join()).expect("first waiter"), 200);
    assert_eq!(blocking(|| second.join()).expect("second waiter"), 200);
    blocking(move || drop(server));
}
