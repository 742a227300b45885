//! The pool API (see docs/pools.md): `GET /pools`, and under `/pool/{pool}` the pool, its
//! claim queue (`/claim`), its items (`/item/{item}`) and their claims (`/item/{item}/claim`).
//! Thin like the lock handlers: parse, call the store, map the outcome to a status.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use locker_client::wire::{
    ItemBody, ItemClaim, ItemFreed, ItemRelease, ItemStored, PoolItem, PoolList, PoolStatus,
    PoolSummary,
};
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::error::ApiError;
use super::request::{self, LockQuery, read_body, validate_name};
use super::{AppState, holder_request, peer, views};
use crate::rules::{Item, Pool};
use crate::store::{ItemState, StoreError};
use crate::timefmt::parse_duration;

/// Largest item metadata, as pool-resource users keep it (YAML or JSON of an environment).
pub const MAX_METADATA: usize = 64 * 1024;

/// Where under `/pool/` a request goes.
#[derive(Debug, PartialEq, Eq)]
enum PoolPath {
    Pool(String),
    Claim(String),
    Item(String, String),
    ItemClaim(String, String),
}

impl PoolPath {
    /// Parses the raw (still percent-encoded) path, so `%2F` stays part of a name.
    fn parse(path: &str) -> Result<PoolPath, ApiError> {
        let rest = path
            .strip_prefix("/pool/")
            .ok_or_else(|| ApiError::NotFound("no such route".into()))?;
        let segments: Vec<&str> = rest.split('/').collect();
        let name = |raw: &str, what: &str| -> Result<String, ApiError> {
            let name = percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| ApiError::BadRequest(format!("{what} name is not valid UTF-8")))?;
            validate_name(&name).map_err(|e| match e {
                ApiError::BadRequest(text) => ApiError::BadRequest(text.replacen("lock", what, 1)),
                other => other,
            })?;
            Ok(name.into_owned())
        };
        match segments.as_slice() {
            [pool] => Ok(PoolPath::Pool(name(pool, "pool")?)),
            [pool, "claim"] => Ok(PoolPath::Claim(name(pool, "pool")?)),
            [pool, "item", item] => Ok(PoolPath::Item(name(pool, "pool")?, name(item, "item")?)),
            [pool, "item", item, "claim"] => Ok(PoolPath::ItemClaim(
                name(pool, "pool")?,
                name(item, "item")?,
            )),
            _ => Err(ApiError::NotFound(
                "no such route: pools have /pool/{pool}, /pool/{pool}/claim, \
                 /pool/{pool}/item/{item} and /pool/{pool}/item/{item}/claim"
                    .into(),
            )),
        }
    }
}

/// `GET /pools`.
pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let pools = state.store.pools().await?;
    Ok(HttpResponse::Ok().json(PoolList {
        pools: pools
            .into_iter()
            .map(|p| PoolSummary {
                name: p.name,
                items: p.items as u64,
                claimed: p.claimed as u64,
                waiters: p.waiters as u64,
            })
            .collect(),
    }))
}

