//! Parsing what clients send: lock names from the path, query flags, and the JSON body, which
//! is parsed whatever the Content-Type (the original resource sends `curl -d`, form-encoded).

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{HttpRequest, web};
use bytes::Bytes;
use futures_util::StreamExt;
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::error::ApiError;
use crate::rules::Info;
use crate::store::{LockPage, Page};
use crate::timefmt::{BodyDuration, parse_duration};

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
    let raw = request
        .uri()
        .path()
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

/// The JSON body of `PUT` and `DELETE /lock/{name}`. Unknown fields are ignored, as the
/// original did.
#[derive(Debug, Default, Deserialize)]
pub struct LockBody {
    #[serde(default)]
    key: Option<String>,
    /// The original's code and docs spell it three ways.
    #[serde(default, alias = "lock_by", alias = "locked_by")]
    requestor: Option<String>,
    #[serde(default)]
    wait: Option<BodyDuration>,
    #[serde(default)]
    ttl: Option<BodyDuration>,
    #[serde(default)]
    info: Option<BTreeMap<String, String>>,
    #[serde(default)]
    slots: Option<u32>,
    #[serde(default)]
    release_when_build_ends: Option<bool>,
    #[serde(default)]
    renew: Option<bool>,
}

impl LockBody {
    /// Parses the body as JSON. An empty body is an empty object (a force release needs none).
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(LockBody::default());
        }
        serde_json::from_slice(bytes).map_err(|e| {
            ApiError::BadRequest(format!(
                "request body is not valid JSON for a lock request: {e}"
            ))
        })
    }

    /// The key: required and not empty.
    pub fn key(&self) -> Result<String, ApiError> {
        let key = self
            .key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::BadRequest("missing \"key\" in the request body".into()))?;
        check_length("key", key)?;
        Ok(key.to_string())
    }

    /// The requestor; defaults to the key.
    pub fn requestor(&self, key: &str) -> Result<String, ApiError> {
        match self.requestor.as_deref().filter(|r| !r.is_empty()) {
            Some(requestor) => {
                check_length("requestor", requestor)?;
                Ok(requestor.to_string())
            }
            None => Ok(key.to_string()),
        }
    }

    pub fn wait(&self) -> Option<Duration> {
        self.wait.map(|w| w.0)
    }

    /// Slots of a semaphore: 1 to [`MAX_SLOTS`].
    pub fn slots(&self) -> Result<Option<u32>, ApiError> {
        match self.slots {
            Some(slots) if !(1..=MAX_SLOTS).contains(&slots) => Err(ApiError::BadRequest(format!(
                "slots must be between 1 and {MAX_SLOTS}, not {slots}"
            ))),
            slots => Ok(slots),
        }
    }

    pub fn renew(&self) -> bool {
        self.renew.unwrap_or(false)
    }

    pub fn release_when_build_ends(&self) -> bool {
        self.release_when_build_ends.unwrap_or(false)
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl.map(|t| t.0)
    }

    /// Holder info, within [`MAX_INFO_ENTRIES`] and [`MAX_INFO_BYTES`].
    pub fn info(&self) -> Result<Info, ApiError> {
        // Parsed as a tree map (a JSON object, last duplicate wins), kept as the compact `Info`.
        let info: Info = self
            .info
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        locker_client::limits::check_info(info.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        Ok(info)
    }
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
            let body = LockBody::parse(format!(r#"{{"key":"k","{field}":"r"}}"#).as_bytes())
                .expect("parses");
            assert_eq!(body.requestor("k").ok().as_deref(), Some("r"), "{field}");
        }
        let body = LockBody::parse(br#"{"key":"k"}"#).expect("parses");
        assert_eq!(body.requestor("k").ok().as_deref(), Some("k"));
    }

    #[test]
    fn key_is_required_and_not_empty() {
        for text in [&b"{}"[..], br#"{"key":""}"#, b""] {
            let body = LockBody::parse(text).expect("parses");
            assert!(body.key().is_err());
        }
        assert!(LockBody::parse(br#"{"key": 5}"#).is_err());
        assert!(LockBody::parse(b"{not json").is_err());
    }

    #[test]
    fn info_must_be_flat_and_small() {
        assert!(LockBody::parse(br#"{"key":"k","info":{"a":{"b":"c"}}}"#).is_err());
        let many: BTreeMap<String, String> = (0..17)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let body = serde_json::json!({"key": "k", "info": many}).to_string();
        assert!(
            LockBody::parse(body.as_bytes())
                .expect("parses")
                .info()
                .is_err()
        );
        let long = serde_json::json!({"key": "k", "info": {"a": "x".repeat(1100)}}).to_string();
        assert!(
            LockBody::parse(long.as_bytes())
                .expect("parses")
                .info()
                .is_err()
        );
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
                let body = LockBody::parse(body.as_bytes()).expect("parses");
                let error = body
                    .key()
                    .and_then(|key| body.requestor(&key))
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
