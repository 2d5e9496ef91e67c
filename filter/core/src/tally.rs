//! The filter's cumulative routing counts per upstream endpoint, sent to the sidecar as reports.

use std::collections::BTreeMap;

use kvab_contract::report::{Report, RoutedCount, OVERFLOW_ENDPOINT};

use crate::endpoints::Served;
use crate::metrics::CodeClass;
use crate::plan::{ArmId, Plan};

/// Distinct endpoints tracked per reporter; more are folded into [`OVERFLOW_ENDPOINT`].
pub const MAX_ENDPOINTS: usize = 1024;

/// Counts since this VM started, never reset (reports carry totals, not deltas).
#[derive(Debug, Clone)]
pub struct Tally {
    arms: usize,
    /// Endpoint → counts indexed by (requested, served, code class).
    counts: BTreeMap<Box<[u8]>, Vec<u64>>,
}

const CLASSES: usize = CodeClass::ALL.len();

impl Tally {
    pub fn new(plan: &Plan) -> Self {
        Tally {
            arms: plan.arm_names().len(),
            counts: BTreeMap::new(),
        }
    }

    fn cells(&self) -> usize {
        (self.arms + 1) * (self.arms + 2) * CLASSES
    }

    fn cell(&self, requested: Option<ArmId>, served: Served, class: CodeClass) -> usize {
        let requested = requested.map_or(self.arms, |a| a.0.min(self.arms));
        (requested * (self.arms + 2) + served.index(self.arms)) * CLASSES + class as usize
    }

    /// Counts one finished request. Allocates only the first time an endpoint is seen.
    pub fn record(
        &mut self,
        requested: Option<ArmId>,
        served: Served,
        endpoint: &[u8],
        class: CodeClass,
    ) {
        let cell = self.cell(requested, served, class);
        let key: &[u8] = if self.counts.contains_key(endpoint) || self.counts.len() < MAX_ENDPOINTS
        {
            endpoint
        } else {
            OVERFLOW_ENDPOINT.as_bytes()
        };
        if !self.counts.contains_key(key) {
            let cells = self.cells();
            self.counts
                .insert(key.to_vec().into_boxed_slice(), vec![0; cells]);
        }
        if let Some(n) = self.counts.get_mut(key).and_then(|c| c.get_mut(cell)) {
            *n = n.saturating_add(1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The report with every non-zero total.
    pub fn report(&self, plan: &Plan, reporter: &str, sequence: u64, started_at_ms: u64) -> Report {
        let mut totals = Vec::new();
        let requested_arms = (0..self.arms).map(|a| Some(ArmId(a))).chain([None]);
        let served_arms: Vec<Served> = (0..self.arms)
            .map(|a| Served::Arm(ArmId(a)))
            .chain([Served::Unknown, Served::None])
            .collect();
        for requested in requested_arms {
            for &served in &served_arms {
                for class in CodeClass::ALL {
                    let cell = self.cell(requested, served, class);
                    for (endpoint, counts) in &self.counts {
                        let count = counts.get(cell).copied().unwrap_or(0);
                        if count > 0 {
                            totals.push(RoutedCount {
                                requested: plan.arm_label(requested).to_owned(),
                                served: served.label(plan).to_owned(),
                                endpoint: String::from_utf8_lossy(endpoint).into_owned(),
                                code_class: class.label().to_owned(),
                                count,
                            });
                        }
                    }
                }
            }
        }
        Report {
            reporter: reporter.to_owned(),
            sequence,
            started_at_ms,
            totals,
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use crate::config::parse;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn totals_are_cumulative_and_keyed_like_the_sidecar_exports_them() {
        let plan = parse(b"{}").unwrap();
        let mut tally = Tally::new(&plan);
        assert!(tally.is_empty());
        for _ in 0..3 {
            tally.record(
                Some(ArmId(0)),
                Served::Arm(ArmId(0)),
                b"10.0.0.5:8080",
                CodeClass::C2xx,
            );
        }
        tally.record(
            Some(ArmId(0)),
            Served::Arm(ArmId(1)),
            b"10.0.0.7:8080",
            CodeClass::C2xx,
        );
        tally.record(None, Served::None, b"", CodeClass::C4xx);
        let report = tally.report(&plan, "r1", 1, 0);
        assert_eq!(report.reporter, "r1");
        let rows: Vec<(&str, &str, &str, &str, u64)> = report
            .totals
            .iter()
            .map(|t| {
                (
                    t.requested.as_str(),
                    t.served.as_str(),
                    t.endpoint.as_str(),
                    t.code_class.as_str(),
                    t.count,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 3),
                ("nvlink", "fs", "10.0.0.7:8080", "2xx", 1),
                ("none", "none", "", "4xx", 1),
            ]
        );
        tally.record(
            Some(ArmId(0)),
            Served::Arm(ArmId(0)),
            b"10.0.0.5:8080",
            CodeClass::C2xx,
        );
        assert_eq!(tally.report(&plan, "r1", 2, 0).totals[0].count, 4);
    }

    #[test]
    fn endpoints_beyond_the_cap_are_folded() {
        let plan = parse(b"{}").unwrap();
        let mut tally = Tally::new(&plan);
        for i in 0..MAX_ENDPOINTS + 10 {
            tally.record(
                None,
                Served::Unknown,
                format!("10.1.{}.{}:80", i / 256, i % 256).as_bytes(),
                CodeClass::C2xx,
            );
        }
        let report = tally.report(&plan, "r", 1, 0);
        assert_eq!(report.totals.len(), MAX_ENDPOINTS + 1);
        let other = report
            .totals
            .iter()
            .find(|t| t.endpoint == "other")
            .unwrap();
        assert_eq!(other.count, 10);
        assert_eq!(
            report.totals.iter().map(|t| t.count).sum::<u64>(),
            (MAX_ENDPOINTS + 10) as u64
        );
    }
}
