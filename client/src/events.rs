//! The live events of `GET /events` (docs/history.md, "Live events"): a parser of
//! `text/event-stream` ([`Parser`]) and a reader ([`EventStream`]) that yields each
//! [`Event`] once, in order, across dropped connections.
//!
//! The reader remembers the id of the last event it yielded and, when the connection drops
//! (the server restarted, a proxy cut it, nothing came for three keep-alive periods, or the
//! server let a client that fell behind go), connects again with `Last-Event-ID` set to it,
//! after a pause that doubles up to a cap; the server then sends every kept event after it
//! before the live ones. An event it has already yielded (an id not above the last) is
//! dropped, so nothing is seen twice. Events the server no longer keeps are reported as a
//! [`Item::Gap`].

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderValue};
use serde::Deserialize;

use crate::error::{CertificateProblem, Error, describe};
use crate::history::encode;
use crate::http::{Client, RetryPolicy};
use crate::wire::Event;

/// The longest line the parser keeps; the rest of a longer one is dropped, and the line with it.
pub const MAX_LINE: usize = 1 << 20;

/// The server sends a comment every 15 s: a connection silent for this long is dead.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(45);

/// Pauses before connecting again: 250 ms, doubled up to 10 s.
pub const DEFAULT_BACKOFF: RetryPolicy = RetryPolicy {
    first: Duration::from_millis(250),
    max: Duration::from_secs(10),
    attempts: u32::MAX,
};

/// One message of an event stream: the block of lines up to an empty line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The last `id:` the stream has set (it carries over to later messages, as in the SSE
    /// specification).
    pub id: Option<String>,
    /// `event:`, `message` when the block has none.
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// An incremental `text/event-stream` parser: feed it bytes as they come, cut anywhere (inside
/// a line, between `\r` and `\n`, inside a UTF-8 character), and it hands back each complete
/// message. Lines end with `\n`, `\r\n` or `\r`; `:` starts a comment; a field's value loses
/// one leading space; `retry:` and unknown fields are ignored.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The line has passed [`MAX_LINE`]: it is dropped when it ends.
    overlong: bool,
    /// The last byte was `\r`: a `\n` right after it ends no further line.
    after_cr: bool,
    event: String,
    data: String,
    id: Option<String>,
}

impl Parser {
    /// Takes the next bytes; returns the messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut messages = Vec::new();
        for &byte in bytes {
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                continue;
            }
            match byte {
                b'\n' => self.end_line(&mut messages),
                b'\r' => {
                    self.end_line(&mut messages);
                    self.after_cr = true;
                }
                _ if self.line.len() >= MAX_LINE => self.overlong = true,
                _ => self.line.push(byte),
            }
        }
        messages
    }

    fn end_line(&mut self, messages: &mut Vec<Message>) {
        let bytes = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.overlong) {
            return;
        }
        if bytes.is_empty() {
            self.dispatch(messages);
            return;
        }
        let line = String::from_utf8_lossy(&bytes);
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            _ => {}
        }
    }

    fn dispatch(&mut self, messages: &mut Vec<Message>) {
        let event = std::mem::take(&mut self.event);
        let mut data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return;
        }
        data.pop();
        messages.push(Message {
            id: self.id.clone(),
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data,
        });
    }
}

/// Whose events to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    Lock(String),
    Pool(String),
}

impl Filter {
    /// `/events`, `/events?lock=NAME` or `/events?pool=NAME`.
    pub fn path(&self) -> String {
        match self {
            Filter::All => "/events".to_string(),
            Filter::Lock(name) => format!("/events?lock={}", encode(name)),
            Filter::Pool(name) => format!("/events?pool={}", encode(name)),
        }
    }
}

/// What the reader has to tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The next event, its id above every one before it.
    Event(Box<Event>),
    /// Events asked for are no longer kept: the first kept one is `oldest`.
    Gap { oldest: u64 },
    /// Connected (again); `after`: the `Last-Event-ID` sent, if any.
    Connected { after: Option<u64> },
    /// The connection dropped or could not be made; trying again after `retry_in`.
    Disconnected { cause: String, retry_in: Duration },
    /// A message that is not an event (nor a gap); the reader moves past it.
    Unreadable { event: String, cause: String },
}

