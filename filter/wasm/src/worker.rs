//! Everything one configuration needs at request time, built once in `on_configure` and shared
//! (by `Rc`) with the HTTP contexts of that worker's VM.

use std::cell::Cell;

use kvab_filter_core::assign::Draws;
use kvab_filter_core::headers::serialize_pairs;
use kvab_filter_core::metrics::{Kind, MetricLayout};
use kvab_filter_core::Plan;

use crate::abi::{self, HostError, MetricKind};
use crate::link::Link;

/// The host ids of every metric of a plan, looked up through the layout.
pub struct Metrics {
    pub layout: MetricLayout,
    ids: Vec<u32>,
}

impl Metrics {
    /// Defines every metric of the plan up front, so the request path only increments ids.
    fn define(plan: &Plan) -> Result<Metrics, (String, HostError)> {
        let layout = MetricLayout::new(plan);
        let ids = layout
            .definitions(plan)
            .into_iter()
            .map(|(kind, name)| {
                let kind = match kind {
                    Kind::Counter => MetricKind::Counter,
                    Kind::Gauge => MetricKind::Gauge,
                    Kind::Histogram => MetricKind::Histogram,
                };
                abi::define_metric(kind, &name).map_err(|e| (name, e))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(Metrics { layout, ids })
    }

    /// Adds one to the counter at `index`. A failing host call loses one count, never the request.
    pub fn count(&self, index: usize) {
        if let Some(&id) = self.ids.get(index) {
            let _ = abi::increment_metric(id, 1);
        }
    }

    /// Records a histogram sample or sets a gauge.
    pub fn record(&self, index: usize, value: u64) {
        if let Some(&id) = self.ids.get(index) {
            let _ = abi::record_metric(id, value);
        }
    }
}

pub struct Worker {
    pub plan: Plan,
    pub metrics: Metrics,
    draws: Cell<Draws>,
    /// Serialized headers of a rejection answer.
    pub reject_headers: Vec<u8>,
    /// The link to `kvab serve`, when configured.
    pub link: Option<Link>,
}

impl Worker {
    pub fn new(plan: Plan, seed: u64, reporter: String) -> Result<Worker, (String, HostError)> {
        let metrics = Metrics::define(&plan)?;
        let link = plan
            .sidecar()
            .map(|sidecar| Link::new(&plan, sidecar.clone(), reporter));
        Ok(Worker {
            plan,
            metrics,
            draws: Cell::new(Draws::seeded(seed)),
            reject_headers: serialize_pairs(&[(b"content-type", b"application/json")]),
            link,
        })
    }

    pub fn next_draw(&self) -> u64 {
        let mut draws = self.draws.replace(Draws::seeded(0));
        let draw = draws.next_draw();
        self.draws.set(draws);
        draw
    }
}
