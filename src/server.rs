//! Wiring: builds the actix-web app (logging, auth, routes), serves it on a bound listener with
//! or without TLS, and shuts down in order: waiters answered, requests drained, state durable.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, Protocol, Request};
use actix_server::GracefulShutdownSignal;
use actix_service::{
    IntoServiceFactory, ServiceFactory, ServiceFactoryExt, fn_service, map_config,
};
use actix_tls::accept::TlsError;
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{AppConfig, Extensions, ServiceRequest, ServiceResponse};
use actix_web::http::{StatusCode, header};
use actix_web::middleware::{Logger, Next, from_fn};
use actix_web::rt::net::TcpStream;
use actix_web::{App, HttpResponse, ResponseError, web};
use actix_web_httpauth::middleware::HttpAuthentication;
use log::info;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::api::{self, AppState};
use crate::auth::{self, Credentials};
use crate::config::Settings;
use crate::connection::{self, ConnectionCap, HeadDeadline, Limits};
use crate::metrics::Metrics;
use crate::store::LockStore;

/// How long an idle keep-alive connection stays open. actix-web's default (5 s) is shorter than
/// the idle timeout of common client pools (reqwest: 90 s), and its dispatcher checks the timer
/// before reading: a busy server closed connections whose next request was already waiting in
/// the socket, and clients saw resets (tests/load.rs). nginx's default.
const KEEP_ALIVE: Duration = Duration::from_secs(75);
/// Most bytes of header names and values a request may carry. actix-http itself only refuses a
/// head past 128 KiB (or past 96 headers); real clients send well under 1 KiB.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Connections the kernel queues before the server accepts them (std's `bind` allows 128; a
/// thousand clients connecting at once overflowed it and waited a second for SYN retries).
const LISTEN_BACKLOG: i32 = 2048;

/// Binds the listening socket, with room for bursts of new connections.
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    // As std and actix do: a restart may bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Serves the API on `listener` until `shutdown` completes, then drains and closes the store.
pub async fn serve(
    listener: TcpListener,
    settings: &Settings,
    store: Arc<dyn LockStore>,
    metrics: Arc<Metrics>,
    tls: Option<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let reclaimer = match &settings.reclaim {
        Some(reclaim) => Some(
            crate::reclaim::Reclaimer::new(reclaim.clone(), store.clone(), metrics.clone())
                .map_err(std::io::Error::other)?,
        ),
        None => None,
    };
    let state = web::Data::new(AppState {
        store: store.clone(),
        metrics,
        max_wait: settings.max_wait,
        default_ttl: settings.default_ttl,
    });
    let credentials = settings.credentials.clone().map(web::Data::new);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let address = listener.local_addr()?;
    let app = move || {
        let mut app = App::new()
            .wrap(from_fn(refuse_oversized))
            // Method, path, status and latency; never headers (Authorization stays out of logs).
            .wrap(Logger::new("%a \"%r\" %s %b %Dms"))
            .wrap(from_fn(api::error::json_error_bodies))
            .app_data(state.clone());
        if let Some(credentials) = &credentials {
            app = app.app_data(credentials.clone());
        }
        // Probes carry no credentials: liveness and readiness are open (the dashboard's assets
        // are behind auth with the rest).
        app.service(
            web::resource("/health")
                .route(web::get().to(api::health))
                .route(web::head().to(api::health)),
        )
        .route("/ready", web::get().to(api::ready))
        .service(
            web::scope("")
                .wrap(HttpAuthentication::with_fn(auth::validate))
                .configure(api::routes)
                .default_service(web::to(api::not_found)),
        )
        // Outermost: tells the connection's head timer that a head arrived.
        .wrap(from_fn(connection::track_requests))
    };
    // actix counts connections per worker thread.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(512));
    let cap = ConnectionCap::new(
        settings
            .max_connections
            .unwrap_or(connection::DEFAULT_MAX_CONNECTIONS),
        workers,
    );
    let limits = Limits::new(settings.head_timeout, KEEP_ALIVE);
    let head_timeout = settings.head_timeout;
    let builder = actix_server::Server::build()
        .workers(cap.workers)
        .max_concurrent_connections(cap.per_worker)
        .disable_signals()
        // Requests in flight get this long to finish at shutdown (waiters are answered at once);
        // actix counts whole seconds, so a part second rounds up.
        .shutdown_timeout(settings.shutdown_grace.as_secs_f64().ceil() as u64);
    let graceful = builder.graceful_shutdown_signal();
    let builder = match tls {
        None => builder.listen("locker", listener, move || {
            let limits = limits.clone();
            fn_service(move |io: TcpStream| {
                let peer = io.peer_addr().ok();
                let io = HeadDeadline::new(io, limits.clone());
                async move { Ok((io, Protocol::Http1, peer)) }
            })
            .and_then(http_service(
                app.clone(),
                graceful.clone(),
                head_timeout,
                address,
            ))
        })?,
        Some(mut config) => {
            // HTTP/1.1 only, also over TLS: actix-http does not stop a handler when its HTTP/2
            // stream is reset, so a cancelled wait would still be granted (tests/http2.rs).
            let mut protocols = vec![b"http/1.1".to_vec()];
            protocols.append(&mut config.alpn_protocols);
            config.alpn_protocols = protocols;
            let acceptor = Acceptor::new(config);
            builder.listen("locker", listener, move || {
                let limits = limits.clone();
                acceptor
                    .clone()
                    .map_err(TlsError::into_service_error)
                    .and_then(fn_service(move |io: TlsStream<TcpStream>| {
                        let protocol = Protocol::Http1;
                        let peer = io.get_ref().0.peer_addr().ok();
                        let io = HeadDeadline::new(io, limits.clone());
                        async move { Ok((io, protocol, peer)) }
                    }))
                    .and_then(
                        http_service(app.clone(), graceful.clone(), head_timeout, address)
                            .map_err(TlsError::Service),
                    )
            })?
        }
    };
    let server = builder.run();
    info!(
        "accepting at most {} connections ({} per worker, {} workers); request heads get {}",
        cap.total(),
        cap.per_worker,
        cap.workers,
        humantime::format_duration(head_timeout)
    );
    // Last: tests and scripts take this line to mean "ready".
    info!("locker listening on {scheme}://{address}");
    let handle = server.handle();
    let reclaiming = reclaimer.map(|r| actix_web::rt::spawn(r.run()));
    let _stop_reclaiming = AbortOnDrop(reclaiming);
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => {
            store.close().await;
            return result;
        }
        () = shutdown => {}
    }
    info!("shutting down: answering waiters, finishing requests");
    store.begin_shutdown();
    let (result, ()) = futures_util::future::join(server, handle.stop(true)).await;
    store.close().await;
    info!("stopped; state is durable");
    result
}

