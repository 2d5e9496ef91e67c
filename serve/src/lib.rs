//! `kvab serve`: the long-running server. Wiring only; the parts live in their modules:
//! `config` (TOML; label selectors checked by `selector`), `index` (pods → endpoint map), `watch`
//! (Kubernetes source), `probe` (proxy `/metrics`), `state` (published snapshot, readiness), `reports`
//! (`POST /v1/reports` and its writer; the ledger and its journal are the `kvab-ledger` crate), `http` (the
//! API), `server` (listener limits), `fence` (what a panic does), `metrics` (Prometheus), `filter_wasm`
//! (the filter module served to the gateway). `client` is the HTTP client of the prober, which the
//! `kvab` tools share.

mod answer;
pub mod client;
mod config;
pub mod fence;
mod filter_wasm;
mod http;
mod index;
mod metrics;
mod probe;
mod published;
mod reports;
pub mod selector;
mod server;
mod state;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch as shutdown_channel;

use crate::config::{Config, Source};
use crate::index::{Index, Proxy};
use crate::state::State;

/// What `kvab serve` is asked to do (its command line).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The configuration file (`--config`, `KVAB_CONFIG`); `None` or empty: the built-in defaults.
    pub config: Option<String>,
    /// `--check-config`: check the configuration, print a summary and exit.
    pub check_config: bool,
    /// `--repair-state`: move damaged report state aside and count from zero.
    pub repair_state: bool,
}

/// What `kvab serve` starts with: the configuration read and checked, and the filter module read.
pub struct Prepared {
    config: Config,
    filter_module: Option<filter_wasm::FilterWasm>,
    repair_state: bool,
}

/// What the command line asks for, once the configuration is read.
pub enum Start {
    /// Serve until a signal.
    Serve(Box<Prepared>),
    /// `--check-config`: the configuration is good; its summary line.
    Checked(String),
}

/// Reads and checks the configuration (and reads and hashes the filter module it names), before anything is
/// served; `Err` is the configuration error, naming the key.
pub fn prepare(options: Options) -> Result<Start, String> {
    // An empty KVAB_CONFIG means "not set", as before clap read it.
    let config_path = options.config.filter(|path| !path.is_empty());
    let config = Config::load(config_path.as_deref()).map_err(|e| e.to_string())?;
    // Read and hashed once, before anything is served: a missing file stops the start with the key's name.
    let filter_module = config
        .filter_wasm
        .as_deref()
        .map(filter_wasm::FilterWasm::load)
        .transpose()
        .map_err(|e| format!("{e:#}"))?;
    if options.check_config {
        let mut line = summary(&config);
        if let Some(module) = &filter_module {
            line.push_str(&format!(", filter_wasm sha256 {}", module.sha256));
        }
        return Ok(Start::Checked(line));
    }
    Ok(Start::Serve(Box::new(Prepared {
        config,
        filter_module,
        repair_state: options.repair_state,
    })))
}

/// Serves until SIGTERM or SIGINT (then drains), or until the source fails for good.
pub async fn run(prepared: Box<Prepared>) -> anyhow::Result<()> {
    if !fence::unwinds() {
        log::warn!(
            "this kvab was built with panic = \"abort\": a panic while answering one request ends the \
             process; build it with `cargo build --profile sidecar -p kvab` (docs/sidecar.md)"
        );
    }
    if let Some(module) = &prepared.filter_module {
        log::info!(
            "serving {} ({} bytes, sha256 {}) at GET {}",
            module.path,
            module.body.len(),
            module.sha256,
            filter_wasm::PATH
        );
    }
    serve(
        prepared.config,
        prepared.filter_module,
        prepared.repair_state,
    )
    .await
}

fn summary(config: &Config) -> String {
    let source = match &config.source {
        Source::Static(endpoints) => format!("static ({} endpoints)", endpoints.len()),
        Source::Kubernetes(k) => format!(
            "kubernetes (namespaces {}, selector {:?}, label {}, port {})",
            if k.namespaces.is_empty() {
                "all".to_string()
            } else {
                k.namespaces.join(",")
            },
            k.pod_selector,
            k.backend_label,
            k.endpoint_port
        ),
    };
    format!(
        "configuration ok: listen {}, arms {}, source {source}",
        config.listen,
        config.arms.join(",")
    )
}

