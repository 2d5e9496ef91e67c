//! `kvab check`: the A/B runbook (prerequisites, Steps 1–4, EPP health) as one command with a verdict.
//!
//! This module only orders the steps and moves data between them. Each step's judgement is a pure function
//! in its own module (`prerequisites`, `direct`, `wiring`, `header_ab`, `burst`, `epp_health`, `latency`);
//! the statistics are in `stats`, HTTP in `crate::client`, Kubernetes in `kube`, counters in `observe`, rendering
//! in `report`.

mod burst;
mod direct;
mod epp_health;
mod header_ab;
mod kube;
mod latency;
mod observe;
pub mod options;
mod prerequisites;
mod prom;
mod report;
mod stats;
mod wiring;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;

use crate::client::{HttpClient, Request};
use observe::{Counters, SidecarView};
use options::{Arm, Mode, Options};
use report::{Check, Outcome, Report};

/// Entry point of `kvab check`, with its flags as parsed by the command line.
pub fn main(args: options::CheckArgs) -> ExitCode {
    let options = match Options::from_args(args) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("error: {message}\n\nFor more information, try 'kvab check --help'.");
            return ExitCode::from(3);
        }
    };
    if options.dry_run {
        print!("{}", plan(&options));
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kvab check: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(&options)) {
        Ok(report) => {
            if options.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("kvab check: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", report::render_table(&report));
            }
            ExitCode::from(report.exit_code)
        }
        Err(message) => {
            eprintln!("kvab check: {message}");
            ExitCode::from(3)
        }
    }
}

fn mode_name(options: &Options) -> &'static str {
    match options.mode {
        Mode::Local => "local",
        Mode::Cluster => "cluster",
    }
}

/// Where the check sends its requests, after any port-forwards are open.
struct Targets {
    gateway: String,
    sidecar: Option<String>,
    envoy_admin: Option<String>,
    /// Per arm, the proxy URL for Step 1 (or why there is none).
    proxies: Vec<(Arm, Result<String, String>)>,
    /// Open port-forwards; they close when dropped at the end of the run.
    _forwards: Vec<kube::Forward>,
}

