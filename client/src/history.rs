//! The history (docs/history.md) as calls of the [`Client`]: `GET /history` (every event after
//! an id, of one lock or pool if asked, a page at a time) and `GET /lock/{name}/history` (a
//! lock's last events). Both answer a [`HistoryPage`]; anything else is an
//! [`Error::Refused`] (an older server has no such route: 404).

use std::time::Duration;

use reqwest::{Method, StatusCode};

use crate::error::Error;
use crate::http::{Client, Reply};
use crate::path::{PATH_SEGMENT, lock_path};
use crate::wire::{Event, HistoryPage};

/// The most events the server puts in one page.
pub const MAX_PAGE: u64 = 1000;

/// What `GET /history` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only the events after this id (0: from the oldest kept).
    pub since: u64,
    /// Only this lock's events.
    pub lock: Option<String>,
    /// Only this pool's events.
    pub pool: Option<String>,
    /// At most this many (the server's default when absent: 100; at most [`MAX_PAGE`]).
    pub limit: Option<u64>,
}

impl HistoryQuery {
    /// `/history?since=...&lock=...&pool=...&limit=...`, names percent-encoded.
    pub fn path(&self) -> String {
        let mut path = format!("/history?since={}", self.since);
        if let Some(lock) = &self.lock {
            path.push_str(&format!("&lock={}", encode(lock)));
        }
        if let Some(pool) = &self.pool {
            path.push_str(&format!("&pool={}", encode(pool)));
        }
        if let Some(limit) = self.limit {
            path.push_str(&format!("&limit={limit}"));
        }
        path
    }
}

pub(crate) fn encode(text: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(text, PATH_SEGMENT)
}

impl Client {
    /// `GET /history`: one page of the events after `query.since`, oldest first.
    pub async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, Error> {
        self.page(&query.path()).await
    }

    /// `GET /lock/{name}/history`: the lock's last `limit` events (the server's default, 50,
    /// when `None`), oldest first.
    pub async fn lock_history(&self, name: &str, limit: Option<u64>) -> Result<HistoryPage, Error> {
        let query = limit.map(|l| format!("?limit={l}")).unwrap_or_default();
        self.page(&format!("{}/history{query}", lock_path(name)))
            .await
    }

    /// Every event after `query.since` up to `max` of them, a page after another (each of at
    /// most [`MAX_PAGE`]); with the last page, whose `more` says whether events are left.
    pub async fn history_upto(
        &self,
        query: &HistoryQuery,
        max: u64,
    ) -> Result<(Vec<Event>, HistoryPage), Error> {
        collect_pages(query, max, |q| async move { self.history(&q).await }).await
    }

    async fn page(&self, path: &str) -> Result<HistoryPage, Error> {
        let reply = self
            .locker::<()>(Method::GET, path, None, Duration::ZERO)
            .await?;
        let refused = |reply: &Reply, message: String| Error::Refused {
            method: Method::GET,
            url: format!("{}{path}", self.shown_base()),
            status: reply.status,
            message,
        };
        if reply.status != StatusCode::OK {
            return Err(refused(&reply, reply.error_message()));
        }
        serde_json::from_value::<HistoryPage>(reply.body.clone())
            .map_err(|e| refused(&reply, format!("the answer is not a page of history: {e}")))
    }
}

