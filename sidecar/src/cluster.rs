//! The tools' access to Kubernetes (kube-rs; `kvab check` cluster mode, `kvab experiment`): pods, the
//! HTTPRoute, the EPP ConfigMap, the EPP's logs, and port-forwards that kvab opens itself (to the gateway
//! Service, the sidecar Service, a proxy pod) so that no `kubectl port-forward` is needed. Credentials: `KUBECONFIG` / `~/.kube/config`, else in-cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, LogParams};
use kube::core::GroupVersionKind;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the check needs to know about a pod (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub phase: String,
    pub ready: bool,
}

impl PodState {
    pub fn healthy(&self) -> bool {
        self.phase == "Running" && self.ready
    }
}

pub struct Cluster {
    client: kube::Client,
}

/// A local listener on 127.0.0.1 forwarding every connection to a pod port; stops when dropped.
pub struct Forward {
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a read from the API server failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    /// The error is itself a finding about the cluster (the object or key is absent, or not what
    /// the runbook applies): the check fails. Otherwise the read failed (5xx, RBAC, network) and
    /// nothing was learned: the check is inconclusive.
    pub finding: bool,
    pub message: String,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ReadError> for String {
    fn from(e: ReadError) -> Self {
        e.message
    }
}

/// `what: 404 NotFound: configmaps "x" not found` from an API `Status`; other errors as kube-rs
/// words them. A 403 names the RBAC the check needs.
fn err(what: &str) -> impl Fn(kube::Error) -> ReadError + '_ {
    move |e| match e {
        kube::Error::Api(status) => {
            let hint = if status.code == 403 {
                " (kvab check needs the RBAC in docs/check.md)"
            } else {
                ""
            };
            ReadError {
                finding: status.code == 404,
                message: format!(
                    "{what}: {} {}: {}{hint}",
                    status.code, status.reason, status.message
                ),
            }
        }
        other => ReadError {
            finding: false,
            message: format!("{what}: {other}"),
        },
    }
}

/// The container whose log `kubectl logs` shows by default: the one named by the
/// `kubectl.kubernetes.io/default-container` annotation (which Istio's injector sets), else the
/// first. The API server refuses a log read without a container when a pod has several.
pub fn default_container(pod: &Pod) -> Option<String> {
    let names: Vec<&str> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| c.name.as_str())
        .collect();
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("kubectl.kubernetes.io/default-container"))
        .filter(|name| names.contains(&name.as_str()))
        .cloned()
        .or_else(|| names.first().map(|n| n.to_string()))
}

pub fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    PodState {
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
        ready: pod.metadata.deletion_timestamp.is_none()
            && status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
    }
}

/// `a=b,c=d` from a selector map.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The container port a Service port targets on `pod`: a number, or a name looked up in the pod's ports.
pub fn target_port(service: &Service, port: u16, pod: &Pod) -> Result<u16, String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == i32::from(port)))
        .ok_or_else(|| format!("the Service has no port {port}"))?;
    let number = match &spec_port.target_port {
        None => spec_port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| format!("no container port named {name:?} on the pod"))?,
    };
    u16::try_from(number).map_err(|_| format!("port {number} out of range"))
}

impl Cluster {
    pub async fn connect() -> Result<Self, String> {
        let client = kube::Client::try_default().await.map_err(|e| {
            format!("no Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster): {e}")
        })?;
        Ok(Self { client })
    }

