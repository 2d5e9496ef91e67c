//! The metric names and label keys that readers rely on: the filter's (on Envoy's `/stats/prometheus`) and
//! `kvab serve`'s routed counter. The filter defines its metrics with these names, `kvab serve` exports
//! its counter with them, and `kvab analyze` and `kvab check` query them by them (docs/observability.md
//! lists every metric).

/// Requests by the arm they went to and how it was chosen (`backend`, `source`).
pub const REQUESTS: &str = "kvab_requests_total";
/// Responses by arm, how it was chosen and status class (`backend`, `source`, `code_class`).
pub const RESPONSES: &str = "kvab_responses_total";
pub const REJECTED: &str = "kvab_rejected_total";
pub const INVALID_VALUES: &str = "kvab_invalid_values_total";
/// Histogram: request start to end of the answer, per arm and whether the split's draw chose it (`backend`,
/// `source`: `split` or `other`, see [`source::OTHER`]); answered requests only (status 1xx to 4xx): failures
/// are counted by `RESPONSES`.
pub const REQUEST_DURATION: &str = "kvab_request_duration_milliseconds";
/// Histogram: request start to the first response body byte, per arm and whether the split's draw chose it
/// (`backend`, `source`: `split` or `other`); answered requests only, as `REQUEST_DURATION`.
pub const TIME_TO_FIRST_BYTE: &str = "kvab_time_to_first_byte_milliseconds";
/// Answers by the arm requested and the arm whose endpoint served it (`requested`, `served`).
pub const SERVED: &str = "kvab_served_total";
pub const UNAVAILABLE: &str = "kvab_unavailable_total";
pub const MAP_FETCHES: &str = "kvab_endpoint_map_fetches_total";
pub const MAP_AGE: &str = "kvab_endpoint_map_age_seconds";
pub const REPORTS: &str = "kvab_reports_total";

/// The bucket series of `REQUEST_DURATION` and `TIME_TO_FIRST_BYTE` (Prometheus appends `_bucket`).
pub const REQUEST_DURATION_BUCKET: &str = "kvab_request_duration_milliseconds_bucket";
pub const TIME_TO_FIRST_BYTE_BUCKET: &str = "kvab_time_to_first_byte_milliseconds_bucket";

/// `kvab serve`: requests routed, from the filters' reports (`requested`, `served`, `pod`, `code_class`).
pub const ROUTED_REQUESTS: &str = "kvab_routed_requests_total";

/// Label keys.
pub mod label {
    /// The arm a request went to (the filter's request and latency metrics).
    pub const BACKEND: &str = "backend";
    /// How the arm was chosen: the values of [`super::source`].
    pub const SOURCE: &str = "source";
    /// `1xx` … `5xx`, or `none` when no status came.
    pub const CODE_CLASS: &str = "code_class";
    pub const REASON: &str = "reason";
    /// The arm asked for, and the arm whose endpoint answered.
    pub const REQUESTED: &str = "requested";
    pub const SERVED: &str = "served";
    pub const RESULT: &str = "result";
    /// `namespace/name` of the proxy pod (`kvab serve`'s metrics).
    pub const POD: &str = "pod";
}

/// The values of the `source` label (and of the source header the filter sets upstream): how a request's
/// arm was chosen.
pub mod source {
    /// The arm header named a configured arm.
    pub const HEADER: &str = "header";
    /// The arm header named one of an arm's aliases.
    pub const ALIAS: &str = "alias";
    /// Assigned by the split with a random draw, request by request: the one source a randomized comparison
    /// of requests may use.
    pub const SPLIT: &str = "split";
    /// Assigned by the split from the key header's value (`split.keyHeader`): every request of a key goes to
    /// the same arm, so the key, not the request, is the unit of randomization.
    pub const KEY: &str = "key";
    /// `onMissing: default`, or `onUnknown: default`.
    pub const DEFAULT: &str = "default";
    /// An untagged request (`backend="none"`).
    pub const NONE: &str = "none";
    /// On the latency histograms only: a tagged request not assigned by the split's random draw (`header`,
    /// `alias`, `key` or `default`). The histograms tell the randomized requests from the rest and no more,
    /// which keeps their series per gateway pod at 2 per arm plus one (docs/observability.md).
    pub const OTHER: &str = "other";
}

/// Status classes of a failed request: a 5xx, or no response status at all (reset, timeout). The error
/// rates count them; the latency histograms leave them out.
pub const FAILED_CODE_CLASSES: [&str; 2] = ["5xx", crate::report::NO_CODE_CLASS];

/// The filter's tag names, for Envoy's `stats_tags` / Istio's `extraStatTags`.
pub const FILTER_TAGS: [&str; 7] = [
    label::BACKEND,
    label::SOURCE,
    label::CODE_CLASS,
    label::REASON,
    label::REQUESTED,
    label::SERVED,
    label::RESULT,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_series_are_the_histograms_names_with_bucket() {
        assert_eq!(
            REQUEST_DURATION_BUCKET,
            format!("{REQUEST_DURATION}_bucket")
        );
        assert_eq!(
            TIME_TO_FIRST_BYTE_BUCKET,
            format!("{TIME_TO_FIRST_BYTE}_bucket")
        );
    }
}
