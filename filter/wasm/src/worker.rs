//! Everything one configuration needs at request time, built once in `on_configure` and shared
//! (by `Rc`) with the HTTP contexts of that worker's VM.

use std::cell::Cell;

use kvab_filter_core::assign::Draws;
use kvab_filter_core::headers::serialize_pairs;
use kvab_filter_core::Plan;

use crate::abi::HostError;
use crate::link::Link;
use crate::metrics::Metrics;

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
