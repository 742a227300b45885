//! Connection limits: every request head must arrive in time, and the number of open
//! connections is capped within the process's file-descriptor limit.
//!
//! actix-http times only a connection's first request head (`client_request_timeout`); its
//! keep-alive timer stops at the first byte of the next request. A client could send one
//! request, then a byte of the next head every few seconds, and keep its connection (and a
//! descriptor) for as long as it liked, without credentials. [`HeadDeadline`] wraps each
//! connection's stream and closes it when a head is not complete [`Limits::head_timeout`] after
//! its first byte; [`track_requests`] tells it when a head was complete (the request reached the
//! app) and when its response was ready. A connection with no request in progress is closed after
//! keep-alive plus the head timeout whatever it sends, which also bounds a head whose first bytes
//! were read while the previous request was still being handled (pipelined).
//!
//! actix-http also answers a few requests itself, before any of locker's code sees them, with an
//! empty body: 400 for a head it cannot parse, 408 when a connection's first head is late, 431 for
//! a head over its limit. [`HeadDeadline`] gives those the API's JSON body on their way out
//! ([`with_json_body`]), so every refusal a client meets is `{"error": ...}`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use log::{info, warn};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Descriptors kept for everything but client connections: the listener, the state file and
/// its journal, the runtime's epoll and event descriptors, logging, the etcd client's channels.
pub const RESERVED_DESCRIPTORS: u64 = 128;
/// Descriptors a client connection may need: its socket, and the duplicate a waiting request
/// watches to notice that its client went away (see `api::peer`).
pub const DESCRIPTORS_PER_CONNECTION: u64 = 2;
/// Connections when `LOCKER_MAX_CONNECTIONS` is unset: room for the default
/// `LOCKER_MAX_WAITERS` (10,000) waiting requests and as many ordinary clients again.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;

/// What every connection is held to.
pub struct Limits {
    /// Longest a request head may take from its first byte.
    pub head_timeout: Duration,
    /// Longest a connection may go without a request in progress (keep-alive + head timeout).
    pub idle_limit: Duration,
    /// What a connection that ran out of time is told before it is closed.
    response: Vec<u8>,
}

impl Limits {
    pub fn new(head_timeout: Duration, keep_alive: Duration) -> Arc<Self> {
        let body = serde_json::json!({
            "error": format!(
                "the request head did not arrive within {}",
                humantime::format_duration(head_timeout)
            )
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        Arc::new(Limits {
            head_timeout,
            idle_limit: keep_alive + head_timeout,
            response: response.into_bytes(),
        })
    }
}

/// What a connection is doing, shared between its stream and the requests it carries.
#[derive(Debug)]
pub struct HeadClock(Mutex<ClockState>);

#[derive(Debug)]
struct ClockState {
    /// Requests that reached the app and have no response yet (several with HTTP/2).
    in_flight: usize,
    /// When the head being received must be complete; set by its first byte.
    head_due: Option<Instant>,
    /// When a connection with no request in progress is closed, whatever it sends.
    idle_due: Instant,
}

/// Counts one request as in progress until dropped (also when the client went away and its
/// handler was dropped).
struct InFlight {
    clock: Arc<HeadClock>,
    idle_limit: Duration,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.clock.0.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.head_due = None;
            state.idle_due = Instant::now() + self.idle_limit;
        }
    }
}

/// The middleware (outermost) that tells a connection's [`HeadDeadline`] that a head was
/// complete and, once the handler has answered, that the next head may begin.
pub async fn track_requests(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let in_flight = request.conn_data::<ConnectionLimits>().map(|limits| {
        let mut state = limits.clock.0.lock();
        state.in_flight += 1;
        state.head_due = None;
        drop(state);
        InFlight {
            clock: limits.clock.clone(),
            idle_limit: limits.limits.idle_limit,
        }
    });
    let response = next.call(request).await;
    drop(in_flight);
    response
}

/// Stored in each connection's extensions by `on_connect`, for [`track_requests`].
#[derive(Clone)]
pub struct ConnectionLimits {
    clock: Arc<HeadClock>,
    limits: Arc<Limits>,
}

/// A connection's stream, closed (after a 408) when a request head takes too long.
pub struct HeadDeadline<S> {
    io: S,
    clock: Arc<HeadClock>,
    limits: Arc<Limits>,
    timer: Pin<Box<Sleep>>,
    expired: bool,
    /// Bytes of a rewritten response not yet written to `io`.
    unsent: Vec<u8>,
}

