//! Errors as the API answers them: one JSON body `{"error": ...}` and one status per kind.

use actix_web::body::{BodySize, EitherBody, MessageBody};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// The request body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The client hung up while waiting; nobody reads this answer.
    #[error("client closed the connection")]
    ClientGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            // nginx's "client closed request", so the request log shows what happened.
            ApiError::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::Store(error) => match error {
                StoreError::Held { .. }
                | StoreError::TimedOut { .. }
                | StoreError::WrongKey { .. }
                | StoreError::ItemClaimed { .. }
                | StoreError::ItemTimedOut { .. } => StatusCode::LOCKED,
                StoreError::SlotsMismatch { .. }
                | StoreError::TooManyRequestors { .. }
                | StoreError::ItemExists { .. } => StatusCode::CONFLICT,
                StoreError::NoSuchItem { .. } => StatusCode::NOT_FOUND,
                StoreError::TooManyWaiters { .. }
                | StoreError::TooManyLocks { .. }
                | StoreError::ShuttingDown
                | StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Unauthorized(_) = self {
            response.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"locker\""),
            ));
        }
        response.json(serde_json::json!({ "error": self.to_string() }))
    }
}

/// Middleware: gives every error response that reaches the app without a body (actix-web's own
/// 404 for a target that is not a path, such as `OPTIONS *`, or an error from a middleware or
/// extractor with no body of its own) the API's JSON body, keeping its status and headers.
///
/// Responses actix-http writes itself before any service runs (400 for a head it cannot parse,
/// 408 when the head does not arrive in time, 431 for a head over 128 KiB) never pass through
/// here: `connection::with_json_body` gives them their body on the socket. It relies on this
/// middleware: an error response of the app's always has a body, so it is never rewritten.
pub async fn json_error_bodies(
    request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    // An `Err` passes through: actix-web turns it into its `error_response()`, which for the
    // API's own errors ([`ApiError`]) has the JSON body already.
    let response = next.call(request).await?.map_into_boxed_body();
    let status = response.status();
    let empty = matches!(
        response.response().body().size(),
        BodySize::None | BodySize::Sized(0)
    );
    if !(status.is_client_error() || status.is_server_error()) || !empty {
        return Ok(response.map_into_left_body());
    }
    let (http_request, old) = response.into_parts();
    let mut answer = HttpResponse::build(status);
    for (name, value) in old.headers() {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
            answer.append_header((name.clone(), value.clone()));
        }
    }
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let answer = answer.json(serde_json::json!({ "error": reason }));
    Ok(actix_web::dev::ServiceResponse::new(http_request, answer).map_into_right_body())
}
