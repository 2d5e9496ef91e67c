//! One request's path through the filter: decide and tag on request headers, tag the response,
//! count when the stream ends.

use std::rc::Rc;

use kvab_filter_core::headers::scan_request_headers;
use kvab_filter_core::metrics::CodeClass;
use kvab_filter_core::{ArmId, Decision};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::abi::{self, Level, Map};
use crate::worker::Worker;

const RESPONSE_CODE: &[u8] = b"response\0code";
const UPSTREAM_ADDRESS: &[u8] = b"upstream\0address";
const SOURCE_ADDRESS: &[u8] = b"source\0address";

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
    arm: Option<ArmId>,
    start_nanos: u64,
}

impl RequestContext {
    pub fn new(worker: Option<Rc<Worker>>) -> Self {
        RequestContext {
            worker,
            stage: Stage::Idle,
            arm: None,
            start_nanos: 0,
        }
    }
}

fn millis_since(start_nanos: u64) -> u64 {
    abi::now_nanos().saturating_sub(start_nanos) / 1_000_000
}

impl Context for RequestContext {}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(worker) = self.worker.clone() else {
            return Action::Continue;
        };
        self.start_nanos = abi::now_nanos();
        let plan = &worker.plan;
        let map = match abi::header_pairs(Map::RequestHeaders) {
            Ok(map) => map.unwrap_or_default(),
            Err(e) => {
                abi::log(
                    Level::Error,
                    &format!("cannot read request headers: host status {}", e.0),
                );
                Box::default()
            }
        };
        let scan = scan_request_headers(plan, &map);
        // Reads the source address only under an `allowChoice` policy with source ranges.
        let may_choose = scan.may_choose(plan, || abi::property(SOURCE_ADDRESS).ok().flatten());
        let verdict = plan.decide_for(&scan.reading, may_choose, scan.split_key, || {
            worker.next_draw()
        });
        if let Some(why) = verdict.invalid {
            worker.count(worker.layout.invalid_values(why));
        }
        if scan.forged_tags {
            let _ = abi::remove_header(Map::RequestHeaders, plan.endpoint_header());
        }
        match verdict.decision {
            Decision::Reject(rejection) => {
                self.stage = Stage::Rejected;
                worker.count(worker.layout.rejected(rejection));
                let details = match rejection {
                    kvab_filter_core::Rejection::UnknownBackend => "kvab_unknown_kv_backend",
                    kvab_filter_core::Rejection::AmbiguousBackend => "kvab_ambiguous_kv_backend",
                };
                let body = plan.rejection_body(rejection);
                if abi::send_local_response(
                    rejection.status(),
                    details,
                    body,
                    &worker.reject_headers,
                )
                .is_ok()
                {
                    return Action::Pause;
                }
                // The host refused the local reply: let the request through untagged rather than hang it.
                self.stage = Stage::Admitted;
                let _ = abi::remove_header(Map::RequestHeaders, plan.header());
                let _ = abi::remove_header(Map::RequestHeaders, plan.source_header());
                worker.count(worker.layout.requests(None));
            }
            Decision::Tag { arm, source } => {
                self.stage = Stage::Admitted;
                self.arm = Some(arm);
                if !scan.reading.already_canonical(arm) {
                    let name = plan.arm_label(Some(arm));
                    let _ =
                        abi::replace_header(Map::RequestHeaders, plan.header(), name.as_bytes());
                }
                let _ = abi::replace_header(
                    Map::RequestHeaders,
                    plan.source_header(),
                    source.label().as_bytes(),
                );
                worker.count(worker.layout.requests(Some((arm, source))));
            }
            Decision::Untagged => {
                self.stage = Stage::Admitted;
                if scan.reading.present() {
                    let _ = abi::remove_header(Map::RequestHeaders, plan.header());
                }
                if scan.forged_tags {
                    let _ = abi::remove_header(Map::RequestHeaders, plan.source_header());
                }
                worker.count(worker.layout.requests(None));
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(worker) = self.worker.as_deref() else {
            return Action::Continue;
        };
        if self.stage != Stage::Admitted {
            return Action::Continue;
        }
        let plan = &worker.plan;
        worker.record(
            worker.layout.time_to_first_byte(self.arm),
            millis_since(self.start_nanos),
        );
        if self.arm.is_some() {
            let _ = abi::replace_header(
                Map::ResponseHeaders,
                plan.header(),
                plan.arm_label(self.arm).as_bytes(),
            );
        }
        match abi::property(UPSTREAM_ADDRESS) {
            Ok(Some(address)) if !address.is_empty() => {
                let _ = abi::replace_header(Map::ResponseHeaders, plan.endpoint_header(), &address);
            }
            // No upstream (e.g. an Envoy local reply): make sure nobody else's value shows.
            _ => {
                let _ = abi::remove_header(Map::ResponseHeaders, plan.endpoint_header());
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(worker) = self.worker.as_deref() else {
            return;
        };
        if self.stage == Stage::Idle {
            return;
        }
        let status = match abi::property(RESPONSE_CODE) {
            Ok(Some(bytes)) => bytes
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes),
            _ => 0,
        };
        worker.count(worker.layout.responses(self.arm, CodeClass::of(status)));
        if self.stage == Stage::Admitted {
            worker.record(
                worker.layout.request_duration(self.arm),
                millis_since(self.start_nanos),
            );
        }
    }
}
