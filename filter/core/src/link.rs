//! The filter's side of the link to `kvab serve` as a state machine: endpoint maps in, reports out.
//!
//! Every worker VM ticks, but only one fetches the map per interval: a lease in shared data
//! (compare-and-swap) picks it, and the map it gets is published in shared data for all workers.
//! Each worker reports its own cumulative counts as its own reporter. The host glue provides
//! shared data, HTTP calls and the clock through [`LinkHost`] and counts the outcomes returned.

use std::rc::Rc;

use kvab_contract::report::{is_ack, REPORTS_PATH};
use kvab_contract::{ENDPOINTS_PATH, MAX_MAP_BYTES};

use crate::endpoints::{ArmMap, Served};
use crate::headers::HeaderPairs;
use crate::metrics::{CodeClass, FetchResult, ReportResult};
use crate::plan::{ArmId, Plan};
use crate::sidecar::Sidecar;
use crate::tally::{Tally, REPORT_BUDGET_BYTES};

const NANOS_PER_MS: u64 = 1_000_000;
/// The smallest report budget a 413 can bring the filter down to (a few dozen entries).
const MIN_REPORT_BUDGET: usize = 8 * 1024;
const PAYLOAD_TOO_LARGE: u32 = 413;
/// Answers that say "not now": the sidecar cannot take the report yet (its state cannot be written,
/// 503 `state_unavailable`, or its ledger is at a cap, 507 `ledger_full`), or Envoy has no healthy
/// sidecar (503). The totals stay for a later report; the next one waits a backoff.
const RETRY_LATER: [u32; 3] = [429, 503, 507];
/// The longest wait between reports while the sidecar says "not now": after n such answers in a row
/// the next report waits `refreshMs` × 2^n (rounded up to a tick), at most this.
pub const MAX_REPORT_BACKOFF_MS: u64 = 60_000;

/// A non-OK status of a host call (proxy-wasm ABI numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

/// Envoy's shared data as its host keeps it, for tests and fuzzing (feature `fake-host`): one
/// store for every worker VM, a CAS token per key that every write moves, so a write with a stale
/// token fails with `CasMismatch`.
#[cfg(any(test, feature = "fake-host"))]
#[derive(Debug, Default)]
pub struct FakeSharedData {
    values: std::collections::BTreeMap<String, (Vec<u8>, u32)>,
    writes: u32,
}

#[cfg(any(test, feature = "fake-host"))]
impl FakeSharedData {
    /// proxy-wasm's `CasMismatch`.
    const CAS_MISMATCH: HostStatus = HostStatus(8);

    pub fn get(&self, key: &str) -> Option<SharedValue> {
        self.values.get(key).map(|(value, cas)| SharedValue {
            value: value.clone().into_boxed_slice(),
            cas: *cas,
        })
    }

    pub fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus> {
        if cas != 0
            && self
                .values
                .get(key)
                .is_some_and(|(_, current)| *current != cas)
        {
            return Err(Self::CAS_MISMATCH);
        }
        self.writes += 1;
        self.values
            .insert(key.to_owned(), (value.to_vec(), self.writes));
        Ok(())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }
}

/// A shared-data value with its compare-and-swap token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedValue {
    pub value: Box<[u8]>,
    pub cas: u32,
}

/// An HTTP call to the sidecar's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub cluster: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
    pub timeout_ms: u64,
}

/// What the link needs from the host.
pub trait LinkHost {
    /// The value shared by every worker VM of the plugin under `key`; `Ok(None)` when unset.
    fn shared(&mut self, key: &str) -> Result<Option<SharedValue>, HostStatus>;
    /// Writes a shared value; with `cas` other than 0 only if nobody wrote since it was read.
    fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus>;
    /// Sends a call; its answer comes back to [`Link::on_response`] with the returned token.
    fn call(&mut self, call: Outgoing<'_>) -> Result<u32, HostStatus>;
    /// The body of the answer being handled, read only when it decides something.
    fn call_response_body(&mut self, size: usize) -> Option<Box<[u8]>>;
    fn warn(&mut self, message: &str);
}

#[derive(Debug, Default)]
struct MapView {
    map: Option<Rc<ArmMap>>,
    /// ETag of `map`, as the sidecar sent it (sent back in `If-None-Match`).
    etag: Vec<u8>,
    /// When the sidecar last confirmed this map (200 or 304), in host nanoseconds.
    confirmed_nanos: u64,
}

/// A map request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentFetch {
    started_nanos: u64,
    /// The ETag sent in `If-None-Match` (a 304 confirms that map, not one adopted since).
    etag: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Fetch(SentFetch),
    /// `changes` as counted when it was written; `complete`: it carried every unacknowledged total.
    Report {
        changes: u64,
        complete: bool,
    },
}

/// What one tick did that the metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The host refused to send the map request this worker's lease called for.
    pub fetch_refused: bool,
    /// The host refused to send the report.
    pub report_refused: bool,
    /// Seconds since the sidecar last confirmed the map (since the start, before any).
    pub map_age_s: u64,
}

