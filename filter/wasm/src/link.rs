//! The host side of the link to `kvab serve` (the state machine is `kvab_filter_core::link`):
//! shared data, HTTP calls and log lines through `abi`, outcomes counted in the worker's metrics.

use std::cell::RefCell;
use std::rc::Rc;

use kvab_filter_core::endpoints::{ArmMap, Served};
use kvab_filter_core::link::{self, Answered, HostStatus, LinkHost, Outgoing, SharedValue};
use kvab_filter_core::metrics::{CodeClass, FetchResult, ReportResult};
use kvab_filter_core::sidecar::Sidecar;
use kvab_filter_core::{ArmId, Plan};

use crate::abi::{self, Headers, HostError, Level};
use crate::metrics::Metrics;

/// The proxy as the link's host.
struct Host;

fn status(e: HostError) -> HostStatus {
    HostStatus(e.0)
}

impl LinkHost for Host {
    fn shared(&mut self, key: &str) -> Result<Option<SharedValue>, HostStatus> {
        abi::shared_data(key).map_err(status)
    }

    fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus> {
        abi::set_shared_data(key, value, cas).map_err(status)
    }

    fn call(&mut self, call: Outgoing<'_>) -> Result<u32, HostStatus> {
        abi::http_call(call.cluster, call.headers, call.body, call.timeout_ms).map_err(status)
    }

    fn call_response_body(&mut self, size: usize) -> Option<Box<[u8]>> {
        abi::http_call_response_body(size).ok().flatten()
    }

    fn warn(&mut self, message: &str) {
        abi::log(Level::Warn, message);
    }
}

/// One worker VM's link. The callbacks that use it never nest, so a borrow that fails (it
/// cannot) skips the step rather than panic.
pub struct Link(RefCell<link::Link>);

impl Link {
    pub fn new(plan: &Plan, sidecar: Sidecar, reporter: String) -> Link {
        Link(RefCell::new(link::Link::new(
            plan,
            sidecar,
            reporter,
            abi::now_nanos(),
        )))
    }

    pub fn refresh_ms(&self) -> u64 {
        self.0.try_borrow().map_or(0, |l| l.sidecar().refresh_ms)
    }

    pub fn cluster(&self) -> String {
        self.0
            .try_borrow()
            .map(|l| l.sidecar().cluster.clone())
            .unwrap_or_default()
    }

    pub fn fresh_map(&self, now: u64) -> Option<Rc<ArmMap>> {
        self.0.try_borrow().ok()?.fresh_map(now)
    }

    pub fn record(
        &self,
        requested: Option<ArmId>,
        served: Served,
        endpoint: &[u8],
        class: CodeClass,
    ) {
        if let Ok(mut link) = self.0.try_borrow_mut() {
            link.record(requested, served, endpoint, class);
        }
    }

    /// Sends a map request now; the host's refusal (e.g. an unknown cluster) is counted and returned.
    pub fn fetch(&self, metrics: &Metrics, now: u64) -> Result<(), HostError> {
        let Ok(mut link) = self.0.try_borrow_mut() else {
            return Ok(());
        };
        link.fetch(&mut Host, now).map_err(|e| {
            metrics.count(metrics.layout.map_fetches(FetchResult::Error));
            HostError(e.0)
        })
    }

    pub fn tick(&self, plan: &Plan, metrics: &Metrics) {
        let Ok(mut link) = self.0.try_borrow_mut() else {
            return;
        };
        let tick = link.tick(plan, &mut Host, abi::now_nanos());
        if tick.fetch_refused {
            metrics.count(metrics.layout.map_fetches(FetchResult::Error));
        }
        if tick.report_refused {
            metrics.count(metrics.layout.reports(ReportResult::Error));
        }
        metrics.record(metrics.layout.map_age(), tick.map_age_s);
    }

    pub fn on_response(&self, plan: &Plan, metrics: &Metrics, token: u32, body_size: usize) {
        let Ok(mut link) = self.0.try_borrow_mut() else {
            return;
        };
        let headers = abi::header_pairs(Headers::CallResponse)
            .ok()
            .flatten()
            .unwrap_or_default();
        let answered = link.on_response(
            plan,
            &mut Host,
            token,
            &headers,
            body_size,
            abi::now_nanos(),
        );
        match answered {
            Some(Answered::Fetch(result)) => metrics.count(metrics.layout.map_fetches(result)),
            Some(Answered::Report(result)) => metrics.count(metrics.layout.reports(result)),
            None => {}
        }
    }
}
