//! kvab's judge: everything between measured data and a verdict, with no I/O.
//!
//! `stats` (percentiles, the split test, Mann-Whitney with the Hodges–Lehmann shift and its interval,
//! median intervals, Holm, two proportions) works on samples; `binned` (quantiles, Mann-Whitney and the
//! interval of the difference of medians) on Prometheus histograms.

pub mod binned;
pub mod stats;