    pub async fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>, ReadError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = if selector.is_empty() {
            ListParams::default()
        } else {
            ListParams::default().labels(selector)
        };
        let what = format!("listing pods in {namespace}");
        Ok(api.list(&params).await.map_err(err(&what))?.items)
    }

    pub async fn httproute(&self, namespace: &str, name: &str) -> Result<Value, ReadError> {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &ApiResource::from_gvk(&gvk));
        let what = format!("reading HTTPRoute {namespace}/{name}");
        let route = api.get(name).await.map_err(err(&what))?;
        serde_json::to_value(route).map_err(|e| ReadError {
            finding: false,
            message: format!("{what}: {e}"),
        })
    }

    pub async fn configmap_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<String, ReadError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("reading ConfigMap {namespace}/{name}");
        let map = api.get(name).await.map_err(err(&what))?;
        map.data
            .and_then(|d| d.get(key).cloned())
            .ok_or_else(|| ReadError {
                // The object is there but not what the runbook applies: a finding, like a 404.
                finding: true,
                message: format!("ConfigMap {namespace}/{name} has no key {key:?}"),
            })
    }

    /// Logs of every pod of a Deployment since `since_seconds` ago (what `kubectl logs deploy/X --since`
    /// shows, for all replicas).
    pub async fn deployment_logs(
        &self,
        namespace: &str,
        name: &str,
        since_seconds: i64,
    ) -> Result<Vec<(String, String)>, ReadError> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("reading Deployment {namespace}/{name}");
        let deployment = deployments.get(name).await.map_err(err(&what))?;
        let selector = deployment
            .spec
            .and_then(|s| s.selector.match_labels)
            .map(|l| selector_string(&l))
            .ok_or_else(|| ReadError {
                finding: false,
                message: format!("Deployment {namespace}/{name} has no matchLabels selector"),
            })?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let mut logs = Vec::new();
        for pod in self.pods(namespace, &selector).await? {
            let container = default_container(&pod);
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let params = LogParams {
                container,
                since_seconds: Some(since_seconds.max(1)),
                ..LogParams::default()
            };
            let what = format!("reading the log of pod {namespace}/{pod_name}");
            let text = pods.logs(&pod_name, &params).await.map_err(err(&what))?;
            logs.push((pod_name, text));
        }
        Ok(logs)
    }

    /// Forwards to a ready pod behind `service` (as `kubectl port-forward svc/NAME PORT` does).
    pub async fn forward_service(
        &self,
        namespace: &str,
        service: &str,
        port: u16,
    ) -> Result<Forward, String> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let svc = services
            .get(service)
            .await
            .map_err(err(&format!("reading Service {namespace}/{service}")))?;
        let selector = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .map(|l| selector_string(&l))
            .ok_or_else(|| format!("Service {namespace}/{service} has no selector"))?;
        let pod = self
            .pods(namespace, &selector)
            .await?
            .into_iter()
            .find(|p| {
                let state = pod_state(p);
                state.phase == "Running" && state.ready
            })
            .ok_or_else(|| format!("no ready pod behind Service {namespace}/{service}"))?;
        let pod_port = target_port(&svc, port, &pod)?;
        let name = pod.metadata.name.unwrap_or_default();
        self.forward_pod(namespace, &name, pod_port).await
    }

    pub async fn forward_pod(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> Result<Forward, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("local listener: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        log::info!("port-forward http://{local} -> {namespace}/{pod}:{port}");
        let pod = pod.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (pods, pod) = (pods.clone(), pod.clone());
                tokio::spawn(async move {
                    let mut forwarder = match pods.portforward(&pod, &[port]).await {
                        Ok(forwarder) => forwarder,
                        Err(e) => {
                            log::warn!("port-forward to {pod}:{port}: {e}");
                            return;
                        }
                    };
                    // The kubelet reports on the port's error channel why it could not connect
                    // (nothing listening, pod gone); the stream then just ends.
                    if let Some(error) = forwarder.take_error(port) {
                        let pod = pod.clone();
                        tokio::spawn(async move {
                            if let Some(message) = error.await {
                                log::warn!("port-forward to {pod}:{port}: {message}");
                            }
                        });
                    }
                    if let Some(mut upstream) = forwarder.take_stream(port) {
                        let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                        drop(upstream);
                    }
                    let _ = forwarder.join().await;
                });
            }
        });
        Ok(Forward {
            url: format!("http://{local}"),
            task,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_ports_resolve_by_number_and_by_name() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "spec": {"selector": {"app": "gw"}, "ports": [
                {"port": 80, "targetPort": "http"}, {"port": 443, "targetPort": 8443}, {"port": 15021}
            ]}
        }))
        .unwrap();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gw-1"},
            "spec": {"containers": [{"name": "istio-proxy", "ports": [{"name": "http", "containerPort": 8080}]}]}
        }))
        .unwrap();
        assert_eq!(target_port(&service, 80, &pod), Ok(8080));
        assert_eq!(target_port(&service, 443, &pod), Ok(8443));
        assert_eq!(target_port(&service, 15021, &pod), Ok(15021));
        assert!(target_port(&service, 81, &pod)
            .unwrap_err()
            .contains("no port 81"));
    }

    #[test]
    fn logs_are_read_from_the_default_container() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "epp-1", "annotations": {"kubectl.kubernetes.io/default-container": "epp"}},
            "spec": {"containers": [{"name": "istio-proxy"}, {"name": "epp"}]}
        }))
        .unwrap();
        assert_eq!(default_container(&pod).as_deref(), Some("epp"));
        pod.metadata.annotations = None;
        assert_eq!(default_container(&pod).as_deref(), Some("istio-proxy"));
        pod.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/default-container".to_string(),
                "gone".to_string(),
            )]
            .into(),
        );
        assert_eq!(
            default_container(&pod).as_deref(),
            Some("istio-proxy"),
            "an annotation naming no container is ignored"
        );
    }

    #[test]
    fn api_errors_say_code_reason_and_message_and_404_is_a_finding() {
        let status = |code: u16, reason: &str, message: &str| {
            kube::Error::Api(Box::new(
                serde_json::from_value(serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "code": code, "reason": reason, "message": message
                }))
                .unwrap(),
            ))
        };
        let missing =
            err("reading ConfigMap ns/x")(status(404, "NotFound", "configmaps \"x\" not found"));
        assert!(missing.finding);
        assert_eq!(
            missing.message,
            "reading ConfigMap ns/x: 404 NotFound: configmaps \"x\" not found"
        );
        let broken = err("listing pods in ns")(status(500, "InternalError", "etcd down"));
        assert!(!broken.finding);
        assert_eq!(
            broken.message,
            "listing pods in ns: 500 InternalError: etcd down"
        );
        let denied = err("reading Service ns/gw")(status(403, "Forbidden", "no"));
        assert!(!denied.finding && denied.message.contains("RBAC"));
    }

    #[test]
    fn pod_state_reads_phase_readiness_and_deletion() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vllm-fs-proxy-1", "labels": {"role": "proxy"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let state = pod_state(&pod);
        assert!(state.ready && state.phase == "Running");
        assert_eq!(state.labels["role"], "proxy");
        pod.metadata.deletion_timestamp =
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap();
        assert!(!pod_state(&pod).ready, "a terminating pod is not ready");
    }
}
