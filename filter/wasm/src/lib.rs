//! kvab proxy-wasm HTTP filter: the host glue around `kvab_filter_core`.
//!
//! `exports` is what Envoy calls (the proxy-wasm callbacks, each routed to its context); `abi`
//! owns every host call; `root` parses the configuration once per VM and drives the sidecar link;
//! `http` runs one request. The decisions themselves live in the core crate.
#![deny(clippy::indexing_slicing)]

mod abi;
mod exports;
mod http;
mod link;
mod metrics;
mod root;
mod worker;
