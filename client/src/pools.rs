//! The pool API (docs/pools.md) from a client's side: one [`Client`] method per request, each
//! answering a [`Reply`] for the caller to interpret (`200` with a [`crate::wire::PoolStatus`],
//! [`crate::wire::ItemClaim`], [`crate::wire::ItemFreed`] ..., or a refusal with its
//! `{"error": ...}`), plus the pure questions clients ask of a pool's listing.
//!
//! A waiting claim goes through the shared long-poll loop ([`crate::acquire::claim`]); the
//! other waits (`check`, `check_unclaimed`, an update while the item is claimed) are single
//! requests here, repeated by the caller.

use std::time::Duration;

use reqwest::Method;

use crate::duration::wire_duration;
use crate::error::Error;
use crate::http::{Client, Reply};
use crate::path::{item_path, pool_path};
use crate::wire::{ItemBody, ItemRelease, LockRequest, PoolItem, PoolStatus};

/// The state a `GET /pool/{pool}/item/{item}?until=` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// pool-resource's `check`: until nobody holds the item.
    Unclaimed,
    /// pool-resource's `check_unclaimed`: until somebody holds it.
    Claimed,
}

impl Until {
    fn query(self) -> &'static str {
        match self {
            Until::Unclaimed => "unclaimed",
            Until::Claimed => "claimed",
        }
    }
}

fn wait_query(wait: Option<Duration>) -> String {
    wait.map(|w| format!("?wait={}", wire_duration(w)))
        .unwrap_or_default()
}

impl Client {
    /// `GET /pools`: every pool with its counts.
    pub async fn pools(&self) -> Result<Reply, Error> {
        self.locker::<()>(Method::GET, "/pools", None, Duration::ZERO)
            .await
    }

    /// `GET /pool/{pool}`: the pool's items with their state, holder and metadata; 404 when
    /// the pool has no items (and no waiting claims).
    pub async fn pool(&self, pool: &str) -> Result<Reply, Error> {
        self.locker::<()>(Method::GET, &pool_path(pool), None, Duration::ZERO)
            .await
    }

    /// `GET /pool/{pool}/item/{item}`: one item, at once; with `until`,
    /// `?until=...&wait=...`: the item once it is in that state, or as it is when the wait ran
    /// out (look at `claimed`). 404 (at once) when the item does not exist or is removed
    /// meanwhile.
    pub async fn item(
        &self,
        pool: &str,
        item: &str,
        until: Option<(Until, Duration)>,
    ) -> Result<Reply, Error> {
        let (query, wait) = match until {
            Some((until, wait)) => (
                format!("?until={}&wait={}", until.query(), wire_duration(wait)),
                wait,
            ),
            None => (String::new(), Duration::ZERO),
        };
        let path = format!("{}{query}", item_path(pool, item));
        self.locker::<()>(Method::GET, &path, None, wait).await
    }

    /// `PUT /pool/{pool}/claim` (any free item, with `item` `None`) or
    /// `PUT /pool/{pool}/item/{item}/claim`, asking the server to wait up to `wait`.
    pub async fn claim(
        &self,
        pool: &str,
        item: Option<&str>,
        body: &LockRequest,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        let target = match item {
            Some(item) => format!("{}/claim", item_path(pool, item)),
            None => format!("{}/claim", pool_path(pool)),
        };
        let path = format!("{target}{}", wait_query(wait));
        self.locker(Method::PUT, &path, Some(body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /pool/{pool}/item/{item}/claim`: releases the item; without a key in `body`,
    /// whoever holds it.
    pub async fn release_item(
        &self,
        pool: &str,
        item: &str,
        body: &ItemRelease,
    ) -> Result<Reply, Error> {
        let path = format!("{}/claim", item_path(pool, item));
        self.locker(Method::DELETE, &path, Some(body), Duration::ZERO)
            .await
    }

    /// `POST /pool/{pool}/item/{item}`: adds the item, unclaimed or (with `body.claim`)
    /// claimed. 201 when added, 200 when it was there the same way, 409 otherwise.
    pub async fn add_item(&self, pool: &str, item: &str, body: &ItemBody) -> Result<Reply, Error> {
        self.locker(
            Method::POST,
            &item_path(pool, item),
            Some(body),
            Duration::ZERO,
        )
        .await
    }

    /// `PUT /pool/{pool}/item/{item}?wait=...`: replaces the item's metadata, adding the item
    /// if absent; while it is claimed, waits up to `wait` (423 when it is still claimed).
    pub async fn update_item(
        &self,
        pool: &str,
        item: &str,
        metadata: &str,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        let body = ItemBody {
            metadata: metadata.to_string(),
            claim: None,
        };
        let path = format!("{}{}", item_path(pool, item), wait_query(wait));
        self.locker(Method::PUT, &path, Some(&body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /pool/{pool}/item/{item}`: removes the item, claimed or not; with a key in
    /// `body`, only if it is unclaimed or held under that key.
    pub async fn remove_item(
        &self,
        pool: &str,
        item: &str,
        body: &ItemRelease,
    ) -> Result<Reply, Error> {
        self.locker(
            Method::DELETE,
            &item_path(pool, item),
            Some(body),
            Duration::ZERO,
        )
        .await
    }
}

/// The items of `pool` held under `key`, with `requestor` among their holders (the key when
/// `None`, as the server defaults it): what a claim by that pair may have been granted.
pub fn claimed_by<'a, I>(
    pool: &'a PoolStatus<I>,
    key: &'a str,
    requestor: Option<&'a str>,
) -> impl Iterator<Item = &'a PoolItem<I>> + 'a {
    let requestor = requestor.unwrap_or(key);
    pool.items.iter().filter(move |item| {
        item.holder.as_ref().is_some_and(|holder| {
            holder.key == key && holder.locked_by.get(requestor).is_some_and(|n| *n > 0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Holder;

    fn item(name: &str, holder: Option<(&str, &str)>) -> PoolItem {
        PoolItem {
            name: name.into(),
            metadata: String::new(),
            claimed: holder.is_some(),
            holder: holder.map(|(key, requestor)| Holder {
                key: key.into(),
                locked_by: [(requestor.to_string(), 1)].into(),
                ..Holder::default()
            }),
        }
    }

    #[test]
    fn finds_the_items_a_key_and_requestor_hold() {
        let pool = PoolStatus {
            name: "aws".into(),
            waiters: 0,
            items: vec![
                item("a", Some(("k", "k"))),
                item("b", Some(("k", "other"))),
                item("c", Some(("j", "k"))),
                item("d", None),
                item("e", Some(("k", "r"))),
            ],
        };
        let names = |key, requestor| -> Vec<String> {
            claimed_by(&pool, key, requestor)
                .map(|i| i.name.clone())
                .collect()
        };
        assert_eq!(names("k", None), ["a"]);
        assert_eq!(names("k", Some("r")), ["e"]);
        assert_eq!(names("j", Some("k")), ["c"]);
        assert!(names("x", None).is_empty());
    }
}