async fn serve(
    config: Config,
    filter_module: Option<filter_wasm::FilterWasm>,
    repair_state: bool,
) -> anyhow::Result<()> {
    let unready_after = match &config.source {
        Source::Kubernetes(k) => k.unready_after,
        Source::Static(_) => Duration::MAX,
    };
    let state = Arc::new(State::new(unready_after)?);
    let reports = Arc::new(reports::Reports::open(
        reports::Settings {
            arms: config.arms.clone(),
            state_file: config.reports_state_file.clone(),
            token: config.reports_token.clone(),
            retire_after: config.reports_retire_after,
            repair: repair_state,
            evict_idle_after: reports::EVICT_IDLE_AFTER,
            limits: kvab_ledger::Limits {
                max_reporters: config.reports_max_reporters,
                max_entries: config.reports_max_entries,
            },
        },
        &state,
    )?);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (key `listen`)", config.listen))?;
    let health_listener = match config.health_listen {
        None => None,
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (key `health_listen`)"))?,
        ),
    };
    let (shutdown_tx, shutdown_rx) = shutdown_channel::channel(false);
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let mut source_task = match &config.source {
        Source::Static(endpoints) => {
            let mut index = Index::new(&config.arms);
            for endpoint in endpoints {
                index.apply(Proxy {
                    namespace: String::new(),
                    name: endpoint.pod.clone(),
                    backend: Some(endpoint.backend.clone()),
                    address: Some(endpoint.address.clone()),
                    ready: endpoint.ready,
                });
            }
            state.publish(index.view(), jiff::Timestamp::now())?;
            log::info!("static source: {} endpoints", endpoints.len());
            None
        }
        Source::Kubernetes(settings) => Some(tokio::spawn(watch::run(
            settings.clone(),
            config.arms.clone(),
            state.clone(),
            shutdown_rx.clone(),
        ))),
    };
    let probe_task = config.probe.interval.map(|interval| {
        tokio::spawn(probe::run(
            config.probe.clone(),
            interval,
            state.clone(),
            shutdown_rx.clone(),
        ))
    });

    let mut server_shutdown = shutdown_rx.clone();
    let app = Arc::new(http::App {
        state: state.clone(),
        reports,
        filter_module,
    });
    let server = server::run(
        "api",
        listener,
        server::API,
        http::routes(app.clone()),
        state.clone(),
        async move {
            let _ = server_shutdown.changed().await;
        },
    );
    let mut server_task = tokio::spawn(server);
    log::info!("kvab serve listening on http://{}", config.listen);
    // Probes stay answered while the draining API finishes: this listener closes with the process.
    let _probe_task = health_listener.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            log::info!("probes (/healthz, /readyz) also on http://{address}");
        }
        tokio::spawn(server::run(
            "probes",
            listener,
            server::PROBES,
            http::probe_routes(app),
            state.clone(),
            std::future::pending(),
        ))
    });

    // Run until a signal, or until the source fails for good (e.g. no Kubernetes client can be configured).
    let source_failure = tokio::select! {
        _ = terminate.recv() => { log::info!("SIGTERM: shutting down"); None }
        _ = interrupt.recv() => { log::info!("SIGINT: shutting down"); None }
        result = async { match source_task.as_mut() { Some(task) => task.await, None => std::future::pending().await } } => {
            source_task = None;
            Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("the Kubernetes watch ended unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("the Kubernetes watch task failed: {e}"),
            })
        }
        result = &mut server_task => {
            return Err(anyhow::anyhow!("the HTTP server stopped unexpectedly: {result:?}"));
        }
    };

    // Readiness goes false first; after the drain delay the listener closes and in-flight requests finish.
    state.start_draining();
    if source_failure.is_none() && !config.shutdown.drain_delay.is_zero() {
        log::info!(
            "readiness is off; waiting {:?} before closing the listener",
            config.shutdown.drain_delay
        );
        tokio::select! {
            _ = tokio::time::sleep(config.shutdown.drain_delay) => {}
            _ = terminate.recv() => log::warn!("second signal: skipping the drain delay"),
            _ = interrupt.recv() => log::warn!("second signal: skipping the drain delay"),
        }
    }
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(config.shutdown.grace, server_task).await {
        Ok(_) => log::info!("HTTP server drained"),
        Err(_) => log::warn!(
            "in-flight requests still open after {:?}; exiting anyway",
            config.shutdown.grace
        ),
    }
    if let Some(task) = source_task {
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            log::warn!("the Kubernetes watch did not stop within 2s");
        }
    }
    if let Some(task) = probe_task {
        if tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            log::warn!("the proxy prober did not stop within 2s");
        }
    }
    match source_failure {
        Some(e) => Err(e),
        None => {
            log::info!("shutdown complete");
            Ok(())
        }
    }
}
