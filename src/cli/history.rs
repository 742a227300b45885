//! `locker history` (a lock's last events, or every event after an id) and `locker watch`
//! (events as they happen), over the history API of docs/history.md: a table or one line per
//! event by default, one JSON object per line with `--json`.

use std::collections::BTreeMap;
use std::time::Duration;

use locker_client::duration::short_duration;
use locker_client::events::{EventStream, Filter, Item};
use locker_client::history::HistoryQuery;
use locker_client::wire::Event;

use super::Failure;
use super::http::Connection;
use super::show::table;

/// How many events `history --all` prints without `--limit`.
pub const ALL_LIMIT: u64 = 1000;

/// The Concourse build (or other client) an event's holder info names, in a few words:
/// `team/pipeline/job #build`, else the build's URL, else the client (`locker lock`, user),
/// else the info as `key=value` pairs.
pub fn build_of(info: &BTreeMap<String, String>) -> String {
    let get = |name: &str| info.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let build = get("build_name").or_else(|| get("build"));
    match (get("team"), get("pipeline"), get("job"), build) {
        (Some(team), Some(pipeline), Some(job), Some(build)) => {
            return format!("{team}/{pipeline}/{job} #{build}");
        }
        (_, Some(pipeline), Some(job), Some(build)) => return format!("{pipeline}/{job} #{build}"),
        _ => {}
    }
    if let Some(url) = get("build_url") {
        return url.to_string();
    }
    if let Some(client) = get("client") {
        return match get("user") {
            Some(user) => format!("{client} ({user})"),
            None => client.to_string(),
        };
    }
    info.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds for people: `340ms` below a second, else `12m 11s`.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        short_duration(Duration::from_millis(ms))
    }
}

/// How long it was held or waited (or the new slot count), e.g. `held 12m 11s`.
fn duration_of(event: &Event) -> String {
    let ms = millis;
    match (event.held_ms, event.waited_ms, event.slots) {
        (Some(held), _, _) => format!("held {}", ms(held)),
        (None, Some(waited), _) => format!("waited {}", ms(waited)),
        (None, None, Some(slots)) => format!("slots {slots}"),
        (None, None, None) => String::new(),
    }
}

fn or_empty<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The events as a table, with a column naming the lock (or pool item) when `subject`.
fn print_table(events: &[Event], subject: bool) -> Result<(), Failure> {
    let mut header = vec!["TIME", "KIND"];
    if subject {
        header.push("LOCK");
    }
    header.extend(["KEY", "REQUESTOR", "GEN", "FOR", "BUILD", "BY"]);
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for event in events {
        let mut row = vec![event.at.clone(), event.kind.clone()];
        if subject {
            row.push(event.subject());
        }
        row.extend([
            or_empty(event.key.as_ref()),
            or_empty(event.requestor.as_ref()),
            or_empty(event.generation),
            duration_of(event),
            build_of(&event.info),
            or_empty(event.by.as_ref()),
        ]);
        rows.push(row);
    }
    table(&rows)
}

fn print_json_lines(events: &[Event]) -> Result<(), Failure> {
    for event in events {
        print_json(event)?;
    }
    Ok(())
}

fn print_json(event: &Event) -> Result<(), Failure> {
    let line = serde_json::to_string(event)
        .map_err(|e| Failure::new(1, format!("cannot encode an event as JSON: {e}")))?;
    out!("{line}")
}

/// `locker history NAME`: the lock's last `limit` events (the server's default without).
pub async fn lock(
    connection: &Connection,
    name: &str,
    limit: Option<u64>,
    as_json: bool,
) -> Result<u8, Failure> {
    let page = connection
        .client()
        .lock_history(name, limit)
        .await
        .map_err(|e| connection.failure(e))?;
    if as_json {
        print_json_lines(&page.events)?;
    } else if page.events.is_empty() {
        out!("no events of lock {name:?}")?;
    } else {
        print_table(&page.events, false)?;
    }
    Ok(0)
}

/// `locker history --all`: the events after `since`, at most `limit`, a page at a time.
pub async fn all(
    connection: &Connection,
    since: u64,
    limit: u64,
    as_json: bool,
) -> Result<u8, Failure> {
    let query = HistoryQuery {
        since,
        ..HistoryQuery::default()
    };
    let (events, last) = connection
        .client()
        .history_upto(&query, limit)
        .await
        .map_err(|e| connection.failure(e))?;
    if since > 0 && last.lost > since {
        eprintln!(
            "locker: the events after {since} up to {} are no longer kept",
            last.lost
        );
    }
    if as_json {
        print_json_lines(&events)?;
    } else if events.is_empty() {
        out!("no events after {since}")?;
    } else {
        print_table(&events, true)?;
    }
    if last.more {
        eprintln!(
            "locker: more events follow: locker history --all --since {}",
            last.next
        );
    }
    Ok(0)
}

