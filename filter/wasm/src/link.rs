//! The filter's side of the link to `kvab serve`: endpoint maps in, reports out.
//!
//! Every worker VM ticks, but only one fetches the map per interval: a lease in shared data
//! (compare-and-swap) picks it, and the map it gets is published in shared data for all workers.
//! Each worker reports its own cumulative counts as its own reporter.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use kvab_contract::report::{is_ack, REPORTS_PATH};
use kvab_contract::{ENDPOINTS_PATH, MAX_MAP_BYTES};
use kvab_filter_core::endpoints::{ArmMap, Served};
use kvab_filter_core::headers::HeaderPairs;
use kvab_filter_core::metrics::{CodeClass, FetchResult, ReportResult};
use kvab_filter_core::sidecar::Sidecar;
use kvab_filter_core::tally::{Tally, REPORT_BUDGET_BYTES};
use kvab_filter_core::{ArmId, Plan};

use crate::abi::{self, Headers, Level};
use crate::worker::Metrics;

const NANOS_PER_MS: u64 = 1_000_000;

#[derive(Default)]
struct MapView {
    map: Option<Rc<ArmMap>>,
    /// ETag of `map`, as the sidecar sent it (sent back in `If-None-Match`).
    etag: Vec<u8>,
    /// When the sidecar last confirmed this map (200 or 304), in host nanoseconds.
    confirmed_nanos: u64,
}

#[derive(Clone, Copy)]
enum Call {
    Fetch {
        started_nanos: u64,
    },
    /// `changes` as counted when it was written; `complete`: it carried every unacknowledged total.
    Report {
        changes: u64,
        complete: bool,
    },
}

pub struct Link {
    sidecar: Sidecar,
    /// Shared-data keys: the map's ETag and confirmation time, the map itself, the fetch lease.
    meta_key: String,
    body_key: String,
    lease_key: String,
    view: RefCell<MapView>,
    calls: RefCell<Vec<(u32, Call)>>,
    reporter: String,
    /// `Bearer <reportToken>`, built once.
    bearer: Option<String>,
    sequence: Cell<u64>,
    tally: RefCell<Tally>,
    /// Requests recorded so far, and how many of them the sidecar has acknowledged.
    changes: Cell<u64>,
    acked_changes: Cell<u64>,
    /// Largest report to write; halved (down to a floor) when the sidecar answers 413.
    report_budget: Cell<usize>,
    started_nanos: u64,
}

/// The smallest report budget a 413 can bring the filter down to (a few dozen entries).
const MIN_REPORT_BUDGET: usize = 8 * 1024;
const PAYLOAD_TOO_LARGE: u32 = 413;

impl Link {
    pub fn new(plan: &Plan, sidecar: Sidecar, reporter: String) -> Link {
        let key = |what: &str| format!("kvab.{what}/{}", sidecar.cluster);
        let bearer = sidecar.report_token.as_ref().map(|t| format!("Bearer {t}"));
        Link {
            meta_key: key("endpoints-meta"),
            body_key: key("endpoints"),
            lease_key: key("fetch-lease"),
            sidecar,
            view: RefCell::default(),
            calls: RefCell::default(),
            reporter,
            bearer,
            sequence: Cell::new(0),
            tally: RefCell::new(Tally::new(plan)),
            changes: Cell::new(0),
            acked_changes: Cell::new(0),
            report_budget: Cell::new(REPORT_BUDGET_BYTES),
            started_nanos: abi::now_nanos(),
        }
    }

    pub fn refresh_ms(&self) -> u64 {
        self.sidecar.refresh_ms
    }

    /// The map, if the sidecar confirmed it within `staleAfterMs`.
    pub fn fresh_map(&self, now: u64) -> Option<Rc<ArmMap>> {
        let view = self.view.try_borrow().ok()?;
        let age = now.saturating_sub(view.confirmed_nanos);
        if age <= self.sidecar.stale_after_ms.saturating_mul(NANOS_PER_MS) {
            view.map.clone()
        } else {
            None
        }
    }

    /// Counts one finished request for the next report.
    pub fn record(
        &self,
        requested: Option<ArmId>,
        served: Served,
        endpoint: &[u8],
        class: CodeClass,
    ) {
        if let Ok(mut tally) = self.tally.try_borrow_mut() {
            tally.record(requested, served, endpoint, class);
            self.changes.set(self.changes.get().wrapping_add(1));
        }
    }

    /// Runs every `refreshMs`: adopt the newest shared map, fetch if this worker holds the lease,
    /// report if anything changed.
    pub fn tick(&self, plan: &Plan, metrics: &Metrics) {
        let now = abi::now_nanos();
        self.adopt_shared(plan, now);
        if self.take_lease(now) {
            let _ = self.fetch(metrics, now);
        }
        self.report(plan, metrics);
        let confirmed = self.view.try_borrow().map_or(0, |v| v.confirmed_nanos);
        let since = if confirmed == 0 {
            self.started_nanos
        } else {
            confirmed
        };
        metrics.record(
            metrics.layout.map_age(),
            now.saturating_sub(since) / 1_000_000_000,
        );
    }

