//! The root context: parses the configuration once and hands each request a context.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::abi::{self, Level};
use crate::http::RequestContext;
use crate::worker::Worker;

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
}

impl Context for Root {}

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
        let seed = abi::now_nanos() ^ (u64::from(self.context_id) << 32);
        match Worker::new(plan, seed) {
            Ok(worker) => {
                abi::log(
                    Level::Info,
                    &format!("configured: {}", worker.plan.describe()),
                );
                self.worker = Some(Rc::new(worker));
                true
            }
            Err((name, e)) => {
                abi::log(
                    Level::Error,
                    &format!("cannot define metric {name}: host status {}", e.0),
                );
                false
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
