//! The HTTP API: routes, and thin handlers that parse a request, call the store and map the
//! outcome to a status. The lock semantics live in [`crate::rules`], durability in the store.

mod dashboard;
pub mod error;
mod history;
pub mod peer;
mod pools;
pub mod request;
mod views;

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::metrics::{self, Metrics};
use crate::rules::{Acquire, BuildRef};
use crate::store::{LockStore, Released};
use error::ApiError;
use locker_client::wire::{Health, LockFree, LockGrant, LockReleased, LockRequest};
use request::{ListQuery, LockQuery, lock_name, read_body};

/// What every handler may use: the store and the server-wide limits.
pub struct AppState {
    pub store: Arc<dyn LockStore>,
    pub metrics: Arc<Metrics>,
    pub max_wait: Duration,
    pub default_ttl: Option<Duration>,
}

/// Routes behind auth (when configured). `/health` is registered outside, by the server.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/", web::get().to(dashboard::index))
        .route("/dashboard.css", web::get().to(dashboard::style))
        .route("/dashboard.js", web::get().to(dashboard::script))
        .service(
            web::resource("/metrics")
                .route(web::get().to(metrics_text))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/locks")
                .route(web::get().to(list_locks))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/history")
                .route(web::get().to(history::page))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/events")
                .route(web::get().to(history::live))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/pools")
                .route(web::get().to(pools::list))
                .default_service(web::to(method_not_allowed)),
        )
        .service(web::resource("/pool/{rest:.*}").to(pools::dispatch))
        .service(
            web::resource("/lock/{name:.*}")
                .route(web::get().to(lock_status))
                .route(web::put().to(acquire))
                .route(web::delete().to(release))
                .default_service(web::to(method_not_allowed)),
        );
}

/// Liveness: the process serves HTTP. Says nothing of the store (see [`ready`]).
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "OK".into(),
    })
}

/// Readiness: 200 when the store can take writes now, 503 with the reason when it cannot
/// (etcd without a quorum or out of reach, a state file that cannot be written). For load
/// balancers and Kubernetes readiness probes; open like `/health`, as probes carry no
/// credentials, and it tells nothing about the locks.
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.ready().await?;
    Ok(HttpResponse::Ok().json(Health {
        status: "ready".into(),
    }))
}

pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// Longest a scrape waits to learn whether the store is ready (`locker_store_ready`).
const READY_FOR_METRICS: Duration = Duration::from_secs(2);

