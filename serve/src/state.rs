//! Shared state between the sources, the prober, the report ledger and the HTTP layer: the published
//! endpoint-map snapshot, readiness inputs, the latest probe results and the saved routing counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::Timestamp;
use kvab_contract::Endpoint;

use crate::index::View;
use crate::metrics::{Metrics, Scrape};
use crate::published::{ProbeResult, RoutedCounts, Snapshot};

#[derive(Debug, Default)]
struct WatchHealth {
    failing_since: Option<Instant>,
}

pub struct State {
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    draining: AtomicBool,
    watch_health: Mutex<WatchHealth>,
    unready_after: Duration,
    probes: Mutex<BTreeMap<(String, String), ProbeResult>>,
    routed: RwLock<Arc<RoutedCounts>>,
    pub metrics: Metrics,
}

/// Ignores lock poisoning: every writer leaves the data consistent before anything can panic.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stable across processes and releases, so a restarted sidecar with the same content keeps the same ETag
/// and the filter's cached copy stays valid.
fn content_hash(bytes: &[u8]) -> String {
    format!("{:016x}", kvab_contract::fnv1a_64(bytes))
}

/// The JSON of an `EndpointMap`, reusing the already serialized `backends` (the bulk of the body at 10k pods)
/// instead of serializing them a second time. A test pins it to the serde form of the contract type.
fn endpoint_map_json(
    version: &str,
    generated_at: &str,
    backends_json: &[u8],
) -> serde_json::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(backends_json.len() + 100);
    body.extend_from_slice(b"{\"version\":");
    serde_json::to_writer(&mut body, version)?;
    body.extend_from_slice(b",\"generated_at\":");
    serde_json::to_writer(&mut body, generated_at)?;
    body.extend_from_slice(b",\"backends\":");
    body.extend_from_slice(backends_json);
    body.push(b'}');
    Ok(body)
}

