//! The endpoint index: pure and synchronous. Sources (the Kubernetes watcher, the static configuration) feed it
//! proxies with `apply`, `delete` and `reset`; `view` turns it into the per-arm endpoint lists that are served.
//! Ordering is deterministic (by namespace, then name) so the same content always serializes the same way.

use std::collections::BTreeMap;

use kvab_contract::{Backend, Endpoint};

/// A proxy pod as the index sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Empty for static endpoints.
    pub namespace: String,
    pub name: String,
    /// Value of the backend label; `None` when the pod does not carry the label.
    pub backend: Option<String>,
    /// `ip:port`; `None` while the pod has no IP or the named port is missing.
    pub address: Option<String>,
    pub ready: bool,
}

impl Proxy {
    /// `namespace/name`, or just the name when there is no namespace.
    pub fn pod(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Which objects a `reset` replaces: one namespace's watch or a cluster-wide one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespace(ns) => ns == namespace,
        }
    }
}

/// Where a proxy lands in the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Arm(String),
    /// Matches the selector but has no backend label (runbook failure signals 1 and 3).
    MissingLabel,
    /// Carries a backend label value that is not a configured arm.
    UnknownArm(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArmCounts {
    pub ready: usize,
    /// Not ready, including pods that have no address yet.
    pub not_ready: usize,
}

/// Everything the served map and the gauges are computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Every configured arm, even when empty. Only proxies with an address are listed.
    pub backends: BTreeMap<String, Backend>,
    pub counts: BTreeMap<String, ArmCounts>,
    pub missing_label: usize,
    pub unknown_arm: usize,
}

#[derive(Debug, Clone)]
pub struct Index {
    arms: Vec<String>,
    proxies: BTreeMap<(String, String), Proxy>,
}

impl Index {
    pub fn new(arms: &[String]) -> Self {
        Self {
            arms: arms.to_vec(),
            proxies: BTreeMap::new(),
        }
    }

    pub fn placement(&self, proxy: &Proxy) -> Placement {
        match &proxy.backend {
            None => Placement::MissingLabel,
            Some(value) if self.arms.contains(value) => Placement::Arm(value.clone()),
            Some(value) => Placement::UnknownArm(value.clone()),
        }
    }

    /// Adds or replaces a proxy; returns the entry it replaced.
    pub fn apply(&mut self, proxy: Proxy) -> Option<Proxy> {
        self.proxies
            .insert((proxy.namespace.clone(), proxy.name.clone()), proxy)
    }

