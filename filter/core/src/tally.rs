//! The filter's cumulative routing counts per upstream endpoint, sent to the sidecar as reports.

use std::collections::BTreeMap;

use kvab_contract::report::{is_socket_address, MAX_REPORT_BYTES, OVERFLOW_ENDPOINT};

use crate::endpoints::Served;
use crate::json::push_string;
use crate::metrics::CodeClass;
use crate::plan::{ArmId, Plan};

/// Distinct endpoints tracked per reporter; more are folded into [`OVERFLOW_ENDPOINT`].
pub const MAX_ENDPOINTS: usize = 1024;

/// Largest report the filter writes: half of what the sidecar accepts, so the two never disagree.
pub const REPORT_BUDGET_BYTES: usize = MAX_REPORT_BYTES / 2;
const _: () = assert!(REPORT_BUDGET_BYTES < MAX_REPORT_BYTES);

/// Counts since this VM started, never reset. Reports carry cumulative totals (not deltas) of the
/// entries that changed since the sidecar last acknowledged them; the sidecar keeps the last total of
/// an entry a report leaves out, so a report is bounded by what changed, never by all there is.
#[derive(Debug, Clone)]
pub struct Tally {
    arms: usize,
    /// Endpoint → counts indexed by (requested, served, code class).
    counts: BTreeMap<Box<[u8]>, Vec<Count>>,
    /// What the report in flight carries: endpoint, cell, total.
    in_flight: Vec<(Box<[u8]>, usize, u64)>,
}

/// One cell's total, and how much of it the sidecar acknowledged.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    total: u64,
    acked: u64,
}

/// A report written by [`Tally::report_json`].
#[derive(Debug)]
pub struct ReportBody {
    pub json: Vec<u8>,
    /// Every unacknowledged total is in it (false: the budget cut it, more follow).
    pub complete: bool,
}

const CLASSES: usize = CodeClass::ALL.len();

