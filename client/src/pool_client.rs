//! The pool API (docs/pools.md) as calls of the [`Client`]: list pools, read a pool or an
//! item (waiting until it is claimed or unclaimed), claim and release items, add, update and
//! remove them. Like the lock calls, each returns the answer as a [`Reply`] for the caller to
//! interpret (200, 201, 404, 409, 423 ...); only transport failures, 401 and 5xx are errors.
//! The bodies are the [`crate::wire`] types.

use std::time::Duration;

use reqwest::Method;

use crate::duration::wire_duration;
use crate::error::Error;
use crate::http::{Client, Reply};
use crate::path::{item_path, pool_path};
use crate::wire::{ItemBody, ItemRelease, LockRequest};

/// What `GET /pool/{pool}/item/{item}?until=` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// pool-resource's `check`: until nobody holds the item.
    Unclaimed,
    /// pool-resource's `check_unclaimed`: until somebody holds it.
    Claimed,
}

impl Until {
    fn as_query(self) -> &'static str {
        match self {
            Until::Unclaimed => "unclaimed",
            Until::Claimed => "claimed",
        }
    }
}

/// `?wait=` for a request that may wait, empty for one that does not.
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

    /// `GET /pool/{pool}`: the pool's items with state, holder and metadata (404: no pool).
    pub async fn pool(&self, pool: &str) -> Result<Reply, Error> {
        self.locker::<()>(Method::GET, &pool_path(pool), None, Duration::ZERO)
            .await
    }

    /// `GET /pool/{pool}/item/{item}?until=...&wait=...`: waits until the item is claimed or
    /// unclaimed (pool-resource's `check_unclaimed` and `check`); the answer is the item as it
    /// is then (look at `claimed`), 404 at once if it does not exist. (To read an item without
    /// waiting, read its pool.)
    pub async fn wait_item(
        &self,
        pool: &str,
        item: &str,
        until: Until,
        wait: Duration,
    ) -> Result<Reply, Error> {
        let path = format!(
            "{}?until={}&wait={}",
            item_path(pool, item),
            until.as_query(),
            wire_duration(wait)
        );
        self.locker::<()>(Method::GET, &path, None, wait).await
    }

    /// `PUT /pool/{pool}/item/{item}/claim` (a named item) or `PUT /pool/{pool}/claim` (any
    /// free item), asking the server to wait up to `wait`.
    pub async fn claim(
        &self,
        pool: &str,
        item: Option<&str>,
        body: &LockRequest,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        let target = match item {
            Some(item) => item_path(pool, item),
            None => pool_path(pool),
        };
        let path = format!("{target}/claim{}", wait_query(wait));
        self.locker(Method::PUT, &path, Some(body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /pool/{pool}/item/{item}/claim`: release the item (without a key in `body`,
    /// whoever holds it).
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

    /// `POST /pool/{pool}/item/{item}`: add the item (claimed when `body.claim` is set);
    /// 201 added, 200 already there the same way, 409 there otherwise.
    pub async fn add_item(&self, pool: &str, item: &str, body: &ItemBody) -> Result<Reply, Error> {
        self.locker(
            Method::POST,
            &item_path(pool, item),
            Some(body),
            Duration::ZERO,
        )
        .await
    }

    /// `PUT /pool/{pool}/item/{item}`: replace the metadata (adding the item if absent),
    /// waiting up to `wait` while it is claimed (423 if it still is).
    pub async fn update_item(
        &self,
        pool: &str,
        item: &str,
        metadata: &str,
        wait: Option<Duration>,
    ) -> Result<Reply, Error> {
        let path = format!("{}{}", item_path(pool, item), wait_query(wait));
        let body = ItemBody {
            metadata: metadata.to_string(),
            claim: None,
        };
        self.locker(Method::PUT, &path, Some(&body), wait.unwrap_or_default())
            .await
    }

    /// `DELETE /pool/{pool}/item/{item}`: remove the item, claimed or not (with a key in
    /// `body`, only if unclaimed or held under it).
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