    /// Removes a proxy; returns it if it was present.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Option<Proxy> {
        self.proxies
            .remove(&(namespace.to_string(), name.to_string()))
    }

    /// Replaces every proxy in `scope` with `proxies` in one step (a relist).
    pub fn reset(&mut self, scope: &Scope, proxies: Vec<Proxy>) {
        self.proxies
            .retain(|(namespace, _), _| !scope.contains(namespace));
        for proxy in proxies {
            if scope.contains(&proxy.namespace) {
                self.apply(proxy);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.proxies.len()
    }

    pub fn view(&self) -> View {
        let mut view = View {
            backends: self
                .arms
                .iter()
                .map(|arm| (arm.clone(), Backend::default()))
                .collect(),
            counts: self
                .arms
                .iter()
                .map(|arm| (arm.clone(), ArmCounts::default()))
                .collect(),
            ..View::default()
        };
        for proxy in self.proxies.values() {
            let arm = match self.placement(proxy) {
                Placement::Arm(arm) => arm,
                Placement::MissingLabel => {
                    view.missing_label += 1;
                    continue;
                }
                Placement::UnknownArm(_) => {
                    view.unknown_arm += 1;
                    continue;
                }
            };
            let ready = proxy.ready && proxy.address.is_some();
            if let Some(counts) = view.counts.get_mut(&arm) {
                if ready {
                    counts.ready += 1;
                } else {
                    counts.not_ready += 1;
                }
            }
            if let (Some(address), Some(backend)) = (&proxy.address, view.backends.get_mut(&arm)) {
                backend.endpoints.push(Endpoint {
                    address: address.clone(),
                    pod: proxy.pod(),
                    ready,
                });
            }
        }
        view
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn arms() -> Vec<String> {
        vec!["nvlink".into(), "fs".into()]
    }

    fn proxy(ns: &str, name: &str, backend: Option<&str>, ip: Option<&str>, ready: bool) -> Proxy {
        Proxy {
            namespace: ns.into(),
            name: name.into(),
            backend: backend.map(Into::into),
            address: ip.map(|ip| format!("{ip}:8080")),
            ready,
        }
    }

    fn addresses(view: &View, arm: &str) -> Vec<(String, bool)> {
        view.backends[arm]
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.ready))
            .collect()
    }

    #[test]
    fn empty_index_lists_every_configured_arm() {
        let view = Index::new(&arms()).view();
        assert_eq!(view.backends.keys().collect::<Vec<_>>(), ["fs", "nvlink"]);
        assert!(view.backends.values().all(|b| b.endpoints.is_empty()));
        assert_eq!(view.counts["fs"], ArmCounts::default());
    }

    #[test]
    fn apply_places_pods_by_label_and_sorts_them() {
        let mut index = Index::new(&arms());
        index.apply(proxy("ns", "p2p-b", Some("nvlink"), Some("10.0.0.2"), true));
        index.apply(proxy(
            "ns",
            "p2p-a",
            Some("nvlink"),
            Some("10.0.0.1"),
            false,
        ));
        index.apply(proxy("ns", "fs-a", Some("fs"), Some("10.0.0.3"), true));
        let view = index.view();
        assert_eq!(
            addresses(&view, "nvlink"),
            [
                ("10.0.0.1:8080".into(), false),
                ("10.0.0.2:8080".into(), true)
            ]
        );
        assert_eq!(view.backends["nvlink"].endpoints[0].pod, "ns/p2p-a");
        assert_eq!(addresses(&view, "fs"), [("10.0.0.3:8080".into(), true)]);
        assert_eq!(
            view.counts["nvlink"],
            ArmCounts {
                ready: 1,
                not_ready: 1
            }
        );
    }

    #[test]
    fn relabel_moves_a_pod_between_arms() {
        let mut index = Index::new(&arms());
        index.apply(proxy("ns", "p", Some("nvlink"), Some("10.0.0.1"), true));
        let previous = index.apply(proxy("ns", "p", Some("fs"), Some("10.0.0.1"), true));
        assert_eq!(previous.unwrap().backend.as_deref(), Some("nvlink"));
        let view = index.view();
        assert!(view.backends["nvlink"].endpoints.is_empty());
        assert_eq!(addresses(&view, "fs").len(), 1);
    }

    #[test]
    fn pod_without_address_is_counted_not_ready_but_not_listed() {
        let mut index = Index::new(&arms());
        index.apply(proxy("ns", "pending", Some("fs"), None, true));
        let view = index.view();
        assert!(view.backends["fs"].endpoints.is_empty());
        assert_eq!(
            view.counts["fs"],
            ArmCounts {
                ready: 0,
                not_ready: 1
            }
        );
    }

    #[test]
    fn missing_and_unknown_labels_are_counted_not_served() {
        let mut index = Index::new(&arms());
        index.apply(proxy("ns", "bare", None, Some("10.0.0.1"), true));
        index.apply(proxy("ns", "odd", Some("p2p"), Some("10.0.0.2"), true));
        let view = index.view();
        assert_eq!((view.missing_label, view.unknown_arm), (1, 1));
        assert!(view.backends.values().all(|b| b.endpoints.is_empty()));
        assert_eq!(
            index.placement(&proxy("ns", "odd", Some("p2p"), None, true)),
            Placement::UnknownArm("p2p".into())
        );
    }

    #[test]
    fn delete_removes_and_reports_the_pod() {
        let mut index = Index::new(&arms());
        index.apply(proxy("ns", "p", Some("fs"), Some("10.0.0.1"), true));
        assert!(index.delete("ns", "p").is_some());
        assert!(index.delete("ns", "p").is_none());
        assert!(index.view().backends["fs"].endpoints.is_empty());
    }

    #[test]
    fn reset_replaces_only_its_scope() {
        let mut index = Index::new(&arms());
        index.apply(proxy("a", "old", Some("fs"), Some("10.0.0.1"), true));
        index.apply(proxy("b", "keep", Some("fs"), Some("10.0.0.2"), true));
        index.reset(
            &Scope::Namespace("a".into()),
            vec![
                proxy("a", "new", Some("nvlink"), Some("10.0.0.3"), true),
                // Not in scope: a namespaced relist cannot carry it, and it must not leak in.
                proxy("c", "stray", Some("fs"), Some("10.0.0.4"), true),
            ],
        );
        let view = index.view();
        assert_eq!(addresses(&view, "fs"), [("10.0.0.2:8080".into(), true)]);
        assert_eq!(addresses(&view, "nvlink"), [("10.0.0.3:8080".into(), true)]);
        index.reset(&Scope::All, vec![]);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn view_is_deterministic_whatever_the_apply_order() {
        let pods = [
            proxy("ns", "c", Some("fs"), Some("10.0.0.3"), true),
            proxy("ns", "a", Some("fs"), Some("10.0.0.1"), true),
            proxy("ms", "b", Some("fs"), Some("10.0.0.2"), false),
        ];
        let mut forward = Index::new(&arms());
        let mut backward = Index::new(&arms());
        for p in &pods {
            forward.apply(p.clone());
        }
        for p in pods.iter().rev() {
            backward.apply(p.clone());
        }
        assert_eq!(forward.view(), backward.view());
        assert_eq!(forward.view().backends["fs"].endpoints[0].pod, "ms/b");
    }
}