/// One event in one line: time, kind, what, then the fields it has.
pub fn line(event: &Event) -> String {
    let mut text = format!("{} {} {}", event.at, event.kind, event.subject());
    let mut field = |name: &str, value: String| {
        if value.is_empty() {
            return;
        }
        if value.contains(char::is_whitespace) || value.contains('"') {
            text.push_str(&format!(" {name}={value:?}"));
        } else {
            text.push_str(&format!(" {name}={value}"));
        }
    };
    field("key", or_empty(event.key.as_ref()));
    field("requestor", or_empty(event.requestor.as_ref()));
    field("generation", or_empty(event.generation));
    field("count", or_empty(event.count));
    let ms = |ms: Option<u64>| or_empty(ms.map(millis));
    field("held", ms(event.held_ms));
    field("waited", ms(event.waited_ms));
    field("slots", or_empty(event.slots));
    field("build", build_of(&event.info));
    field("by", or_empty(event.by.as_ref()));
    text
}

/// `locker watch`: prints each event of `filter` as it happens (with `since`, the kept ones
/// after it first), until interrupted; rides out a dropped connection.
pub async fn watch(
    connection: &Connection,
    filter: Filter,
    since: Option<u64>,
    as_json: bool,
) -> Result<u8, Failure> {
    let what = match &filter {
        Filter::All => "every lock and pool".to_string(),
        Filter::Lock(name) => format!("lock {name:?}"),
        Filter::Pool(name) => format!("pool {name:?}"),
    };
    let mut stream = EventStream::new(connection.client(), filter, since);
    let mut connected = false;
    loop {
        let item = stream.next().await.map_err(|e| connection.failure(e))?;
        match item {
            Item::Event(event) if as_json => print_json(&event)?,
            Item::Event(event) => out!("{}", line(&event))?,
            Item::Connected { after } => {
                if connected {
                    eprintln!(
                        "locker: reconnected{}",
                        after
                            .map(|id| format!(", resuming after event {id}"))
                            .unwrap_or_default()
                    );
                } else {
                    eprintln!("locker: watching {what} (Ctrl-C to stop)");
                    connected = true;
                }
            }
            Item::Disconnected { cause, retry_in } => eprintln!(
                "locker: lost the event stream ({cause}); reconnecting in {}",
                humantime::format_duration(retry_in)
            ),
            Item::Gap { oldest } => eprintln!(
                "locker: some events were missed: the server keeps only those from {oldest} on"
            ),
            Item::Unreadable { event, cause } => {
                eprintln!("locker: skipping an unreadable {event:?} message: {cause}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builds_are_named_briefly() {
        let concourse = info(&[
            ("team", "main"),
            ("pipeline", "deploy"),
            ("job", "prod"),
            ("build_name", "17"),
            ("build_url", "https://ci/b/17"),
        ]);
        assert_eq!(build_of(&concourse), "main/deploy/prod #17");
        // docs/history.md's example spells the build `build`.
        let documented = info(&[("pipeline", "deploy"), ("job", "prod"), ("build", "17")]);
        assert_eq!(build_of(&documented), "deploy/prod #17");
        assert_eq!(
            build_of(&info(&[("build_url", "https://ci/b/9")])),
            "https://ci/b/9"
        );
        assert_eq!(
            build_of(&info(&[("client", "locker lock"), ("user", "ann")])),
            "locker lock (ann)"
        );
        assert_eq!(build_of(&info(&[("a", "1"), ("b", "2")])), "a=1, b=2");
        assert_eq!(build_of(&BTreeMap::new()), "");
    }

    #[test]
    fn one_line_per_event_with_the_fields_it_has() {
        let event = Event {
            id: 1042,
            at: "2026-11-30T22:41:07.113Z".into(),
            kind: "released".into(),
            lock: Some("deploy-prod".into()),
            key: Some("pipeline-a".into()),
            requestor: Some("build-17".into()),
            generation: Some(88),
            info: info(&[
                ("team", "main"),
                ("pipeline", "deploy"),
                ("job", "prod"),
                ("build", "17"),
            ]),
            held_ms: Some(731_004),
            ..Event::default()
        };
        assert_eq!(
            line(&event),
            "2026-11-30T22:41:07.113Z released deploy-prod key=pipeline-a requestor=build-17 \
             generation=88 held=\"12m 11s\" build=\"main/deploy/prod #17\""
        );
        let forced = Event {
            id: 7,
            at: "t".into(),
            kind: "force-released".into(),
            pool: Some("aws".into()),
            item: Some("env-1".into()),
            by: Some("admin 127.0.0.1".into()),
            ..Event::default()
        };
        assert_eq!(
            line(&forced),
            "t force-released aws/env-1 by=\"admin 127.0.0.1\""
        );
    }

    #[test]
    fn the_for_column_says_held_waited_or_slots() {
        let held = Event {
            held_ms: Some(61_000),
            waited_ms: Some(5_000),
            ..Event::default()
        };
        assert_eq!(duration_of(&held), "held 1m 1s");
        let waited = Event {
            waited_ms: Some(2_500),
            ..Event::default()
        };
        assert_eq!(duration_of(&waited), "waited 2s");
        let slots = Event {
            slots: Some(3),
            ..Event::default()
        };
        assert_eq!(duration_of(&slots), "slots 3");
        let brief = Event {
            held_ms: Some(340),
            ..Event::default()
        };
        assert_eq!(duration_of(&brief), "held 340ms");
        assert_eq!(duration_of(&Event::default()), "");
    }
}
