//! Metric names and the layout of the metric table the host defines once per configuration.
//!
//! The proxy-wasm ABI has no labels, so labels travel in the stat name as Istio's tag segments,
//! `<tag>=.=<value>;.;`, followed by the metric name. Envoy's `stats_tags` regexes
//! `(<tag>=\.=(.*?);\.;)` (our bootstrap; Istio's `extraStatTags`) cut them back out, so
//! `/stats/prometheus` shows `kvab_requests_total{backend="nvlink",source="header"}`.

use crate::endpoints::Served;
use crate::plan::{ArmId, Invalid, Plan, Rejection, Source};

// The names and label keys are the contract's: `kvab analyze` and `kvab check` read them by the same names.
use kvab_contract::metrics::label;
pub use kvab_contract::metrics::{
    FILTER_TAGS as TAGS, INVALID_VALUES, MAP_AGE, MAP_FETCHES, REJECTED, REPORTS, REQUESTS,
    REQUEST_DURATION, RESPONSES, SERVED, TIME_TO_FIRST_BYTE, UNAVAILABLE,
};

/// Outcome of one endpoint-map fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchResult {
    Ok,
    NotModified,
    Error,
    Timeout,
}

impl FetchResult {
    pub const ALL: [FetchResult; 4] = [
        FetchResult::Ok,
        FetchResult::NotModified,
        FetchResult::Error,
        FetchResult::Timeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FetchResult::Ok => "ok",
            FetchResult::NotModified => "not_modified",
            FetchResult::Error => "error",
            FetchResult::Timeout => "timeout",
        }
    }
}

/// Outcome of one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportResult {
    Ok,
    Error,
    /// Refused for now (503, 507 `ledger_full`, 429): the totals stay for a later report, sent after a
    /// backoff.
    Deferred,
}

impl ReportResult {
    pub const ALL: [ReportResult; 3] = [
        ReportResult::Ok,
        ReportResult::Error,
        ReportResult::Deferred,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ReportResult::Ok => "ok",
            ReportResult::Error => "error",
            ReportResult::Deferred => "deferred",
        }
    }
}

/// Label of a request that carries no arm.
const SOURCE_NONE: &str = "none";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Response status classes; `none` is a stream that ended without a response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    C1xx,
    C2xx,
    C3xx,
    C4xx,
    C5xx,
    None,
}

impl CodeClass {
    pub const ALL: [CodeClass; 6] = [
        CodeClass::C1xx,
        CodeClass::C2xx,
        CodeClass::C3xx,
        CodeClass::C4xx,
        CodeClass::C5xx,
        CodeClass::None,
    ];

