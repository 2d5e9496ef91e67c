//! The `kubernetes` source: a kube-rs watcher on Pods matching the selector, one per configured namespace (or
//! one cluster-wide). Each relist (`Init` … `InitDone`) is buffered and applied as one atomic `reset`, so the
//! served map is never a half-listed one. Objects that are not readable pods are skipped and counted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::core::DeserializeGuard;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch as signal;

use crate::config::{EndpointPort, Kubernetes};
use crate::index::{Index, Placement, Proxy, Scope};
use crate::state::State;

/// How often to ask the API server whether it is back while the watch is failing: the watcher itself says
/// nothing when its retry succeeds and no pod changes.
const RECHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Reads a pod as the index sees it. Ready means: has an IP, phase Running, condition Ready=True and no
/// deletion timestamp (terminating).
pub fn proxy_from_pod(pod: &Pod, settings: &Kubernetes) -> Result<Proxy, String> {
    let metadata = &pod.metadata;
    let name = metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("pod has no metadata.name")?;
    let namespace = metadata.namespace.clone().unwrap_or_default();
    let backend = metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(&settings.backend_label))
        .cloned();
    let status = pod.status.as_ref();
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let port = match &settings.endpoint_port {
        EndpointPort::Number(port) => Some(*port),
        EndpointPort::Name(wanted) => pod.spec.as_ref().and_then(|spec| {
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(wanted.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    };
    let address = match (ip, port) {
        (Some(ip), Some(port)) if ip.contains(':') => Some(format!("[{ip}]:{port}")),
        (Some(ip), Some(port)) => Some(format!("{ip}:{port}")),
        _ => None,
    };
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
    let terminating = metadata.deletion_timestamp.is_some();
    Ok(Proxy {
        namespace,
        name,
        backend,
        ready: address.is_some() && running && ready_condition && !terminating,
        address,
    })
}

/// Feeds watch events into the index and publishes the result. Pure apart from logging and counters, so tests
/// can drive it with synthetic events.
pub struct Reflector {
    settings: Kubernetes,
    index: Index,
    /// Relists in progress, per scope.
    buffers: BTreeMap<Scope, Vec<Proxy>>,
    synced: BTreeSet<Scope>,
    scopes: BTreeSet<Scope>,
    state: Arc<State>,
}

impl Reflector {
    pub fn new(settings: Kubernetes, arms: &[String], state: Arc<State>) -> Self {
        let scopes = scopes(&settings).into_iter().collect();
        Self {
            settings,
            index: Index::new(arms),
            buffers: BTreeMap::new(),
            synced: BTreeSet::new(),
            scopes,
            state,
        }
    }

    pub fn handle(
        &mut self,
        scope: &Scope,
        event: Event<DeserializeGuard<Pod>>,
    ) -> anyhow::Result<()> {
        let kind = match &event {
            Event::Init => "init",
            Event::InitApply(_) => "init_apply",
            Event::InitDone => "init_done",
            Event::Apply(_) => "apply",
            Event::Delete(_) => "delete",
        };
        self.state
            .metrics
            .watch_events
            .with_label_values(&[kind])
            .inc();
        let changed = match event {
            Event::Init => {
                self.buffers.insert(scope.clone(), Vec::new());
                false
            }
            Event::InitApply(pod) => {
                if let Ok(proxy) = self.read(pod) {
                    self.buffers.entry(scope.clone()).or_default().push(proxy);
                }
                false
            }
            Event::InitDone => {
                let proxies = self.buffers.remove(scope).unwrap_or_default();
                for proxy in &proxies {
                    self.log_if_unmapped(proxy, None);
                }
                if proxies.is_empty() {
                    // The API server lists a namespace that does not exist as empty, like one
                    // without proxies: say which, since it is most often a typo.
                    log::warn!(
                        "no pod in {} matches selector {:?}: check that the namespace exists and the proxies carry the selector's labels",
                        describe(scope),
                        self.settings.pod_selector
                    );
                }
                self.index.reset(scope, proxies);
                self.synced.insert(scope.clone());
                log::info!(
                    "relist of {} complete: {} proxy pods in the index",
                    describe(scope),
                    self.index.len()
                );
                true
            }
            Event::Apply(pod) => match self.read(pod) {
                Ok(proxy) => {
                    let current = proxy.clone();
                    let previous = self.index.apply(proxy);
                    self.log_if_unmapped(&current, previous.as_ref());
                    true
                }
                Err(Evicted(evicted)) => evicted,
            },
            Event::Delete(pod) => {
                let meta = match &pod.0 {
                    Ok(pod) => &pod.metadata,
                    Err(invalid) => &invalid.metadata,
                };
                let namespace = meta.namespace.clone().unwrap_or_default();
                let name = meta.name.clone().unwrap_or_default();
                self.index.delete(&namespace, &name).is_some()
            }
        };
        if changed && self.synced.is_superset(&self.scopes) {
            self.state
                .publish(self.index.view(), self.last_sync_time(kind))?;
        }
        Ok(())
    }

    fn last_sync_time(&self, kind: &str) -> Timestamp {
        match (kind, self.state.snapshot()) {
            ("init_done", _) | (_, None) => Timestamp::now(),
            (_, Some(snapshot)) => snapshot.last_sync,
        }
    }

    /// A malformed object is counted, logged and left out; if an earlier good version was indexed it is
    /// removed, since its current state is unknown.
    fn read(&mut self, pod: DeserializeGuard<Pod>) -> Result<Proxy, Evicted> {
        let result = match pod.0 {
            Ok(pod) => proxy_from_pod(&pod, &self.settings).map_err(|e| (e, pod.metadata)),
            Err(invalid) => Err((invalid.error, invalid.metadata)),
        };
        match result {
            Ok(proxy) => Ok(proxy),
            Err((reason, metadata)) => {
                self.state.metrics.watch_skipped_objects.inc();
                let namespace = metadata.namespace.unwrap_or_default();
                let name = metadata.name.unwrap_or_default();
                log::warn!("skipping pod {namespace}/{name}: {reason}");
                Err(Evicted(self.index.delete(&namespace, &name).is_some()))
            }
        }
    }

    /// Logs pods that match the selector but cannot be served (runbook failure signals 1 and 3), once per
    /// change of placement rather than at every status update.
    fn log_if_unmapped(&self, proxy: &Proxy, previous: Option<&Proxy>) {
        let placement = self.index.placement(proxy);
        if previous.is_some_and(|p| self.index.placement(p) == placement) {
            return;
        }
        match placement {
            Placement::Arm(_) => {}
            Placement::MissingLabel => log::warn!(
                "pod {} matches selector {:?} but has no label {}; it gets no traffic (runbook failure signals 1, 3)",
                proxy.pod(),
                self.settings.pod_selector,
                self.settings.backend_label
            ),
            Placement::UnknownArm(value) => log::warn!(
                "pod {} has {}={value:?}, which is not a configured arm; it gets no traffic (runbook failure signals 1, 3)",
                proxy.pod(),
                self.settings.backend_label
            ),
        }
    }
}

/// A pod could not be read; `true` if an earlier version of it was removed from the index.
struct Evicted(bool);

fn scopes(settings: &Kubernetes) -> Vec<Scope> {
    if settings.namespaces.is_empty() {
        vec![Scope::All]
    } else {
        settings
            .namespaces
            .iter()
            .map(|ns| Scope::Namespace(ns.clone()))
            .collect()
    }
}

fn describe(scope: &Scope) -> String {
    match scope {
        Scope::All => "all namespaces".to_string(),
        Scope::Namespace(ns) => format!("namespace {ns}"),
    }
}

fn api(client: &Client, scope: &Scope) -> Api<DeserializeGuard<Pod>> {
    match scope {
        Scope::All => Api::all(client.clone()),
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
    }
}

/// Runs the watch until `shutdown` fires. Fails only if no Kubernetes client can be configured at all.
pub async fn run(
    settings: Kubernetes,
    arms: Vec<String>,
    state: Arc<State>,
    mut shutdown: signal::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (set KUBECONFIG, or run in a pod with a service account)")?;
    let config = if settings.pod_selector.is_empty() {
        watcher::Config::default()
    } else {
        watcher::Config::default().labels(&settings.pod_selector)
    };
    let scopes = scopes(&settings);
    log::info!(
        "watching pods with selector {:?} in {}",
        settings.pod_selector,
        scopes.iter().map(describe).collect::<Vec<_>>().join(", ")
    );
    let mut events = stream::select_all(scopes.iter().map(|scope| {
        let scope = scope.clone();
        watcher::watcher(api(&client, &scope), config.clone())
            .default_backoff()
            .map(move |event| (scope.clone(), event))
            .boxed()
    }));
    let recheck_params = ListParams::default()
        .labels(&settings.pod_selector)
        .limit(1);
    let recheck_api = api(&client, &scopes[0]);
    let mut reflector = Reflector::new(settings, &arms, state.clone());
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            next = events.next() => match next {
                None => break,
                Some((scope, Ok(event))) => {
                    state.watch_succeeded();
                    reflector.handle(&scope, event)?;
                }
                Some((scope, Err(e))) => {
                    state.metrics.watch_errors.inc();
                    state.watch_failed();
                    log::warn!("watch of {} failed (retrying with backoff): {e}", describe(&scope));
                }
            },
            _ = recheck.tick(), if state.watch_failing() => {
                if recheck_api.list(&recheck_params).await.is_ok() {
                    log::info!("Kubernetes API server answers again");
                    state.watch_succeeded();
                }
            }
        }
    }
    log::info!("watch stopped");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use kvab_contract::EndpointMap;

    use super::*;

    fn settings(port: EndpointPort) -> Kubernetes {
        Kubernetes {
            namespaces: vec!["llm-d-vllm".into()],
            pod_selector: "role=proxy".into(),
            backend_label: "llm-d.ai/kv-backend".into(),
            endpoint_port: port,
            unready_after: Duration::from_secs(30),
        }
    }

    fn pod(name: &str, backend: Option<&str>, ip: Option<&str>, phase: &str, ready: bool) -> Pod {
        let mut labels = BTreeMap::from([("role".to_string(), "proxy".to_string())]);
        if let Some(backend) = backend {
            labels.insert("llm-d.ai/kv-backend".into(), backend.into());
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("llm-d-vllm".into()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "proxy".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8000,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(Into::into),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn ready_needs_ip_running_ready_and_not_terminating() {
        let s = settings(EndpointPort::Number(8080));
        let ok =
            proxy_from_pod(&pod("p", Some("fs"), Some("10.0.0.1"), "Running", true), &s).unwrap();
        assert_eq!(ok.address.as_deref(), Some("10.0.0.1:8080"));
        assert!(ok.ready);
        assert_eq!(ok.pod(), "llm-d-vllm/p");

        assert!(
            !proxy_from_pod(&pod("p", Some("fs"), None, "Running", true), &s)
                .unwrap()
                .ready
        );
        assert!(
            !proxy_from_pod(&pod("p", Some("fs"), Some("10.0.0.1"), "Pending", true), &s)
                .unwrap()
                .ready
        );
        assert!(
            !proxy_from_pod(
                &pod("p", Some("fs"), Some("10.0.0.1"), "Running", false),
                &s
            )
            .unwrap()
            .ready
        );
        let mut terminating = pod("p", Some("fs"), Some("10.0.0.1"), "Running", true);
        terminating.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let terminating = proxy_from_pod(&terminating, &s).unwrap();
        assert!(!terminating.ready);
        assert!(
            terminating.address.is_some(),
            "a terminating pod stays listed, not ready"
        );
    }

    #[test]
    fn named_port_and_ipv6() {
        let s = settings(EndpointPort::Name("http".into()));
        let p =
            proxy_from_pod(&pod("p", Some("fs"), Some("fd00::1"), "Running", true), &s).unwrap();
        assert_eq!(p.address.as_deref(), Some("[fd00::1]:8000"));
        let missing = settings(EndpointPort::Name("metrics".into()));
        let p = proxy_from_pod(
            &pod("p", Some("fs"), Some("10.0.0.1"), "Running", true),
            &missing,
        )
        .unwrap();
        assert_eq!((p.address, p.ready), (None, false));
    }

    #[test]
    fn pod_without_name_is_rejected() {
        let mut p = pod("x", Some("fs"), None, "Running", true);
        p.metadata.name = None;
        assert!(proxy_from_pod(&p, &settings(EndpointPort::Number(1))).is_err());
    }

    fn guard(p: Pod) -> DeserializeGuard<Pod> {
        DeserializeGuard(Ok(p))
    }

    fn served(state: &State) -> Option<EndpointMap> {
        state
            .snapshot()
            .map(|s| serde_json::from_slice(&s.body).unwrap())
    }

    #[test]
    fn relist_is_published_only_when_complete_and_replaces_the_map() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let arms = vec!["nvlink".to_string(), "fs".to_string()];
        let mut reflector =
            Reflector::new(settings(EndpointPort::Number(8080)), &arms, state.clone());
        let scope = Scope::Namespace("llm-d-vllm".into());

        reflector.handle(&scope, Event::Init).unwrap();
        reflector
            .handle(
                &scope,
                Event::InitApply(guard(pod(
                    "a",
                    Some("fs"),
                    Some("10.0.0.1"),
                    "Running",
                    true,
                ))),
            )
            .unwrap();
        assert!(served(&state).is_none(), "half a list must not be served");
        reflector.handle(&scope, Event::InitDone).unwrap();
        assert_eq!(served(&state).unwrap().backends["fs"].endpoints.len(), 1);

        // Second relist: `a` is gone, `b` arrived. Until InitDone the old map stays.
        reflector.handle(&scope, Event::Init).unwrap();
        reflector
            .handle(
                &scope,
                Event::InitApply(guard(pod(
                    "b",
                    Some("nvlink"),
                    Some("10.0.0.2"),
                    "Running",
                    true,
                ))),
            )
            .unwrap();
        assert_eq!(served(&state).unwrap().backends["fs"].endpoints.len(), 1);
        reflector.handle(&scope, Event::InitDone).unwrap();
        let map = served(&state).unwrap();
        assert!(map.backends["fs"].endpoints.is_empty());
        assert_eq!(map.backends["nvlink"].endpoints[0].pod, "llm-d-vllm/b");

        reflector
            .handle(
                &scope,
                Event::Delete(guard(pod("b", Some("nvlink"), None, "Running", true))),
            )
            .unwrap();
        assert!(served(&state).unwrap().backends["nvlink"]
            .endpoints
            .is_empty());
    }

    #[test]
    fn malformed_objects_are_skipped_counted_and_evicted() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let arms = vec!["fs".to_string()];
        let mut reflector =
            Reflector::new(settings(EndpointPort::Number(8080)), &arms, state.clone());
        let scope = Scope::Namespace("llm-d-vllm".into());
        reflector.handle(&scope, Event::Init).unwrap();
        reflector.handle(&scope, Event::InitDone).unwrap();
        reflector
            .handle(
                &scope,
                Event::Apply(guard(pod(
                    "a",
                    Some("fs"),
                    Some("10.0.0.1"),
                    "Running",
                    true,
                ))),
            )
            .unwrap();
        let invalid: DeserializeGuard<Pod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "llm-d-vllm"},
            "spec": {"containers": "not-a-list"}
        }))
        .unwrap();
        assert!(invalid.0.is_err());
        reflector.handle(&scope, Event::Apply(invalid)).unwrap();
        assert_eq!(state.metrics.watch_skipped_objects.get(), 1);
        assert!(served(&state).unwrap().backends["fs"].endpoints.is_empty());
    }

    #[test]
    fn multi_namespace_map_waits_for_every_namespace() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let mut s = settings(EndpointPort::Number(8080));
        s.namespaces = vec!["a".into(), "b".into()];
        let mut reflector = Reflector::new(s, &["fs".to_string()], state.clone());
        reflector
            .handle(&Scope::Namespace("a".into()), Event::Init)
            .unwrap();
        reflector
            .handle(&Scope::Namespace("a".into()), Event::InitDone)
            .unwrap();
        assert!(served(&state).is_none());
        reflector
            .handle(&Scope::Namespace("b".into()), Event::Init)
            .unwrap();
        reflector
            .handle(&Scope::Namespace("b".into()), Event::InitDone)
            .unwrap();
        assert!(served(&state).is_some());
    }
}