/// Every route under `/pool/`, by path shape and method.
pub async fn dispatch(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let path = PoolPath::parse(request.uri().path())?;
    let method = request.method().clone();
    match (path, method) {
        (PoolPath::Pool(pool), Method::GET) => pool_status(&state, pool).await,
        (PoolPath::Item(pool, item), Method::GET) => {
            item_status(&request, &state, pool, item).await
        }
        (PoolPath::Claim(pool), Method::PUT) => claim(&request, payload, &state, pool, None).await,
        (PoolPath::ItemClaim(pool, item), Method::PUT) => {
            claim(&request, payload, &state, pool, Some(item)).await
        }
        (PoolPath::ItemClaim(pool, item), Method::DELETE) => {
            release(&request, payload, &state, pool, item).await
        }
        (PoolPath::Item(pool, item), Method::POST) => {
            add(&request, payload, &state, pool, item).await
        }
        (PoolPath::Item(pool, item), Method::PUT) => {
            update(&request, payload, &state, pool, item).await
        }
        (PoolPath::Item(pool, item), Method::DELETE) => {
            remove(&request, payload, &state, pool, item).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn pool_status(state: &AppState, pool: String) -> Result<HttpResponse, ApiError> {
    match state.store.pool(&pool).await? {
        Some(found) => Ok(HttpResponse::Ok().json(pool_view(&pool, &found))),
        None => Err(ApiError::NotFound(format!("no pool {pool:?}"))),
    }
}

/// `?until=claimed|unclaimed&wait=` of `GET /pool/{pool}/item/{item}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ItemQuery {
    until: Option<String>,
    wait: Option<String>,
}

async fn item_status(
    request: &HttpRequest,
    state: &AppState,
    pool: String,
    item: String,
) -> Result<HttpResponse, ApiError> {
    let query: ItemQuery = serde_urlencoded::from_str(request.query_string())
        .map_err(|e| ApiError::BadRequest(format!("bad query string: {e}")))?;
    let until = match query.until.as_deref() {
        None | Some("") => None,
        Some("claimed") => Some(ItemState::Claimed),
        Some("unclaimed") => Some(ItemState::Unclaimed),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "until must be claimed or unclaimed, not {other:?}"
            )));
        }
    };
    let wait = match query.wait.as_deref().filter(|w| !w.is_empty()) {
        Some(text) => parse_duration(text)
            .map_err(|e| ApiError::BadRequest(format!("wait: {e}")))?
            .min(state.max_wait),
        None => Duration::ZERO,
    };
    let found = match until {
        Some(until) => tokio::select! {
            found = state.store.wait_item(&pool, &item, until, wait) => found?,
            () = peer::client_gone(request) => return Err(ApiError::ClientGone),
        },
        None => state.store.item(&pool, &item).await?,
    };
    match found {
        Some(found) => Ok(HttpResponse::Ok().json(item_view(&item, &found))),
        None => Err(StoreError::NoSuchItem {
            pool,
            item: Some(item),
        }
        .into()),
    }
}

async fn claim(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: String,
    item: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let query = LockQuery::parse(request.query_string())?;
    let body = request::lock_request(&read_body(request, payload).await?)?;
    if body.slots.is_some() {
        return Err(ApiError::BadRequest(
            "slots apply to locks, not to pool items (an item has one holder)".into(),
        ));
    }
    let wait = query
        .wait()?
        .or(body.wait.map(|w| w.0))
        .map(|w| w.min(state.max_wait));
    let claim = holder_request(&body, state)?;
    let key = claim.key.clone();
    let store = state.store.clone();
    let claimed = store.claim(pool.clone(), item, claim, wait);
    let result = match wait {
        // A waiting client may hang up: withdraw its claim rather than grant it an item.
        Some(_) => tokio::select! {
            grant = claimed => grant,
            () = peer::client_gone(request) => {
                state.metrics.acquire("client_gone");
                return Err(ApiError::ClientGone);
            }
        },
        None => claimed.await,
    };
    state.metrics.acquire(match &result {
        Ok(_) => "granted",
        Err(error) => error.outcome(),
    });
    let grant = result?;
    // The metadata as committed with the grant: an update waits while the item is claimed.
    let metadata = state
        .store
        .item(&pool, &grant.item)
        .await?
        .map(|i| i.metadata.to_string())
        .unwrap_or_default();
    Ok(HttpResponse::Ok().json(ItemClaim {
        pool,
        item: grant.item,
        metadata,
        key,
        generation: grant.grant.generation,
        count: grant.grant.count,
    }))
}

/// The optional body of a release or removal.
async fn release_body(
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<ItemRelease, ApiError> {
    let bytes = read_body(request, payload).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ItemRelease::default());
    }
    let body: ItemRelease = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    Ok(ItemRelease {
        key: body.key.filter(|k| !k.is_empty()),
        requestor: body.requestor.filter(|r| !r.is_empty()),
    })
}

async fn release(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: String,
    item: String,
) -> Result<HttpResponse, ApiError> {
    let body = release_body(request, payload).await?;
    let by_name = body.key.is_none();
    let by = by_name.then(|| super::asked_by(request));
    let result = state
        .store
        .release_item(pool.clone(), item.clone(), body.key, body.requestor, by)
        .await;
    state.metrics.release(match &result {
        Ok(None) => "not_held",
        Ok(Some(_)) if by_name => "forced",
        Ok(Some(_)) => "released",
        Err(error) => error.outcome(),
    });
    let previous = result?;
    Ok(HttpResponse::Ok().json(freed(pool, item, previous.as_ref())))
}

