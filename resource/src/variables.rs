//! The environment variables the resource reads, named once: its code reads them by these
//! names, and its tests (`tests/support`, which includes this file) keep every one of them from
//! leaking in from the test's own environment.

/// The build's identity, which Concourse sets in every step (`lock::BuildEnv`): team,
/// pipeline, job, build name, build id and Concourse's external URL, in that order.
pub const BUILD: [&str; 6] = [
    "BUILD_TEAM_NAME",
    "BUILD_PIPELINE_NAME",
    "BUILD_JOB_NAME",
    "BUILD_NAME",
    "BUILD_ID",
    "ATC_EXTERNAL_URL",
];

/// The first retry delay (tests shrink it).
pub const RETRY_BASE: &str = "LOCKER_RESOURCE_RETRY_BASE";
