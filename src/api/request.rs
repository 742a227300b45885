//! Parsing what clients send: lock names from the path, query flags, and the JSON body, which
//! is parsed whatever the Content-Type (the original resource sends `curl -d`, form-encoded).

use std::time::Duration;

use actix_web::{HttpRequest, web};
use bytes::Bytes;
use futures_util::StreamExt;
use locker_client::wire::LockRequest;
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::error::ApiError;
use crate::rules::Info;
use crate::store::{LockPage, Page};
use crate::timefmt::parse_duration;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest body of a request under `/pool/`: an item's metadata may be 64 KiB, and JSON
/// escaping can make its text up to six times as long.
pub const MAX_POOL_BODY: usize = 512 * 1024;

/// The largest body accepted for a request to `path`.
pub fn body_limit(path: &str) -> usize {
    if path.starts_with("/pool/") {
        MAX_POOL_BODY
    } else {
        MAX_BODY
    }
}
/// The limits on names, keys, holder info and slots, shared with the clients.
pub use locker_client::limits::{MAX_INFO_BYTES, MAX_INFO_ENTRIES, MAX_KEY, MAX_NAME, MAX_SLOTS};

/// The lock name from `/lock/{name}`: percent-decoded, 1 to 255 bytes of UTF-8 without control
/// or format characters. Decoded from the raw path, so `%2F` is part of a name, never a path separator.
pub fn lock_name(request: &HttpRequest) -> Result<String, ApiError> {
    decode_lock_name(request.uri().path())
}

/// The lock name of a `/lock/{name}` path, decoded and checked.
pub fn decode_lock_name(path: &str) -> Result<String, ApiError> {
    let raw = path
        .strip_prefix("/lock/")
        .ok_or_else(|| ApiError::NotFound("no such route".into()))?;
    let name = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest("lock name is not valid UTF-8".into()))?;
    validate_name(&name)?;
    Ok(name.into_owned())
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::BadRequest("lock name is empty".into()));
    }
    if name.len() > MAX_NAME {
        return Err(ApiError::BadRequest(format!(
            "lock name is {} bytes long; at most {MAX_NAME} are allowed",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "lock name contains control characters".into(),
        ));
    }
    if let Some(c) = name.chars().find(|&c| is_format_character(c)) {
        return Err(ApiError::BadRequest(format!(
            "lock name contains the invisible format character U+{:04X} (bidi controls and \
             zero-width characters make names that look alike but differ)",
            c as u32
        )));
    }
    Ok(())
}

/// Whether `c` is a Unicode format character (general category Cf: bidi overrides and
/// isolates, zero-width spaces and joiners, the byte order mark, tags ...), as of Unicode 16.
pub fn is_format_character(c: char) -> bool {
    matches!(
        c as u32,
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Time a client gets to send the whole body: actix-web has no body timeout of its own, so a
/// client that announces a body and never sends it would hold its connection forever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the body up to [`MAX_BODY`] bytes, within [`BODY_TIMEOUT`].
pub async fn read_body(request: &HttpRequest, payload: web::Payload) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, collect_body(request, payload)).await {
        Ok(body) => body,
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ))),
    }
}

/// Grows the buffer with what arrives instead of reserving the limit up front: thousands of
/// waiting requests each hold their connection, and lock bodies are a few hundred bytes.
async fn collect_body(request: &HttpRequest, mut payload: web::Payload) -> Result<Bytes, ApiError> {
    // An announced length over the limit was refused by the server's middleware already.
    let declared = request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let limit = body_limit(request.path());
    let mut body = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Most locks one page of `GET /locks` may ask for.
pub const MAX_PAGE: usize = 10_000;

/// `GET /locks?prefix=&q=&after=&limit=`: which locks a listing shows (all without any).
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ListQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<String>,
}

impl ListQuery {
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::BadRequest(format!("bad query string: {e}")))
    }

    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = match self.limit.as_deref() {
            None | Some("") => None,
            Some(text) => match text.parse::<usize>() {
                Ok(limit @ 1..=MAX_PAGE) => Some(limit),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "limit must be a number from 1 to {MAX_PAGE}, not {text:?}"
                    )));
                }
            },
        };
        Ok(Page {
            prefix: self.prefix.clone().unwrap_or_default(),
            search: self.q.clone().filter(|q| !q.is_empty()),
            after: self.after.clone().filter(|a| !a.is_empty()),
            limit,
        })
    }

    /// The query string of the page after `page`, if it has a last lock to start after.
    pub fn next(&self, page: &LockPage) -> Option<String> {
        let last = page.locks.last()?;
        let next = ListQuery {
            prefix: self.prefix.clone(),
            q: self.q.clone(),
            after: Some(last.name.clone()),
            limit: self.limit.clone(),
        };
        serde_urlencoded::to_string(&next).ok()
    }
}

