//! `--dry-run`: what the check would send and read. The HTTP requests are the run's own (`requests`, sent to
//! `targets::planned`), printed as curl lines; the Kubernetes reads are listed as API paths.

use std::fmt::Write as _;

use super::options::{Mode, Options};
use super::requests;
use super::targets;

pub fn render(options: &Options) -> String {
    let names = &options.cluster;
    let targets = targets::planned(options);
    let cluster = options.mode == Mode::Cluster;
    let mut out = String::new();
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!(
        "kvab check --dry-run ({} mode): nothing is sent.",
        super::mode_name(options)
    ));

    line("\nprerequisites:".into());
    if cluster {
        line(format!(
            "  GET /api/v1/namespaces/{0}/pods (prefill, decode, proxy pods)\n  GET /api/v1/namespaces/{0}/pods?labelSelector={1} (proxy labels)",
            names.proxy_namespace, names.proxy_selector
        ));
        let mut forwards = Vec::new();
        if options.gateway_url.is_none() {
            forwards.push((&names.gateway_namespace, &names.gateway_service.name));
        }
        if !options.no_sidecar && options.sidecar_url.is_none() {
            forwards.push((&names.proxy_namespace, &names.sidecar_service.name));
        }
        for (namespace, service) in forwards {
            line(format!(
                "  GET /api/v1/namespaces/{namespace}/services/{service}, GET /api/v1/namespaces/{namespace}/pods?labelSelector=<its selector>, then a port-forward (GET .../pods/<a ready pod>/portforward, WebSocket) per connection"
            ));
        }
    }
    if let Some(sidecar) = &targets.sidecar {
        line(format!("  {}", requests::endpoint_map(sidecar)));
        line(format!("  {}", requests::metrics(sidecar)));
        if !cluster {
            line(format!(
                "  {}",
                requests::metrics("http://<each proxy of the map>")
            ));
        }
    }

    line("\nstep 1 (direct backend sanity):".into());
    for (arm, proxy) in &targets.proxies {
        match proxy {
            Ok(url) => line(format!("  {}", requests::direct(options, url))),
            Err(why) => line(format!("  {}: skipped ({why})", arm.name)),
        }
    }

    line("\nstep 2 (wiring):".into());
    match (&options.httproute_file, cluster) {
        (Some(path), _) => line(format!("  read {}", path.display())),
        (None, true) => line(format!(
            "  GET /apis/gateway.networking.k8s.io/v1/namespaces/{}/httproutes/{}",
            names.gateway_namespace, names.httproute
        )),
        (None, false) => line("  (skipped: no --httproute-file)".into()),
    }
    match (&options.epp_config_file, cluster) {
        (Some(path), _) => line(format!("  read {}", path.display())),
        (None, true) => line(format!(
            "  GET /api/v1/namespaces/{}/configmaps/{} (key {})",
            names.epp_namespace, names.epp_configmap, names.epp_config_key
        )),
        (None, false) => line("  (skipped: no --epp-config-file)".into()),
    }

    line(format!(
        "\nstep 3 (header A/B), {} per arm:",
        options.header_requests
    ));
    for arm in &options.arms {
        line(format!(
            "  {}",
            requests::header(options, &targets.gateway, &arm.name)
        ));
    }
    line(format!(
        "  {}",
        requests::header(options, &targets.gateway, &options.unknown_value)
    ));

    line(format!(
        "\nstep 4 (burst): {} requests, {} at a time, each at most {:?}, all within {:?}:\n  {}",
        options.burst_requests,
        options.concurrency,
        options.max_time,
        options.burst_time_limit,
        requests::burst(options, &targets.gateway)
    ));
    let mut counters = Vec::new();
    if let Some(sidecar) = &targets.sidecar {
        counters.push(format!(
            "{} (kvab_routed_requests_total)",
            requests::metrics(sidecar).url
        ));
    }
    if let Some(admin) = &targets.envoy_admin {
        counters.push(format!(
            "{} (kvab_served_total)",
            requests::envoy_stats(admin).url
        ));
    }
    if !counters.is_empty() {
        line(format!(
            "  counters before and after steps 3 and 4: {}",
            counters.join(", ")
        ));
    }
    if cluster {
        line(format!(
            "\nEPP health:\n  GET /apis/apps/v1/namespaces/{0}/deployments/{1}, GET /api/v1/namespaces/{0}/pods?labelSelector=<its matchLabels>, then GET /api/v1/namespaces/{0}/pods/<each pod>/log?container=<its default container>&sinceSeconds=<since the check started>",
            names.epp_namespace, names.epp_deployment
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dry_run_prints_the_requests_the_run_sends() {
        let options = Options {
            gateway_url: Some("http://gw:80".into()),
            ..Options::default()
        };
        let text = render(&options);
        for request in [
            requests::header(&options, "http://gw:80", "nvlink"),
            requests::header(&options, "http://gw:80", &options.unknown_value),
            requests::burst(&options, "http://gw:80"),
        ] {
            assert!(
                text.contains(&request.to_string()),
                "{request} missing from\n{text}"
            );
        }
        assert!(text.contains("(skipped: no --httproute-file)"));
        assert!(!text.contains("EPP health"), "no EPP reads in local mode");
        let cluster = render(&Options {
            mode: Mode::Cluster,
            ..options
        });
        assert!(cluster
            .contains("/namespaces/llm-d-vllm/configmaps/gaie-inference-scheduling-epp-config"));
        assert!(cluster.contains("EPP health"));
    }
}