/// The gap message's data.
#[derive(Deserialize)]
struct GapData {
    oldest: u64,
}

/// A connection that could not be made: worth another try or not.
enum ConnectFailure {
    Retry(String),
    Final(Error),
}

/// Reads `GET /events`, yielding every event once, in order, connecting again (with
/// `Last-Event-ID`) whenever the connection drops. Only the first connection's failure is an
/// error (and 401, a refused certificate or a 4xx at any connection): once it has connected,
/// the reader keeps trying, with a bounded backoff.
pub struct EventStream {
    client: Client,
    filter: Filter,
    last_id: Option<u64>,
    response: Option<reqwest::Response>,
    parser: Parser,
    pending: VecDeque<Item>,
    /// Connections failed in a row.
    failures: u32,
    /// Pause before the next connection.
    pause: Option<Duration>,
    connected_once: bool,
    idle: Duration,
    backoff: RetryPolicy,
}

impl EventStream {
    /// A reader of `filter`'s events: the live ones, or with `after`, every kept one after it
    /// first.
    pub fn new(client: &Client, filter: Filter, after: Option<u64>) -> EventStream {
        EventStream {
            client: client.clone(),
            filter,
            last_id: after,
            response: None,
            parser: Parser::default(),
            pending: VecDeque::new(),
            failures: 0,
            pause: None,
            connected_once: false,
            idle: DEFAULT_IDLE,
            backoff: DEFAULT_BACKOFF,
        }
    }

    /// Another pause before connecting again (tests shorten it).
    pub fn with_backoff(mut self, backoff: RetryPolicy) -> EventStream {
        self.backoff = backoff;
        self
    }

    /// Another longest silence before a connection counts as dead.
    pub fn with_idle(mut self, idle: Duration) -> EventStream {
        self.idle = idle;
        self
    }

    /// The id of the last event yielded (or the one asked to start after).
    pub fn last_id(&self) -> Option<u64> {
        self.last_id
    }