impl State {
    pub fn new(unready_after: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            snapshot: RwLock::new(None),
            draining: AtomicBool::new(false),
            watch_health: Mutex::new(WatchHealth::default()),
            unready_after,
            probes: Mutex::new(BTreeMap::new()),
            routed: RwLock::new(Arc::default()),
            metrics: Metrics::new()?,
        })
    }

    /// The current map, or `None` before the first full sync.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Publishes a view after a full sync or a change. The body, version and `generated_at` are kept when the
    /// served content (`backends`) did not change, so the ETag changes exactly when the content does.
    pub fn publish(&self, view: View, last_sync: Timestamp) -> anyhow::Result<()> {
        let backends_json = serde_json::to_vec(&view.backends)?;
        let version = content_hash(&backends_json);
        let mut slot = self
            .snapshot
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (generation, generated_at, body) = match slot.as_ref() {
            Some(current) if current.version == version => (
                current.generation,
                current.generated_at,
                current.body.clone(),
            ),
            current => {
                let generated_at = Timestamp::now();
                let generation = current.map_or(1, |c| c.generation + 1);
                let body = endpoint_map_json(&version, &generated_at.to_string(), &backends_json)?;
                (generation, generated_at, Bytes::from(body))
            }
        };
        let endpoints: Vec<(String, Endpoint)> = view
            .backends
            .into_iter()
            .flat_map(|(arm, backend)| backend.endpoints.into_iter().map(move |e| (arm.clone(), e)))
            .collect();
        let pod_by_address = endpoints
            .iter()
            .map(|(_, e)| (e.address.clone(), e.pod.clone()))
            .collect();
        *slot = Some(Arc::new(Snapshot {
            etag: format!("\"{version}\""),
            version,
            generation,
            generated_at,
            body,
            endpoints,
            pod_by_address,
            counts: view.counts,
            missing_label: view.missing_label,
            unknown_arm: view.unknown_arm,
            last_sync,
        }));
        Ok(())
    }

    /// Readiness flips to false first on shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn watch_failed(&self) {
        lock(&self.watch_health)
            .failing_since
            .get_or_insert_with(Instant::now);
    }

    pub fn watch_succeeded(&self) {
        lock(&self.watch_health).failing_since = None;
    }

    pub fn watch_failing(&self) -> bool {
        lock(&self.watch_health).failing_since.is_some()
    }

    /// The watch is healthy unless it has failed continuously for longer than `unready_after`: a single
    /// dropped connection that the watcher retries must not take the sidecar out of service.
    pub fn watch_healthy(&self) -> bool {
        lock(&self.watch_health)
            .failing_since
            .is_none_or(|since| since.elapsed() <= self.unready_after)
    }

    /// Why the sidecar is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<(&'static str, &'static str)> {
        if self.draining() {
            Some(("shutting_down", "the sidecar is shutting down"))
        } else if self.snapshot().is_none() {
            Some((
                "not_synced",
                "the endpoint map has not completed its first full sync",
            ))
        } else if !self.watch_healthy() {
            Some((
                "watch_failing",
                "the Kubernetes watch has been failing; the map may be stale",
            ))
        } else {
            None
        }
    }

    pub fn set_probe_results(&self, results: BTreeMap<(String, String), ProbeResult>) {
        *lock(&self.probes) = results;
    }

    pub fn probe_results(&self) -> BTreeMap<(String, String), ProbeResult> {
        lock(&self.probes).clone()
    }

    /// Makes saved routing counts visible. Synchronous: nothing can stop it half done.
    pub fn publish_routed(&self, routed: RoutedCounts) {
        *self
            .routed
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(routed);
    }

    pub fn routed(&self) -> Arc<RoutedCounts> {
        self.routed
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// `/metrics`: the counters, and the gauges computed from the current snapshot, probes and ledger.
    pub fn render_metrics(&self) -> anyhow::Result<Vec<u8>> {
        let snapshot = self.snapshot();
        let probes = self.probe_results();
        let routed = self.routed();
        self.metrics.render(&Scrape {
            ready: self.not_ready_reason().is_none(),
            snapshot: snapshot.as_deref(),
            probes: &probes,
            routed: &routed,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kvab_contract::EndpointMap;

    use super::*;
    use crate::index::{Index, Proxy};

    fn view_with(address: Option<&str>, missing: bool) -> View {
        let mut index = Index::new(&["nvlink".to_string(), "fs".to_string()]);
        if let Some(address) = address {
            index.apply(Proxy {
                namespace: "ns".into(),
                name: "p".into(),
                backend: Some("fs".into()),
                address: Some(address.into()),
                ready: true,
            });
        }
        if missing {
            index.apply(Proxy {
                namespace: "ns".into(),
                name: "bare".into(),
                backend: None,
                address: None,
                ready: false,
            });
        }
        index.view()
    }

    #[test]
    fn version_and_body_change_only_with_content() {
        let state = State::new(Duration::from_secs(30)).unwrap();
        assert!(state.snapshot().is_none());
        state
            .publish(view_with(Some("10.0.0.1:1"), false), Timestamp::now())
            .unwrap();
        let first = state.snapshot().unwrap();
        assert_eq!(first.generation, 1);
        assert_eq!(first.etag, format!("\"{}\"", first.version));

        // Same backends, different unlabeled count: same body and ETag, new counts.
        state
            .publish(view_with(Some("10.0.0.1:1"), true), Timestamp::now())
            .unwrap();
        let same = state.snapshot().unwrap();
        assert_eq!(
            (same.version.as_str(), same.generation),
            (first.version.as_str(), 1)
        );
        assert_eq!(same.body, first.body);
        assert_eq!(same.missing_label, 1);

        state
            .publish(view_with(Some("10.0.0.2:1"), false), Timestamp::now())
            .unwrap();
        let changed = state.snapshot().unwrap();
        assert_ne!(changed.version, first.version);
        assert_eq!(changed.generation, 2);
        let map: EndpointMap = serde_json::from_slice(&changed.body).unwrap();
        assert_eq!(map.version, changed.version);
        assert_eq!(map.backends["fs"].endpoints[0].address, "10.0.0.2:1");
        assert!(map.backends["nvlink"].endpoints.is_empty());
    }

    #[test]
    fn body_is_exactly_the_serde_form_of_the_contract_type() {
        let state = State::new(Duration::from_secs(30)).unwrap();
        state
            .publish(view_with(Some("10.0.0.1:1"), false), Timestamp::now())
            .unwrap();
        let snapshot = state.snapshot().unwrap();
        let map: EndpointMap = serde_json::from_slice(&snapshot.body).unwrap();
        assert_eq!(serde_json::to_vec(&map).unwrap(), snapshot.body.to_vec());
    }

    #[test]
    fn content_hash_is_stable() {
        // Pinned so that a change of hash (and so of every ETag after an upgrade) is a deliberate decision.
        assert_eq!(content_hash(b""), "cbf29ce484222325");
        assert_eq!(content_hash(b"a"), "af63dc4c8601ec8c");
    }

    #[test]
    fn readiness_needs_sync_and_a_healthy_watch_and_flips_on_drain() {
        let state = State::new(Duration::ZERO).unwrap();
        assert_eq!(state.not_ready_reason().unwrap().0, "not_synced");
        state
            .publish(view_with(None, false), Timestamp::now())
            .unwrap();
        assert_eq!(state.not_ready_reason(), None);
        state.watch_failed();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(state.not_ready_reason().unwrap().0, "watch_failing");
        state.watch_succeeded();
        assert_eq!(state.not_ready_reason(), None);
        state.start_draining();
        assert_eq!(state.not_ready_reason().unwrap().0, "shutting_down");
    }
}
