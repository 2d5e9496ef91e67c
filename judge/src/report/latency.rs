//! Per-arm latency percentiles of traffic that was not randomized (`kvab check`'s burst, where the scheduler
//! chose the arms): an observation, shown with the same percentiles as the reports, never a comparison.

use serde::Serialize;

use crate::stats::percentile;

/// A sample's size and its p50, p95 and p99 in milliseconds, to 0.1 ms (`null` for an empty sample).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    pub fn of(sample: &[f64]) -> Self {
        let p = |q| percentile(sample, q).map(|v| (v * 10.0).round() / 10.0);
        Percentiles {
            n: sample.len(),
            p50: p(50.0),
            p95: p(95.0),
            p99: p(99.0),
        }
    }

    /// `p50/p95/p99` as the table shows them (`-` for none).
    pub fn text(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.1}"));
        format!("{}/{}/{}", f(self.p50), f(self.p95), f(self.p99))
    }
}
