//! One request's path through the filter: decide and tag on request headers, tag the response
//! with the arm that served it, time its first body byte, count when the stream ends. What to do
//! at each step is decided by `kvab_filter_core::request`; this file reads the host's inputs and
//! applies the answers.

use std::rc::Rc;

use kvab_filter_core::endpoints::Served;
use kvab_filter_core::plan::Source;
use kvab_filter_core::request::{
    on_reply_refused, on_request_headers, on_response_headers, on_stream_end, HeaderEdit,
    RequestEffects, RequestInputs,
};
use kvab_filter_core::ArmId;

use crate::abi::{self, Headers, Level};
use crate::worker::Worker;

const RESPONSE_CODE: &[u8] = b"response\0code";
const UPSTREAM_ADDRESS: &[u8] = b"upstream\0address";
const SOURCE_ADDRESS: &[u8] = b"source\0address";

/// What a header or body callback tells Envoy (proxy-wasm ABI 0.2.1 numbering).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Continue = 0,
    /// Stop iteration: the filter answered locally.
    Pause = 1,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Request headers not seen yet (or no configuration).
    Idle,
    /// Admitted, tagged with `arm` or untagged.
    Admitted,
    /// Answered by the filter itself.
    Rejected,
}

pub struct RequestContext {
    worker: Option<Rc<Worker>>,
    stage: Stage,
    /// The request's arm and how it was chosen (`None`: untagged).
    tag: Option<(ArmId, Source)>,
    start_nanos: u64,
    /// Upstream `ip:port` that answered, and the arm it belongs to per the endpoint map.
    upstream: Option<Box<[u8]>>,
    served: Served,
    /// Response headers passed without the end of the stream: the time to first byte waits for
    /// the first body byte.
    first_byte_pending: bool,
    /// Milliseconds to the first body byte, recorded when the stream ends if the request was
    /// answered (its status is read once, then).
    first_byte_ms: Option<u64>,
    /// When the response's end of stream passed (with its headers or a body chunk): the request's
    /// end for its duration, so `on_log` reads no clock of its own.
    end_nanos: Option<u64>,
}

impl RequestContext {
    pub fn new(worker: Option<Rc<Worker>>) -> Self {
        RequestContext {
            worker,
            stage: Stage::Idle,
            tag: None,
            start_nanos: 0,
            upstream: None,
            served: Served::None,
            first_byte_pending: false,
            first_byte_ms: None,
            end_nanos: None,
        }
    }

    fn arm(&self) -> Option<ArmId> {
        self.tag.map(|(arm, _)| arm)
    }

    fn note_first_byte(&mut self, now: u64) {
        self.first_byte_pending = false;
        self.first_byte_ms = Some(now.saturating_sub(self.start_nanos) / 1_000_000);
    }

    /// Applies what the core decided: header edits and counts, then the local reply if any.
    fn apply(&mut self, worker: &Worker, effects: &RequestEffects<'_>) -> Action {
        apply_edits(Headers::Request, effects.edits());
        for index in effects.counts() {
            worker.metrics.count(index);
        }
        self.tag = effects.tag;
        let Some((rejection, arm)) = effects.reply else {
            self.stage = Stage::Admitted;
            return Action::Continue;
        };
        self.stage = Stage::Rejected;
        let body = worker.plan.rejection_body(rejection, arm);
        if abi::send_local_response(
            rejection.status(),
            rejection.details(),
            body,
            &worker.reject_headers,
        )
        .is_ok()
        {
            return Action::Pause;
        }
        self.apply(
            worker,
            &on_reply_refused(&worker.plan, &worker.metrics.layout),
        )
    }
}

/// Applies the core's header edits to one map. A failing host call loses the edit, never the
/// request.
fn apply_edits<'a>(map: Headers, edits: impl Iterator<Item = HeaderEdit<'a>>) {
    for edit in edits {
        let _ = match edit {
            HeaderEdit::Set(name, value) => abi::replace_header(map, name, value),
            HeaderEdit::Remove(name) => abi::remove_header(map, name),
        };
    }
}

/// The host's answers to what the core asks while deciding a request.
struct HostInputs<'w> {
    worker: &'w Worker,
    now: u64,
}

