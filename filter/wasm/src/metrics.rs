//! The filter's metrics as the host knows them: every metric of a plan defined once at configuration,
//! then incremented or recorded by id.

use kvab_filter_core::metrics::{Kind, MetricLayout};
use kvab_filter_core::Plan;

use crate::abi::{self, HostError, MetricKind};

/// The host ids of every metric of a plan, looked up through the layout.
pub struct Metrics {
    pub layout: MetricLayout,
    ids: Vec<u32>,
}

impl Metrics {
    /// Defines every metric of the plan up front, so the request path only increments ids.
    pub fn define(plan: &Plan) -> Result<Metrics, (String, HostError)> {
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