    /// Sends a map request now. Errors are the host's refusal (e.g. an unknown cluster).
    pub fn fetch(&self, metrics: &Metrics, now: u64) -> Result<(), abi::HostError> {
        let etag = self
            .view
            .try_borrow()
            .map(|v| v.etag.clone())
            .unwrap_or_default();
        let mut headers = vec![
            (":method", "GET"),
            (":path", ENDPOINTS_PATH),
            (":authority", self.sidecar.authority.as_str()),
        ];
        // ETags are ASCII (the sidecar sends a quoted hash); anything else is not sent back.
        if let Ok(etag) = std::str::from_utf8(&etag) {
            if !etag.is_empty() {
                headers.push(("if-none-match", etag));
            }
        }
        match abi::http_call(&self.sidecar.cluster, headers, &[], self.sidecar.timeout_ms) {
            Ok(token) => {
                self.remember(token, Call::Fetch { started_nanos: now });
                Ok(())
            }
            Err(e) => {
                metrics.count(metrics.layout.map_fetches(FetchResult::Error));
                Err(e)
            }
        }
    }

    pub fn cluster(&self) -> &str {
        &self.sidecar.cluster
    }

    fn remember(&self, token: u32, call: Call) {
        if let Ok(mut calls) = self.calls.try_borrow_mut() {
            calls.push((token, call));
        }
    }

    /// Whether this worker fetches now: it moved the shared "next fetch due" time forward first.
    fn take_lease(&self, now: u64) -> bool {
        let (due, cas) = match abi::shared_data(&self.lease_key) {
            Ok(Some(shared)) => (read_u64(&shared.value).unwrap_or(0), shared.cas),
            Ok(None) => (0, 0),
            Err(_) => return false,
        };
        if now < due {
            return false;
        }
        let next = now.saturating_add(self.sidecar.refresh_ms.saturating_mul(NANOS_PER_MS));
        abi::set_shared_data(&self.lease_key, &next.to_le_bytes(), cas).is_ok()
    }

    /// Adopts the map another worker published (or a newer confirmation time of ours).
    fn adopt_shared(&self, plan: &Plan, now: u64) {
        let Ok(Some(abi::Shared { value: meta, .. })) = abi::shared_data(&self.meta_key) else {
            return;
        };
        let (Some(confirmed), Some(etag)) = (read_u64(&meta), meta.get(8..)) else {
            return;
        };
        let Ok(mut view) = self.view.try_borrow_mut() else {
            return;
        };
        if view.map.is_some() && view.etag.as_slice() == etag {
            view.confirmed_nanos = view.confirmed_nanos.max(confirmed);
            return;
        }
        let Ok(Some(abi::Shared { value: body, .. })) = abi::shared_data(&self.body_key) else {
            return;
        };
        // The body carries its own ETag: a body from a different write than the meta waits for the next tick.
        let Some((body_etag, json)) = split_body(&body) else {
            return;
        };
        if body_etag != etag {
            return;
        }
        match ArmMap::parse(plan, json) {
            Ok(map) => {
                view.map = Some(Rc::new(map));
                view.etag = etag.to_vec();
                view.confirmed_nanos = confirmed.min(now);
            }
            Err(e) => abi::log(Level::Warn, &format!("shared endpoint map unreadable: {e}")),
        }
    }

