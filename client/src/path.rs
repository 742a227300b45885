//! Where a lock lives in the API: `/lock/{name}` with the name percent-encoded, so that `/`,
//! `%`, spaces and `.`/`..` stay part of the name.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// Characters left as they are in a URL path segment. `.` is encoded too: `%2E` keeps `.` and
/// `..` names rather than path steps.
pub const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// `/lock/{name}` with the name percent-encoded.
pub fn lock_path(name: &str) -> String {
    format!(
        "/lock/{}",
        percent_encoding::utf8_percent_encode(name, PATH_SEGMENT)
    )
}

fn segment(text: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(text, PATH_SEGMENT)
}

/// `/pool/{pool}` with the name percent-encoded.
pub fn pool_path(pool: &str) -> String {
    format!("/pool/{}", segment(pool))
}

/// `/pool/{pool}/item/{item}` with both names percent-encoded.
pub fn item_path(pool: &str, item: &str) -> String {
    format!("/pool/{}/item/{}", segment(pool), segment(item))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(lock_path("prod-env_1"), "/lock/prod-env_1");
        assert_eq!(lock_path("a/b c"), "/lock/a%2Fb%20c");
        assert_eq!(lock_path("a/b c.d"), "/lock/a%2Fb%20c%2Ed");
        assert_eq!(lock_path("my.director"), "/lock/my%2Edirector");
        assert_eq!(lock_path("é"), "/lock/%C3%A9");
        assert_eq!(pool_path("aws/x"), "/pool/aws%2Fx");
        assert_eq!(item_path("aws", "env.1"), "/pool/aws/item/env%2E1");
    }
}