    /// The next thing to tell; waits as long as it takes.
    pub async fn next(&mut self) -> Result<Item, Error> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            let Some(response) = self.response.as_mut() else {
                if let Some(pause) = self.pause.take() {
                    tokio::time::sleep(pause).await;
                }
                match self.connect().await {
                    Ok(response) => {
                        self.response = Some(response);
                        self.parser = Parser::default();
                        self.failures = 0;
                        self.connected_once = true;
                        return Ok(Item::Connected {
                            after: self.last_id,
                        });
                    }
                    Err(ConnectFailure::Final(error)) => return Err(error),
                    Err(ConnectFailure::Retry(cause)) if !self.connected_once => {
                        return Err(Error::Transport {
                            method: reqwest::Method::GET,
                            url: self.shown_url(),
                            attempts: 1,
                            cause,
                        });
                    }
                    Err(ConnectFailure::Retry(cause)) => return Ok(self.dropped(cause)),
                }
            };
            let cause = match tokio::time::timeout(self.idle, response.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    for message in self.parser.push(&bytes) {
                        self.take(message);
                    }
                    continue;
                }
                Ok(Ok(None)) => "the server ended the stream".to_string(),
                Ok(Err(error)) => format!("the stream broke off: {}", describe(&error)),
                Err(_) => format!("nothing came for {}", humantime::format_duration(self.idle)),
            };
            self.response = None;
            return Ok(self.dropped(cause));
        }
    }

    /// The connection is gone: the pause before the next, and what to tell.
    fn dropped(&mut self, cause: String) -> Item {
        self.response = None;
        self.failures = self.failures.saturating_add(1);
        let retry_in = self.backoff.delay(self.failures);
        self.pause = Some(retry_in);
        Item::Disconnected { cause, retry_in }
    }

    /// A parsed message, as an item (or none: an event already yielded).
    fn take(&mut self, message: Message) {
        if message.event == "gap" {
            match serde_json::from_str::<GapData>(&message.data) {
                Ok(GapData { oldest }) => {
                    // The events before `oldest` will not come: do not ask for them again.
                    let before = oldest.saturating_sub(1);
                    if self.last_id.is_none_or(|last| last < before) {
                        self.last_id = Some(before);
                    }
                    self.pending.push_back(Item::Gap { oldest });
                }
                Err(e) => self.pending.push_back(Item::Unreadable {
                    event: message.event,
                    cause: format!("{e}: {}", message.data),
                }),
            }
            return;
        }
        match serde_json::from_str::<Event>(&message.data) {
            Ok(event) => {
                if self.last_id.is_some_and(|last| event.id <= last) {
                    return;
                }
                self.last_id = Some(event.id);
                self.pending.push_back(Item::Event(Box::new(event)));
            }
            Err(e) => {
                // Not asked for again after a reconnection.
                if let Some(id) = message.id.as_deref().and_then(|id| id.parse::<u64>().ok())
                    && self.last_id.is_none_or(|last| last < id)
                {
                    self.last_id = Some(id);
                }
                self.pending.push_back(Item::Unreadable {
                    event: message.event,
                    cause: format!("{e}: {}", message.data),
                });
            }
        }
    }

    fn shown_url(&self) -> String {
        format!("{}{}", self.client.shown_base(), self.filter.path())
    }

    async fn connect(&self) -> Result<reqwest::Response, ConnectFailure> {
        let mut request = self
            .client
            .stream_request(&self.filter.path())
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        if let Some(id) = self.last_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let timeout = self.client.request_timeout();
        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return Err(ConnectFailure::Retry("timed out".to_string())),
            Ok(Err(error)) => {
                let cause = describe(&error);
                if let Some(problem) = CertificateProblem::of(&error) {
                    return Err(ConnectFailure::Final(Error::Certificate {
                        method: reqwest::Method::GET,
                        url: self.shown_url(),
                        problem,
                        cause,
                    }));
                }
                return Err(ConnectFailure::Retry(cause));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ConnectFailure::Final(Error::Unauthorized {
                url: self.shown_url(),
            }));
        }
        // The body is short (an error), unless the server misbehaves: read it with a deadline.
        let text = tokio::time::timeout(timeout, response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|body| body.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().chars().take(200).collect());
        let message = if message.is_empty() {
            status.to_string()
        } else {
            message
        };
        if status.is_server_error() {
            return Err(ConnectFailure::Retry(format!(
                "answered {status}: {message}"
            )));
        }
        Err(ConnectFailure::Final(Error::Refused {
            method: reqwest::Method::GET,
            url: self.shown_url(),
            status,
            message,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": keep-alive\n\
        id: 41\nevent: acquired\ndata: {\"id\":41}\n\n\
        : a comment between\n\
        id: 42\r\nevent: released\r\ndata: first\r\ndata:second\r\ndata\r\n\r\n\
        id: 43\revent: gap\rdata: {\"oldest\": 40}\r\r\
        data: no event, no id\n\n";

    fn expected() -> Vec<Message> {
        let message = |id: &str, event: &str, data: &str| Message {
            id: Some(id.to_string()),
            event: event.to_string(),
            data: data.to_string(),
        };
        vec![
            message("41", "acquired", "{\"id\":41}"),
            message("42", "released", "first\nsecond\n"),
            message("43", "gap", "{\"oldest\": 40}"),
            // The id carries over; the event type does not.
            message("43", "message", "no event, no id"),
        ]
    }

    #[test]
    fn parses_whole_streams_with_lf_crlf_and_cr_and_skips_comments() {
        assert_eq!(Parser::default().push(STREAM.as_bytes()), expected());
    }

    #[test]
    fn parses_the_same_however_the_bytes_are_cut() {
        let bytes = STREAM.as_bytes();
        // Every single cut, and every pair of cuts: inside lines, between \r and \n, around
        // the empty lines.
        for first in 0..=bytes.len() {
            for second in (first..=bytes.len()).step_by(7) {
                let mut parser = Parser::default();
                let mut messages = parser.push(&bytes[..first]);
                messages.extend(parser.push(&bytes[first..second]));
                messages.extend(parser.push(&bytes[second..]));
                assert_eq!(messages, expected(), "cut at {first} and {second}");
            }
        }
        // One byte at a time.
        let mut parser = Parser::default();
        let messages: Vec<Message> = bytes.iter().flat_map(|b| parser.push(&[*b])).collect();
        assert_eq!(messages, expected());
    }

    #[test]
    fn keeps_characters_cut_across_chunks_and_drops_blocks_without_data() {
        let text = "event: x\nid: 5\n\ndata: \u{e9}t\u{e9} \u{1f512}\n\n";
        let bytes = text.as_bytes();
        let cut = text.find('\u{1f512}').expect("lock") + 2;
        let mut parser = Parser::default();
        let mut messages = parser.push(&bytes[..cut]);
        assert!(messages.is_empty());
        messages.extend(parser.push(&bytes[cut..]));
        // The first block has no data: not dispatched, and its type is forgotten; its id stays.
        assert_eq!(
            messages,
            [Message {
                id: Some("5".into()),
                event: "message".into(),
                data: "\u{e9}t\u{e9} \u{1f512}".into(),
            }]
        );
        // Nothing until the empty line.
        assert!(Parser::default().push(b"data: x\n").is_empty());
    }

    #[test]
    fn drops_an_overlong_line_and_nothing_else() {
        let mut parser = Parser::default();
        let mut stream = b"data: ".to_vec();
        stream.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        stream.extend(b"\ndata: kept\n\n");
        let messages = parser.push(&stream);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].data, "kept");
    }

    #[test]
    fn filters_name_their_lock_or_pool() {
        assert_eq!(Filter::All.path(), "/events");
        assert_eq!(Filter::Lock("a/b".into()).path(), "/events?lock=a%2Fb");
        assert_eq!(Filter::Pool("aws".into()).path(), "/events?pool=aws");
    }

    mod reconnecting {
        use super::super::*;
        use crate::http::Settings;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        fn event_data(id: u64) -> String {
            format!(
                "id: {id}\nevent: released\ndata: {{\"id\":{id},\"at\":\"t\",\"kind\":\"released\",\"lock\":\"l\"}}\n\n"
            )
        }

        /// Reads one request head; answers an event stream with `body`, then closes.
        async fn serve(listener: &TcpListener, body: String) -> String {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let head = read_head(&mut socket).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{body}"
            );
            socket.write_all(answer.as_bytes()).await.expect("write");
            socket.shutdown().await.expect("shutdown");
            head
        }

        async fn read_head(socket: &mut TcpStream) -> String {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                let n = socket.read(&mut byte).await.expect("read");
                assert_eq!(n, 1, "the request ended early");
                head.push(byte[0]);
            }
            String::from_utf8_lossy(&head).to_lowercase()
        }

        fn client(port: u16) -> Client {
            Client::new(Settings {
                url: format!("http://127.0.0.1:{port}").parse().expect("url"),
                credentials: None,
                ca_pem: None,
                accept_invalid_certs: false,
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(5),
                user_agent: "test".into(),
                retry: RetryPolicy::ONCE,
            })
            .expect("client")
        }

        fn id_of(item: &Item) -> Option<u64> {
            match item {
                Item::Event(event) => Some(event.id),
                _ => None,
            }
        }

        #[tokio::test]
        async fn resumes_after_the_last_event_and_yields_each_once() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("address").port();
            let server = tokio::spawn(async move {
                let first = serve(&listener, format!("{}{}", event_data(1), event_data(2))).await;
                // The second connection: event 2 again (a server resends what it keeps), then 3.
                let second = serve(&listener, format!("{}{}", event_data(2), event_data(3))).await;
                (first, second)
            });
            let mut stream = EventStream::new(&client(port), Filter::Lock("l".into()), None)
                .with_backoff(quick());
            let mut items = Vec::new();
            while items.iter().rev().find_map(id_of) != Some(3) {
                items.push(stream.next().await.expect("item"));
            }
            let (first, second) = server.await.expect("server");
            assert!(first.starts_with("get /events?lock=l "), "{first}");
            assert!(!first.contains("last-event-id"), "{first}");
            assert!(first.contains("accept: text/event-stream"), "{first}");
            assert!(second.contains("last-event-id: 2\r\n"), "{second}");

            assert_eq!(
                items.iter().filter_map(id_of).collect::<Vec<_>>(),
                [1, 2, 3]
            );
            assert_eq!(items[0], Item::Connected { after: None });
            assert!(matches!(items[3], Item::Disconnected { .. }), "{items:?}");
            assert_eq!(items[4], Item::Connected { after: Some(2) });
            assert_eq!(stream.last_id(), Some(3));
        }

        fn quick() -> RetryPolicy {
            RetryPolicy {
                first: Duration::from_millis(1),
                max: Duration::from_millis(1),
                attempts: u32::MAX,
            }
        }

        #[tokio::test]
        async fn a_gap_is_reported_and_not_asked_for_again() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("address").port();
            let server = tokio::spawn(async move {
                let gap = "event: gap\ndata: {\"oldest\":40}\n\n".to_string();
                let first = serve(&listener, gap).await;
                let second = serve(&listener, event_data(40)).await;
                (first, second)
            });
            let mut stream =
                EventStream::new(&client(port), Filter::All, Some(3)).with_backoff(quick());
            let mut items = Vec::new();
            while items.iter().rev().find_map(id_of) != Some(40) {
                items.push(stream.next().await.expect("item"));
            }
            let (first, second) = server.await.expect("server");
            assert!(first.contains("last-event-id: 3\r\n"), "{first}");
            // Events 4 to 39 are gone: the next connection asks for what follows them.
            assert!(second.contains("last-event-id: 39\r\n"), "{second}");
            assert_eq!(items[1], Item::Gap { oldest: 40 }, "{items:?}");
        }

        #[tokio::test]
        async fn a_silent_connection_counts_as_dropped() {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("address").port();
            let (done, mut finished) = tokio::sync::mpsc::channel::<()>(1);
            let server = tokio::spawn(async move {
                // Headers, then nothing, the connection kept open until the test ends.
                let (mut silent, _) = listener.accept().await.expect("accept");
                read_head(&mut silent).await;
                silent
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
                    .await
                    .expect("write");
                let head = serve(&listener, event_data(5)).await;
                finished.recv().await;
                drop(silent);
                head
            });
            let mut stream = EventStream::new(&client(port), Filter::All, None)
                .with_backoff(quick())
                .with_idle(Duration::from_millis(200));
            assert_eq!(
                stream.next().await.expect("item"),
                Item::Connected { after: None }
            );
            match stream.next().await.expect("item") {
                Item::Disconnected { cause, .. } => {
                    assert!(cause.contains("nothing came for 200ms"), "{cause}")
                }
                other => panic!("not a drop: {other:?}"),
            }
            assert_eq!(
                stream.next().await.expect("item"),
                Item::Connected { after: None }
            );
            assert_eq!(stream.next().await.ok().as_ref().and_then(id_of), Some(5));
            done.send(()).await.expect("done");
            server.await.expect("server");
        }

        #[tokio::test]
        async fn the_first_connection_failing_is_an_error_and_4xx_is_final() {
            // Nothing listens on a port just released.
            let port = {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                listener.local_addr().expect("address").port()
            };
            let mut stream = EventStream::new(&client(port), Filter::All, None);
            let error = stream.next().await.expect_err("nobody listens");
            assert!(error.is_unreachable(), "{error}");

            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("address").port();
            let server = tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.expect("accept");
                read_head(&mut socket).await;
                let body = "{\"error\":\"no such route\"}";
                let answer = format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.expect("write");
            });
            let mut stream = EventStream::new(&client(port), Filter::All, Some(7));
            let error = stream.next().await.expect_err("404");
            server.await.expect("server");
            match error {
                Error::Refused {
                    status, message, ..
                } => {
                    assert_eq!(status, StatusCode::NOT_FOUND);
                    assert_eq!(message, "no such route");
                }
                other => panic!("not a refusal: {other}"),
            }
        }
    }
}