async fn targets(options: &Options, cluster: Option<&kube::Cluster>) -> Result<Targets, String> {
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
                        a.proxy_url
                            .clone()
                            .ok_or_else(|| "no --proxy-url".to_string()),
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
                    .map(kube::pod_state)
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

fn completion_body(options: &Options) -> serde_json::Value {
    json!({"model": options.model, "prompt": "Hello", "max_tokens": 5})
}

fn burst_request(options: &Options, gateway: &str) -> Request {
    let body = json!({
        "model": options.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": options.stream,
    });
    Request::post_json(format!("{gateway}{}", options.burst_path), &body)
}

fn header_request(options: &Options, gateway: &str, value: &str) -> Request {
    Request::post_json(
        format!("{gateway}/v1/completions"),
        &completion_body(options),
    )
    .with_header(&options.header, value)
}

async fn run(options: &Options) -> Result<Report, String> {
    let started = Instant::now();
    // The filter tags each answer with the endpoint that served it, in `<header>-endpoint`.
    let endpoint_header = kvab_contract::endpoint_header(&options.header);
    let client = HttpClient::new(options.max_time);
    let cluster = match options.mode {
        Mode::Cluster => Some(kube::Cluster::connect().await?),
        Mode::Local => None,
    };
    let targets = targets(options, cluster.as_ref()).await?;
    let sidecar_url = targets.sidecar.as_deref();
    let admin_url = targets.envoy_admin.as_deref();
    let mut checks = Vec::new();

    // Prerequisites.
    let sidecar = match sidecar_url {
        Some(url) => Some(SidecarView::fetch(&client, url).await),
        None => None,
    };
    if let Some(view) = &sidecar {
        if let Some(error) = &view.error {
            checks.push(
                Check::new(
                    "prerequisites/sidecar",
                    "kvab serve answers /v1/endpoints",
                    error.clone(),
                    Outcome::Fail,
                )
                .diagnosis("start kvab serve or pass --sidecar-url (none to run without it)"),
            );
        }
    }
    let endpoints = sidecar
        .as_ref()
        .map(SidecarView::endpoints)
        .unwrap_or_default();
    if let Some(cluster) = &cluster {
        let names = &options.cluster;
        let unread = |name: &str, e: kube::ReadError| {
            Check::new(name, "pods listed", e.message, Outcome::Inconclusive).diagnosis(
                "the Kubernetes API did not answer the read; nothing was learned about the pods",
            )
        };
        // The API server evaluates --proxy-selector, whatever its form (as `kubectl get -l` does).
        let proxies = cluster
            .pods(&names.proxy_namespace, &names.proxy_selector)
            .await
            .map(|pods| pods.iter().map(kube::pod_state).collect::<Vec<_>>());
        let all = cluster
            .pods(&names.proxy_namespace, "")
            .await
            .map(|pods| pods.iter().map(kube::pod_state).collect::<Vec<_>>());
        match (&all, &proxies) {
            (Ok(all), Ok(proxies)) => checks.push(prerequisites::judge_pods(
                all,
                proxies,
                &options.arms,
                &names.backend_label,
            )),
            (Err(e), _) | (_, Err(e)) => checks.push(unread("prerequisites/pods", e.clone())),
        }
        match proxies {
            Ok(proxies) => checks.push(prerequisites::judge_pod_labels(
                &proxies,
                &options.arms,
                &names.backend_label,
            )),
            Err(e) => checks.push(unread("prerequisites/proxy-labels", e)),
        }
    } else if let Some(view) = sidecar.as_ref().filter(|v| v.map.is_some()) {
        checks.push(prerequisites::judge_map_readiness(
            &endpoints,
            &options.arms,
        ));
        checks.push(prerequisites::judge_sidecar_labels(
            &endpoints,
            &view.samples,
            &options.arms,
            &options.cluster.backend_label,
        ));
    }
    checks.push(prerequisites::judge_metrics(
        &metrics_probes(options, &client, sidecar.as_ref(), &targets).await,
    ));

    // Step 1: each arm's proxy directly.
    for (arm, url) in &targets.proxies {
        let check = match url {
            Ok(url) => {
                let request =
                    Request::post_json(format!("{url}/v1/completions"), &completion_body(options));
                direct::judge(arm, &options.arms, url, &client.send(&request).await)
            }
            Err(why) => Check::new(
                &format!("step1/direct-{}", arm.name),
                "200 from the proxy",
                why.clone(),
                Outcome::Inconclusive,
            ),
        };
        checks.push(check);
    }

    // Step 2: wiring.
    checks.extend(wiring_checks(options, cluster.as_ref()).await);

    // Step 3: header A/B.
    let before_all = Counters::read(&client, sidecar_url, admin_url).await;
    let mut header_outcomes = Vec::new();
    for arm in &options.arms {
        let mut outcomes = Vec::new();
        for _ in 0..options.header_requests {
            outcomes.push(
                client
                    .send(&header_request(options, &targets.gateway, &arm.name))
                    .await,
            );
        }
        header_outcomes.push((arm.clone(), outcomes));
    }
    let unknown = client
        .send(&header_request(
            options,
            &targets.gateway,
            &options.unknown_value,
        ))
        .await;
    let upstream_answers = |arm: &str| -> f64 {
        header_outcomes
            .iter()
            .filter(|(a, _)| a.name == arm)
            .flat_map(|(_, o)| o.iter().flatten())
            .filter(|e| e.header(&endpoint_header).is_some())
            .count() as f64
    };
    let delta = observe::settle(
        &client,
        sidecar_url,
        admin_url,
        &before_all,
        options.settle,
        |d| {
            options.arms.iter().all(|a| {
                let want = upstream_answers(&a.name);
                (d.routed.is_none() || d.routed_by_served(&a.name).values().sum::<f64>() >= want)
                    && (d.served.is_none()
                        || d.served_by_served(&a.name).values().sum::<f64>() >= want)
            })
        },
    )
    .await;
    for (arm, outcomes) in &header_outcomes {
        checks.push(header_ab::judge_arm(
            arm,
            &options.arms,
            &options.header,
            outcomes,
            &delta,
        ));
    }
    checks.push(header_ab::judge_unknown(
        &options.header,
        &options.unknown_value,
        &unknown,
    ));

    // Step 4: burst of untagged requests.
    let before_burst = Counters::read(&client, sidecar_url, admin_url).await;
    let shots = burst::run(
        &client,
        &burst_request(options, &targets.gateway),
        options.burst_requests,
        options.concurrency,
        options.burst_time_limit,
        true,
    )
    .await;
    let reached: Vec<&str> = shots
        .iter()
        .flatten()
        .filter_map(|e| e.header(&endpoint_header))
        .collect();
    let burst_delta = observe::settle(
        &client,
        sidecar_url,
        admin_url,
        &before_burst,
        options.settle,
        |d| {
            d.routed.is_none()
                || d.routed_by_served("none").values().sum::<f64>() >= reached.len() as f64
        },
    )
    .await;
    checks.push(burst::judge_status(
        &shots,
        options.burst_requests,
        options.min_success_ratio,
    ));
    let (pool, counts, source) = match (&sidecar, &burst_delta.routed) {
        (Some(view), Some(_)) if view.map.is_some() => (
            endpoints
                .iter()
                .filter(|(.., ready)| *ready)
                .map(|(a, pod, ..)| (a.clone(), pod.clone()))
                .collect(),
            burst_delta.answered_by_pod("none"),
            "sidecar counters, answers below 500",
        ),
        _ => {
            // No sidecar: the proxies are known by their URLs, the counts by the responses' endpoint tag.
            let pool: Vec<(String, String)> = targets
                .proxies
                .iter()
                .filter_map(|(a, url)| {
                    url.as_ref()
                        .ok()
                        .map(|u| (a.name.clone(), u.trim_start_matches("http://").to_string()))
                })
                .collect();
            let mut counts: BTreeMap<String, f64> = BTreeMap::new();
            for exchange in shots.iter().flatten().filter(|e| e.status < 500) {
                if let Some(endpoint) = exchange.header(&endpoint_header) {
                    *counts.entry(endpoint.to_string()).or_default() += 1.0;
                }
            }
            (pool, counts, "response endpoint tags, answers below 500")
        }
    };
    checks.push(burst::judge_spread(
        &pool,
        &counts,
        &options.split,
        options.alpha,
        source,
    ));
    let after = Counters::read(&client, sidecar_url, admin_url).await;
    checks.push(burst::judge_misroutes(
        &after.since(&before_all),
        &options.arms,
    ));

    // EPP health.
    checks.push(match &cluster {
        Some(cluster) => {
            let names = &options.cluster;
            let since = started.elapsed().as_secs() as i64 + 1;
            match cluster
                .deployment_logs(&names.epp_namespace, &names.epp_deployment, since)
                .await
            {
                Ok(logs) => epp_health::judge_epp_logs(&logs),
                Err(e) => Check::new(
                    "epp/health",
                    "EPP log readable",
                    e.message,
                    Outcome::Inconclusive,
                )
                .diagnosis("cannot read the scheduler's log: check --epp-deployment, --gateway-namespace and the RBAC in the README"),
            }
        }
        None => Check::new(
            "epp/health",
            "no selection failures in the EPP log",
            "local mode: no EPP",
            Outcome::Skip,
        ),
    });

    // A/B verdict.
    let by_arm = latency::samples_by_arm(&shots, &options.header, &options.arms);
    let (verdict_check, mut ab) = latency::judge(&by_arm, options.alpha);
    checks.push(verdict_check);
    ab["burst_status"] = json!(burst::histogram(&shots));
    Ok(Report::new(mode_name(options), checks, Some(ab)))
}

async fn metrics_probes(
    options: &Options,
    client: &HttpClient,
    sidecar: Option<&SidecarView>,
    targets: &Targets,
) -> Vec<prerequisites::MetricsProbe> {
    let mut probes = Vec::new();
    let probe = |url: String| async move {
        client
            .send(&Request::get(format!("{url}/metrics")))
            .await
            .map(|e| e.status)
    };
    match sidecar.filter(|v| v.map.is_some()) {
        Some(view) => {
            for (arm, pod, address, _) in view.endpoints() {
                // Pod addresses are reachable from here only locally.
                let direct = match options.mode {
                    Mode::Local => Some(probe(format!("http://{address}")).await),
                    Mode::Cluster => None,
                };
                let sidecar = prerequisites::sidecar_probe_status(&view.samples, &arm, &pod);
                probes.push(prerequisites::MetricsProbe {
                    arm,
                    pod,
                    direct,
                    sidecar,
                });
            }
        }
        None => {
            for (arm, url) in &targets.proxies {
                if let Ok(url) = url {
                    probes.push(prerequisites::MetricsProbe {
                        arm: arm.name.clone(),
                        pod: url.clone(),
                        direct: Some(probe(url.clone()).await),
                        sidecar: None,
                    });
                }
            }
        }
    }
    probes
}

async fn wiring_checks(options: &Options, cluster: Option<&kube::Cluster>) -> Vec<Check> {
    use kube::ReadError;
    let names = &options.cluster;
    // A file that cannot be read or parsed, or an object that is absent or not YAML, is a finding
    // (fail); an API read that failed (5xx, RBAC, network) teaches nothing (inconclusive).
    let finding = |message: String| ReadError {
        finding: true,
        message,
    };
    let read_file = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| finding(format!("{}: {e}", path.display())))
            .and_then(|t| wiring::parse_document(&t).map_err(finding))
            .map(|v| (v, path.display().to_string()))
    };
    let route: Option<Result<(serde_json::Value, String), ReadError>> =
        match (cluster, &options.httproute_file) {
            (_, Some(path)) => Some(read_file(path)),
            (Some(cluster), None) => Some(
                cluster
                    .httproute(&names.gateway_namespace, &names.httproute)
                    .await
                    .map(|v| {
                        (
                            v,
                            format!("httproute {}/{}", names.gateway_namespace, names.httproute),
                        )
                    }),
            ),
            (None, None) => None,
        };
    let epp: Option<Result<(serde_json::Value, String), ReadError>> =
        match (cluster, &options.epp_config_file) {
            (_, Some(path)) => Some(read_file(path)),
            (Some(cluster), None) => Some(
                cluster
                    .configmap_value(
                        &names.epp_namespace,
                        &names.epp_configmap,
                        &names.epp_config_key,
                    )
                    .await
                    .and_then(|t| {
                        wiring::parse_document(&t).map_err(|e| {
                            finding(format!(
                                "ConfigMap {}/{} key {:?}: {e}",
                                names.epp_namespace, names.epp_configmap, names.epp_config_key
                            ))
                        })
                    })
                    .map(|v| {
                        (
                            v,
                            format!("configmap {}/{}", names.epp_namespace, names.epp_configmap),
                        )
                    }),
            ),
            (None, None) => None,
        };
    let unread = |name: &str, flag: &str, e: Option<ReadError>| match e {
        None => Check::new(
            name,
            "read",
            format!("local mode without {flag}"),
            Outcome::Skip,
        ),
        Some(e) if e.finding => Check::new(name, "read", e.message, Outcome::Fail),
        Some(e) => Check::new(name, "read", e.message, Outcome::Inconclusive).diagnosis(
            "the Kubernetes API did not answer the read; nothing was learned about the wiring",
        ),
    };
    vec![
        match route {
            Some(Ok((value, source))) => {
                wiring::judge_httproute(&value, &names.inference_pool, &source)
            }
            Some(Err(e)) => unread("step2/httproute", "--httproute-file", Some(e)),
            None => unread("step2/httproute", "--httproute-file", None),
        },
        match epp {
            Some(Ok((value, source))) => wiring::judge_epp_config(
                &value,
                &names.backend_label,
                options.require_label_selector,
                &source,
            ),
            Some(Err(e)) => unread("step2/epp-config", "--epp-config-file", Some(e)),
            None => unread("step2/epp-config", "--epp-config-file", None),
        },
    ]
}