/// The outcome of one answered call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    Fetch(FetchResult),
    Report(ReportResult),
}

#[derive(Debug)]
pub struct Link {
    sidecar: Sidecar,
    /// Shared-data keys: the map's ETag and confirmation time, the map itself, the fetch lease.
    meta_key: String,
    body_key: String,
    lease_key: String,
    view: MapView,
    calls: Vec<(u32, Call)>,
    reporter: String,
    /// `Bearer <reportToken>`, built once.
    bearer: Option<String>,
    sequence: u64,
    tally: Tally,
    /// Requests recorded so far, and how many of them the sidecar has acknowledged.
    changes: u64,
    acked_changes: u64,
    /// Largest report to write; halved (down to a floor) when the sidecar answers 413.
    report_budget: usize,
    /// "Not now" answers in a row (`RETRY_LATER`), and no report is sent before `report_due`
    /// (host nanoseconds) after one.
    deferred: u32,
    report_due: u64,
    started_nanos: u64,
}

impl Link {
    pub fn new(plan: &Plan, sidecar: Sidecar, reporter: String, now: u64) -> Link {
        let key = |what: &str| format!("kvab.{what}/{}", sidecar.cluster);
        Link {
            meta_key: key("endpoints-meta"),
            body_key: key("endpoints"),
            lease_key: key("fetch-lease"),
            bearer: sidecar.report_token.as_ref().map(|t| format!("Bearer {t}")),
            sidecar,
            view: MapView::default(),
            calls: Vec::new(),
            reporter,
            sequence: 0,
            tally: Tally::new(plan),
            changes: 0,
            acked_changes: 0,
            report_budget: REPORT_BUDGET_BYTES,
            deferred: 0,
            report_due: 0,
            started_nanos: now,
        }
    }

    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// The map, if the sidecar confirmed it within `staleAfterMs`.
    pub fn fresh_map(&self, now: u64) -> Option<Rc<ArmMap>> {
        let age = now.saturating_sub(self.view.confirmed_nanos);
        if age <= self.sidecar.stale_after_ms.saturating_mul(NANOS_PER_MS) {
            self.view.map.clone()
        } else {
            None
        }
    }

    /// Counts one finished request for the next report.
    pub fn record(
        &mut self,
        requested: Option<ArmId>,
        served: Served,
        endpoint: &[u8],
        class: CodeClass,
    ) {
        self.tally.record(requested, served, endpoint, class);
        self.changes = self.changes.wrapping_add(1);
    }

    /// Runs every `refreshMs`: adopt the newest shared map, fetch if this worker holds the lease,
    /// report if anything changed.
    pub fn tick(&mut self, plan: &Plan, host: &mut impl LinkHost, now: u64) -> Tick {
        self.adopt_shared(plan, host, now);
        let fetch_refused = self.take_lease(host, now) && self.fetch(host, now).is_err();
        let report_refused = self.report(plan, host, now) == Err(());
        let since = match self.view.confirmed_nanos {
            0 => self.started_nanos,
            confirmed => confirmed,
        };
        Tick {
            fetch_refused,
            report_refused,
            map_age_s: now.saturating_sub(since) / 1_000_000_000,
        }
    }

    /// Sends a map request now. Errors are the host's refusal (e.g. an unknown cluster).
    pub fn fetch(&mut self, host: &mut impl LinkHost, now: u64) -> Result<(), HostStatus> {
        let mut headers = vec![
            (":method", "GET"),
            (":path", ENDPOINTS_PATH),
            (":authority", self.sidecar.authority.as_str()),
        ];
        // ETags are ASCII (the sidecar sends a quoted hash); anything else is not sent back.
        let sent_etag = match std::str::from_utf8(&self.view.etag) {
            Ok(etag) if !etag.is_empty() => {
                headers.push(("if-none-match", etag));
                etag.as_bytes().to_vec()
            }
            _ => Vec::new(),
        };
        let token = host.call(Outgoing {
            cluster: &self.sidecar.cluster,
            headers,
            body: &[],
            timeout_ms: self.sidecar.timeout_ms,
        })?;
        self.calls.push((
            token,
            Call::Fetch(SentFetch {
                started_nanos: now,
                etag: sent_etag,
            }),
        ));
        Ok(())
    }

    /// Whether this worker fetches now: it moved the shared "next fetch due" time forward first.
    fn take_lease(&self, host: &mut impl LinkHost, now: u64) -> bool {
        let (due, cas) = match host.shared(&self.lease_key) {
            Ok(Some(shared)) => (read_u64(&shared.value).unwrap_or(0), shared.cas),
            Ok(None) => (0, 0),
            Err(_) => return false,
        };
        if now < due {
            return false;
        }
        let next = now.saturating_add(self.sidecar.refresh_ms.saturating_mul(NANOS_PER_MS));
        host.set_shared(&self.lease_key, &next.to_le_bytes(), cas)
            .is_ok()
    }

