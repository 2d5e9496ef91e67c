//! Host-independent logic of the kvab filter. Nothing here calls the proxy: the wasm crate feeds
//! it header bytes and turns its decisions into host calls, so all of it is tested natively (and,
//! with `wasm-bindgen-test`, inside a wasm VM).
#![deny(clippy::indexing_slicing)]
// Tests may unwrap and index: a panic there is a failing test, not a trapped VM.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod arm;
pub mod assign;
pub mod choice;
pub mod config;
mod config_error;
pub mod endpoints;
mod field;
pub mod headers;
mod json;
pub mod link;
pub mod metrics;
pub mod plan;
mod reply;
pub mod request;
pub mod sidecar;
pub mod tally;

pub use config::{parse, ConfigError};
pub use plan::{Admission, ArmId, Decision, Invalid, Plan, Reading, Rejection, Source, Verdict};
