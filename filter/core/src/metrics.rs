//! Metric names and the layout of the metric table the host defines once per configuration.
//!
//! The proxy-wasm ABI has no labels, so labels travel in the stat name as Istio's tag segments,
//! `<tag>=.=<value>;.;`, followed by the metric name. Envoy's `stats_tags` regexes
//! `(<tag>=\.=(.*?);\.;)` (our bootstrap; Istio's `extraStatTags`) cut them back out, so
//! `/stats/prometheus` shows `kvab_requests_total{backend="nvlink",source="header"}`.

use crate::endpoints::Served;
use crate::plan::{ArmId, Invalid, Plan, Rejection, Source};

// The names and label keys are the contract's: `kvab analyze` and `kvab check` read them by the same names.
use kvab_contract::metrics::{
    label,
    source::{self as source_label, NONE as SOURCE_NONE},
};
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

    /// An answer: any status but a 5xx, and a status at all (the contract's `FAILED_CODE_CLASSES` are the
    /// others). Only answered requests are timed.
    pub fn answered(self) -> bool {
        !matches!(self, CodeClass::C5xx | CodeClass::None)
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
/// The latency histograms' `source` values: the split's draw, or any other way (contract `source::OTHER`).
const TIMING_SOURCES: [&str; 2] = [source_label::SPLIT, source_label::OTHER];
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

    /// Tags are (arm, source) for every arm and source, then the untagged (`none`, `none`).
    fn tags(&self) -> usize {
        self.arms * SOURCES + 1
    }

    fn tag_index(&self, tagged: Option<(ArmId, Source)>) -> usize {
        match tagged {
            Some((arm, source)) if arm.0 < self.arms => arm.0 * SOURCES + source as usize,
            _ => self.arms * SOURCES,
        }
    }

    fn requests_base(&self) -> usize {
        0
    }
    fn responses_base(&self) -> usize {
        self.requests_base() + self.tags()
    }
    fn rejected_base(&self) -> usize {
        self.responses_base() + self.tags() * CLASSES
    }
    fn invalid_base(&self) -> usize {
        self.rejected_base() + Rejection::ALL.len()
    }
    fn duration_base(&self) -> usize {
        self.invalid_base() + Invalid::ALL.len()
    }
    fn ttfb_base(&self) -> usize {
        self.duration_base() + self.timings()
    }

    /// The latency histograms' tags: (arm, `split`) and (arm, `other`) for every arm, then the untagged.
    fn timings(&self) -> usize {
        self.arms * TIMING_SOURCES.len() + 1
    }

    fn timing_index(&self, tagged: Option<(ArmId, Source)>) -> usize {
        match tagged {
            Some((arm, source)) if arm.0 < self.arms => {
                arm.0 * TIMING_SOURCES.len() + usize::from(source != Source::Split)
            }
            _ => self.arms * TIMING_SOURCES.len(),
        }
    }

    fn served_base(&self) -> usize {
        self.ttfb_base() + self.timings()
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
        self.requests_base() + self.tag_index(tagged)
    }

    /// `kvab_responses_total{backend,source,code_class}`.
    pub fn responses(&self, tagged: Option<(ArmId, Source)>, class: CodeClass) -> usize {
        self.responses_base() + self.tag_index(tagged) * CLASSES + class.index()
    }

    pub fn rejected(&self, rejection: Rejection) -> usize {
        self.rejected_base() + rejection as usize
    }

    pub fn invalid_values(&self, why: Invalid) -> usize {
        self.invalid_base() + why as usize
    }

    /// `kvab_request_duration_milliseconds{backend,source}`, `source` being `split` or `other`.
    pub fn request_duration(&self, tagged: Option<(ArmId, Source)>) -> usize {
        self.duration_base() + self.timing_index(tagged)
    }

    /// `kvab_time_to_first_byte_milliseconds{backend,source}`, as `request_duration`.
    pub fn time_to_first_byte(&self, tagged: Option<(ArmId, Source)>) -> usize {
        self.ttfb_base() + self.timing_index(tagged)
    }

    /// `(backend, source)` label pairs: every arm with each of `sources` in turn, then the untagged
    /// (`none`, `none`): the order of `tag_index` and `timing_index`.
    fn tag_list<'p>(&self, plan: &'p Plan, sources: &[&'p str]) -> Vec<[(&'p str, &'p str); 2]> {
        (0..self.arms)
            .flat_map(|arm| {
                let backend = plan.arm_label(Some(ArmId(arm)));
                sources
                    .iter()
                    .map(move |source| [(label::BACKEND, backend), (label::SOURCE, *source)])
            })
            .chain([[
                (label::BACKEND, plan.arm_label(None)),
                (label::SOURCE, SOURCE_NONE),
            ]])
            .collect()
    }

    /// Every metric `(kind, stat name)`, in table order.
    pub fn definitions(&self, plan: &Plan) -> Vec<(Kind, String)> {
        let mut defs = Vec::with_capacity(self.len());
        let backend = |i: usize| plan.arm_label(Some(ArmId(i)).filter(|a| a.0 < self.arms));
        // Every (backend, source) tag in `tag_index` order.
        let tags = self.tag_list(plan, &Source::ALL.map(Source::label));
        for tag in &tags {
            defs.push((Kind::Counter, stat_name(REQUESTS, tag)));
        }
        for tag in &tags {
            for class in CodeClass::ALL {
                let tags = [tag[0], tag[1], (label::CODE_CLASS, class.label())];
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
        // Every (backend, split|other) tag in `timing_index` order.
        let timings = self.tag_list(plan, &TIMING_SOURCES);
        for metric in [REQUEST_DURATION, TIME_TO_FIRST_BYTE] {
            for tag in &timings {
                defs.push((Kind::Histogram, stat_name(metric, tag)));
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
            let sources: Vec<(Option<(ArmId, Source)>, &str)> = match arm {
                Some(a) => Source::ALL
                    .iter()
                    .map(|s| (Some((*a, *s)), s.label()))
                    .collect(),
                None => vec![(None, "none")],
            };
            for (tagged, source) in sources {
                let tags = [(label::BACKEND, label), (label::SOURCE, source)];
                assert_eq!(name(layout.requests(tagged)), stat_name(REQUESTS, &tags));
                for class in CodeClass::ALL {
                    let expected = stat_name(
                        RESPONSES,
                        &[tags[0], tags[1], (label::CODE_CLASS, class.label())],
                    );
                    assert_eq!(name(layout.responses(tagged, class)), expected);
                }
                // The histograms tell the split's draw from the rest, and no more.
                let timing = match source {
                    "split" | "none" => source,
                    _ => "other",
                };
                let timing_tags = [(label::BACKEND, label), (label::SOURCE, timing)];
                let d = stat_name(REQUEST_DURATION, &timing_tags);
                assert_eq!(name(layout.request_duration(tagged)), d);
                assert_eq!(defs[layout.request_duration(tagged)].0, Kind::Histogram);
                let t = stat_name(TIME_TO_FIRST_BYTE, &timing_tags);
                assert_eq!(name(layout.time_to_first_byte(tagged)), t);
            }
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

    #[test]
    fn failures_are_the_contracts_failed_classes() {
        for class in CodeClass::ALL {
            let failed = kvab_contract::metrics::FAILED_CODE_CLASSES.contains(&class.label());
            assert_eq!(class.answered(), !failed, "{}", class.label());
        }
    }
}