/// `?wait=<duration>`, `?wait_free=<duration>` and `?force=true`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct LockQuery {
    wait: Option<String>,
    wait_free: Option<String>,
    force: Option<String>,
}

impl LockQuery {
    pub fn parse(query: &str) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::BadRequest(format!("bad query string: {e}")))
    }

    pub fn wait(&self) -> Result<Option<Duration>, ApiError> {
        query_duration("wait", self.wait.as_deref())
    }

    pub fn wait_free(&self) -> Result<Option<Duration>, ApiError> {
        query_duration("wait_free", self.wait_free.as_deref())
    }

    pub fn force(&self) -> Result<bool, ApiError> {
        match self.force.as_deref() {
            None | Some("false") | Some("0") | Some("") => Ok(false),
            Some("true") | Some("1") => Ok(true),
            Some(other) => Err(ApiError::BadRequest(format!(
                "force must be true or false, not {other:?}"
            ))),
        }
    }
}

fn query_duration(name: &str, text: Option<&str>) -> Result<Option<Duration>, ApiError> {
    text.map(|text| parse_duration(text).map_err(|e| ApiError::BadRequest(format!("{name}: {e}"))))
        .transpose()
}

/// Reads the body of `PUT` and `DELETE /lock/{name}` as the clients' own [`LockRequest`], so
/// the two cannot disagree on its fields. An empty body is an empty object (a force release
/// needs none). The checks come after, field by field, below.
pub fn lock_request(bytes: &[u8]) -> Result<LockRequest, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(LockRequest::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "request body is not valid JSON for a lock request: {e}"
        ))
    })
}

/// The key: required and not empty.
pub fn key(body: &LockRequest) -> Result<String, ApiError> {
    if body.key.is_empty() {
        return Err(ApiError::BadRequest(
            "missing \"key\" in the request body".into(),
        ));
    }
    check_length("key", &body.key)?;
    Ok(body.key.clone())
}

/// The requestor; defaults to the key.
pub fn requestor(body: &LockRequest, key: &str) -> Result<String, ApiError> {
    match body.requestor.as_deref().filter(|r| !r.is_empty()) {
        Some(requestor) => {
            check_length("requestor", requestor)?;
            Ok(requestor.to_string())
        }
        None => Ok(key.to_string()),
    }
}

/// Slots of a semaphore: 1 to [`MAX_SLOTS`].
pub fn slots(body: &LockRequest) -> Result<Option<u32>, ApiError> {
    match body.slots {
        Some(slots) if !(1..=MAX_SLOTS).contains(&slots) => Err(ApiError::BadRequest(format!(
            "slots must be between 1 and {MAX_SLOTS}, not {slots}"
        ))),
        slots => Ok(slots),
    }
}

