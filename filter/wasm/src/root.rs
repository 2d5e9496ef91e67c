//! A root context's work: parse the configuration once per VM, drive the link to the sidecar on
//! each tick and take its answers. `exports` keeps the roots and hands each request its worker.

use crate::abi::{self, Level};
use crate::worker::Worker;

/// `BadArgument`: what Envoy answers a call to a cluster it does not have.
const BAD_ARGUMENT: u32 = 2;

/// Unique per VM instance and never reused: the Envoy node and 64 random bits of this VM's
/// (never the clock: workers configure in the same instant, and two VMs sharing an id
/// interleave their cumulative totals, so the sidecar refuses about half of them).
fn reporter_id(context_id: u32, instance: u64) -> String {
    let node = abi::property(b"node\0id")
        .ok()
        .flatten()
        .and_then(|id| String::from_utf8(id.into_vec()).ok())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| "envoy".to_owned());
    format!("{node}/{instance:016x}/{context_id}")
}

pub fn on_http_call_response(worker: &Worker, token: u32, body_size: usize) {
    if let Some(link) = &worker.link {
        link.on_response(&worker.plan, &worker.metrics, token, body_size);
    }
}

pub fn tick(worker: &Worker) {
    if let Some(link) = &worker.link {
        link.tick(&worker.plan, &worker.metrics);
    }
}

/// The worker for a root context's configuration; `None` (logged) refuses it.
pub fn configure(context_id: u32) -> Option<Worker> {
    let raw = match abi::plugin_configuration() {
        Ok(raw) => raw.unwrap_or_default(),
        Err(e) => {
            abi::log(
                Level::Error,
                &format!("cannot read the plugin configuration: host status {}", e.0),
            );
            return None;
        }
    };
    let plan = match kvab_filter_core::parse(&raw) {
        Ok(plan) => plan,
        Err(e) => {
            abi::log(Level::Error, &format!("invalid plugin configuration: {e}"));
            return None;
        }
    };
    // Two draws: the split's seed is not derivable from the id the reports show.
    let (instance, seed) = match (abi::random_u64(), abi::random_u64()) {
        (Ok(instance), Ok(seed)) => (instance, seed),
        (Err(e), _) | (_, Err(e)) => {
            abi::log(
                Level::Error,
                &format!("cannot read the host's random source: WASI errno {}", e.0),
            );
            return None;
        }
    };
    let worker = match Worker::new(plan, seed, reporter_id(context_id, instance)) {
        Ok(worker) => worker,
        Err((name, e)) => {
            abi::log(
                Level::Error,
                &format!("cannot define metric {name}: host status {}", e.0),
            );
            return None;
        }
    };
    if let Some(link) = &worker.link {
        // The first fetch goes out now, and proves the cluster exists.
        if let Err(e) = link.fetch(&worker.metrics, abi::now_nanos()) {
            if e.0 == BAD_ARGUMENT {
                abi::log(
                        Level::Error,
                        &format!("invalid plugin configuration: sidecar.cluster: Envoy has no cluster named \"{}\"", link.cluster()),
                    );
                return None;
            }
            abi::log(
                Level::Warn,
                &format!("first endpoint map request failed: host status {}", e.0),
            );
        }
        let period = u32::try_from(link.refresh_ms()).unwrap_or(u32::MAX);
        if let Err(e) = abi::set_tick_period_ms(period) {
            abi::log(
                Level::Error,
                &format!("cannot set the tick period: host status {}", e.0),
            );
            return None;
        }
    }
    abi::log(
        Level::Info,
        &format!("configured: {}", worker.plan.describe()),
    );
    Some(worker)
}
