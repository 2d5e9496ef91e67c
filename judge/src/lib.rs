//! kvab's judge: everything between measured data and a verdict, with no I/O.
//!
//! - `stats` (percentiles, the split test, Mann-Whitney with the Hodges–Lehmann shift and its interval,
//!   median intervals, Holm, two proportions) works on samples; `binned` (quantiles, Mann-Whitney and the
//!   interval of the difference of medians) on Prometheus histograms.
//! - `comparison`: one `Comparison` of two arms and the one rule that decides it (`faster`,
//!   `equivalent`, `inconclusive`), from samples or from histograms: the ratio of the arms' times with
//!   its intervals, held by the guardrails.
//! - `guardrail`: the tails (p90, p99) and the error rates, each with its interval and margin.
//! - `verdict`: the verdict on a whole report and its reasons, in one wording.
//! - `outcome`: what one request of an experiment measured.
//! - `requests`: an experiment's per-request outcomes judged (assignment, error rates, comparisons).
//! - `reuse`: the workload's shape (`--workload`) and the prefix reuse each arm was sent, by construction.
//! - `sweep`: a load sweep's levels, and per arm the latency-versus-load curve, its knee and its goodput
//!   under the SLO.
//! - `report`: the reports of `kvab experiment` and `kvab analyze` (their JSON is a public contract) and
//!   their renderings: the table, the HTML page and its plots.

pub mod binned;
pub mod comparison;
pub mod guardrail;
pub mod outcome;
pub mod power;
pub mod report;
pub mod requests;
pub mod resolution;
pub mod reuse;
pub mod sequential;
pub mod stats;
pub mod sweep;
pub mod verdict;

pub use comparison::{Comparison, Decision, Rule};
pub use verdict::{Findings, Verdict};
