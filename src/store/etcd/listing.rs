//! Listing locks from etcd a page at a time: a range read that starts at the page's first name
//! and stops after its last, so a page of the dashboard costs its own size, not every lock.

use std::collections::BTreeMap;

use etcd_client::GetOptions;

use super::{EtcdStore, REQUEST_TIMEOUT, codec, unavailable};
use crate::rules::Lock;
use crate::store::{LockPage, Page, StoreError, page_of, view};

impl EtcdStore {
    pub(super) async fn list_page(&self, page: &Page) -> Result<LockPage, StoreError> {
        let locks_prefix = self.shared.keys.locks_prefix();
        let first = format!("{locks_prefix}{}", page.prefix);
        let end = range_end(first.as_bytes());
        if page.search.is_some() || page.limit.is_none() {
            // A search looks at every lock of the prefix.
            let locks = self.read_range(first, end, None).await?.0;
            return Ok(page_of(&locks, page));
        }
        let start = match &page.after {
            Some(after) if after.as_str() >= page.prefix.as_str() => {
                format!("{locks_prefix}{after}\0")
            }
            _ => first.clone(),
        };
        let limit = page.limit.unwrap_or(usize::MAX);
        let (locks, more) = self.read_range(start, end.clone(), Some(limit)).await?;
        let total = self.count_range(first, end).await?;
        Ok(LockPage {
            locks: locks
                .iter()
                .filter(|(_, lock)| lock.is_held())
                .map(|(name, lock)| view(name, lock))
                .collect(),
            total,
            more,
        })
    }

    /// The locks with keys in `[start, end)`, at most `limit`, and whether more follow.
    async fn read_range(
        &self,
        start: String,
        end: Vec<u8>,
        limit: Option<usize>,
    ) -> Result<(BTreeMap<String, Lock>, bool), StoreError> {
        let mut options = GetOptions::new().with_range(end);
        if let Some(limit) = limit {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let response = self
            .read(REQUEST_TIMEOUT, move |mut client| {
                let (start, options) = (start.clone(), options.clone());
                async move { client.get(start, Some(options)).await }
            })
            .await?;
        let locks_prefix = self.shared.keys.locks_prefix();
        let mut locks = BTreeMap::new();
        for kv in response.kvs() {
            let Some(name) = kv
                .key_str()
                .ok()
                .and_then(|key| key.strip_prefix(&locks_prefix))
            else {
                continue;
            };
            let lock = codec::decode_lock(name, kv.value())
                .map_err(unavailable)?
                .lock;
            locks.insert(name.to_string(), lock);
        }
        Ok((locks, response.more()))
    }

    /// How many locks have keys in `[start, end)` (free ones that still have waiters too).
    async fn count_range(&self, start: String, end: Vec<u8>) -> Result<usize, StoreError> {
        let options = GetOptions::new().with_range(end).with_count_only();
        let response = self
            .read(REQUEST_TIMEOUT, move |mut client| {
                let (start, options) = (start.clone(), options.clone());
                async move { client.get(start, Some(options)).await }
            })
            .await?;
        Ok(usize::try_from(response.count()).unwrap_or(0))
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no key is greater; "\0" means "to the end of the keyspace".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::range_end;

    #[test]
    fn the_range_end_follows_every_key_with_the_prefix() {
        assert_eq!(range_end(b"locker/locks/a"), b"locker/locks/b");
        assert_eq!(range_end(b"a\xff"), b"b");
        assert_eq!(range_end(b"\xff"), b"\0");
    }
}