/// `--dry-run`: what the check would send and read, as curl lines and Kubernetes API paths.
fn plan(options: &Options) -> String {
    let names = &options.cluster;
    let mut out = String::new();
    let cluster = options.mode == Mode::Cluster;
    let gateway = options.gateway_url.clone().unwrap_or_else(|| {
        format!(
            "http://127.0.0.1:<port-forward to svc/{}>",
            names.gateway_service
        )
    });
    let sidecar = if options.no_sidecar {
        None
    } else {
        Some(options.sidecar_url.clone().unwrap_or_else(|| {
            format!(
                "http://127.0.0.1:<port-forward to svc/{}>",
                names.sidecar_service
            )
        }))
    };
    let _ = writeln!(
        out,
        "kvab check --dry-run ({} mode): nothing is sent.",
        mode_name(options)
    );
    let _ = writeln!(out, "\nprerequisites:");
    if cluster {
        let _ = writeln!(
            out,
            "  GET /api/v1/namespaces/{0}/pods (prefill, decode, proxy pods)\n  GET /api/v1/namespaces/{0}/pods?labelSelector={1} (proxy labels)",
            names.proxy_namespace, names.proxy_selector
        );
        let mut forwards = Vec::new();
        if options.gateway_url.is_none() {
            forwards.push((&names.gateway_namespace, &names.gateway_service.name));
        }
        if !options.no_sidecar && options.sidecar_url.is_none() {
            forwards.push((&names.proxy_namespace, &names.sidecar_service.name));
        }
        for (namespace, service) in forwards {
            let _ = writeln!(
                out,
                "  GET /api/v1/namespaces/{namespace}/services/{service}, GET /api/v1/namespaces/{namespace}/pods?labelSelector=<its selector>, then a port-forward (GET .../pods/<a ready pod>/portforward, WebSocket) per connection"
            );
        }
    }
    if let Some(url) = &sidecar {
        let _ = writeln!(
            out,
            "  curl -sS {url}/v1/endpoints\n  curl -sS {url}/metrics"
        );
        if !cluster {
            let _ = writeln!(out, "  curl -sS http://<each proxy of the map>/metrics");
        }
    }
    let proxy_url = |arm: &Arm| {
        arm.proxy_url.clone().unwrap_or_else(|| {
            format!(
                "http://127.0.0.1:<port-forward to a proxy pod of {}:{}>",
                arm.name, names.proxy_port
            )
        })
    };
    let _ = writeln!(out, "\nstep 1 (direct backend sanity):");
    for arm in &options.arms {
        let request = Request::post_json(
            format!("{}/v1/completions", proxy_url(arm)),
            &completion_body(options),
        );
        let _ = writeln!(out, "  {request}");
    }
    let _ = writeln!(out, "\nstep 2 (wiring):");
    match (&options.httproute_file, cluster) {
        (Some(path), _) => {
            let _ = writeln!(out, "  read {}", path.display());
        }
        (None, true) => {
            let _ = writeln!(
                out,
                "  GET /apis/gateway.networking.k8s.io/v1/namespaces/{}/httproutes/{}",
                names.gateway_namespace, names.httproute
            );
        }
        (None, false) => {
            let _ = writeln!(out, "  (skipped: no --httproute-file)");
        }
    }
    match (&options.epp_config_file, cluster) {
        (Some(path), _) => {
            let _ = writeln!(out, "  read {}", path.display());
        }
        (None, true) => {
            let _ = writeln!(
                out,
                "  GET /api/v1/namespaces/{}/configmaps/{} (key {})",
                names.epp_namespace, names.epp_configmap, names.epp_config_key
            );
        }
        (None, false) => {
            let _ = writeln!(out, "  (skipped: no --epp-config-file)");
        }
    }
    let _ = writeln!(
        out,
        "\nstep 3 (header A/B), {} per arm:",
        options.header_requests
    );
    for arm in &options.arms {
        let _ = writeln!(out, "  {}", header_request(options, &gateway, &arm.name));
    }
    let _ = writeln!(
        out,
        "  {}",
        header_request(options, &gateway, &options.unknown_value)
    );
    let _ = writeln!(
        out,
        "\nstep 4 (burst): {} requests, {} at a time, each at most {:?}, all within {:?}:\n  {}",
        options.burst_requests,
        options.concurrency,
        options.max_time,
        options.burst_time_limit,
        burst_request(options, &gateway)
    );
    let mut counters = Vec::new();
    if let Some(url) = &sidecar {
        counters.push(format!("{url}/metrics (kvab_routed_requests_total)"));
    }
    if let Some(url) = options.envoy_admin_url.as_ref().filter(|u| !u.is_empty()) {
        counters.push(format!("{url}/stats/prometheus (kvab_served_total)"));
    }
    if !counters.is_empty() {
        let _ = writeln!(
            out,
            "  counters before and after steps 3 and 4: {}",
            counters.join(", ")
        );
    }
    if cluster {
        let _ = writeln!(
            out,
            "\nEPP health:\n  GET /apis/apps/v1/namespaces/{0}/deployments/{1}, GET /api/v1/namespaces/{0}/pods?labelSelector=<its matchLabels>, then GET /api/v1/namespaces/{0}/pods/<each pod>/log?container=<its default container>&sinceSeconds=<since the check started>",
            names.epp_namespace, names.epp_deployment
        );
    }
    out
}