async fn metrics_text(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // `ready` answers within about a second; a store that takes longer is not ready.
    let ready = tokio::time::timeout(READY_FOR_METRICS, state.store.ready()).await;
    state.metrics.set_store_ready(matches!(ready, Ok(Ok(()))));
    let text = state
        .metrics
        .encode(state.store.stats(), std::time::SystemTime::now())
        .map_err(|e| ApiError::Internal(format!("cannot encode metrics: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(text))
}

/// `GET /locks`: every held lock, or with `limit` one page of them (see [`ListQuery`]). The
/// body is the same name → lock map either way; `Locker-Total` says how many locks the
/// listing has in all, and a `Link` header with `rel="next"` names the next page.
async fn list_locks(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let query = ListQuery::parse(request.query_string())?;
    let page = state.store.list(&query.page()?).await?;
    let mut response = HttpResponse::Ok();
    response.insert_header(("Locker-Total", page.total.to_string()));
    if let Some(next) = page.more.then(|| query.next(&page)).flatten() {
        response.insert_header((header::LINK, format!("<locks?{next}>; rel=\"next\"")));
    }
    Ok(response.json(views::lock_map(&page.locks)))
}

async fn lock_status(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // `/lock/{name}/history`; a lock whose name ends in `/history` is `.../%2Fhistory`.
    if let Some(lock) = request.uri().path().strip_suffix("/history")
        && lock.len() > "/lock/".len()
    {
        let name = request::decode_lock_name(lock)?;
        return history::of_lock(name, &request, &state).await;
    }
    let name = lock_name(&request)?;
    let query = LockQuery::parse(request.query_string())?;
    if let Some(wait) = query.wait_free()? {
        let wait = wait.min(state.max_wait);
        let still_held = tokio::select! {
            held = state.store.wait_free(&name, wait) => held?,
            () = peer::client_gone(&request) => return Err(ApiError::ClientGone),
        };
        return Ok(match still_held {
            None => HttpResponse::Ok().json(LockFree::new(&name)),
            Some(lock) => HttpResponse::Ok().json(views::still_held(&lock)),
        });
    }
    match state.store.status(&name).await? {
        Some(lock) => Ok(HttpResponse::Ok().json(views::lock_status(&lock))),
        None => Err(ApiError::NotFound(format!("lock {name:?} is not held"))),
    }
}

/// The parts of a `PUT` or `DELETE /lock/{name}`: the name, the query and the body.
async fn parse_lock_request(
    request: &HttpRequest,
    payload: web::Payload,
) -> Result<(String, LockQuery, LockRequest), ApiError> {
    let name = lock_name(request)?;
    let query = LockQuery::parse(request.query_string())?;
    let body = request::lock_request(&read_body(request, payload).await?)?;
    Ok((name, query, body))
}

async fn acquire(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (name, query, body) = parse_lock_request(&request, payload).await?;
    let wait = query
        .wait()?
        .or(body.wait.map(|w| w.0))
        .map(|w| w.min(state.max_wait));
    let acquire = Acquire {
        slots: request::slots(&body)?,
        ..holder_request(&body, &state)?
    };
    let (key, requestor) = (acquire.key.clone(), acquire.requestor.clone());
    let result = match wait {
        // A waiting client may hang up: withdraw its request rather than grant it the lock.
        Some(_) => tokio::select! {
            grant = state.store.acquire(name.clone(), acquire, wait) => grant,
            () = peer::client_gone(&request) => {
                state.metrics.acquire("client_gone");
                return Err(ApiError::ClientGone);
            }
        },
        None => state.store.acquire(name.clone(), acquire, wait).await,
    };
    state.metrics.acquire(match &result {
        Ok(_) => "granted",
        Err(error) => error.outcome(),
    });
    let grant = result?;
    Ok(HttpResponse::Ok().json(LockGrant {
        generation: Some(grant.generation),
        response: format!(
            "lock {name:?} acquired with key {key:?} by {requestor:?} (count {})",
            grant.count
        ),
    }))
}

/// What a lock acquire or a pool claim asks for, from its body: key, requestor, lease, info
/// and the build to release with (no slots: only locks have them).
fn holder_request(body: &LockRequest, state: &AppState) -> Result<Acquire, ApiError> {
    let key = request::key(body)?;
    let requestor = request::requestor(body, &key)?;
    let ttl = body
        .ttl
        .map(|t| t.0)
        .or(state.default_ttl)
        .filter(|t| !t.is_zero());
    let info = request::info(body)?;
    let release_with_build = match body.release_when_build_ends {
        false => None,
        true => Some(Box::new(BuildRef::from_info(&info).ok_or_else(|| {
            ApiError::BadRequest(
                "release_when_build_ends needs info naming the build: build_id, or team, pipeline, job and build_name".into(),
            )
        })?)),
    };
    Ok(Acquire {
        key,
        requestor,
        ttl,
        info,
        slots: None,
        release_with_build,
        renew: body.renew,
    })
}

async fn release(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (name, query, body) = parse_lock_request(&request, payload).await?;
    if query.force()? {
        let forced = state
            .store
            .force_release(name.clone(), Some(asked_by(&request)))
            .await;
        match &forced {
            Ok(previous) if previous.is_empty() => state.metrics.release("not_held"),
            Ok(_) => state.metrics.release("forced"),
            Err(error) => state.metrics.release(error.outcome()),
        }
        let previous = forced?;
        let message = if previous.is_empty() {
            format!("lock {name:?} was not held")
        } else {
            format!("lock {name:?} force-released")
        };
        return Ok(HttpResponse::Ok().json(LockReleased { response: message }));
    }
    let key = request::key(&body)?;
    let requestor = request::requestor(&body, &key)?;
    let result = state
        .store
        .release(name.clone(), key, requestor.clone())
        .await;
    state.metrics.release(match &result {
        Ok(Released::Released) => "released",
        Ok(Released::NotHeld) => "not_held",
        Err(error) => error.outcome(),
    });
    let message = match result? {
        Released::Released => format!("lock {name:?} released by {requestor:?}"),
        Released::NotHeld => format!("lock {name:?} was not held by {requestor:?}"),
    };
    Ok(HttpResponse::Ok().json(LockReleased { response: message }))
}

/// Who made a request, for the history of a force release: the basic-auth user (never the
/// password) and the client's address.
pub(crate) fn asked_by(request: &HttpRequest) -> String {
    use actix_web::http::header::Header;
    use actix_web_httpauth::headers::authorization::{Authorization, Basic};
    let address = request
        .peer_addr()
        .map_or_else(|| "an unknown address".to_string(), |a| a.ip().to_string());
    match Authorization::<Basic>::parse(request) {
        Ok(auth) => format!("{} from {address}", auth.as_ref().user_id()),
        Err(_) => format!("a client at {address}"),
    }
}