    /// Adopts the map another worker published (or a newer confirmation time of ours).
    fn adopt_shared(&mut self, plan: &Plan, host: &mut impl LinkHost, now: u64) {
        let Ok(Some(SharedValue { value: meta, .. })) = host.shared(&self.meta_key) else {
            return;
        };
        let Some((confirmed, etag)) = split_meta(&meta) else {
            return;
        };
        let view = &mut self.view;
        if view.map.is_some() && view.etag.as_slice() == etag {
            view.confirmed_nanos = view.confirmed_nanos.max(confirmed);
            return;
        }
        let Ok(Some(SharedValue { value: body, .. })) = host.shared(&self.body_key) else {
            return;
        };
        // The body carries its own ETag: a body from a different write than the meta waits for
        // the next tick.
        let Some((body_etag, json)) = split_body(&body) else {
            return;
        };
        if body_etag != etag {
            return;
        }
        match ArmMap::parse(plan, json) {
            Ok(map) => {
                *view = MapView {
                    map: Some(Rc::new(map)),
                    etag: etag.to_vec(),
                    confirmed_nanos: confirmed.min(now),
                };
            }
            Err(e) => host.warn(&format!("shared endpoint map unreadable: {e}")),
        }
    }

    /// Sends a report when something changed since the last acknowledged one, none is in flight
    /// and no backoff is running; `Err` when the host refused to send it.
    fn report(&mut self, plan: &Plan, host: &mut impl LinkHost, now: u64) -> Result<(), ()> {
        let pending = self
            .calls
            .iter()
            .any(|(_, call)| matches!(call, Call::Report { .. }));
        if self.changes == self.acked_changes || pending || now < self.report_due {
            return Ok(());
        }
        self.sequence += 1;
        let body = self.tally.report_json(
            plan,
            &self.reporter,
            self.sequence,
            self.started_nanos / NANOS_PER_MS,
            self.report_budget,
        );
        let mut headers = vec![
            (":method", "POST"),
            (":path", REPORTS_PATH),
            (":authority", self.sidecar.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(bearer) = &self.bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        let sent = host.call(Outgoing {
            cluster: &self.sidecar.cluster,
            headers,
            body: &body.json,
            timeout_ms: self.sidecar.timeout_ms,
        });
        let token = sent.map_err(|_| ())?;
        self.calls.push((
            token,
            Call::Report {
                changes: self.changes,
                complete: body.complete,
            },
        ));
        Ok(())
    }

    /// Handles the answer to one of our calls (`headers`: its serialized header map); `None` if
    /// the token is not ours.
    pub fn on_response(
        &mut self,
        plan: &Plan,
        host: &mut impl LinkHost,
        token: u32,
        headers: &[u8],
        body_size: usize,
        now: u64,
    ) -> Option<Answered> {
        let index = self.calls.iter().position(|(t, _)| *t == token)?;
        let (_, call) = self.calls.swap_remove(index);
        let header = |name: &[u8]| {
            HeaderPairs::new(headers)
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let status =
            header(b":status").and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
        Some(match call {
            Call::Fetch(sent) => Answered::Fetch(self.on_fetched(
                plan,
                host,
                &sent,
                status,
                header(b"etag"),
                body_size,
                now,
            )),
            Call::Report { changes, complete } => Answered::Report(self.on_reported(
                host,
                status,
                body_size,
                (changes, complete),
                now,
            )),
        })
    }

    fn on_reported(
        &mut self,
        host: &mut impl LinkHost,
        status: Option<u32>,
        body_size: usize,
        (changes, complete): (u64, bool),
        now: u64,
    ) -> ReportResult {
        let acked = status == Some(200)
            && host
                .call_response_body(body_size)
                .is_some_and(|body| is_ack(&body));
        if acked {
            self.deferred = 0;
            self.report_due = 0;
            self.tally.acknowledge();
            // A report the budget cut leaves totals for the next tick.
            if complete {
                self.acked_changes = changes;
            }
            return ReportResult::Ok;
        }
        if let Some(status) = status.filter(|s| RETRY_LATER.contains(s)) {
            // Nothing is acknowledged: the next report carries these totals again (cumulative).
            self.deferred = self.deferred.saturating_add(1);
            let wait_ms = self
                .sidecar
                .refresh_ms
                .max(1)
                .saturating_mul(1 << self.deferred.min(20))
                .min(MAX_REPORT_BACKOFF_MS);
            self.report_due = now.saturating_add(wait_ms.saturating_mul(NANOS_PER_MS));
            if self.deferred == 1 {
                host.warn(&format!(
                    "kvab serve cannot take reports now ({status}); the counts are kept and sent again after a backoff of up to {} s",
                    MAX_REPORT_BACKOFF_MS / 1000
                ));
            }
            return ReportResult::Deferred;
        }
        if status == Some(PAYLOAD_TOO_LARGE) {
            self.report_budget = (self.report_budget / 2).max(MIN_REPORT_BUDGET);
            host.warn(&format!(
                "kvab serve refused a report as too large (413); reports now stop at {} bytes",
                self.report_budget
            ));
        }
        ReportResult::Error
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fetched(
        &mut self,
        plan: &Plan,
        host: &mut impl LinkHost,
        sent: &SentFetch,
        status: Option<u32>,
        etag: Option<&[u8]>,
        body_size: usize,
        now: u64,
    ) -> FetchResult {
        match status {
            Some(200) if body_size > MAX_MAP_BYTES => {
                host.warn(&format!(
                    "endpoint map from {} refused: {body_size} bytes, over {MAX_MAP_BYTES}",
                    self.sidecar.cluster
                ));
                FetchResult::Error
            }
            Some(200) => {
                let body = host.call_response_body(body_size).unwrap_or_default();
                match ArmMap::parse(plan, &body) {
                    Ok(map) => {
                        let etag = etag.unwrap_or_default();
                        self.publish(host, etag, &body, now);
                        self.view = MapView {
                            map: Some(Rc::new(map)),
                            etag: etag.to_vec(),
                            confirmed_nanos: now,
                        };
                        FetchResult::Ok
                    }
                    Err(e) => {
                        host.warn(&format!(
                            "endpoint map from {} refused: {e}",
                            self.sidecar.cluster
                        ));
                        FetchResult::Error
                    }
                }
            }
            Some(304) => {
                if self.view.map.is_some() && self.view.etag == sent.etag {
                    self.view.confirmed_nanos = now;
                }
                self.confirm_shared(host, &sent.etag, now);
                FetchResult::NotModified
            }
            // Envoy answers a call that ran out of time with its own 504.
            Some(504) => FetchResult::Timeout,
            Some(_) => FetchResult::Error,
            // No status: the call failed. Envoy does not say why; one that took the whole timeout
            // timed out.
            None if now.saturating_sub(sent.started_nanos)
                >= self.sidecar.timeout_ms.saturating_mul(NANOS_PER_MS) * 9 / 10 =>
            {
                FetchResult::Timeout
            }
            None => FetchResult::Error,
        }
    }

    /// Publishes a fetched map for the other workers: the body first, then the meta that points
    /// at it.
    fn publish(&self, host: &mut impl LinkHost, etag: &[u8], json: &[u8], now: u64) {
        let etag_len = u16::try_from(etag.len()).unwrap_or(0);
        let etag = etag.get(..usize::from(etag_len)).unwrap_or_default();
        let mut body = Vec::with_capacity(2 + etag.len() + json.len());
        body.extend_from_slice(&etag_len.to_le_bytes());
        body.extend_from_slice(etag);
        body.extend_from_slice(json);
        if host.set_shared(&self.body_key, &body, 0).is_ok() {
            let _ = host.set_shared(&self.meta_key, &meta(now, etag), 0);
        }
    }

    /// Moves the shared confirmation time of `etag` forward, unless another worker published a
    /// newer map.
    fn confirm_shared(&self, host: &mut impl LinkHost, etag: &[u8], now: u64) {
        if let Ok(Some(current)) = host.shared(&self.meta_key) {
            if current.value.get(8..) == Some(etag) {
                let _ = host.set_shared(&self.meta_key, &meta(now, etag), current.cas);
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

/// Splits the shared meta into the confirmation time and the ETag of the published map.
fn split_meta(meta: &[u8]) -> Option<(u64, &[u8])> {
    Some((read_u64(meta)?, meta.get(8..)?))
}

/// Splits a published body into its ETag and JSON.
fn split_body(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_le_bytes(body.get(..2)?.try_into().ok()?));
    let etag = body.get(2..2 + len)?;
    let json = body.get(2 + len..)?;
    Some((etag, json))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::config::parse;
    use crate::headers::serialize_pairs;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = NANOS_PER_MS;
    const CONFIG: &[u8] = br#"{"sidecar":{"cluster":"kvab","refreshMs":100,"timeoutMs":100,"staleAfterMs":1000,"reportToken":"0123456789abcdef"}}"#;
    const MAP: &[u8] = br#"{"version":"v1","backends":{"nvlink":{"endpoints":[{"address":"10.0.0.5:8080","ready":true}]},"fs":{"endpoints":[{"address":"10.0.0.7:8080","ready":true}]}}}"#;

    type Sent = (u32, Vec<(String, String)>, Vec<u8>);

    /// One worker's host: the shared store, the calls it sent, the answer body in hand.
    struct FakeHost<'s> {
        store: &'s RefCell<FakeSharedData>,
        /// Token, headers and body of each call sent.
        sent: Vec<Sent>,
        next_token: u32,
        refuse_calls: bool,
        response_body: Option<Vec<u8>>,
        warnings: Vec<String>,
    }

    impl<'s> FakeHost<'s> {
        fn new(store: &'s RefCell<FakeSharedData>, first_token: u32) -> Self {
            FakeHost {
                store,
                sent: Vec::new(),
                next_token: first_token,
                refuse_calls: false,
                response_body: None,
                warnings: Vec::new(),
            }
        }

        /// Takes the fetch lease for ever: map fetches stay out of a test about reports.
        fn hold_fetch_lease(&mut self) {
            self.set_shared("kvab.fetch-lease/kvab", &u64::MAX.to_le_bytes(), 0)
                .unwrap();
        }

        fn header(&self, call: usize, name: &str) -> Option<String> {
            let (_, headers, _) = self.sent.get(call)?;
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }

        fn paths(&self) -> Vec<String> {
            (0..self.sent.len())
                .map(|i| self.header(i, ":path").unwrap())
                .collect()
        }
    }

    impl LinkHost for FakeHost<'_> {
        fn shared(&mut self, key: &str) -> Result<Option<SharedValue>, HostStatus> {
            Ok(self.store.borrow().get(key))
        }

        fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus> {
            self.store.borrow_mut().set(key, value, cas)
        }

        fn call(&mut self, call: Outgoing<'_>) -> Result<u32, HostStatus> {
            assert_eq!(call.cluster, "kvab");
            assert_eq!(call.timeout_ms, 100);
            if self.refuse_calls {
                return Err(HostStatus(2));
            }
            self.next_token += 1;
            let headers = call
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            self.sent
                .push((self.next_token, headers, call.body.to_vec()));
            Ok(self.next_token)
        }

        fn call_response_body(&mut self, size: usize) -> Option<Box<[u8]>> {
            let body = self.response_body.clone()?;
            Some(
                body.get(..size.min(body.len()))?
                    .to_vec()
                    .into_boxed_slice(),
            )
        }

        fn warn(&mut self, message: &str) {
            self.warnings.push(message.to_owned());
        }
    }

    fn answer(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        serialize_pairs(pairs)
    }

    fn plan() -> Plan {
        parse(CONFIG).unwrap()
    }

    fn link(plan: &Plan, name: &str) -> Link {
        Link::new(plan, plan.sidecar().unwrap().clone(), name.to_owned(), MS)
    }

    /// Answers call `index` of `host` with `headers` and `body`.
    fn respond(
        link: &mut Link,
        plan: &Plan,
        host: &mut FakeHost<'_>,
        index: usize,
        pairs: &[(&[u8], &[u8])],
        body: &[u8],
        now: u64,
    ) -> Option<Answered> {
        let token = host.sent[index].0;
        host.response_body = Some(body.to_vec());
        link.on_response(plan, host, token, &answer(pairs), body.len(), now)
    }

    /// Two workers over one store, `a` holding the map of ETag "e1" it fetched at 10 ms.
    fn a_fetched_e1<'s>(
        plan: &Plan,
        store: &'s RefCell<FakeSharedData>,
    ) -> (Link, Link, FakeHost<'s>, FakeHost<'s>) {
        let (mut a, b) = (link(plan, "a"), link(plan, "b"));
        let (mut host_a, host_b) = (FakeHost::new(store, 0), FakeHost::new(store, 100));
        a.tick(plan, &mut host_a, 10 * MS);
        respond(
            &mut a,
            plan,
            &mut host_a,
            0,
            &[(b":status", b"200"), (b"etag", b"\"e1\"")],
            MAP,
            10 * MS,
        );
        (a, b, host_a, host_b)
    }

    #[test]
    fn one_worker_per_interval_fetches_and_the_others_adopt_its_map() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let (mut a, mut b) = (link(&plan, "a"), link(&plan, "b"));
        let (mut host_a, mut host_b) = (FakeHost::new(&store, 0), FakeHost::new(&store, 100));
        let now = 10 * MS;
        a.tick(&plan, &mut host_a, now);
        b.tick(&plan, &mut host_b, now);
        assert_eq!(host_a.paths(), [ENDPOINTS_PATH], "a took the lease");
        assert!(
            host_b.sent.is_empty(),
            "b did not: the lease is a's until {now} + refreshMs"
        );
        assert_eq!(
            host_a.header(0, "if-none-match"),
            None,
            "no map yet, no ETag"
        );

        let answered = respond(
            &mut a,
            &plan,
            &mut host_a,
            0,
            &[(b":status", b"200"), (b"etag", b"\"e1\"")],
            MAP,
            now + MS,
        );
        assert_eq!(answered, Some(Answered::Fetch(FetchResult::Ok)));
        let map = a.fresh_map(now + MS).unwrap();
        assert_eq!(map.arm_of(b"10.0.0.7:8080"), Served::Arm(ArmId(1)));
        assert!(b.fresh_map(now + MS).is_none(), "b has not ticked since");

        b.tick(&plan, &mut host_b, now + 50 * MS);
        assert!(host_b.sent.is_empty(), "still inside a's interval");
        assert_eq!(b.fresh_map(now + 50 * MS).unwrap().version(), "v1");

        // The next interval: whoever ticks first takes the lease, and sends the ETag it adopted.
        b.tick(&plan, &mut host_b, now + 110 * MS);
        a.tick(&plan, &mut host_a, now + 111 * MS);
        assert_eq!(host_b.paths(), [ENDPOINTS_PATH]);
        assert_eq!(host_b.header(0, "if-none-match").as_deref(), Some("\"e1\""));
        assert_eq!(host_a.sent.len(), 1, "a sent nothing more");
    }

    #[test]
    fn a_304_confirms_the_map_for_every_worker_and_an_unconfirmed_map_goes_stale() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let (mut a, mut b, mut host_a, mut host_b) = a_fetched_e1(&plan, &store);
        b.tick(&plan, &mut host_b, 20 * MS);
        // staleAfterMs is 1000: the map confirmed at 10 ms is trusted through 1010 ms.
        assert!(b.fresh_map(1010 * MS).is_some());
        assert!(b.fresh_map(1011 * MS).is_none());

        a.tick(&plan, &mut host_a, 900 * MS);
        let answered = respond(
            &mut a,
            &plan,
            &mut host_a,
            1,
            &[(b":status", b"304")],
            b"",
            900 * MS,
        );
        assert_eq!(answered, Some(Answered::Fetch(FetchResult::NotModified)));
        assert!(a.fresh_map(1800 * MS).is_some());
        b.tick(&plan, &mut host_b, 950 * MS);
        assert!(
            b.fresh_map(1800 * MS).is_some(),
            "b adopted the newer confirmation"
        );
        let tick = b.tick(&plan, &mut host_b, 3900 * MS);
        assert_eq!(tick.map_age_s, 3, "confirmed at 0.9 s, 3.9 s now");
        assert!(b.fresh_map(3900 * MS).is_none());
    }

    #[test]
    fn refused_maps_change_nothing_and_say_why() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        for (i, body) in [&b"{not json"[..], br#"{"version":"v2"}"#]
            .iter()
            .enumerate()
        {
            a.tick(&plan, &mut host, (10 + 200 * i as u64) * MS);
            let answered = respond(
                &mut a,
                &plan,
                &mut host,
                i,
                &[(b":status", b"200"), (b"etag", b"\"x\"")],
                body,
                0,
            );
            assert_eq!(answered, Some(Answered::Fetch(FetchResult::Error)));
        }
        assert!(a.fresh_map(500 * MS).is_none());
        assert_eq!(host.warnings.len(), 2);
        assert!(
            host.warnings[1].contains("no object `backends`"),
            "{:?}",
            host.warnings
        );
        assert!(
            !store.borrow().contains("kvab.endpoints/kvab"),
            "nothing published"
        );

        // Over MAX_MAP_BYTES: refused by its size, the body never read.
        a.tick(&plan, &mut host, 1000 * MS);
        let token = host.sent[2].0;
        host.response_body = None;
        let headers = answer(&[(b":status", b"200")]);
        let answered = a.on_response(&plan, &mut host, token, &headers, MAX_MAP_BYTES + 1, 0);
        assert_eq!(answered, Some(Answered::Fetch(FetchResult::Error)));
        assert!(
            host.warnings[2].contains("bytes, over"),
            "{:?}",
            host.warnings
        );
    }

    #[test]
    fn a_body_from_another_write_than_the_meta_is_not_adopted() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        let mut body = 4u16.to_le_bytes().to_vec();
        body.extend_from_slice(b"\"e2\"");
        body.extend_from_slice(MAP);
        host.set_shared("kvab.endpoints/kvab", &body, 0).unwrap();
        host.set_shared("kvab.endpoints-meta/kvab", &meta(5 * MS, b"\"e1\""), 0)
            .unwrap();
        host.hold_fetch_lease();
        a.tick(&plan, &mut host, 10 * MS);
        assert!(
            a.fresh_map(10 * MS).is_none(),
            "ETags differ: wait for the next tick"
        );
        host.set_shared("kvab.endpoints-meta/kvab", &meta(6 * MS, b"\"e2\""), 0)
            .unwrap();
        a.tick(&plan, &mut host, 20 * MS);
        assert_eq!(a.fresh_map(20 * MS).unwrap().version(), "v1");
        assert!(host.sent.is_empty(), "the lease was never free");
    }

    #[test]
    fn failed_calls_are_timeouts_only_when_they_took_the_timeout() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        let cases: [(&[u8], u64, FetchResult); 4] = [
            (b"504", 1, FetchResult::Timeout),
            (b"503", 1, FetchResult::Error),
            (b"", 90, FetchResult::Timeout),
            (b"", 89, FetchResult::Error),
        ];
        for (i, (status, took_ms, expected)) in cases.into_iter().enumerate() {
            let start = (1000 + 1000 * i as u64) * MS;
            a.tick(&plan, &mut host, start);
            let token = host.sent[i].0;
            let headers = if status.is_empty() {
                answer(&[])
            } else {
                answer(&[(b":status", status)])
            };
            let answered =
                a.on_response(&plan, &mut host, token, &headers, 0, start + took_ms * MS);
            assert_eq!(answered, Some(Answered::Fetch(expected)), "case {i}");
        }
        assert_eq!(
            a.on_response(&plan, &mut host, 9999, &answer(&[]), 0, 0),
            None,
            "not ours"
        );
        host.refuse_calls = true;
        assert!(a.tick(&plan, &mut host, 9000 * MS).fetch_refused);
    }