/// Holder info, within [`MAX_INFO_ENTRIES`] and [`MAX_INFO_BYTES`].
pub fn info(body: &LockRequest) -> Result<Info, ApiError> {
    // Read as a tree map (a JSON object, last duplicate wins), kept as the compact `Info`.
    let info: Info = body
        .info
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    locker_client::limits::check_info(info.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(info)
}

/// A key or requestor: at most [`MAX_KEY`] bytes, without control characters (they would
/// break log lines and the CLI's tables).
fn check_length(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_KEY {
        return Err(ApiError::BadRequest(format!(
            "{field} is {} bytes long; at most {MAX_KEY} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_requestor_spellings_are_read() {
        for field in ["requestor", "lock_by", "locked_by"] {
            let body =
                lock_request(format!(r#"{{"key":"k","{field}":"r"}}"#).as_bytes()).expect("parses");
            assert_eq!(requestor(&body, "k").ok().as_deref(), Some("r"), "{field}");
        }
        let body = lock_request(br#"{"key":"k"}"#).expect("parses");
        assert_eq!(requestor(&body, "k").ok().as_deref(), Some("k"));
    }

    #[test]
    fn key_is_required_and_not_empty() {
        for text in [
            &b"{}"[..],
            br#"{"key":""}"#,
            br#"{"key":null}"#,
            b"",
            b" \n",
        ] {
            let body = lock_request(text).expect("parses");
            assert!(key(&body).is_err());
        }
        assert!(lock_request(br#"{"key": 5}"#).is_err());
        assert!(lock_request(b"{not json").is_err());
    }

    /// The bodies the server has always accepted and refused (when it read them with a type of
    /// its own): the clients' `LockRequest` must read them the same way.
    #[test]
    fn the_accepted_json_stays_as_it_was() {
        let s = Duration::from_secs;
        let read = |text: &str| lock_request(text.as_bytes()).map_err(|e| e.to_string());
        // Unknown fields are ignored; null is absent; durations are seconds or strings.
        let body = read(
            r#"{"key":"k","lock_by":"r","ttl":90,"wait":"1m","info":{"job":"j"},"slots":2,
                "release_when_build_ends":true,"renew":null,"pipeline":{"any":["thing"]}}"#,
        )
        .expect("parses");
        assert_eq!(body.key, "k");
        assert_eq!(body.requestor.as_deref(), Some("r"));
        assert_eq!(body.ttl.map(|t| t.0), Some(s(90)));
        assert_eq!(body.wait.map(|w| w.0), Some(s(60)));
        assert_eq!(body.slots, Some(2));
        assert!(body.release_when_build_ends && !body.renew);
        let nulls = read(
            r#"{"key":null,"requestor":null,"ttl":null,"wait":null,"info":null,"slots":null,
                "release_when_build_ends":null,"renew":null}"#,
        )
        .expect("parses");
        assert_eq!(nulls, LockRequest::default());
        // The last of duplicate info keys wins.
        let body = read(r#"{"key":"k","info":{"a":"1","a":"2"}}"#).expect("parses");
        assert_eq!(
            info(&body).expect("info").get("a").map(String::as_str),
            Some("2")
        );
        // A JSON array is read field by field in the struct's order, as serde reads structs.
        let array = read(r#"["k","r","5s"]"#).expect("parses");
        assert_eq!(
            (
                array.key.as_str(),
                array.requestor.as_deref(),
                array.wait.map(|w| w.0)
            ),
            ("k", Some("r"), Some(s(5)))
        );
        for refused in [
            r#"{"key":"k","ttl":1.5}"#,
            r#"{"key":"k","ttl":-1}"#,
            r#"{"key":"k","wait":true}"#,
            r#"{"key":"k","ttl":"soon"}"#,
            r#"{"key":"k","slots":"2"}"#,
            r#"{"key":"k","slots":-1}"#,
            r#"{"key":"k","renew":"yes"}"#,
            r#"{"key":"k","release_when_build_ends":1}"#,
            r#"{"key":"k","requestor":7}"#,
            r#"{"key":"k","info":["a"]}"#,
            r#"{"key":"k","info":{"a":1}}"#,
            r#"{"key":"k","requestor":"a","lock_by":"b"}"#,
            r#"{"key":"k","key":"k"}"#,
            r#""k""#,
            "5",
        ] {
            let error = read(refused).expect_err(refused);
            assert!(
                error.contains("not valid JSON for a lock request"),
                "{refused}: {error}"
            );
        }
    }

    #[test]
    fn info_must_be_flat_and_small() {
        assert!(lock_request(br#"{"key":"k","info":{"a":{"b":"c"}}}"#).is_err());
        let many: std::collections::BTreeMap<String, String> = (0..17)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let body = serde_json::json!({"key": "k", "info": many}).to_string();
        assert!(info(&lock_request(body.as_bytes()).expect("parses")).is_err());
        let long = serde_json::json!({"key": "k", "info": {"a": "x".repeat(1100)}}).to_string();
        assert!(info(&lock_request(long.as_bytes()).expect("parses")).is_err());
    }

    #[test]
    fn names_are_bounded_and_printable() {
        assert!(validate_name("deploy-prod").is_ok());
        assert!(validate_name("dïrector/δ name").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"n".repeat(256)).is_err());
        assert!(validate_name(&"n".repeat(255)).is_ok());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name("a\u{7f}").is_err());
    }

    #[test]
    fn names_with_invisible_format_characters_are_refused() {
        for c in [
            '\u{AD}',
            '\u{200B}',
            '\u{200D}',
            '\u{200E}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{E0041}',
            '\u{1343F}',
        ] {
            let name = format!("deploy{c}prod");
            let error = validate_name(&name).expect_err("format character");
            assert!(error.to_string().contains("format character"), "{error}");
        }
        // Letters, marks and symbols from other scripts stay allowed.
        for name in ["déploiement", "部署", "деплой", "prod-🚀", "e\u{301}"] {
            assert!(validate_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn keys_and_requestors_without_control_characters() {
        for field in ["key", "requestor"] {
            for bad in ["a\nb", "a\u{0}", "tab\t", "\u{1b}[31mred", "a\u{85}"] {
                let body = serde_json::json!({"key": "k", field: bad}).to_string();
                let body = lock_request(body.as_bytes()).expect("parses");
                let error = key(&body)
                    .and_then(|key| requestor(&body, &key))
                    .expect_err("control character");
                assert!(error.to_string().contains("control characters"), "{error}");
            }
        }
    }

    #[test]
    fn force_flag_values() {
        let force = |q: &str| LockQuery::parse(q).and_then(|q| q.force()).ok();
        assert_eq!(force("force=true"), Some(true));
        assert_eq!(force("force=1"), Some(true));
        assert_eq!(force(""), Some(false));
        assert_eq!(force("force=false"), Some(false));
        assert_eq!(force("force=yes please"), None);
    }
}