    fn report(&self, plan: &Plan, metrics: &Metrics) {
        let changes = self.changes.get();
        let pending = self.calls.try_borrow().map_or(true, |c| {
            c.iter()
                .any(|(_, call)| matches!(call, Call::Report { .. }))
        });
        if changes == self.acked_changes.get() || pending {
            return;
        }
        let sequence = self.sequence.get() + 1;
        let body = match self.tally.try_borrow_mut() {
            Ok(mut tally) => tally.report_json(
                plan,
                &self.reporter,
                sequence,
                self.started_nanos / 1_000_000,
                self.report_budget.get(),
            ),
            Err(_) => return,
        };
        let mut headers = vec![
            (":method", "POST"),
            (":path", REPORTS_PATH),
            (":authority", self.sidecar.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(bearer) = &self.bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        self.sequence.set(sequence);
        match abi::http_call(
            &self.sidecar.cluster,
            headers,
            &body.json,
            self.sidecar.timeout_ms,
        ) {
            Ok(token) => self.remember(
                token,
                Call::Report {
                    changes,
                    complete: body.complete,
                },
            ),
            Err(_) => metrics.count(metrics.layout.reports(ReportResult::Error)),
        }
    }

    /// Handles the answer to one of our calls; false if the token is not ours.
    pub fn on_response(
        &self,
        plan: &Plan,
        metrics: &Metrics,
        token: u32,
        body_size: usize,
    ) -> bool {
        let call = match self.calls.try_borrow_mut() {
            Ok(mut calls) => match calls.iter().position(|(t, _)| *t == token) {
                Some(i) => calls.swap_remove(i).1,
                None => return false,
            },
            Err(_) => return false,
        };
        let headers = abi::header_pairs(Headers::CallResponse)
            .ok()
            .flatten()
            .unwrap_or_default();
        let status = HeaderPairs::new(&headers)
            .find(|(k, _)| *k == b":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
        let now = abi::now_nanos();
        match call {
            Call::Fetch { started_nanos } => {
                let etag = HeaderPairs::new(&headers)
                    .find(|(k, _)| *k == b"etag")
                    .map(|(_, v)| v.to_vec());
                let result = self.on_fetched(plan, status, etag, body_size, now, started_nanos);
                metrics.count(metrics.layout.map_fetches(result));
            }
            Call::Report { changes, complete } => {
                let acked = status == Some(200)
                    && abi::http_call_response_body(body_size)
                        .ok()
                        .flatten()
                        .is_some_and(|body| is_ack(&body));
                if acked {
                    if let Ok(mut tally) = self.tally.try_borrow_mut() {
                        tally.acknowledge();
                    }
                    // A report the budget cut leaves totals for the next tick.
                    if complete {
                        self.acked_changes.set(changes);
                    }
                    metrics.count(metrics.layout.reports(ReportResult::Ok));
                } else {
                    if status == Some(PAYLOAD_TOO_LARGE) {
                        let budget = (self.report_budget.get() / 2).max(MIN_REPORT_BUDGET);
                        self.report_budget.set(budget);
                        abi::log(
                            Level::Warn,
                            &format!("kvab serve refused a report as too large (413); reports now stop at {budget} bytes"),
                        );
                    }
                    metrics.count(metrics.layout.reports(ReportResult::Error));
                }
            }
        }
        true
    }

    fn on_fetched(
        &self,
        plan: &Plan,
        status: Option<u32>,
        etag: Option<Vec<u8>>,
        body_size: usize,
        now: u64,
        started: u64,
    ) -> FetchResult {
        match status {
            Some(200) if body_size > MAX_MAP_BYTES => {
                abi::log(
                    Level::Warn,
                    &format!(
                        "endpoint map from {} refused: {body_size} bytes, over {MAX_MAP_BYTES}",
                        self.sidecar.cluster
                    ),
                );
                FetchResult::Error
            }
            Some(200) => {
                let body = abi::http_call_response_body(body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                match ArmMap::parse(plan, &body) {
                    Ok(map) => {
                        let etag = etag.unwrap_or_default();
                        self.publish(&etag, &body, now);
                        if let Ok(mut view) = self.view.try_borrow_mut() {
                            *view = MapView {
                                map: Some(Rc::new(map)),
                                etag,
                                confirmed_nanos: now,
                            };
                        }
                        FetchResult::Ok
                    }
                    Err(e) => {
                        abi::log(
                            Level::Warn,
                            &format!("endpoint map from {} refused: {e}", self.sidecar.cluster),
                        );
                        FetchResult::Error
                    }
                }
            }
            Some(304) => {
                let etag = match self.view.try_borrow_mut() {
                    Ok(mut view) => {
                        view.confirmed_nanos = now;
                        view.etag.clone()
                    }
                    Err(_) => return FetchResult::NotModified,
                };
                self.confirm_shared(&etag, now);
                FetchResult::NotModified
            }
            // Envoy answers a call that ran out of time with its own 504.
            Some(504) => FetchResult::Timeout,
            Some(_) => FetchResult::Error,
            // No status: the call failed. Envoy does not say why; one that took the whole timeout timed out.
            None if now.saturating_sub(started)
                >= self.sidecar.timeout_ms.saturating_mul(NANOS_PER_MS) * 9 / 10 =>
            {
                FetchResult::Timeout
            }
            None => FetchResult::Error,
        }
    }

    /// Publishes a fetched map for the other workers: the body first, then the meta that points at it.
    fn publish(&self, etag: &[u8], json: &[u8], now: u64) {
        let etag_len = u16::try_from(etag.len()).unwrap_or(0);
        let etag = etag.get(..usize::from(etag_len)).unwrap_or_default();
        let mut body = Vec::with_capacity(2 + etag.len() + json.len());
        body.extend_from_slice(&etag_len.to_le_bytes());
        body.extend_from_slice(etag);
        body.extend_from_slice(json);
        if abi::set_shared_data(&self.body_key, &body, 0).is_ok() {
            let _ = abi::set_shared_data(&self.meta_key, &meta(now, etag), 0);
        }
    }

    /// Moves the shared confirmation time forward, unless another worker published a newer map.
    fn confirm_shared(&self, etag: &[u8], now: u64) {
        if let Ok(Some(current)) = abi::shared_data(&self.meta_key) {
            if current.value.get(8..) == Some(etag) {
                let _ = abi::set_shared_data(&self.meta_key, &meta(now, etag), current.cas);
            }
        }
    }
}

fn meta(confirmed_nanos: u64, etag: &[u8]) -> Vec<u8> {
    let mut meta = confirmed_nanos.to_le_bytes().to_vec();
    meta.extend_from_slice(etag);
    meta
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Splits a published body into its ETag and JSON.
fn split_body(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes(body.get(..2)?.try_into().ok()?));
    let etag = body.get(2..2 + len)?;
    let json = body.get(2 + len..)?;
    Some((etag, json))
}