    #[test]
    fn reports_go_one_at_a_time_and_only_acknowledged_totals_stop_them() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        host.hold_fetch_lease();
        a.tick(&plan, &mut host, 10 * MS);
        assert!(host.sent.is_empty(), "nothing to report");

        a.record(
            Some(ArmId(0)),
            Served::Arm(ArmId(0)),
            b"10.0.0.5:8080",
            CodeClass::of(200),
        );
        a.tick(&plan, &mut host, 20 * MS);
        a.record(
            Some(ArmId(0)),
            Served::Arm(ArmId(0)),
            b"10.0.0.5:8080",
            CodeClass::of(200),
        );
        a.tick(&plan, &mut host, 30 * MS);
        assert_eq!(
            host.paths(),
            [REPORTS_PATH],
            "the second waits for the first's answer"
        );
        assert_eq!(
            host.header(0, "authorization").as_deref(),
            Some("Bearer 0123456789abcdef")
        );
        let first: serde_json::Value = serde_json::from_slice(&host.sent[0].2).unwrap();
        assert_eq!(first["reporter"], "a");
        assert_eq!(first["sequence"], 1);
        assert_eq!(first["totals"][0]["count"], 1);

        let ack = br#"{"result":"applied"}"#;
        let answered = respond(
            &mut a,
            &plan,
            &mut host,
            0,
            &[(b":status", b"200")],
            ack,
            40 * MS,
        );
        assert_eq!(answered, Some(Answered::Report(ReportResult::Ok)));
        a.tick(&plan, &mut host, 50 * MS);
        let second: serde_json::Value = serde_json::from_slice(&host.sent[1].2).unwrap();
        assert_eq!(
            (
                second["sequence"].as_u64(),
                second["totals"][0]["count"].as_u64()
            ),
            (Some(2), Some(2))
        );

