//! The filter's cumulative routing counts per upstream endpoint, sent to the sidecar as reports.

use std::collections::BTreeMap;

use kvab_contract::report::{is_socket_address, OVERFLOW_ENDPOINT};

use crate::endpoints::Served;
use crate::json::push_string;
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
    /// `endpoint` is the upstream address as Envoy gives it (empty: no upstream); one that is not
    /// `ip:port` is counted under [`OVERFLOW_ENDPOINT`], since the sidecar refuses any other value.
    pub fn record(
        &mut self,
        requested: Option<ArmId>,
        served: Served,
        endpoint: &[u8],
        class: CodeClass,
    ) {
        let cell = self.cell(requested, served, class);
        // The common case, an endpoint already seen, is one lookup.
        if let Some(counts) = self.counts.get_mut(endpoint) {
            if let Some(n) = counts.get_mut(cell) {
                *n = n.saturating_add(1);
            }
            return;
        }
        // Only well-formed endpoints become keys, so an odd one never matches above and lands here.
        let well_formed = endpoint.is_empty() || is_socket_address(endpoint);
        let key: &[u8] = if well_formed && self.counts.len() < MAX_ENDPOINTS {
            endpoint
        } else {
            OVERFLOW_ENDPOINT.as_bytes()
        };
        let cells = self.cells();
        let counts = self
            .counts
            .entry(key.to_vec().into_boxed_slice())
            .or_insert_with(|| vec![0; cells]);
        if let Some(n) = counts.get_mut(cell) {
            *n = n.saturating_add(1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The report with every non-zero total, as `POST /v1/reports` JSON (`kvab_contract::report::Report`).
    /// Written by hand: a serializer would double the size of this code in the `.wasm`.
    pub fn report_json(
        &self,
        plan: &Plan,
        reporter: &str,
        sequence: u64,
        started_at_ms: u64,
    ) -> Vec<u8> {
        let mut out = String::with_capacity(128 + 96 * self.counts.len());
        out.push_str("{\"reporter\":");
        push_string(&mut out, reporter);
        out.push_str(&format!(
            ",\"sequence\":{sequence},\"started_at_ms\":{started_at_ms},\"totals\":["
        ));
        let mut first = true;
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
                        if count == 0 {
                            continue;
                        }
                        if !first {
                            out.push(',');
                        }
                        first = false;
                        out.push_str("{\"requested\":");
                        push_string(&mut out, plan.arm_label(requested));
                        out.push_str(",\"served\":");
                        push_string(&mut out, served.label(plan));
                        out.push_str(",\"endpoint\":");
                        push_string(&mut out, &String::from_utf8_lossy(endpoint));
                        out.push_str(",\"code_class\":");
                        push_string(&mut out, class.label());
                        out.push_str(&format!(",\"count\":{count}}}"));
                    }
                }
            }
        }
        out.push_str("]}");
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use kvab_contract::report::Report;

    /// The JSON the filter sends, read back with the contract's own (strict) type.
    fn sent(tally: &Tally, sequence: u64) -> Report {
        let plan = parse(b"{}").unwrap();
        serde_json::from_slice(&tally.report_json(&plan, "r1", sequence, 7)).unwrap()
    }
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
        let report = sent(&tally, 1);
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
        assert_eq!(sent(&tally, 2).totals[0].count, 4);
    }

    #[test]
    fn upstream_addresses_that_are_not_ip_port_are_folded_so_the_sidecar_accepts_the_report() {
        let plan = parse(b"{}").unwrap();
        let mut tally = Tally::new(&plan);
        for odd in [
            &b"envoy://internal_client_address/"[..],
            b"/var/run/upstream.sock",
            b"10.0.0.5:8080\xff",
            &[b'1'; 100],
        ] {
            tally.record(None, Served::Unknown, odd, CodeClass::C2xx);
        }
        tally.record(None, Served::Unknown, b"[fd00::5]:8080", CodeClass::C2xx);
        let report = sent(&tally, 1);
        let rows: Vec<(&str, u64)> = report
            .totals
            .iter()
            .map(|t| (t.endpoint.as_str(), t.count))
            .collect();
        assert_eq!(rows, [("[fd00::5]:8080", 1), ("other", 4)]);
        assert!(report
            .totals
            .iter()
            .all(|t| kvab_contract::report::is_endpoint(t.endpoint.as_bytes())));
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
        let report = sent(&tally, 1);
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