impl RequestInputs for HostInputs<'_> {
    fn source_address(&mut self) -> Option<Box<[u8]>> {
        abi::property(SOURCE_ADDRESS).ok().flatten()
    }

    fn next_draw(&mut self) -> u64 {
        self.worker.next_draw()
    }

    fn ready_endpoints(&mut self, arm: ArmId) -> Option<u32> {
        let link = self.worker.link.as_ref()?;
        link.fresh_map(self.now).map(|map| map.ready_endpoints(arm))
    }
}

/// The callbacks `exports` hands a request's context.
impl RequestContext {
    pub fn on_request_headers(&mut self) -> Action {
        let Some(worker) = self.worker.clone() else {
            return Action::Continue;
        };
        self.start_nanos = abi::now_nanos();
        let map = match abi::header_pairs(Headers::Request) {
            Ok(map) => map.unwrap_or_default(),
            Err(e) => {
                abi::log(
                    Level::Error,
                    &format!("cannot read request headers: host status {}", e.0),
                );
                Box::default()
            }
        };
        let mut inputs = HostInputs {
            worker: &worker,
            now: self.start_nanos,
        };
        let effects = on_request_headers(&worker.plan, &worker.metrics.layout, &map, &mut inputs);
        self.apply(&worker, &effects)
    }

    pub fn on_response_headers(&mut self, end_of_stream: bool) -> Action {
        let Some(worker) = self.worker.clone() else {
            return Action::Continue;
        };
        if self.stage != Stage::Admitted {
            return Action::Continue;
        }
        let plan = &worker.plan;
        // The clock only when something reads it: each host call costs (BENCHMARKS.md).
        let now = (end_of_stream || worker.link.is_some()).then(abi::now_nanos);
        // Streaming servers send the headers before the first token; a response without a body
        // has no later moment.
        match now {
            Some(now) if end_of_stream => {
                self.note_first_byte(now);
                self.end_nanos = Some(now);
            }
            _ => self.first_byte_pending = true,
        }
        self.upstream = abi::property(UPSTREAM_ADDRESS)
            .ok()
            .flatten()
            .filter(|a| !a.is_empty());
        let map = match (worker.link.as_ref(), now) {
            (Some(link), Some(now)) => link.fresh_map(now),
            _ => None,
        };
        let effects =
            on_response_headers(plan, self.arm(), self.upstream.as_deref(), map.as_deref());
        apply_edits(Headers::Response, effects.edits());
        self.served = effects.served;
        Action::Continue
    }

    pub fn on_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Entered for every chunk of a stream: after the first byte, only these tests. One clock
        // read serves the first byte and the end when one chunk is the whole body.
        let first_byte = self.first_byte_pending && (body_size > 0 || end_of_stream);
        let end = end_of_stream && self.stage == Stage::Admitted;
        if first_byte || end {
            let now = abi::now_nanos();
            if first_byte {
                self.note_first_byte(now);
            }
            if end {
                self.end_nanos = Some(now);
            }
        }
        Action::Continue
    }

    pub fn on_log(&mut self) {
        // Only an admitted request is timed (and only it can wait for its first byte).
        let end_nanos =
            (self.stage == Stage::Admitted).then(|| self.end_nanos.unwrap_or_else(abi::now_nanos));
        if let (true, Some(end_nanos)) = (self.first_byte_pending, end_nanos) {
            // The body never carried a byte (it ended with trailers, or the stream was reset).
            self.note_first_byte(end_nanos);
        }
        let Some(worker) = self.worker.as_deref() else {
            return;
        };
        if self.stage == Stage::Idle {
            return;
        }
        let metrics = &worker.metrics;
        let status = match abi::property(RESPONSE_CODE) {
            Ok(Some(bytes)) => bytes
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes),
            _ => 0,
        };
        let end = on_stream_end(&metrics.layout, self.tag, self.served, status);
        for index in end.counts {
            metrics.count(index);
        }
        if let Some(link) = &worker.link {
            link.record(
                self.arm(),
                self.served,
                self.upstream.as_deref().unwrap_or_default(),
                end.class,
            );
        }
        // An answered, admitted request: its duration, and its first byte when one came.
        if let (Some([duration, first_byte]), Some(end_nanos)) = (end.timed, end_nanos) {
            metrics.record(
                duration,
                end_nanos.saturating_sub(self.start_nanos) / 1_000_000,
            );
            if let Some(ms) = self.first_byte_ms {
                metrics.record(first_byte, ms);
            }
        }
    }
}