        // A refusal acknowledges nothing: the same totals go again, with the next sequence.
        let answered = respond(
            &mut a,
            &plan,
            &mut host,
            1,
            &[(b":status", b"401")],
            b"{}",
            60 * MS,
        );
        assert_eq!(answered, Some(Answered::Report(ReportResult::Error)));
        a.tick(&plan, &mut host, 70 * MS);
        let third: serde_json::Value = serde_json::from_slice(&host.sent[2].2).unwrap();
        assert_eq!(
            (
                third["sequence"].as_u64(),
                third["totals"][0]["count"].as_u64()
            ),
            (Some(3), Some(2))
        );
        respond(
            &mut a,
            &plan,
            &mut host,
            2,
            &[(b":status", b"200")],
            br#"{"result":"duplicate"}"#,
            80 * MS,
        );
        a.tick(&plan, &mut host, 90 * MS);
        assert_eq!(host.sent.len(), 3, "all acknowledged: nothing more to send");

        // A 200 whose body is not an acknowledgement is not one.
        a.record(None, Served::None, b"", CodeClass::of(0));
        a.tick(&plan, &mut host, 100 * MS);
        let answered = respond(
            &mut a,
            &plan,
            &mut host,
            3,
            &[(b":status", b"200")],
            b"ok",
            110 * MS,
        );
        assert_eq!(answered, Some(Answered::Report(ReportResult::Error)));
        host.refuse_calls = true;
        assert!(a.tick(&plan, &mut host, 120 * MS).report_refused);
    }

    #[test]
    fn a_503_or_507_keeps_the_counts_and_backs_off_exponentially_up_to_a_bound() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        host.hold_fetch_lease();
        let record = |a: &mut Link| {
            a.record(
                Some(ArmId(0)),
                Served::Arm(ArmId(0)),
                b"10.0.0.5:8080",
                CodeClass::of(200),
            )
        };
        // refreshMs is 100: tick every 100 ms, answer each report at once with 507, then 503.
        let mut sent_at = Vec::new();
        let mut now = 0;
        let mut recorded = 0u64;
        while now <= 400_000 * MS {
            record(&mut a);
            recorded += 1;
            a.tick(&plan, &mut host, now);
            if host.sent.len() > sent_at.len() {
                sent_at.push(now / MS);
                let status: &[u8] = if sent_at.len() % 2 == 0 {
                    b"503"
                } else {
                    b"507"
                };
                let answered = respond(
                    &mut a,
                    &plan,
                    &mut host,
                    sent_at.len() - 1,
                    &[(b":status", status)],
                    br#"{"error":{"code":"ledger_full"}}"#,
                    now,
                );
                assert_eq!(answered, Some(Answered::Report(ReportResult::Deferred)));
            }
            now += 100 * MS;
        }
        let gaps: Vec<u64> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps[..10],
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 60000]
        );
        assert!(gaps[10..].iter().all(|&g| g == MAX_REPORT_BACKOFF_MS));
        assert_eq!(host.warnings.len(), 1, "warned once: {:?}", host.warnings);
        // Every report is cumulative: the last one sent carries every request recorded before it.
        let last: serde_json::Value =
            serde_json::from_slice(&host.sent[sent_at.len() - 1].2).unwrap();
        let sent_count = last["totals"][0]["count"].as_u64().unwrap();
        assert_eq!(sent_count, *sent_at.last().unwrap() / 100 + 1);
        // The sidecar takes reports again: the next report (after the backoff) carries all of it,
        // and then reports go every tick again.
        let mut after = Vec::new();
        while after.len() < 3 {
            record(&mut a);
            recorded += 1;
            a.tick(&plan, &mut host, now);
            if host.sent.len() > sent_at.len() + after.len() {
                let index = host.sent.len() - 1;
                let report: serde_json::Value =
                    serde_json::from_slice(&host.sent[index].2).unwrap();
                after.push((now / MS, report["totals"][0]["count"].as_u64().unwrap()));
                let answered = respond(
                    &mut a,
                    &plan,
                    &mut host,
                    index,
                    &[(b":status", b"200")],
                    br#"{"result":"applied"}"#,
                    now,
                );
                assert_eq!(answered, Some(Answered::Report(ReportResult::Ok)));
            }
            now += 100 * MS;
        }
        assert_eq!(after[0].1, recorded - 2, "nothing lost: {after:?}");
        assert_eq!(after[1].0 - after[0].0, 100, "no backoff after a 200");
        assert_eq!(after[2].1, recorded);
    }

    #[test]
    fn a_413_halves_the_report_budget_down_to_a_floor() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        host.hold_fetch_lease();
        let mut budgets = Vec::new();
        for i in 0..8 {
            a.record(
                Some(ArmId(1)),
                Served::Unknown,
                b"10.0.0.9:8080",
                CodeClass::of(503),
            );
            a.tick(&plan, &mut host, (10 + i) * MS);
            respond(
                &mut a,
                &plan,
                &mut host,
                i as usize,
                &[(b":status", b"413")],
                b"",
                0,
            );
            budgets.push(a.report_budget);
        }
        assert_eq!(budgets[0], REPORT_BUDGET_BYTES / 2);
        assert_eq!(budgets[7], MIN_REPORT_BUDGET);
        assert!(budgets.windows(2).all(|w| w[1] <= w[0]));
        assert!(host.warnings[0].contains("413"), "{:?}", host.warnings);

        // A report the budget cut is acknowledged, and the rest follows on the next tick.
        for i in 0..150u32 {
            let endpoint = format!("10.0.{}.{}:8080", i / 100, i % 100);
            a.record(
                Some(ArmId(0)),
                Served::Unknown,
                endpoint.as_bytes(),
                CodeClass::of(200),
            );
        }
        let ack = br#"{"result":"applied"}"#;
        let mut reported = 0;
        for round in 0..10 {
            a.tick(&plan, &mut host, (100 + round) * MS);
            let Some((_, _, body)) = host.sent.get(8 + round as usize) else {
                break;
            };
            assert!(body.len() <= MIN_REPORT_BUDGET);
            let report: serde_json::Value = serde_json::from_slice(body).unwrap();
            reported += report["totals"].as_array().unwrap().len();
            respond(
                &mut a,
                &plan,
                &mut host,
                8 + round as usize,
                &[(b":status", b"200")],
                ack,
                0,
            );
        }
        let reports = host.sent.len() - 8;
        assert!(
            reports >= 2,
            "the budget cut the first report: {reports} sent"
        );
        assert_eq!(
            reported,
            150 + 1,
            "every endpoint once, and the 503s of 10.0.0.9"
        );
    }

    #[test]
    fn map_age_counts_from_the_start_until_a_map_is_confirmed() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let mut a = link(&plan, "a");
        let mut host = FakeHost::new(&store, 0);
        host.refuse_calls = true;
        assert_eq!(a.tick(&plan, &mut host, 2_500 * MS).map_age_s, 2);
    }

    #[test]
    fn a_304_for_an_older_etag_does_not_confirm_the_map_adopted_since() {
        let plan = plan();
        let store = RefCell::new(FakeSharedData::default());
        let (mut a, mut b, mut host_a, mut host_b) = a_fetched_e1(&plan, &store);
        // a asks again with e1; meanwhile b fetches e2 and a adopts it.
        a.tick(&plan, &mut host_a, 120 * MS);
        assert_eq!(host_a.header(1, "if-none-match").as_deref(), Some("\"e1\""));
        b.tick(&plan, &mut host_b, 230 * MS);
        let map_v2 = String::from_utf8(MAP.to_vec()).unwrap().replace("v1", "v2");
        respond(
            &mut b,
            &plan,
            &mut host_b,
            0,
            &[(b":status", b"200"), (b"etag", b"\"e2\"")],
            map_v2.as_bytes(),
            230 * MS,
        );
        host_a.hold_fetch_lease();
        a.tick(&plan, &mut host_a, 240 * MS);
        assert_eq!(a.fresh_map(240 * MS).unwrap().version(), "v2");
        // The sidecar's 304 says e1 is current at 900 ms: it says nothing about v2.
        let answered = respond(
            &mut a,
            &plan,
            &mut host_a,
            1,
            &[(b":status", b"304")],
            b"",
            900 * MS,
        );
        assert_eq!(answered, Some(Answered::Fetch(FetchResult::NotModified)));
        assert!(
            a.fresh_map(1231 * MS).is_none(),
            "v2 was confirmed at 230 ms only"
        );
    }
}
