//! The history routes: `GET /history`, `GET /lock/{name}/history` and the live `GET /events`
//! (server-sent events). See docs/history.md.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::stream;
use locker_client::wire::Event;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::AppState;
use super::error::ApiError;
use crate::history::{History, MAX_PAGE, Query};

/// Events a lock's history shows when no limit is asked for.
const LOCK_HISTORY_DEFAULT: usize = 50;
/// Events a page of `GET /history` holds when no limit is asked for.
const PAGE_DEFAULT: usize = 100;
/// A comment on an idle stream this often, so proxies and clients see it alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// `?since=&lock=&pool=&limit=`, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HistoryParams {
    since: Option<String>,
    lock: Option<String>,
    pool: Option<String>,
    limit: Option<String>,
}

impl HistoryParams {
    fn parse(query: &str) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::BadRequest(format!("bad query string: {e}")))
    }

    fn since(&self) -> Result<Option<u64>, ApiError> {
        number("since", self.since.as_deref())
    }

    fn limit(&self, default: usize) -> Result<usize, ApiError> {
        match number("limit", self.limit.as_deref())? {
            None => Ok(default),
            Some(0) => Err(ApiError::BadRequest("limit must be at least 1".into())),
            Some(n) => Ok(usize::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE)),
        }
    }

    fn query(&self, default_limit: usize) -> Result<Query, ApiError> {
        let empty_is_none = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(Query {
            since: self.since()?.unwrap_or(0),
            lock: empty_is_none(&self.lock),
            pool: empty_is_none(&self.pool),
            limit: self.limit(default_limit)?,
            last: false,
        })
    }
}

fn number(name: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    match text {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("{name} must be a whole number, not {text:?}"))
        }),
    }
}

fn history(state: &AppState) -> Result<Arc<History>, ApiError> {
    state.store.history().cloned().ok_or_else(|| {
        ApiError::NotFound("the history is off on this server (LOCKER_HISTORY_BYTES=0)".into())
    })
}

/// `GET /history?since=&lock=&pool=&limit=`: the events after `since`, oldest first.
pub async fn page(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query = HistoryParams::parse(request.query_string())?.query(PAGE_DEFAULT)?;
    Ok(HttpResponse::Ok().json(history(&state)?.page(&query)))
}

/// `GET /lock/{name}/history?limit=`: a lock's last events, oldest first.
pub async fn of_lock(
    name: String,
    request: &HttpRequest,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let params = HistoryParams::parse(request.query_string())?;
    let query = Query {
        lock: Some(name),
        pool: None,
        last: true,
        ..params.query(LOCK_HISTORY_DEFAULT)?
    };
    Ok(HttpResponse::Ok().json(history(state)?.page(&query)))
}

/// `GET /events?lock=&pool=` (with `Last-Event-ID` or `?since=` to resume): the events as they
/// happen, as server-sent events.
pub async fn live(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let params = HistoryParams::parse(request.query_string())?;
    let resume = match request.headers().get("last-event-id") {
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))?;
            number("Last-Event-ID", Some(text.trim()))?
        }
        None => params.since()?,
    };
    let query = params.query(MAX_PAGE)?;
    let history = history(&state)?;
    // Subscribed before the kept events are read: nothing falls between the two.
    let live = history.subscribe();
    let closed = history.closed();
    let gap = resume.and_then(|since| history.gap(since));
    let feed = Feed {
        history,
        query,
        backlog: resume,
        sent: resume.unwrap_or(0),
        live,
        closed,
        gap,
        pending: std::collections::VecDeque::new(),
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        // A stream that ends (a reader dropped for falling behind, a stopping server) closes
        // its connection: the reader notices and resumes with Last-Event-ID.
        .force_close()
        .streaming(stream::unfold(feed, Feed::next)))
}

/// One reader's stream: the kept events after its resume point, page by page, then the live
/// ones.
struct Feed {
    history: Arc<History>,
    query: Query,
    /// Where the kept events are read from next; `None` once caught up.
    backlog: Option<u64>,
    /// The highest id passed (sent or filtered out): live events up to it came in the backlog.
    sent: u64,
    live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    closed: tokio::sync::watch::Receiver<bool>,
    /// The oldest kept id, when the reader asked for events older than it.
    gap: Option<u64>,
    pending: std::collections::VecDeque<Bytes>,
}

impl Feed {
    async fn next(mut self) -> Option<(Result<Bytes, std::convert::Infallible>, Self)> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some((Ok(chunk), self));
            }
            if let Some(oldest) = self.gap.take() {
                let data = format!("event: gap\ndata: {{\"oldest\":{oldest}}}\n\n");
                return Some((Ok(Bytes::from(data)), self));
            }
            if let Some(since) = self.backlog {
                self.read_backlog(since);
                continue;
            }
            let received = tokio::select! {
                received = self.live.recv() => Some(received),
                _ = self.closed.wait_for(|closed| *closed) => return None,
                () = tokio::time::sleep(KEEP_ALIVE) => None,
            };
            let event = match received {
                Some(Ok(event)) => event,
                // Too far behind: dropped, to resume with Last-Event-ID.
                Some(Err(RecvError::Lagged(_) | RecvError::Closed)) => return None,
                None => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), self)),
            };
            if event.id <= self.sent {
                continue;
            }
            self.sent = event.id;
            if self.query.matches(&event) {
                return Some((Ok(frame(&event)), self));
            }
        }
    }

    /// Queues one page of kept events after `since`, every event looked at counting as passed.
    fn read_backlog(&mut self, since: u64) {
        let page = self.history.page(&Query {
            since,
            limit: MAX_PAGE,
            ..Query::default()
        });
        for event in &page.events {
            self.sent = self.sent.max(event.id);
            if self.query.matches(event) {
                self.pending.push_back(frame(event));
            }
        }
        self.backlog = page.more.then_some(page.next);
    }
}

/// One event as a server-sent event.
fn frame(event: &Event) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.id, event.kind
    ))
}
