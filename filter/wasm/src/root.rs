//! The root context: parses the configuration once per VM, drives the link to the sidecar on
//! each tick, and hands each request a context.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::abi::{self, Level};
use crate::http::RequestContext;
use crate::worker::Worker;

/// `BadArgument`: what Envoy answers a call to a cluster it does not have.
const BAD_ARGUMENT: u32 = 2;

pub struct Root {
    context_id: u32,
    worker: Option<Rc<Worker>>,
}

impl Root {
    pub fn new(context_id: u32) -> Self {
        Root {
            context_id,
            worker: None,
        }
    }

    /// Unique per VM instance and never reused: the Envoy node and 64 random bits of this VM's
    /// (never the clock: workers configure in the same instant, and two VMs sharing an id
    /// interleave their cumulative totals, so the sidecar refuses about half of them).
    fn reporter_id(&self, instance: u64) -> String {
        let node = abi::property(b"node\0id")
            .ok()
            .flatten()
            .and_then(|id| String::from_utf8(id.into_vec()).ok())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| "envoy".to_owned());
        format!("{node}/{instance:016x}/{}", self.context_id)
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(worker) = self.worker.as_deref() {
            if let Some(link) = &worker.link {
                link.on_response(&worker.plan, &worker.metrics, token_id, body_size);
            }
        }
    }
}

impl RootContext for Root {
    /// Returning false makes Envoy refuse the configuration (startup fails, an xDS update is
    /// rejected), so a bad config never reaches the request path.
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = match abi::plugin_configuration() {
            Ok(raw) => raw.unwrap_or_default(),
            Err(e) => {
                abi::log(
                    Level::Error,
                    &format!("cannot read the plugin configuration: host status {}", e.0),
                );
                return false;
            }
        };
        let plan = match kvab_filter_core::parse(&raw) {
            Ok(plan) => plan,
            Err(e) => {
                abi::log(Level::Error, &format!("invalid plugin configuration: {e}"));
                return false;
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
                return false;
            }
        };
        let worker = match Worker::new(plan, seed, self.reporter_id(instance)) {
            Ok(worker) => worker,
            Err((name, e)) => {
                abi::log(
                    Level::Error,
                    &format!("cannot define metric {name}: host status {}", e.0),
                );
                return false;
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
                    return false;
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
                return false;
            }
        }
        abi::log(
            Level::Info,
            &format!("configured: {}", worker.plan.describe()),
        );
        self.worker = Some(Rc::new(worker));
        true
    }

    fn on_tick(&mut self) {
        if let Some(worker) = self.worker.as_deref() {
            if let Some(link) = &worker.link {
                link.tick(&worker.plan, &worker.metrics);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a worker (configuration refused) Envoy does not run the filter; a pass-through
        // context keeps the dispatcher from panicking should it ask anyway.
        Some(Box::new(RequestContext::new(self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
