//! What the check reads besides responses: the sidecar's endpoint map and metrics, and the request counters
//! of the sidecar (`kvab_routed_requests_total`, reported by the filter) and of the filter itself (Envoy's
//! `kvab_served_total`). Counters are read before and after traffic; the difference is what the traffic did.

use kvab_contract::metrics;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvab_contract::EndpointMap;

use super::prom::{self, Sample};
use super::requests;
use kvab_serve::client::{HttpClient, Request};

pub struct SidecarView {
    pub map: Option<EndpointMap>,
    pub samples: Vec<Sample>,
    /// Why the map or the metrics could not be read.
    pub error: Option<String>,
}

impl SidecarView {
    pub async fn fetch(client: &HttpClient, url: &str) -> Self {
        let map = client.send(&requests::endpoint_map(url)).await;
        let metrics = client.send(&requests::metrics(url)).await;
        let mut error = None;
        let map = match map {
            Ok(e) if e.status == 200 => serde_json::from_slice(&e.body)
                .map_err(|err| {
                    error = Some(format!("{url}/v1/endpoints: not an endpoint map: {err}"))
                })
                .ok(),
            Ok(e) => {
                error = Some(format!("{url}/v1/endpoints answered {}", e.status));
                None
            }
            Err(e) => {
                error = Some(format!("{url}/v1/endpoints: {e}"));
                None
            }
        };
        let samples = match metrics {
            Ok(e) if e.status == 200 => prom::parse(&String::from_utf8_lossy(&e.body)),
            _ => Vec::new(),
        };
        Self {
            map,
            samples,
            error,
        }
    }

    /// Every endpoint of the map as (arm, pod, address, ready), in map order.
    pub fn endpoints(&self) -> Vec<(String, String, String, bool)> {
        self.map
            .iter()
            .flat_map(|m| m.backends.iter())
            .flat_map(|(arm, backend)| {
                backend
                    .endpoints
                    .iter()
                    .map(move |e| (arm.clone(), e.pod.clone(), e.address.clone(), e.ready))
            })
            .collect()
    }
}

/// (requested, served, pod, code_class) → requests.
pub type Routed = BTreeMap<(String, String, String, String), f64>;
/// (requested, served) → requests.
pub type Served = BTreeMap<(String, String), f64>;

/// Cumulative counters at one moment (or, after `since`, what happened in between).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// `None` when there is no sidecar to ask.
    pub routed: Option<Routed>,
    /// `None` when there is no Envoy admin to ask.
    pub served: Option<Served>,
}

impl Counters {
    pub async fn read(
        client: &HttpClient,
        sidecar: Option<&str>,
        envoy_admin: Option<&str>,
    ) -> Self {
        let mut counters = Counters::default();
        if let Some(url) = sidecar {
            if let Some(samples) = metrics(client, &requests::metrics(url)).await {
                let mut routed = Routed::new();
                for s in prom::select(&samples, metrics::ROUTED_REQUESTS, &[]) {
                    let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
                    *routed
                        .entry((
                            label(metrics::label::REQUESTED),
                            label(metrics::label::SERVED),
                            label(metrics::label::POD),
                            label(metrics::label::CODE_CLASS),
                        ))
                        .or_default() += s.value;
                }
                counters.routed = Some(routed);
            }
        }
        if let Some(url) = envoy_admin {
            if let Some(samples) = metrics(client, &requests::envoy_stats(url)).await {
                let mut served = Served::new();
                for s in prom::select(&samples, metrics::SERVED, &[]) {
                    let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
                    *served
                        .entry((
                            label(metrics::label::REQUESTED),
                            label(metrics::label::SERVED),
                        ))
                        .or_default() += s.value;
                }
                counters.served = Some(served);
            }
        }
        counters
    }

