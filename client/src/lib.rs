//! `locker-client`: the locker wire protocol and a client for it, one crate for every program
//! that speaks it: the `locker` CLI (`src/cli/`), the Concourse resource (`resource/`), and
//! the server itself, whose views serialize from the same types.
//!
//! # Layout
//!
//! - [`duration`]: the duration syntax (`30`, `500ms`, `5m`, `1h 30m`, at most ten years) and
//!   how durations go on the wire.
//! - [`path`]: `/lock/{name}` with the name percent-encoded.
//! - [`limits`]: what the server accepts (name, key, holder info, slots), so clients fit
//!   within it before they send.

pub mod duration;
pub mod limits;
pub mod path;

pub use duration::{DurationError, MAX_DURATION, parse_duration, wire_duration};
pub use path::lock_path;
