//! Prometheus metrics. Counters are incremented where things happen; gauges are recomputed from the current
//! snapshot and probe results at scrape time, so they cannot drift from what `/v1/endpoints` serves.
//! `kvab_routed_requests_total`, `kvab_reporters`, `kvab_retired_reporters` and `kvab_ledger_entries` are the saved report ledger itself, read at scrape
//! time: a count shows if and only if it is saved, and both saturate alike at 2^64-1.

use kvab_contract::metrics::{self, label};
use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::published::{ProbeResult, RoutedCounts, Snapshot};

/// What the gauges show at one scrape: values read once from the state, so the metrics depend on data, not
/// on where it is kept.
pub struct Scrape<'a> {
    pub ready: bool,
    pub snapshot: Option<&'a Snapshot>,
    pub probes: &'a BTreeMap<(String, String), ProbeResult>,
    pub routed: &'a RoutedCounts,
}

/// Values of `kvab_reports_received_total{result}`.
pub const REPORT_RESULTS: [&str; 9] = [
    "applied",
    "baselined",
    "duplicate",
    "stale",
    "invalid",
    "too_large",
    "unauthorized",
    "unsaved",
    "full",
];

/// The operations of `kvab_state_errors_total`.
pub const STATE_OPS: [&str; 4] = ["append", "compact", "cleanup", "open"];