impl Tally {
    pub fn new(plan: &Plan) -> Self {
        Tally {
            arms: plan.arm_names().len(),
            counts: BTreeMap::new(),
            in_flight: Vec::new(),
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
                n.total = n.total.saturating_add(1);
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
            .or_insert_with(|| vec![Count::default(); cells]);
        if let Some(n) = counts.get_mut(cell) {
            n.total = n.total.saturating_add(1);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The report, as `POST /v1/reports` JSON (`kvab_contract::report::Report`): the totals that
    /// changed since the sidecar last acknowledged them, in at most `budget` bytes. Remembers what it
    /// carried for [`Tally::acknowledge`]. Written by hand: a serializer would double the size of
    /// this code in the `.wasm`.
    pub fn report_json(
        &mut self,
        plan: &Plan,
        reporter: &str,
        sequence: u64,
        started_at_ms: u64,
        budget: usize,
    ) -> ReportBody {
        self.in_flight.clear();
        let mut out = String::with_capacity(128 + 96 * self.counts.len().min(64));
        out.push_str("{\"reporter\":");
        push_string(&mut out, reporter);
        out.push_str(&format!(
            ",\"sequence\":{sequence},\"started_at_ms\":{started_at_ms},\"totals\":["
        ));
        let mut complete = true;
        let requested_arms = (0..self.arms).map(|a| Some(ArmId(a))).chain([None]);
        let served_arms: Vec<Served> = (0..self.arms)
            .map(|a| Served::Arm(ArmId(a)))
            .chain([Served::Unknown, Served::None])
            .collect();
        'cells: for requested in requested_arms {
            for &served in &served_arms {
                for class in CodeClass::ALL {
                    let cell = self.cell(requested, served, class);
                    for (endpoint, counts) in &self.counts {
                        let Some(&Count {
                            total: count,
                            acked,
                        }) = counts.get(cell)
                        else {
                            continue;
                        };
                        if count <= acked {
                            continue;
                        }
                        let before = out.len();
                        if !self.in_flight.is_empty() {
                            out.push(',');
                        }
                        out.push_str("{\"requested\":");
                        push_string(&mut out, plan.arm_label(requested));
                        out.push_str(",\"served\":");
                        push_string(&mut out, served.label(plan));
                        out.push_str(",\"endpoint\":");
                        push_string(&mut out, &String::from_utf8_lossy(endpoint));
                        out.push_str(",\"code_class\":");
                        push_string(&mut out, class.label());
                        out.push_str(&format!(",\"count\":{count}}}"));
                        // "]}" closes the report; an entry that does not fit waits for the next one.
                        if out.len() + 2 > budget && !self.in_flight.is_empty() {
                            out.truncate(before);
                            complete = false;
                            break 'cells;
                        }
                        self.in_flight.push((endpoint.clone(), cell, count));
                    }
                }
            }
        }
        out.push_str("]}");
        ReportBody {
            json: out.into_bytes(),
            complete,
        }
    }

    /// The sidecar applied the report in flight: its totals need not be sent again until they change.
    pub fn acknowledge(&mut self) {
        for (endpoint, cell, count) in self.in_flight.drain(..) {
            if let Some(n) = self.counts.get_mut(&endpoint).and_then(|c| c.get_mut(cell)) {
                n.acked = n.acked.max(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use kvab_contract::report::Report;

    /// The JSON the filter sends, read back with the contract's own (strict) type.
    /// The report the filter sends (everything, no budget), read back with the contract's own
    /// (strict) type; nothing is acknowledged.
    fn sent(tally: &mut Tally, sequence: u64) -> Report {
        let plan = parse(b"{}").unwrap();
        let body = tally.report_json(&plan, "r1", sequence, 7, usize::MAX);
        assert!(body.complete);
        serde_json::from_slice(&body.json).unwrap()
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
        let report = sent(&mut tally, 1);
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
        assert_eq!(sent(&mut tally, 2).totals[0].count, 4);
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
        let report = sent(&mut tally, 1);
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
        let report = sent(&mut tally, 1);
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

    #[test]
    fn acknowledged_totals_are_left_out_until_they_change() {
        let plan = parse(b"{}").unwrap();
        let mut tally = Tally::new(&plan);
        let fs = |tally: &mut Tally, endpoint: &[u8]| {
            tally.record(
                Some(ArmId(1)),
                Served::Arm(ArmId(1)),
                endpoint,
                CodeClass::C2xx,
            )
        };
        fs(&mut tally, b"10.0.0.7:8080");
        fs(&mut tally, b"10.0.0.8:8080");
        assert_eq!(sent(&mut tally, 1).totals.len(), 2);
        // Not acknowledged (lost, refused): the next report carries both again.
        assert_eq!(sent(&mut tally, 2).totals.len(), 2);
        tally.acknowledge();
        assert!(sent(&mut tally, 3).totals.is_empty());
        tally.acknowledge();
        fs(&mut tally, b"10.0.0.8:8080");
        let report = sent(&mut tally, 4);
        let rows: Vec<(&str, u64)> = report
            .totals
            .iter()
            .map(|t| (t.endpoint.as_str(), t.count))
            .collect();
        // Cumulative, not a delta: the total of the entry that changed.
        assert_eq!(rows, [("10.0.0.8:8080", 2)]);
    }

    #[test]
    fn a_report_stops_at_its_budget_and_the_rest_follows() {
        let plan = parse(b"{}").unwrap();
        let mut tally = Tally::new(&plan);
        for i in 0..MAX_ENDPOINTS {
            for class in CodeClass::ALL {
                tally.record(
                    None,
                    Served::Unknown,
                    format!("10.1.{}.{}:8080", i / 256, i % 256).as_bytes(),
                    class,
                );
            }
        }
        let mut seen = 0u64;
        let mut sequence = 0;
        loop {
            sequence += 1;
            let body = tally.report_json(&plan, "r1", sequence, 7, 64 * 1024);
            assert!(body.json.len() <= 64 * 1024, "{} bytes", body.json.len());
            let report: Report = serde_json::from_slice(&body.json).unwrap();
            seen += report.totals.iter().map(|t| t.count).sum::<u64>();
            tally.acknowledge();
            if body.complete {
                break;
            }
            assert!(!report.totals.is_empty());
        }
        assert!(sequence > 1, "the budget never cut a report");
        assert_eq!(seen, (MAX_ENDPOINTS * CodeClass::ALL.len()) as u64);
    }
}
