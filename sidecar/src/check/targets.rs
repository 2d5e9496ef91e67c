//! Where the check sends its requests: the URLs given, else (cluster mode) port-forwards it opens to the
//! gateway's and the sidecar's Services and to a ready proxy pod of each arm. `planned` gives the same
//! targets for `--dry-run`, with a placeholder for each port-forward it would open.

use super::options::{Arm, Mode, Options};
use crate::cluster;

const NO_PROXY_URL: &str = "no --proxy-url";

/// Where the check sends its requests, after any port-forwards are open.
pub struct Targets {
    pub gateway: String,
    pub sidecar: Option<String>,
    pub envoy_admin: Option<String>,
    /// Per arm, the proxy URL for Step 1 (or why there is none).
    pub proxies: Vec<(Arm, Result<String, String>)>,
    /// Open port-forwards; they close when dropped at the end of the run.
    _forwards: Vec<cluster::Forward>,
}

pub async fn resolve(
    options: &Options,
    cluster: Option<&cluster::Cluster>,
) -> Result<Targets, String> {
    let envoy_admin = options.envoy_admin_url.clone().filter(|u| !u.is_empty());
    let Some(cluster) = cluster else {
        return Ok(Targets {
            gateway: options.gateway_url.clone().unwrap_or_default(),
            sidecar: options.sidecar_url.clone().filter(|_| !options.no_sidecar),
            envoy_admin,
            proxies: options
                .arms
                .iter()
                .map(|a| {
                    (
                        a.clone(),
                        a.proxy_url.clone().ok_or_else(|| NO_PROXY_URL.to_string()),
                    )
                })
                .collect(),
            _forwards: Vec::new(),
        });
    };
    let names = &options.cluster;
    let mut forwards = Vec::new();
    let gateway = match &options.gateway_url {
        Some(url) => url.clone(),
        None => {
            let forward = cluster
                .forward_service(
                    &names.gateway_namespace,
                    &names.gateway_service.name,
                    names.gateway_service.port,
                )
                .await?;
            let url = forward.url.clone();
            forwards.push(forward);
            url
        }
    };
    let sidecar = if options.no_sidecar {
        None
    } else if let Some(url) = &options.sidecar_url {
        Some(url.clone())
    } else {
        match cluster
            .forward_service(
                &names.proxy_namespace,
                &names.sidecar_service.name,
                names.sidecar_service.port,
            )
            .await
        {
            Ok(forward) => {
                let url = forward.url.clone();
                forwards.push(forward);
                Some(url)
            }
            Err(e) => {
                log::warn!("no sidecar: {e}");
                None
            }
        }
    };
    let pods = cluster
        .pods(&names.proxy_namespace, &names.proxy_selector)
        .await;
    let mut proxies = Vec::new();
    for arm in &options.arms {
        let url = match (&arm.proxy_url, &pods) {
            (Some(url), _) => Ok(url.clone()),
            (None, Err(e)) => Err(e.message.clone()),
            (None, Ok(pods)) => {
                let pod = pods
                    .iter()
                    .map(cluster::pod_state)
                    .find(|p| p.ready && p.labels.get(&names.backend_label) == Some(&arm.name));
                match pod {
                    None => Err(format!(
                        "no ready proxy pod labelled {}={}",
                        names.backend_label, arm.name
                    )),
                    Some(pod) => match cluster
                        .forward_pod(&names.proxy_namespace, &pod.name, names.proxy_port)
                        .await
                    {
                        Ok(forward) => {
                            let url = forward.url.clone();
                            forwards.push(forward);
                            Ok(url)
                        }
                        Err(e) => Err(e),
                    },
                }
            }
        };
        proxies.push((arm.clone(), url));
    }
    Ok(Targets {
        gateway,
        sidecar,
        envoy_admin,
        proxies,
        _forwards: forwards,
    })
}

/// The targets of a dry run: what `resolve` would return, each port-forward described instead of opened.
pub fn planned(options: &Options) -> Targets {
    let names = &options.cluster;
    let forward = |what: String| format!("http://127.0.0.1:<port-forward to {what}>");
    let proxies = options
        .arms
        .iter()
        .map(|arm| {
            let url = match (&arm.proxy_url, options.mode) {
                (Some(url), _) => Ok(url.clone()),
                (None, Mode::Cluster) => Ok(forward(format!(
                    "a ready proxy pod of {}:{}",
                    arm.name, names.proxy_port
                ))),
                (None, Mode::Local) => Err(NO_PROXY_URL.to_string()),
            };
            (arm.clone(), url)
        })
        .collect();
    Targets {
        gateway: options
            .gateway_url
            .clone()
            .unwrap_or_else(|| forward(format!("svc/{}", names.gateway_service))),
        sidecar: (!options.no_sidecar).then(|| {
            options
                .sidecar_url
                .clone()
                .unwrap_or_else(|| forward(format!("svc/{}", names.sidecar_service)))
        }),
        envoy_admin: options.envoy_admin_url.clone().filter(|u| !u.is_empty()),
        proxies,
        _forwards: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_names_each_port_forward_and_local_mode_needs_urls() {
        let cluster = Options {
            mode: Mode::Cluster,
            gateway_url: None,
            sidecar_url: None,
            envoy_admin_url: None,
            ..Options::default()
        };
        let cluster = Options {
            arms: cluster
                .arms
                .iter()
                .cloned()
                .map(|arm| Arm {
                    proxy_url: None,
                    ..arm
                })
                .collect(),
            ..cluster
        };
        let planned_cluster = planned(&cluster);
        assert_eq!(
            planned_cluster.gateway,
            "http://127.0.0.1:<port-forward to svc/infra-inference-scheduling-inference-gateway-istio:80>"
        );
        assert_eq!(
            planned_cluster.sidecar.as_deref(),
            Some("http://127.0.0.1:<port-forward to svc/kvab:18090>")
        );
        assert_eq!(
            planned_cluster.proxies[0].1.as_deref(),
            Ok("http://127.0.0.1:<port-forward to a ready proxy pod of nvlink:8080>")
        );
        let local = Options {
            no_sidecar: true,
            sidecar_url: None,
            arms: cluster.arms.clone(),
            ..Options::default()
        };
        let planned_local = planned(&local);
        assert_eq!(planned_local.sidecar, None);
        assert_eq!(planned_local.proxies[1].1, Err(NO_PROXY_URL.to_string()));
    }
}
