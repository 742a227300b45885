//! What the integration tests share, a module per concern: [`server`] runs the real `locker`
//! binary (a free loopback port, a temp state file, a scrubbed environment, its log forwarded,
//! killed and reaped on drop) and picks the backend; [`http`] talks to it; [`process`] runs
//! other commands; [`wait`] polls for what a test waits for; [`history`] reads the history
//! back; `etcd` (with the `etcd` feature) runs a loopback etcd cluster and replicas on it. The BOSH release and pipeline tests add
//! `tests/common/bosh/`, which only they compile.
//!
//! Each test binary compiles this module on its own and uses part of it, so every test declares
//! it `pub mod common;`: what is `pub` here is then public API of the test crate and never dead
//! code, while a private item nothing uses still is.
//!
//! Shared by the integration tests of every crate in the workspace (`#[path]`-included), so it
//! finds the server binary itself: Cargo's `CARGO_BIN_EXE_locker` in this package, else the
//! `locker` binary beside the test executable's target directory (`cargo test --workspace`
//! builds it before running any test).
// The etcd parts need the server built with the `etcd` feature: they are compiled only with
// `feature = "etcd"` of the including crate. The resource crate has no such feature (there they
// are always compiled out), hence no complaint about an unknown feature name.
#![allow(unexpected_cfgs)]

pub mod history;
pub mod http;
pub mod process;
pub mod server;
pub mod wait;

#[cfg(feature = "etcd")]
pub mod etcd;

pub use http::*;
pub use process::*;
pub use server::*;
pub use wait::*;

/// Runs each named test (a plain `fn()`, usually also a `#[test]` of its own against the file
/// backend) once more against the etcd backend, as `on_etcd::<name>`: one contract for both.
/// Only with the `etcd` feature (the server needs it); without, the file tests run alone.
#[macro_export]
macro_rules! also_on_etcd {
    ($($test:ident),* $(,)?) => {
        #[cfg(feature = "etcd")]
        mod on_etcd {
            $(
                #[test]
                fn $test() {
                    $crate::common::with_backend($crate::common::Backend::Etcd, super::$test);
                }
            )*
        }
    };
}