    /// What happened since `before`: the difference of every counter (a counter that went backwards, i.e. a
    /// restarted process, counts from zero).
    pub fn since(&self, before: &Counters) -> Counters {
        fn diff<K: Ord + Clone>(
            after: &BTreeMap<K, f64>,
            before: Option<&BTreeMap<K, f64>>,
        ) -> BTreeMap<K, f64> {
            after
                .iter()
                .map(|(k, v)| {
                    let base = before.and_then(|b| b.get(k)).copied().unwrap_or(0.0);
                    (k.clone(), if *v >= base { v - base } else { *v })
                })
                .filter(|(_, v)| *v > 0.0)
                .collect()
        }
        Counters {
            routed: self
                .routed
                .as_ref()
                .map(|a| diff(a, before.routed.as_ref())),
            served: self
                .served
                .as_ref()
                .map(|a| diff(a, before.served.as_ref())),
        }
    }

    /// Sidecar count of requests tagged `requested`, by served arm (0 when there is no sidecar).
    pub fn routed_by_served(&self, requested: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((r, served, _, _), v) in self.routed.iter().flatten() {
            if r == requested {
                *out.entry(served.clone()).or_default() += v;
            }
        }
        out
    }

    /// Sidecar count of requests tagged `requested` that a proxy answered (status below 500), by pod. A
    /// 5xx may be the gateway's own answer for a proxy it could not reach, so it does not show traffic.
    pub fn answered_by_pod(&self, requested: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((r, _, pod, class), v) in self.routed.iter().flatten() {
            if r == requested && !pod.is_empty() && !matches!(class.as_str(), "5xx" | "none") {
                *out.entry(pod.clone()).or_default() += v;
            }
        }
        out
    }

    /// Envoy's count of requests tagged `requested`, by served arm.
    pub fn served_by_served(&self, requested: &str) -> BTreeMap<String, f64> {
        self.served
            .iter()
            .flatten()
            .filter(|((r, _), _)| r == requested)
            .map(|((_, s), v)| (s.clone(), *v))
            .collect()
    }
}

async fn metrics(client: &HttpClient, request: &Request) -> Option<Vec<Sample>> {
    match client.send(request).await {
        Ok(e) if e.status == 200 => Some(prom::parse(&String::from_utf8_lossy(&e.body))),
        _ => None,
    }
}

/// Reads the counters until `done` holds for the difference from `before`, or `timeout` passes: the filter
/// counts a request when its stream ends and reports to the sidecar once per refresh interval.
pub async fn settle(
    client: &HttpClient,
    sidecar: Option<&str>,
    envoy_admin: Option<&str>,
    before: &Counters,
    timeout: Duration,
    done: impl Fn(&Counters) -> bool,
) -> Counters {
    let deadline = Instant::now() + timeout;
    loop {
        let delta = Counters::read(client, sidecar, envoy_admin)
            .await
            .since(before);
        if done(&delta) || Instant::now() >= deadline {
            return delta;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Renders counts as `a 3, b 1` (or `none`).
pub fn render_counts(counts: &BTreeMap<String, f64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn differences_drop_unchanged_series_and_survive_restarts() {
        let key = |r: &str, s: &str, p: &str| (r.into(), s.into(), p.into(), "2xx".into());
        let before = Counters {
            routed: Some(Routed::from([
                (key("fs", "fs", "a"), 5.0),
                (key("none", "fs", "a"), 9.0),
            ])),
            served: None,
        };
        let after = Counters {
            routed: Some(Routed::from([
                (key("fs", "fs", "a"), 8.0),
                (key("none", "fs", "a"), 2.0),
                (key("nvlink", "fs", "a"), 1.0),
            ])),
            served: None,
        };
        let delta = after.since(&before);
        assert_eq!(
            delta.routed_by_served("fs"),
            BTreeMap::from([("fs".to_string(), 3.0)])
        );
        assert_eq!(
            delta.answered_by_pod("none"),
            BTreeMap::from([("a".to_string(), 2.0)]),
            "restarted counter"
        );
        assert_eq!(delta.routed_by_served("nvlink")["fs"], 1.0);
        // A 5xx may be the gateway's own answer: not traffic a proxy received.
        let gateway_error = Counters {
            routed: Some(Routed::from([(
                ("none".into(), "fs".into(), "a".into(), "5xx".into()),
                4.0,
            )])),
            served: None,
        };
        assert!(gateway_error.answered_by_pod("none").is_empty());
        assert_eq!(gateway_error.routed_by_served("none")["fs"], 4.0);
        assert_eq!(render_counts(&delta.routed_by_served("fs")), "fs 3");
    }
}