impl<S> HeadDeadline<S> {
    pub fn new(io: S, limits: Arc<Limits>) -> Self {
        let idle_due = Instant::now() + limits.idle_limit;
        HeadDeadline {
            io,
            clock: Arc::new(HeadClock(Mutex::new(ClockState {
                in_flight: 0,
                head_due: None,
                idle_due,
            }))),
            limits,
            timer: Box::pin(tokio::time::sleep_until(idle_due)),
            expired: false,
            unsent: Vec::new(),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// What [`track_requests`] needs, for the connection's extensions.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            clock: self.clock.clone(),
            limits: self.limits.clone(),
        }
    }
}

impl<S: AsyncWrite + Unpin> HeadDeadline<S> {
    /// Tells the client why (best effort: a full socket buffer gets nothing), then reads end.
    fn expire(&mut self, cx: &mut Context<'_>) {
        self.expired = true;
        let _ = Pin::new(&mut self.io).poll_write(cx, &self.limits.response);
        let _ = Pin::new(&mut self.io).poll_flush(cx);
        log::debug!("closed a connection whose request head was not complete in time");
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            // End of stream: the dispatcher closes the connection.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let now = Instant::now();
        let due = {
            let mut state = this.clock.0.lock();
            if state.in_flight > 0 {
                None
            } else {
                if buf.filled().len() > before && state.head_due.is_none() {
                    state.head_due = Some(now + this.limits.head_timeout);
                }
                Some(
                    state
                        .head_due
                        .map_or(state.idle_due, |d| d.min(state.idle_due)),
                )
            }
        };
        let Some(due) = due else {
            return read;
        };
        if now >= due {
            buf.set_filled(before);
            this.expire(cx);
            return Poll::Ready(Ok(()));
        }
        if read.is_pending() {
            this.timer.as_mut().reset(due);
            if this.timer.as_mut().poll(cx).is_ready() {
                this.expire(cx);
                return Poll::Ready(Ok(()));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> HeadDeadline<S> {
    /// Writes what is left of a rewritten response.
    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.unsent.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.unsent) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    self.unsent.drain(..written);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.poll_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(rewritten) = with_json_body(buf) {
            this.unsent = rewritten;
            // Taken in full: the rest goes out with the next write or flush.
            let _ = this.poll_unsent(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// actix-http's own error answer (a whole response: an HTTP/1.1 4xx or 5xx head with
/// `content-length: 0` and nothing after it) with the API's JSON body instead. `None` for
/// anything else: locker's own error responses always have a body (see
/// `api::error::json_error_bodies`), so nothing of the app's is ever rewritten.
pub fn with_json_body(response: &[u8]) -> Option<Vec<u8>> {
    let head = response.strip_suffix(b"\r\n\r\n")?;
    let head = std::str::from_utf8(head).ok()?;
    if head.contains("\r\n\r\n") {
        return None; // more than one response
    }
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let (code, reason) = status_line.strip_prefix("HTTP/1.1 ")?.split_once(' ')?;
    if !(code.starts_with('4') || code.starts_with('5')) {
        return None;
    }
    let headers: Vec<&str> = lines.collect();
    let is_empty = |h: &&str| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("content-length") && value.trim() == "0"
        })
    };
    if !headers.iter().any(is_empty) {
        return None;
    }
    let body = serde_json::json!({ "error": reason.to_lowercase() }).to_string();
    let mut out = format!("{status_line}\r\n");
    for header in headers.iter().filter(|h| !is_empty(h)) {
        out.push_str(header);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(out.into_bytes())
}

/// How many connections each worker accepts, and what that adds up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionCap {
    pub workers: usize,
    pub per_worker: usize,
}

impl ConnectionCap {
    /// actix counts connections per worker: `cap` is spread over at most `workers` workers
    /// (fewer when the cap is smaller), rounded down to a multiple of their number.
    pub fn new(cap: usize, workers: usize) -> Self {
        let workers = workers.clamp(1, cap.max(1));
        ConnectionCap {
            workers,
            per_worker: (cap / workers).max(1),
        }
    }

    pub fn total(&self) -> usize {
        self.workers * self.per_worker
    }
}

/// Descriptors needed for `connections` connections.
pub fn descriptors_for(connections: usize) -> u64 {
    RESERVED_DESCRIPTORS + DESCRIPTORS_PER_CONNECTION * connections as u64
}

/// Connections that fit in `descriptors`.
fn connections_within(descriptors: u64) -> usize {
    usize::try_from(descriptors.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION)
        .unwrap_or(usize::MAX)
}

/// Why the connection cap cannot be served within the file-descriptor limit, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("cannot read the file-descriptor limit (RLIMIT_NOFILE): {0}")]
    Unreadable(#[source] io::Error),
    /// LOCKER_MAX_CONNECTIONS was set higher than the limit allows.
    #[error(
        "LOCKER_MAX_CONNECTIONS={cap} needs {needed} file descriptors ({DESCRIPTORS_PER_CONNECTION} per connection \
         and {RESERVED_DESCRIPTORS} besides), but the limit is {soft} (hard limit {hard}): raise it \
         (`ulimit -n`, systemd's LimitNOFILE, bpm's limits.open_files) or set LOCKER_MAX_CONNECTIONS to at most {fits}"
    )]
    CapTooHigh {
        cap: usize,
        needed: u64,
        soft: u64,
        hard: u64,
        fits: usize,
    },
    #[error(
        "the file-descriptor limit ({soft}) leaves no room for client connections: \
         raise it to at least {}",
        descriptors_for(1)
    )]
    NoRoom { soft: u64 },
}