async fn remove(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: String,
    item: String,
) -> Result<HttpResponse, ApiError> {
    let body = release_body(request, payload).await?;
    let previous = state
        .store
        .remove_item(pool.clone(), item.clone(), body.key)
        .await?;
    Ok(HttpResponse::Ok().json(freed(pool, item, previous.as_ref())))
}

fn freed(pool: String, item: String, previous: Option<&crate::rules::Holder>) -> ItemFreed {
    ItemFreed {
        pool,
        item,
        released: previous.is_some(),
        previous: previous.map(views::client_holder),
    }
}

/// The body of an addition or update, its metadata within [`MAX_METADATA`].
async fn item_body(request: &HttpRequest, payload: web::Payload) -> Result<ItemBody, ApiError> {
    let bytes = read_body(request, payload).await?;
    let body: ItemBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "request body is not valid JSON for an item (\"metadata\": text): {e}"
        ))
    })?;
    if body.metadata.len() > MAX_METADATA {
        return Err(ApiError::BadRequest(format!(
            "metadata is {} bytes long; at most {MAX_METADATA} are allowed",
            body.metadata.len()
        )));
    }
    Ok(body)
}

async fn add(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: String,
    item: String,
) -> Result<HttpResponse, ApiError> {
    let body = item_body(request, payload).await?;
    let claim = match &body.claim {
        Some(claim) => Some(holder_request(claim, state)?),
        None => None,
    };
    let changed = state
        .store
        .add_item(pool.clone(), item.clone(), Arc::from(body.metadata), claim)
        .await?;
    let status = if changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(ItemStored {
        pool,
        item,
        changed,
    }))
}

async fn update(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    pool: String,
    item: String,
) -> Result<HttpResponse, ApiError> {
    let query = LockQuery::parse(request.query_string())?;
    let wait = query.wait()?.map(|w| w.min(state.max_wait));
    let body = item_body(request, payload).await?;
    if body.claim.is_some() {
        return Err(ApiError::BadRequest(
            "an update changes metadata only; add a claimed item with POST".into(),
        ));
    }
    let updated =
        state
            .store
            .update_item(pool.clone(), item.clone(), Arc::from(body.metadata), wait);
    let changed = tokio::select! {
        changed = updated => changed?,
        () = peer::client_gone(request) => return Err(ApiError::ClientGone),
    };
    Ok(HttpResponse::Ok().json(ItemStored {
        pool,
        item,
        changed,
    }))
}

fn item_view<'a>(name: &str, item: &'a Item) -> PoolItem<views::InfoObject<'a>> {
    PoolItem {
        name: name.to_string(),
        metadata: item.metadata.to_string(),
        claimed: item.is_claimed(),
        holder: item.holder.as_ref().map(views::holder),
    }
}

fn pool_view<'a>(name: &str, pool: &'a Pool) -> PoolStatus<views::InfoObject<'a>> {
    PoolStatus {
        name: name.to_string(),
        waiters: pool.waiters() as u64,
        items: pool
            .items
            .iter()
            .map(|(name, item)| item_view(name, item))
            .collect(),
        queue: pool
            .queued_since()
            .map(|(_, item, request, since)| views::waiting(item, request, since))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_pools_and_items_percent_decoded() {
        assert_eq!(
            PoolPath::parse("/pool/aws").expect("parses"),
            PoolPath::Pool("aws".into())
        );
        assert_eq!(
            PoolPath::parse("/pool/aws/claim").expect("parses"),
            PoolPath::Claim("aws".into())
        );
        assert_eq!(
            PoolPath::parse("/pool/a%2Fb/item/env%2E1").expect("parses"),
            PoolPath::Item("a/b".into(), "env.1".into())
        );
        assert_eq!(
            PoolPath::parse("/pool/aws/item/e/claim").expect("parses"),
            PoolPath::ItemClaim("aws".into(), "e".into())
        );
        for bad in ["/pool/", "/pool/a/b", "/pool/a/item", "/pool/a/item/b/c"] {
            assert!(PoolPath::parse(bad).is_err(), "{bad}");
        }
    }
}