/// Pages through the history with `fetch` from `query.since` until `max` events are in hand
/// or no more are left. A page that does not move on (an empty page, or `next` not past the
/// `since` asked) ends it, so a confused server cannot keep it asking forever.
pub async fn collect_pages<F, Fut>(
    query: &HistoryQuery,
    max: u64,
    mut fetch: F,
) -> Result<(Vec<Event>, HistoryPage), Error>
where
    F: FnMut(HistoryQuery) -> Fut,
    Fut: Future<Output = Result<HistoryPage, Error>>,
{
    let mut events: Vec<Event> = Vec::new();
    let mut asked = query.clone();
    loop {
        let wanted = max.saturating_sub(events.len() as u64).min(MAX_PAGE);
        asked.limit = Some(wanted);
        let mut page = fetch(asked.clone()).await?;
        let moved_on = !page.events.is_empty() && page.next > asked.since;
        // Never more than asked for, and never an event at or before `since` (a server that
        // ignores the query).
        page.events.retain(|e| e.id > asked.since);
        page.events.truncate(wanted as usize);
        events.append(&mut page.events);
        if !page.more || !moved_on || events.len() as u64 >= max {
            return Ok((events, page));
        }
        asked.since = page.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64) -> Event {
        Event {
            id,
            at: format!("t{id}"),
            kind: "released".into(),
            lock: Some("l".into()),
            ..Event::default()
        }
    }

    /// A server keeping events 1..=total, answering pages as docs/history.md says (the limit
    /// capped at `cap`), and the queries it was asked.
    fn server(
        total: u64,
        cap: u64,
        asked: &std::cell::RefCell<Vec<HistoryQuery>>,
    ) -> impl FnMut(HistoryQuery) -> std::future::Ready<Result<HistoryPage, Error>> {
        move |q: HistoryQuery| {
            asked.borrow_mut().push(q.clone());
            let limit = q.limit.unwrap_or(100).min(cap);
            let events: Vec<Event> = (q.since + 1..=total)
                .take(limit as usize)
                .map(event)
                .collect();
            let next = events.last().map_or(q.since, |e| e.id);
            std::future::ready(Ok(HistoryPage {
                more: next < total,
                next,
                oldest: 1,
                lost: 0,
                events,
            }))
        }
    }

    fn ids(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    #[tokio::test]
    async fn pages_until_nothing_is_left_or_the_maximum_is_in_hand() {
        let asked = std::cell::RefCell::new(Vec::new());
        let query = HistoryQuery {
            since: 3,
            lock: Some("l".into()),
            ..HistoryQuery::default()
        };
        // Pages of at most 4: 4..=7, 8..=11, 12..=13.
        let (events, last) = collect_pages(&query, 100, server(13, 4, &asked))
            .await
            .expect("pages");
        assert_eq!(ids(&events), (4..=13).collect::<Vec<_>>());
        assert!(!last.more);
        let sinces: Vec<u64> = asked.borrow().iter().map(|q| q.since).collect();
        assert_eq!(sinces, [3, 7, 11]);
        assert!(
            asked
                .borrow()
                .iter()
                .all(|q| q.lock.as_deref() == Some("l"))
        );

        // A maximum below what is kept: exactly that many, and `more` says the rest is there.
        let asked = std::cell::RefCell::new(Vec::new());
        let (events, last) = collect_pages(&HistoryQuery::default(), 6, server(13, 4, &asked))
            .await
            .expect("pages");
        assert_eq!(ids(&events), (1..=6).collect::<Vec<_>>());
        assert!(last.more);
        assert_eq!(last.next, 6);
        let limits: Vec<Option<u64>> = asked.borrow().iter().map(|q| q.limit).collect();
        assert_eq!(limits, [Some(6), Some(2)]);
    }

    #[tokio::test]
    async fn a_server_that_does_not_move_on_ends_the_paging() {
        let mut calls = 0;
        let stuck = |_q: HistoryQuery| {
            calls += 1;
            std::future::ready(Ok(HistoryPage {
                events: vec![event(5)],
                next: 5,
                more: true,
                oldest: 1,
                lost: 0,
            }))
        };
        let query = HistoryQuery {
            since: 5,
            ..HistoryQuery::default()
        };
        let (events, _) = collect_pages(&query, 1000, stuck).await.expect("pages");
        assert!(
            events.is_empty(),
            "an event at `since` was taken: {events:?}"
        );
        assert_eq!(calls, 1);
    }

    #[test]
    fn queries_encode_their_names() {
        let query = HistoryQuery {
            since: 7,
            lock: Some("deploy/prod x".into()),
            pool: None,
            limit: Some(20),
        };
        assert_eq!(
            query.path(),
            "/history?since=7&lock=deploy%2Fprod%20x&limit=20"
        );
        let pool = HistoryQuery {
            pool: Some("aws".into()),
            ..HistoryQuery::default()
        };
        assert_eq!(pool.path(), "/history?since=0&pool=aws");
    }
}