/// The HTTP service of one connection, over a stream timed by [`HeadDeadline`]: actix-web's
/// app, with the keep-alive and first-head timeouts, and the connection's socket and limits in
/// its extensions (for `api::peer` and [`connection::track_requests`]).
fn http_service<T, F, I, S, B>(
    app: F,
    graceful: GracefulShutdownSignal,
    head_timeout: Duration,
    address: SocketAddr,
) -> impl ServiceFactory<
    (HeadDeadline<T>, Protocol, Option<SocketAddr>),
    Config = (),
    Response = (),
    Error = actix_http::error::DispatchError,
    InitError = (),
>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
    F: Fn() -> I,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<
            Request,
            Config = AppConfig,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        > + 'static,
    S::InitError: std::fmt::Debug,
    S::Service: 'static,
    <S::Service as actix_service::Service<Request>>::Future: 'static,
    B: MessageBody + 'static,
{
    HttpService::build()
        .graceful_shutdown_signal(move || {
            let graceful = graceful.clone();
            async move { graceful.notified().await }
        })
        .keep_alive(KEEP_ALIVE)
        // A new connection's first head: from when it opened (later heads: `HeadDeadline`).
        .client_request_timeout(head_timeout)
        .local_addr(address)
        .on_connect_ext(|io: &HeadDeadline<T>, extensions: &mut Extensions| {
            api::peer::record_socket(io.get_ref() as &dyn std::any::Any, extensions);
            extensions.insert(io.connection_limits());
        })
        .finish(map_config(
            app().into_factory().map_err(|error| error.error_response()),
            |_| AppConfig::default(),
        ))
}

/// Stops a background task when the server stops.
struct AbortOnDrop(Option<actix_web::rt::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Refuses requests whose headers exceed [`MAX_HEADER_BYTES`] (431) or whose Content-Length
/// announces a body over the limit (413, at once, rather than after reading 64 KiB of it or
/// waiting for a body that never comes).
async fn refuse_oversized(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        let response = HttpResponse::build(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE).json(
            serde_json::json!({
                "error": format!(
                    "request headers are {header_bytes} bytes; at most {MAX_HEADER_BYTES} are allowed"
                )
            }),
        );
        return Ok(request.into_response(response).map_into_right_body());
    }
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let limit = api::request::body_limit(request.path());
    if announced.is_some_and(|length| length > limit as u64) {
        let response = api::error::ApiError::PayloadTooLarge(limit).error_response();
        return Ok(request.into_response(response).map_into_right_body());
    }
    Ok(next.call(request).await?.map_into_left_body())
}

/// Completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            log::error!("cannot listen for termination signals; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// The start-up warning for a server anyone on the network may use: bound to every interface
/// (`0.0.0.0` or `::`, the default) with basic auth off. `None` when either is not so.
pub fn exposure_warning(address: std::net::SocketAddr, auth_on: bool) -> Option<String> {
    if auth_on || !address.ip().is_unspecified() {
        return None;
    }
    Some(format!(
        "basic auth is off and the server accepts connections on all interfaces ({address}): \
         anyone who can reach port {} can take and release every lock; set AUTH_USER and \
         AUTH_PASS, or LOCKER_LISTEN=127.0.0.1 to serve this machine only",
        address.port()
    ))
}

/// Whether the settings ask for basic auth (for the start-up message).
pub fn auth_summary(credentials: Option<&Credentials>) -> String {
    match credentials {
        Some(c) => format!("basic auth on (user {:?})", c.user()),
        None => "basic auth off".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_when_open_to_every_interface_without_auth() {
        let any4: std::net::SocketAddr = "0.0.0.0:3000".parse().expect("address");
        let any6: std::net::SocketAddr = "[::]:3000".parse().expect("address");
        let local: std::net::SocketAddr = "127.0.0.1:3000".parse().expect("address");
        let warning = exposure_warning(any4, false).expect("warned");
        assert!(warning.contains("all interfaces") && warning.contains("AUTH_USER"));
        // The test fixture finds the address in the line saying "listening on ".
        assert!(!warning.contains("listening on "));
        assert!(exposure_warning(any6, false).is_some());
        assert!(exposure_warning(any4, true).is_none());
        assert!(exposure_warning(local, false).is_none());
    }
}
