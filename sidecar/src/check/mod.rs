//! `kvab check`: the A/B runbook (prerequisites, Steps 1–4, EPP health) as one command with a verdict.
//!
//! This module only orders the steps and moves data between them. Each step has its own module
//! (`prerequisites`, `direct`, `wiring`, `header_ab`, `burst`, `epp_health`, `latency`) whose judgement is a
//! pure, unit-tested function. Where requests go is `targets` (URLs or port-forwards), what is sent is
//! `requests`, and `plan` prints both for `--dry-run`. Flags are `options` (the value parsers shared with the
//! other tools are `crate::args`), statistics `kvab_judge::stats`, Kubernetes `crate::cluster`, counters
//! `observe`, rendering `report`; HTTP is `kvab_serve::client`.

mod burst;
mod direct;
mod epp_health;
mod header_ab;
mod latency;
mod observe;
pub mod options;
mod plan;
mod prerequisites;
mod prom;
mod report;
mod requests;
mod targets;
mod wiring;

use crate::cluster;
use crate::output::{self, Failure};
use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;

use kvab_contract::report::NO_ARM;
use kvab_serve::client::HttpClient;
use observe::{Counters, SidecarView};
use options::{Mode, Options};
use report::{Check, Outcome, Report};

/// Entry point of `kvab check`, with its flags as parsed by the command line.
pub fn main(args: options::CheckArgs) -> ExitCode {
    output::run("check", check(args))
}

async fn check(args: options::CheckArgs) -> Result<ExitCode, Failure> {
    let options = Options::from_args(args).map_err(Failure::Usage)?;
    if options.dry_run {
        print!("{}", plan::render(&options));
        return Ok(ExitCode::SUCCESS);
    }
    let report = run(&options).await.map_err(Failure::Run)?;
    if options.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("kvab check: cannot encode the report: {e}"),
        }
    } else {
        print!("{}", report::render_table(&report));
    }
    Ok(ExitCode::from(report.exit_code))
}

fn mode_name(options: &Options) -> &'static str {
    match options.mode {
        Mode::Local => "local",
        Mode::Cluster => "cluster",
    }
}

async fn run(options: &Options) -> Result<Report, String> {
    let started = Instant::now();
    // The filter tags each answer with the endpoint that served it, in `<header>-endpoint`.
    let endpoint_header = kvab_contract::endpoint_header(&options.header);
    let client = HttpClient::new(options.max_time);
    let cluster = match options.mode {
        Mode::Cluster => Some(cluster::Cluster::connect().await?),
        Mode::Local => None,
    };
    let targets = targets::resolve(options, cluster.as_ref()).await?;
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
        let unread = |name: &str, e: cluster::ReadError| {
            Check::new(name, "pods listed", e.message, Outcome::Inconclusive).diagnosis(
                "the Kubernetes API did not answer the read; nothing was learned about the pods",
            )
        };
        // The API server evaluates --proxy-selector, whatever its form (as `kubectl get -l` does).
        let proxies = cluster
            .pods(&names.proxy_namespace, &names.proxy_selector)
            .await
            .map(|pods| pods.iter().map(cluster::pod_state).collect::<Vec<_>>());
        let all = cluster
            .pods(&names.proxy_namespace, "")
            .await
            .map(|pods| pods.iter().map(cluster::pod_state).collect::<Vec<_>>());
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
        &prerequisites::probe_metrics(options, &client, sidecar.as_ref(), &targets).await,
    ));

    // Step 1: each arm's proxy directly.
    for (arm, url) in &targets.proxies {
        let check = match url {
            Ok(url) => {
                let request = requests::direct(options, url);
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
    checks.extend(wiring::check(options, cluster.as_ref()).await);

    // Step 3: header A/B.
    let before_all = Counters::read(&client, sidecar_url, admin_url).await;
    let mut header_outcomes = Vec::new();
    for arm in &options.arms {
        let mut outcomes = Vec::new();
        for _ in 0..options.header_requests {
            outcomes.push(
                client
                    .send(&requests::header(options, &targets.gateway, &arm.name))
                    .await,
            );
        }
        header_outcomes.push((arm.clone(), outcomes));
    }
    let unknown = client
        .send(&requests::header(
            options,
            &targets.gateway,
            &options.unknown_value,
        ))
        .await;
    // The filter reports every request it admitted once answered, whether a proxy or Envoy itself
    // answered it, so the counters are complete when they hold every answer (the endpoint tag, which
    // only upstream answers carry, may be off: responseEndpointHeader).
    let answers = |arm: &str| -> f64 {
        header_outcomes
            .iter()
            .filter(|(a, _)| a.name == arm)
            .flat_map(|(_, o)| o.iter().flatten())
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
                let want = answers(&a.name);
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
        &requests::burst(options, &targets.gateway),
        options.burst_requests,
        options.concurrency,
        options.burst_time_limit,
        true,
    )
    .await;
    let answered = shots.iter().flatten().count() as f64;
    let burst_delta = observe::settle(
        &client,
        sidecar_url,
        admin_url,
        &before_burst,
        options.settle,
        |d| d.routed.is_none() || d.routed_by_served(NO_ARM).values().sum::<f64>() >= answered,
    )
    .await;
    checks.push(burst::judge_status(
        &shots,
        options.burst_requests,
        options.min_success_ratio,
    ));
    let mapped = sidecar
        .as_ref()
        .filter(|view| view.map.is_some())
        .map(|_| endpoints.as_slice());
    let (pool, counts, source) = burst::pool_and_counts(
        mapped,
        &burst_delta,
        &targets.proxies,
        &shots,
        &endpoint_header,
    );
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
    let since_seconds = started.elapsed().as_secs() as i64 + 1;
    checks.push(epp_health::check(options, cluster.as_ref(), since_seconds).await);

    // Per-arm latency of the burst, as an observation (the verdict is kvab experiment's).
    let by_arm = latency::samples_by_arm(&shots, &options.header, &options.arms);
    let (latency_check, mut ab) = latency::observe(&by_arm);
    checks.push(latency_check);
    ab["burst_status"] = json!(burst::histogram(&shots));
    Ok(Report::new(mode_name(options), checks, Some(ab)))
}
