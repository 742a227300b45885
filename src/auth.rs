//! HTTP basic auth: the credentials check (constant time) and the actix-web-httpauth glue.
//! Every route but `/health` sits behind it when credentials are configured.

use actix_web::dev::ServiceRequest;
use actix_web::{Error, web};
use actix_web_httpauth::extractors::basic::BasicAuth;
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;

/// The one user allowed in (`AUTH_USER` / `AUTH_PASS`).
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(user: String, password: String) -> Self {
        Credentials { user, password }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// Compares both fields in time independent of where they differ; both are always compared.
    pub fn matches(&self, user: &str, password: &str) -> bool {
        let user_ok = self.user.as_bytes().ct_eq(user.as_bytes());
        let password_ok = self.password.as_bytes().ct_eq(password.as_bytes());
        (user_ok & password_ok).into()
    }
}

/// The validator given to `HttpAuthentication::with_fn`. A missing or malformed header arrives
/// as `None`; every refusal is our JSON 401 with a `WWW-Authenticate` challenge.
pub async fn validate(
    request: ServiceRequest,
    credentials: Option<BasicAuth>,
) -> Result<ServiceRequest, (Error, ServiceRequest)> {
    let expected = request.app_data::<web::Data<Credentials>>().cloned();
    let allowed = match (&expected, &credentials) {
        (None, _) => true,
        (Some(expected), Some(given)) => {
            expected.matches(given.user_id(), given.password().unwrap_or(""))
        }
        (Some(_), None) => false,
    };
    if allowed {
        return Ok(request);
    }
    let reason = if credentials.is_some() {
        "wrong user name or password"
    } else {
        "authentication required (HTTP basic auth)"
    };
    Err((ApiError::Unauthorized(reason.into()).into(), request))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_pair_matches() {
        let credentials = Credentials::new("admin".into(), "s3cret".into());
        let cases = [
            ("admin", "s3cret", true),
            ("admin", "s3cre", false),
            ("admin", "s3cret ", false),
            ("Admin", "s3cret", false),
            ("", "", false),
            ("s3cret", "admin", false),
        ];
        for (user, password, expected) in cases {
            assert_eq!(
                credentials.matches(user, password),
                expected,
                "{user}:{password}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_password() {
        let credentials = Credentials::new("admin".into(), "hunter2".into());
        let shown = format!("{credentials:?}");
        assert!(
            shown.contains("admin") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