/// Checks the connection cap against the file-descriptor limit at start-up, raising the soft
/// limit to the hard one when the cap needs more than the soft one. A cap that was set (`requested`) and cannot
/// fit under the hard limit stops the start with a message; the default is lowered to fit,
/// with a warning.
pub fn fit_descriptor_limit(requested: Option<usize>) -> Result<usize, DescriptorError> {
    let wanted = requested.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let needed = descriptors_for(wanted);
    let (soft, hard) = nofile_limit().map_err(DescriptorError::Unreadable)?;
    if needed <= soft {
        return Ok(wanted);
    }
    if hard > soft {
        match set_nofile_limit(hard, hard) {
            Ok(()) => {
                info!("raised the file-descriptor limit from {soft} to the hard limit {hard}")
            }
            Err(e) => warn!("cannot raise the file-descriptor limit from {soft} to {hard}: {e}"),
        }
    }
    let (soft, _) = nofile_limit().unwrap_or((soft, hard));
    if needed <= soft {
        return Ok(wanted);
    }
    let fits = connections_within(soft);
    match requested {
        Some(cap) => Err(DescriptorError::CapTooHigh {
            cap,
            needed,
            soft,
            hard,
            fits,
        }),
        None if fits == 0 => Err(DescriptorError::NoRoom { soft }),
        None => {
            warn!(
                "the file-descriptor limit is {soft} (hard limit {hard}): connections lowered from \
                 {wanted} to {fits} to fit; raise the limit for more"
            );
            Ok(fits)
        }
    }
}

fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_nofile_limit(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actix_https_own_empty_error_answers_get_a_json_body() {
        let own = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\
                    date: Mon, 30 Nov 2026 16:00:00 GMT\r\n\r\n";
        let rewritten = String::from_utf8(with_json_body(own).expect("rewritten")).expect("text");
        let (head, body) = rewritten.split_once("\r\n\r\n").expect("head and body");
        assert_eq!(body, r#"{"error":"bad request"}"#);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(
            head.ends_with(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(!head.contains("content-length: 0"), "{head}");
    }

    #[test]
    fn anything_else_is_written_as_it_is() {
        for response in [
            // The app's errors have a body; successes are left alone even when empty.
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 17\r\n\r\n{\"error\":\"nope\"}"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            // Two pipelined responses in one write, or a head cut in two.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"\x00\xff",
        ] {
            assert_eq!(with_json_body(response), None, "{response:?}");
        }
    }

    #[test]
    fn the_cap_is_spread_over_the_workers_and_rounded_down() {
        assert_eq!(ConnectionCap::new(4, 2).total(), 4);
        assert_eq!(ConnectionCap::new(1000, 3).total(), 999);
        assert_eq!(
            ConnectionCap::new(1, 8),
            ConnectionCap {
                workers: 1,
                per_worker: 1
            }
        );
        assert_eq!(ConnectionCap::new(3, 8).total(), 3);
    }

    #[test]
    fn descriptors_and_connections_agree() {
        assert_eq!(connections_within(descriptors_for(64)), 64);
        assert_eq!(connections_within(256), 64);
        assert_eq!(connections_within(100), 0);
    }
}
