//! The endpoint sources of `kvab serve`: the `[kubernetes]` table (namespaces, selector, labels, port) and the
//! `[[static.endpoints]]` list, checked against the arms.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::raw::{Locator, RawKubernetes, RawStatic};
use super::{ConfigError, EndpointPort, Kubernetes, StaticEndpoint};
use super::{
    DEFAULT_BACKEND_LABEL, DEFAULT_ENDPOINT_PORT, DEFAULT_POD_SELECTOR,
    DEFAULT_UNREADY_AFTER_SECONDS,
};
use crate::selector;

pub(super) fn kubernetes(loc: &Locator<'_>, raw: RawKubernetes) -> Result<Kubernetes, ConfigError> {
    let mut namespaces = Vec::new();
    for ns in raw.namespaces.unwrap_or_default() {
        if !selector::is_label_value(ns.get_ref()) || ns.get_ref().contains(['_', '.']) {
            return Err(loc.at(
                &ns,
                format!(
                    "`kubernetes.namespaces`: {:?} is not a namespace name",
                    ns.get_ref()
                ),
            ));
        }
        if namespaces.contains(ns.get_ref()) {
            return Err(loc.at(
                &ns,
                format!(
                    "`kubernetes.namespaces`: {:?} is listed twice",
                    ns.get_ref()
                ),
            ));
        }
        namespaces.push(ns.into_inner());
    }
    let pod_selector = match raw.pod_selector {
        None => DEFAULT_POD_SELECTOR.to_string(),
        Some(selector) => match selector::validate(selector.get_ref()) {
            Ok(()) => selector.into_inner(),
            Err(e) => {
                return Err(loc.at(
                    &selector,
                    format!("`kubernetes.pod_selector` is not a label selector: {e}"),
                ))
            }
        },
    };
    let backend_label = match raw.backend_label {
        None => DEFAULT_BACKEND_LABEL.to_string(),
        Some(label) => match selector::validate_key(label.get_ref()) {
            Ok(()) => label.into_inner(),
            Err(e) => {
                return Err(loc.at(
                    &label,
                    format!("`kubernetes.backend_label` must be a label key such as \"llm-d.ai/kv-backend\": {e}"),
                ))
            }
        },
    };
    let endpoint_port = match raw.endpoint_port {
        None => EndpointPort::Number(DEFAULT_ENDPOINT_PORT),
        Some(port) => match port.get_ref() {
            EndpointPort::Number(0) => {
                return Err(loc.at(
                    &port,
                    "`kubernetes.endpoint_port` must be 1..=65535 or a container port name",
                ))
            }
            EndpointPort::Name(name) if name.is_empty() || name.len() > 15 => {
                return Err(loc.at(
                    &port,
                    "`kubernetes.endpoint_port`: a container port name has 1 to 15 characters",
                ))
            }
            _ => port.into_inner(),
        },
    };
    Ok(Kubernetes {
        namespaces,
        pod_selector,
        backend_label,
        endpoint_port,
        unready_after: loc.seconds(
            raw.unready_after_seconds,
            "kubernetes.unready_after_seconds",
            DEFAULT_UNREADY_AFTER_SECONDS,
            true,
        )?,
    })
}

pub(super) fn static_endpoints(
    loc: &Locator<'_>,
    raw: RawStatic,
    arms: &[String],
) -> Result<Vec<StaticEndpoint>, ConfigError> {
    let mut endpoints: Vec<StaticEndpoint> = Vec::new();
    let mut addresses = BTreeSet::new();
    for raw in raw.endpoints {
        if !arms.contains(raw.backend.get_ref()) {
            return Err(loc.at(
                &raw.backend,
                format!(
                    "`static.endpoints.backend`: {:?} is not one of the configured arms {arms:?}",
                    raw.backend.get_ref()
                ),
            ));
        }
        let address: SocketAddr = raw.address.get_ref().parse().map_err(|_| {
            loc.at(
                &raw.address,
                format!(
                    "`static.endpoints.address` must be `ip:port`, got {:?}",
                    raw.address.get_ref()
                ),
            )
        })?;
        let address = address.to_string();
        if !addresses.insert(address.clone()) {
            return Err(loc.at(
                &raw.address,
                format!("`static.endpoints.address`: {address} is listed twice"),
            ));
        }
        endpoints.push(StaticEndpoint {
            backend: raw.backend.into_inner(),
            pod: raw.pod.unwrap_or_else(|| address.clone()),
            address,
            ready: raw.ready.unwrap_or(true),
        });
    }
    Ok(endpoints)
}
