//! Reclaiming holds whose Concourse build has ended (opt-in per acquire with
//! `release_when_build_ends`): every interval, asks the Concourse API for the status of each
//! such build and releases the holds of builds in a final state, as a DELETE would.
//! An unreachable or erroring API never releases anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use log::{debug, info, warn};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::rules::{BuildRef, Reclaim};
use crate::store::{LockStore, Released};

/// Builds asked about at once.
const CONCURRENCY: usize = 4;
/// The longest the interval stretches to while the API keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Characters escaped in one path segment of a Concourse API URL.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Why a build's state could not be learnt, or the Concourse API client set up. Nothing is
/// released on such an error.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("cannot build the Concourse API client: {0}")]
    Client(#[source] reqwest::Error),
    /// The store could not list the holds.
    #[error(transparent)]
    List(#[from] crate::store::StoreError),
    /// No answer (`method` is GET or POST).
    #[error("{method} {url}: {source}")]
    Request {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("GET {url}: {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{method} {url}: unexpected answer: {source}")]
    Answer {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("signing in to Concourse as {user:?}: {status}")]
    SignIn {
        user: String,
        status: reqwest::StatusCode,
    },
    #[error("hold names no build: {0}")]
    NoBuild(String),
    /// A round in which some builds' states could not be learnt.
    #[error("{count} build(s) unknown; first: {first}")]
    Unknown {
        count: usize,
        first: Box<ReclaimError>,
    },
}

/// How the server signs in to Concourse.
#[derive(Clone)]
pub enum ConcourseAuth {
    None,
    /// A bearer token, e.g. from `fly -t x userinfo` or a service account.
    Token(String),
    /// A Concourse local user; exchanged for a token at `/sky/issuer/token`.
    LocalUser {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for ConcourseAuth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConcourseAuth::None => write!(f, "none"),
            ConcourseAuth::Token(_) => write!(f, "bearer token"),
            ConcourseAuth::LocalUser { user, .. } => write!(f, "local user {user:?}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ReclaimSettings {
    pub concourse_url: String,
    pub auth: ConcourseAuth,
    pub interval: Duration,
}

/// A build's state, as far as reclaiming is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BuildState {
    Running,
    /// Succeeded, failed, errored or aborted.
    Finished(&'static str),
}

fn build_state(status: &str) -> BuildState {
    match status {
        "succeeded" => BuildState::Finished("succeeded"),
        "failed" => BuildState::Finished("failed"),
        "errored" => BuildState::Finished("errored"),
        "aborted" => BuildState::Finished("aborted"),
        _ => BuildState::Running,
    }
}

#[derive(Deserialize)]
struct BuildJson {
    status: String,
}

#[derive(Deserialize)]
struct TokenJson {
    access_token: String,
}

/// One hold that asked to be released with its build.
#[derive(Clone, Debug)]
struct Candidate {
    name: String,
    /// The pool item, when `name` is a pool.
    item: Option<String>,
    key: String,
    requestor: String,
    /// The holding's fencing generation when the list was taken.
    generation: u64,
}

/// The requestors of a holding that asked to be released with their build, and the build.
fn builds_of(holder: &crate::rules::Holder) -> impl Iterator<Item = (&String, &BuildRef)> {
    holder
        .requestors
        .iter()
        .filter_map(|(requestor, hold)| hold.release_with_build.as_deref().map(|b| (requestor, b)))
}

pub struct Reclaimer {
    settings: ReclaimSettings,
    store: Arc<dyn LockStore>,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Reclaimer {
    pub fn new(
        settings: ReclaimSettings,
        store: Arc<dyn LockStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ReclaimError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(ReclaimError::Client)?;
        Ok(Reclaimer {
            settings,
            store,
            metrics,
            http,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Checks every interval until the task is dropped; backs off while the API fails.
    pub async fn run(self) {
        info!(
            "reclaiming holds of finished builds from {} every {:?} ({:?})",
            self.settings.concourse_url, self.settings.interval, self.settings.auth
        );
        let mut failures: u32 = 0;
        loop {
            let pause = self
                .settings
                .interval
                .saturating_mul(2u32.saturating_pow(failures.min(10)))
                .min(MAX_BACKOFF.max(self.settings.interval));
            tokio::time::sleep(pause).await;
            match self.check_once().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    warn!("reclaim check failed (nothing released): {e}");
                }
            }
        }
    }

    /// One round: asks about every build named by a hold, releases the finished ones' holds.
    /// Fails (releasing nothing for that build) when the API cannot say.
    pub async fn check_once(&self) -> Result<(), ReclaimError> {
        let mut builds: HashMap<BuildRef, Vec<Candidate>> = HashMap::new();
        let mut note = |build: &BuildRef, candidate: Candidate| {
            builds.entry(build.clone()).or_default().push(candidate);
        };
        for lock in self.store.list(&crate::store::Page::all()).await?.locks {
            for holder in &lock.holders {
                for (requestor, build) in builds_of(holder) {
                    note(
                        build,
                        Candidate {
                            name: lock.name.clone(),
                            item: None,
                            key: holder.key.clone(),
                            requestor: requestor.clone(),
                            generation: holder.generation,
                        },
                    );
                }
            }
        }
        for pool in self.store.pools().await? {
            let Some(found) = self.store.pool(&pool.name).await? else {
                continue;
            };
            for (item, holder) in found
                .items
                .iter()
                .filter_map(|(item, i)| i.holder.as_ref().map(|h| (item, h)))
            {
                for (requestor, build) in builds_of(holder) {
                    note(
                        build,
                        Candidate {
                            name: pool.name.clone(),
                            item: Some(item.clone()),
                            key: holder.key.clone(),
                            requestor: requestor.clone(),
                            generation: holder.generation,
                        },
                    );
                }
            }
        }
        let results: Vec<(BuildRef, Vec<Candidate>, Result<BuildState, ReclaimError>)> =
            futures_util::stream::iter(builds)
                .map(|(build, holds)| async move {
                    let state = self.build_state(&build).await;
                    (build, holds, state)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut errors = Vec::new();
        for (build, holds, state) in results {
            match state {
                Ok(BuildState::Finished(status)) => {
                    for hold in holds {
                        self.release(&build, &hold, status).await;
                    }
                }
                Ok(BuildState::Running) => {}
                Err(e) => errors.push(e),
            }
        }
        let count = errors.len();
        match errors.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(ReclaimError::Unknown {
                count,
                first: Box::new(first),
            }),
        }
    }

    async fn release(&self, build: &BuildRef, hold: &Candidate, status: &str) {
        // Applied by the store only if the hold is still this build's, unchanged since the list
        // was taken: a next build that took the lock again meanwhile keeps it.
        let released = self
            .store
            .reclaim(Reclaim {
                item: hold.item.clone(),
                name: hold.name.clone(),
                key: hold.key.clone(),
                requestor: hold.requestor.clone(),
                generation: hold.generation,
                build: build.clone(),
            })
            .await;
        let url = build.url.clone().unwrap_or_else(|| describe(build));
        let what = match &hold.item {
            Some(item) => format!("item {item:?} of pool {:?}", hold.name),
            None => format!("lock {:?}", hold.name),
        };
        match released {
            Ok(Released::Released) => {
                self.metrics.release("reclaimed");
                warn!(
                    "released {what} (key {:?}, requestor {:?}): its build {url} has {status}",
                    hold.key, hold.requestor
                );
            }
            Ok(Released::NotHeld) => {}
            Err(e) => warn!("could not release {what} of ended build {url}: {e}"),
        }
    }

    async fn build_state(&self, build: &BuildRef) -> Result<BuildState, ReclaimError> {
        let url = self.build_url(build)?;
        let mut response = self.get(&url).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED
            && matches!(self.settings.auth, ConcourseAuth::LocalUser { .. })
        {
            // The token expired: sign in again once.
            *self.token.lock().await = None;
            response = self.get(&url).await?;
        }
        let status = response.status();
        if !status.is_success() {
            return Err(ReclaimError::Status { url, status });
        }
        let body: BuildJson = response
            .json()
            .await
            .map_err(|source| ReclaimError::Answer {
                method: "GET",
                url,
                source,
            })?;
        debug!("build {} is {}", describe(build), body.status);
        Ok(build_state(&body.status))
    }

    async fn get(&self, url: &str) -> Result<reqwest::Response, ReclaimError> {
        let mut request = self.http.get(url);
        if let Some(token) = self.token().await? {
            request = request.bearer_auth(token);
        }
        request
            .send()
            .await
            .map_err(|source| ReclaimError::Request {
                method: "GET",
                url: url.to_string(),
                source,
            })
    }

    async fn token(&self) -> Result<Option<String>, ReclaimError> {
        match &self.settings.auth {
            ConcourseAuth::None => Ok(None),
            ConcourseAuth::Token(token) => Ok(Some(token.clone())),
            ConcourseAuth::LocalUser { user, password } => {
                let mut cached = self.token.lock().await;
                if let Some(token) = cached.as_ref() {
                    return Ok(Some(token.clone()));
                }
                let url = format!("{}/sky/issuer/token", self.base());
                // `fly`'s public client id and secret, as every Concourse accepts them.
                let response = self
                    .http
                    .post(&url)
                    .basic_auth("fly", Some("Zmx5"))
                    .form(&[
                        ("grant_type", "password"),
                        ("username", user.as_str()),
                        ("password", password.as_str()),
                        ("scope", "openid profile email federated:id groups"),
                    ])
                    .send()
                    .await
                    .map_err(|source| ReclaimError::Request {
                        method: "POST",
                        url: url.clone(),
                        source,
                    })?;
                if !response.status().is_success() {
                    return Err(ReclaimError::SignIn {
                        user: user.clone(),
                        status: response.status(),
                    });
                }
                let token: TokenJson =
                    response
                        .json()
                        .await
                        .map_err(|source| ReclaimError::Answer {
                            method: "POST",
                            url,
                            source,
                        })?;
                *cached = Some(token.access_token.clone());
                Ok(Some(token.access_token))
            }
        }
    }

    fn base(&self) -> &str {
        self.settings.concourse_url.trim_end_matches('/')
    }

    fn build_url(&self, build: &BuildRef) -> Result<String, ReclaimError> {
        let segment = |s: &str| utf8_percent_encode(s, SEGMENT).to_string();
        if let Some(id) = &build.id {
            return Ok(format!("{}/api/v1/builds/{}", self.base(), segment(id)));
        }
        match (&build.team, &build.pipeline, &build.job, &build.name) {
            (Some(team), Some(pipeline), Some(job), Some(name)) => Ok(format!(
                "{}/api/v1/teams/{}/pipelines/{}/jobs/{}/builds/{}",
                self.base(),
                segment(team),
                segment(pipeline),
                segment(job),
                segment(name)
            )),
            _ => Err(ReclaimError::NoBuild(describe(build))),
        }
    }
}

fn describe(build: &BuildRef) -> String {
    let part = |p: &Option<String>| p.clone().unwrap_or_else(|| "?".into());
    match &build.id {
        Some(id) => format!("build {id}"),
        None => format!(
            "{}/{}/{} #{}",
            part(&build.team),
            part(&build.pipeline),
            part(&build.job),
            part(&build.name)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_states_count_as_finished() {
        for status in ["succeeded", "failed", "errored", "aborted"] {
            assert_eq!(build_state(status), BuildState::Finished(status));
        }
        for status in ["started", "pending", "", "something-new"] {
            assert_eq!(build_state(status), BuildState::Running, "{status}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let shown = format!(
            "{:?} {:?}",
            ConcourseAuth::Token("tok-123".into()),
            ConcourseAuth::LocalUser {
                user: "ops".into(),
                password: "pw-456".into()
            }
        );
        assert!(
            !shown.contains("tok-123") && !shown.contains("pw-456"),
            "{shown}"
        );
    }
}