pub struct Metrics {
    registry: Registry,
    /// Serializes "recompute gauges, then gather" so two scrapes cannot interleave.
    scrape: Mutex<()>,
    backend_endpoints: IntGaugeVec,
    unlabeled_proxies: IntGaugeVec,
    proxy_metrics_up: IntGaugeVec,
    proxy_metrics_status_code: IntGaugeVec,
    map_generation: IntGauge,
    map_last_change: Gauge,
    last_sync: Gauge,
    ready: IntGauge,
    pub watch_events: IntCounterVec,
    pub watch_errors: IntCounter,
    pub watch_skipped_objects: IntCounter,
    pub http_requests: IntCounterVec,
    pub http_panics: IntCounterVec,
    pub http_connections_evicted: IntCounterVec,
    routed_requests: IntCounterVec,
    pub reports_received: IntCounterVec,
    reporters: IntGauge,
    retired_reporters: IntGauge,
    ledger_entries: IntGauge,
    reporters_limit: IntGauge,
    ledger_entries_limit: IntGauge,
    pub shared_reporter_ids: IntCounter,
    pub state_write_errors: IntCounter,
    pub state_errors: IntCounterVec,
    pub state_damaged: IntGauge,
    pub state_unavailable: IntGauge,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Self {
            backend_endpoints: register(r, IntGaugeVec::new(
                Opts::new("kvab_backend_endpoints", "Proxy endpoints per arm (backend) and state (ready, not_ready)."),
                &["backend", "state"],
            )?)?,
            unlabeled_proxies: register(r, IntGaugeVec::new(
                Opts::new(
                    "kvab_unlabeled_proxies",
                    "Pods matching the proxy selector that are not in the map: reason=missing_label (no backend label) or unknown_backend (value is not a configured arm).",
                ),
                &["reason"],
            )?)?,
            proxy_metrics_up: register(r, IntGaugeVec::new(
                Opts::new("kvab_proxy_metrics_up", "1 if the last GET of the endpoint's metrics path answered 200, else 0."),
                &["backend", "pod"],
            )?)?,
            proxy_metrics_status_code: register(r, IntGaugeVec::new(
                Opts::new(
                    "kvab_proxy_metrics_status_code",
                    "HTTP status of the last GET of the endpoint's metrics path; 0 when no HTTP answer came.",
                ),
                &["backend", "pod"],
            )?)?,
            map_generation: register(r, IntGauge::new(
                "kvab_endpoint_map_generation",
                "Number of distinct endpoint-map contents published since start (0 before the first sync).",
            )?)?,
            map_last_change: register(r, Gauge::new(
                "kvab_endpoint_map_last_change_timestamp_seconds",
                "Unix time at which the served endpoint-map content last changed.",
            )?)?,
            last_sync: register(r, Gauge::new(
                "kvab_last_sync_timestamp_seconds",
                "Unix time of the last full sync of the source (Kubernetes relist, or static load).",
            )?)?,
            ready: register(r, IntGauge::new("kvab_ready", "1 when /readyz answers 200, else 0.")?)?,
            watch_events: register(r, IntCounterVec::new(
                Opts::new("kvab_watch_events_total", "Kubernetes watch events by kind (init, init_apply, init_done, apply, delete)."),
                &["kind"],
            )?)?,
            watch_errors: register(r, IntCounter::new(
                "kvab_watch_errors_total",
                "Errors from the Kubernetes watch (each is retried with backoff).",
            )?)?,
            watch_skipped_objects: register(r, IntCounter::new(
                "kvab_watch_skipped_objects_total",
                "Watched objects that could not be read as pods and were left out of the map.",
            )?)?,
            http_requests: register(r, IntCounterVec::new(
                Opts::new("kvab_http_requests_total", "HTTP requests served, by route and status code."),
                &["route", "code"],
            )?)?,
            http_panics: register(r, IntCounterVec::new(
                Opts::new(
                    "kvab_http_panics_total",
                    "Panics caught while answering a request (stage=request: answered 500) or serving a connection (stage=connection: that connection closed); the process kept serving. Any is a bug: report it with the log line.",
                ),
                &["stage"],
            )?)?,
            http_connections_evicted: register(r, IntCounterVec::new(
                Opts::new(
                    "kvab_http_connections_evicted_total",
                    "Connections closed at a listener's connection cap to admit a new one: the one idle longest (no request in flight), by listener (api, probes).",
                ),
                &["listener"],
            )?)?,
            routed_requests: register(r, IntCounterVec::new(
                Opts::new(
                    metrics::ROUTED_REQUESTS,
                    "Requests through the gateway as reported by the kvab filter: the arm requested, the arm that served (per the endpoint map; unknown, or none when no upstream answered), the proxy pod that served (unknown when not in the map) and the status class.",
                ),
                &[label::REQUESTED, label::SERVED, label::POD, label::CODE_CLASS],
            )?)?,
            reports_received: register(r, IntCounterVec::new(
                Opts::new(
                    "kvab_reports_received_total",
                    "Filter reports received, by result: applied, baselined, duplicate, stale, invalid, too_large, unauthorized, unsaved (the state file could not be written: 503, nothing changed), full (the ledger is at reports.max_reporters or reports.max_entries: 507, nothing changed).",
                ),
                &["result"],
            )?)?,
            reporters: register(r, IntGauge::new(
                "kvab_reporters",
                "Filter VMs (reporters) whose totals the sidecar keeps.",
            )?)?,
            retired_reporters: register(r, IntGauge::new(
                "kvab_retired_reporters",
                "Filter VMs retired after reports.retire_after_seconds without a report: their counts stay, their totals are dropped, and a report from one again is a starting point.",
            )?)?,
            ledger_entries: register(r, IntGauge::new(
                "kvab_ledger_entries",
                "Per-reporter totals the report ledger holds, all reporters together (against kvab_ledger_entries_limit).",
            )?)?,
            reporters_limit: register(r, IntGauge::new(
                "kvab_reporters_limit",
                "reports.max_reporters: reporters the ledger holds at most; a report from one more is answered 507 ledger_full.",
            )?)?,
            ledger_entries_limit: register(r, IntGauge::new(
                "kvab_ledger_entries_limit",
                "reports.max_entries: per-reporter totals the ledger holds at most; a report that would add more is answered 507 ledger_full.",
            )?)?,
            shared_reporter_ids: register(r, IntCounter::new(
                "kvab_shared_reporter_ids_total",
                "Reporter ids found used by two or more filter VMs at once (repeated regressions, or repeated stale or duplicate reports); each is also logged.",
            )?)?,
            state_write_errors: register(r, IntCounter::new(
                "kvab_state_write_errors_total",
                "Failed writes of the report state (reports.state_file): appends of reports and compactions.",
            )?)?,
            state_errors: register(r, IntCounterVec::new(
                Opts::new(
                    "kvab_state_errors_total",
                    "Failures on the report state by operation: append (a batch answered 503), compact (a new journal or snapshot could not be written; put off), cleanup (an old journal or a temporary file could not be removed), open (the state could not be opened at start).",
                ),
                &["op"],
            )?)?,
            state_damaged: register(r, IntGauge::new(
                "kvab_state_damaged",
                "1 while the report state files do not read (checksum, gap, missing snapshot): counts are not restored and reports answer 503 state_damaged until the files are restored or kvab serve runs with --repair-state.",
            )?)?,
            state_unavailable: register(r, IntGauge::new(
                "kvab_state_unavailable",
                "1 while the report state could not be opened at start (permissions, a full disk; see the log): reports answer 503 state_unavailable until a restart opens it.",
            )?)?,
            scrape: Mutex::new(()),
            registry,
        };
        // Every result exists from the start, at zero: rate() and increase() need a first sample.
        for result in REPORT_RESULTS {
            metrics.reports_received.with_label_values(&[result]);
        }
        for op in STATE_OPS {
            metrics.state_errors.with_label_values(&[op]);
        }
        for stage in ["request", "connection"] {
            metrics.http_panics.with_label_values(&[stage]);
        }
        for listener in ["api", "probes"] {
            metrics
                .http_connections_evicted
                .with_label_values(&[listener]);
        }
        Ok(metrics)
    }

    /// Recomputes the gauges from `scrape` and returns the text exposition format.
    pub fn render(&self, scrape: &Scrape) -> anyhow::Result<Vec<u8>> {
        let _guard = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.backend_endpoints.reset();
        self.unlabeled_proxies.reset();
        self.proxy_metrics_up.reset();
        self.proxy_metrics_status_code.reset();
        self.ready.set(i64::from(scrape.ready));
        if let Some(snapshot) = scrape.snapshot {
            for (arm, counts) in &snapshot.counts {
                self.backend_endpoints
                    .with_label_values(&[arm.as_str(), "ready"])
                    .set(gauge_value(counts.ready));
                self.backend_endpoints
                    .with_label_values(&[arm.as_str(), "not_ready"])
                    .set(gauge_value(counts.not_ready));
            }
            self.unlabeled_proxies
                .with_label_values(&["missing_label"])
                .set(gauge_value(snapshot.missing_label));
            self.unlabeled_proxies
                .with_label_values(&["unknown_backend"])
                .set(gauge_value(snapshot.unknown_arm));
            self.map_generation
                .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
            self.map_last_change
                .set(snapshot.generated_at.as_millisecond() as f64 / 1000.0);
            self.last_sync
                .set(snapshot.last_sync.as_millisecond() as f64 / 1000.0);
        }
        for ((arm, pod), result) in scrape.probes {
            let labels = [arm.as_str(), pod.as_str()];
            self.proxy_metrics_up
                .with_label_values(&labels)
                .set(i64::from(result.up()));
            self.proxy_metrics_status_code
                .with_label_values(&labels)
                .set(i64::from(result.status.unwrap_or(0)));
        }
        self.routed_requests.reset();
        let routed = scrape.routed;
        for (key, count) in &routed.counters {
            self.routed_requests
                .with_label_values(&[&key.requested, &key.served, &key.pod, &key.code_class])
                .inc_by(*count);
        }
        self.reporters.set(gauge_value(routed.reporters));
        self.retired_reporters.set(gauge_value(routed.retired));
        self.ledger_entries.set(gauge_value(routed.entries));
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }
}

