//! What the server accepts, checked by the server and respected by its clients before they
//! send: lock names, keys, holder info, slots.

/// Longest lock name, in bytes.
pub const MAX_NAME: usize = 255;
/// Longest key or requestor, in bytes.
pub const MAX_KEY: usize = 1024;
/// Most entries of holder info.
pub const MAX_INFO_ENTRIES: usize = 16;
/// Most bytes of holder info, keys and values together.
pub const MAX_INFO_BYTES: usize = 1024;
/// Most slots a semaphore may have.
pub const MAX_SLOTS: u32 = 10_000;

/// Holder info over the server's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoError {
    #[error("info has {0} entries; at most {MAX_INFO_ENTRIES} are allowed")]
    TooManyEntries(usize),
    #[error("info is {0} bytes; at most {MAX_INFO_BYTES} are allowed")]
    TooLarge(usize),
}

/// The bytes holder info counts against [`MAX_INFO_BYTES`]: its keys and values.
pub fn info_bytes<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> usize {
    entries.into_iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Checks holder info against [`MAX_INFO_ENTRIES`] and [`MAX_INFO_BYTES`].
pub fn check_info<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> Result<(), InfoError> {
    let count = entries.clone().into_iter().count();
    if count > MAX_INFO_ENTRIES {
        return Err(InfoError::TooManyEntries(count));
    }
    let bytes = info_bytes(entries);
    if bytes > MAX_INFO_BYTES {
        return Err(InfoError::TooLarge(bytes));
    }
    Ok(())
}

/// Cuts `text` to at most `max` bytes, at a character boundary; true when it cut.
pub fn truncate(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_limits() {
        let small = [("a", "b")];
        assert_eq!(check_info(small.iter().map(|(k, v)| (*k, *v))), Ok(()));
        let many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            check_info(many.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            Err(InfoError::TooManyEntries(17))
        );
        let long = "x".repeat(1100);
        assert_eq!(
            check_info([("a", long.as_str())]),
            Err(InfoError::TooLarge(1101))
        );
    }

    #[test]
    fn truncates_at_character_boundaries() {
        let mut text = "é".repeat(3);
        assert!(truncate(&mut text, 3));
        assert_eq!(text, "é");
        let mut short = "abc".to_string();
        assert!(!truncate(&mut short, 3));
    }
}