    pub fn of(status: u64) -> CodeClass {
        match status {
            100..=199 => CodeClass::C1xx,
            200..=299 => CodeClass::C2xx,
            300..=399 => CodeClass::C3xx,
            400..=499 => CodeClass::C4xx,
            500..=599 => CodeClass::C5xx,
            _ => CodeClass::None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CodeClass::C1xx => "1xx",
            CodeClass::C2xx => "2xx",
            CodeClass::C3xx => "3xx",
            CodeClass::C4xx => "4xx",
            CodeClass::C5xx => "5xx",
            CodeClass::None => kvab_contract::report::NO_CODE_CLASS,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Stat name with tag segments, e.g. `backend=.=fs;.;source=.=split;.;kvab_requests_total`.
pub fn stat_name(metric: &str, tags: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(metric.len() + tags.len() * 24);
    for (tag, value) in tags {
        name.push_str(tag);
        name.push_str("=.=");
        name.push_str(value);
        name.push_str(";.;");
    }
    name.push_str(metric);
    name
}

/// Where each metric sits in the flat table of ids the host keeps. The table is built from
/// [`MetricLayout::definitions`] in the same order the lookups below index into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricLayout {
    arms: usize,
}

const SOURCES: usize = Source::ALL.len();
const CLASSES: usize = CodeClass::ALL.len();

impl MetricLayout {
    pub fn new(plan: &Plan) -> Self {
        MetricLayout {
            arms: plan.arm_names().len(),
        }
    }

    /// Backends are the arms plus `none`.
    fn backends(&self) -> usize {
        self.arms + 1
    }

    fn backend_index(&self, arm: Option<ArmId>) -> usize {
        arm.map_or(self.arms, |a| a.0.min(self.arms))
    }

    fn requests_base(&self) -> usize {
        0
    }
    fn responses_base(&self) -> usize {
        self.requests_base() + self.arms * SOURCES + 1
    }
    fn rejected_base(&self) -> usize {
        self.responses_base() + self.backends() * CLASSES
    }
    fn invalid_base(&self) -> usize {
        self.rejected_base() + Rejection::ALL.len()
    }
    fn duration_base(&self) -> usize {
        self.invalid_base() + Invalid::ALL.len()
    }
    fn ttfb_base(&self) -> usize {
        self.duration_base() + self.backends()
    }

    fn served_base(&self) -> usize {
        self.ttfb_base() + self.backends()
    }
    fn unavailable_base(&self) -> usize {
        self.served_base() + self.backends() * (self.arms + 2)
    }
    fn fetches_base(&self) -> usize {
        self.unavailable_base() + self.arms
    }
    fn reports_base(&self) -> usize {
        self.fetches_base() + FetchResult::ALL.len()
    }
    fn map_age_index(&self) -> usize {
        self.reports_base() + ReportResult::ALL.len()
    }

    /// Number of metrics, i.e. the length of the id table.
    pub fn len(&self) -> usize {
        self.map_age_index() + 1
    }

    /// `kvab_served_total{requested,served}`.
    pub fn served(&self, requested: Option<ArmId>, served: Served) -> usize {
        self.served_base()
            + self.backend_index(requested) * (self.arms + 2)
            + served.index(self.arms)
    }

    /// `kvab_unavailable_total{backend}`.
    pub fn unavailable(&self, arm: ArmId) -> usize {
        self.unavailable_base() + arm.0.min(self.arms.saturating_sub(1))
    }

    pub fn map_fetches(&self, result: FetchResult) -> usize {
        self.fetches_base() + result as usize
    }

    pub fn reports(&self, result: ReportResult) -> usize {
        self.reports_base() + result as usize
    }

    /// `kvab_endpoint_map_age_seconds` (gauge).
    pub fn map_age(&self) -> usize {
        self.map_age_index()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// `kvab_requests_total{backend,source}`; untagged requests are `{none,none}`.
    pub fn requests(&self, tagged: Option<(ArmId, Source)>) -> usize {
        match tagged {
            Some((arm, source)) if arm.0 < self.arms => {
                self.requests_base() + arm.0 * SOURCES + source as usize
            }
            _ => self.requests_base() + self.arms * SOURCES,
        }
    }

    pub fn responses(&self, arm: Option<ArmId>, class: CodeClass) -> usize {
        self.responses_base() + self.backend_index(arm) * CLASSES + class.index()
    }

    pub fn rejected(&self, rejection: Rejection) -> usize {
        self.rejected_base() + rejection as usize
    }

    pub fn invalid_values(&self, why: Invalid) -> usize {
        self.invalid_base() + why as usize
    }

    pub fn request_duration(&self, arm: Option<ArmId>) -> usize {
        self.duration_base() + self.backend_index(arm)
    }

    pub fn time_to_first_byte(&self, arm: Option<ArmId>) -> usize {
        self.ttfb_base() + self.backend_index(arm)
    }

    /// Every metric `(kind, stat name)`, in table order.
    pub fn definitions(&self, plan: &Plan) -> Vec<(Kind, String)> {
        let mut defs = Vec::with_capacity(self.len());
        let backend = |i: usize| plan.arm_label(Some(ArmId(i)).filter(|a| a.0 < self.arms));
        for arm in 0..self.arms {
            for source in Source::ALL {
                let tags = [
                    (label::BACKEND, backend(arm)),
                    (label::SOURCE, source.label()),
                ];
                defs.push((Kind::Counter, stat_name(REQUESTS, &tags)));
            }
        }
        let none = [
            (label::BACKEND, backend(self.arms)),
            (label::SOURCE, SOURCE_NONE),
        ];
        defs.push((Kind::Counter, stat_name(REQUESTS, &none)));
        for b in 0..self.backends() {
            for class in CodeClass::ALL {
                let tags = [
                    (label::BACKEND, backend(b)),
                    (label::CODE_CLASS, class.label()),
                ];
                defs.push((Kind::Counter, stat_name(RESPONSES, &tags)));
            }
        }
        for rejection in Rejection::ALL {
            let tags = [(label::REASON, rejection.code())];
            defs.push((Kind::Counter, stat_name(REJECTED, &tags)));
        }
        for why in Invalid::ALL {
            let tags = [(label::REASON, why.label())];
            defs.push((Kind::Counter, stat_name(INVALID_VALUES, &tags)));
        }
        for metric in [REQUEST_DURATION, TIME_TO_FIRST_BYTE] {
            for b in 0..self.backends() {
                defs.push((
                    Kind::Histogram,
                    stat_name(metric, &[(label::BACKEND, backend(b))]),
                ));
            }
        }
        let served_kinds: Vec<Served> = (0..self.arms)
            .map(|a| Served::Arm(ArmId(a)))
            .chain([Served::Unknown, Served::None])
            .collect();
        for requested in 0..self.backends() {
            for served in &served_kinds {
                let tags = [
                    (label::REQUESTED, backend(requested)),
                    (label::SERVED, served.label(plan)),
                ];
                defs.push((Kind::Counter, stat_name(SERVED, &tags)));
            }
        }
        for arm in 0..self.arms {
            defs.push((
                Kind::Counter,
                stat_name(UNAVAILABLE, &[(label::BACKEND, backend(arm))]),
            ));
        }
        for result in FetchResult::ALL {
            defs.push((
                Kind::Counter,
                stat_name(MAP_FETCHES, &[(label::RESULT, result.label())]),
            ));
        }
        for result in ReportResult::ALL {
            defs.push((
                Kind::Counter,
                stat_name(REPORTS, &[(label::RESULT, result.label())]),
            ));
        }
        defs.push((Kind::Gauge, MAP_AGE.to_owned()));
        defs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn stat_names_carry_istio_style_tag_segments() {
        assert_eq!(
            stat_name(
                REQUESTS,
                &[(label::BACKEND, "fs"), (label::SOURCE, "split")]
            ),
            "backend=.=fs;.;source=.=split;.;kvab_requests_total"
        );
    }

    #[test]
    fn every_lookup_points_at_the_matching_definition() {
        let plan = parse(br#"{"arms":[{"name":"a"},{"name":"b"},{"name":"c"}]}"#).unwrap();
        let layout = MetricLayout::new(&plan);
        let defs = layout.definitions(&plan);
        assert_eq!(defs.len(), layout.len());
        let name = |i: usize| defs[i].1.as_str();
        let arms = [Some(ArmId(0)), Some(ArmId(1)), Some(ArmId(2)), None];
        let labels = ["a", "b", "c", "none"];
        for (arm, label) in arms.iter().zip(labels) {
            if let Some(a) = arm {
                for source in Source::ALL {
                    let expected = stat_name(
                        REQUESTS,
                        &[(label::BACKEND, label), (label::SOURCE, source.label())],
                    );
                    assert_eq!(name(layout.requests(Some((*a, source)))), expected);
                }
            }
            for class in CodeClass::ALL {
                let expected = stat_name(
                    RESPONSES,
                    &[(label::BACKEND, label), (label::CODE_CLASS, class.label())],
                );
                assert_eq!(name(layout.responses(*arm, class)), expected);
            }
            let d = stat_name(REQUEST_DURATION, &[(label::BACKEND, label)]);
            assert_eq!(name(layout.request_duration(*arm)), d);
            assert_eq!(defs[layout.request_duration(*arm)].0, Kind::Histogram);
            let t = stat_name(TIME_TO_FIRST_BYTE, &[(label::BACKEND, label)]);
            assert_eq!(name(layout.time_to_first_byte(*arm)), t);
        }
        assert_eq!(
            name(layout.requests(None)),
            "backend=.=none;.;source=.=none;.;kvab_requests_total"
        );
        for r in Rejection::ALL {
            assert_eq!(
                name(layout.rejected(r)),
                stat_name(REJECTED, &[(label::REASON, r.code())])
            );
        }
        for i in Invalid::ALL {
            assert_eq!(
                name(layout.invalid_values(i)),
                stat_name(INVALID_VALUES, &[(label::REASON, i.label())])
            );
        }
        for requested in arms {
            for served in [
                Served::Arm(ArmId(0)),
                Served::Arm(ArmId(2)),
                Served::Unknown,
                Served::None,
            ] {
                let expected = stat_name(
                    SERVED,
                    &[
                        (label::REQUESTED, plan.arm_label(requested)),
                        (label::SERVED, served.label(&plan)),
                    ],
                );
                assert_eq!(name(layout.served(requested, served)), expected);
            }
        }
        assert_eq!(
            name(layout.unavailable(ArmId(1))),
            stat_name(UNAVAILABLE, &[(label::BACKEND, "b")])
        );
        for r in FetchResult::ALL {
            assert_eq!(
                name(layout.map_fetches(r)),
                stat_name(MAP_FETCHES, &[(label::RESULT, r.label())])
            );
        }
        for r in ReportResult::ALL {
            assert_eq!(
                name(layout.reports(r)),
                stat_name(REPORTS, &[(label::RESULT, r.label())])
            );
        }
        assert_eq!(name(layout.map_age()), MAP_AGE);
        assert_eq!(defs[layout.map_age()].0, Kind::Gauge);
        // Every definition is distinct: no two lookups share a stat.
        let mut names: Vec<&str> = defs.iter().map(|(_, n)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), defs.len());
    }

    #[test]
    fn status_codes_fall_into_classes() {
        assert_eq!(CodeClass::of(200).label(), "2xx");
        assert_eq!(CodeClass::of(404).label(), "4xx");
        assert_eq!(CodeClass::of(503).label(), "5xx");
        assert_eq!(CodeClass::of(101).label(), "1xx");
        assert_eq!(CodeClass::of(302).label(), "3xx");
        assert_eq!(CodeClass::of(0).label(), "none");
        assert_eq!(CodeClass::of(600).label(), "none");
    }
}