impl Metrics {
    /// The ledger's caps, set once at start.
    pub fn set_ledger_limits(&self, limits: &kvab_ledger::Limits) {
        self.reporters_limit.set(gauge_value(limits.max_reporters));
        self.ledger_entries_limit
            .set(gauge_value(limits.max_entries));
    }
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::index::{Index, Proxy};
    use crate::state::State;

    #[test]
    fn gauges_follow_the_snapshot_and_probes() {
        let state = State::new(Duration::from_secs(30)).unwrap();
        let before = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        assert!(before.contains("kvab_ready 0"), "{before}");
        assert!(
            !before.contains("kvab_backend_endpoints{"),
            "no per-arm gauges before the first sync"
        );

        let mut index = Index::new(&["nvlink".to_string(), "fs".to_string()]);
        index.apply(Proxy {
            namespace: "ns".into(),
            name: "p2p".into(),
            backend: Some("nvlink".into()),
            address: Some("10.0.0.1:8080".into()),
            ready: true,
        });
        index.apply(Proxy {
            namespace: "ns".into(),
            name: "odd".into(),
            backend: Some("p2p".into()),
            address: None,
            ready: false,
        });
        state.publish(index.view(), jiff::Timestamp::now()).unwrap();
        state.set_probe_results(BTreeMap::from([(
            ("nvlink".into(), "ns/p2p".into()),
            ProbeResult { status: Some(404) },
        )]));
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        for line in [
            "kvab_ready 1",
            "kvab_backend_endpoints{backend=\"nvlink\",state=\"ready\"} 1",
            "kvab_backend_endpoints{backend=\"fs\",state=\"ready\"} 0",
            "kvab_unlabeled_proxies{reason=\"unknown_backend\"} 1",
            "kvab_unlabeled_proxies{reason=\"missing_label\"} 0",
            "kvab_proxy_metrics_up{backend=\"nvlink\",pod=\"ns/p2p\"} 0",
            "kvab_proxy_metrics_status_code{backend=\"nvlink\",pod=\"ns/p2p\"} 404",
            "kvab_endpoint_map_generation 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }

        // A pod that left the map disappears from the probe gauges at the next scrape.
        state.set_probe_results(BTreeMap::new());
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        assert!(!text.contains("kvab_proxy_metrics_up{"), "{text}");
    }
}
