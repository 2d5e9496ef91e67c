//! The reports and their renderings (no I/O: writing them is the tools' job).

pub mod experiment;
pub mod grid;
pub mod html;
pub mod latency;
pub mod page;
pub mod plots;
pub mod production;
