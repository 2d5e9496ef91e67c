//! One request through the filter as pure steps, one per moment the host reports: what the host
//! provides goes in (the serialized header map, and on demand the source address, a split draw and
//! the endpoint map's answer; the upstream that answered; the response status), what to do comes out
//! as a value (header edits, counters to bump, a local reply). The host glue only reads the inputs and
//! applies the effects, in any order: none depends on another.

use crate::endpoints::{ArmMap, Served};
use crate::headers::scan_request_headers;
use crate::metrics::{CodeClass, MetricLayout};
use crate::plan::{Admission, ArmId, Decision, Plan, Rejection, Source};

/// What the request path may ask the host, each only when the answer decides something.
pub trait RequestInputs {
    /// Envoy's `source.address`: asked only under an `allowChoice` policy with source ranges, for a
    /// request that names an arm and was not already let choose by the policy header.
    fn source_address(&mut self) -> Option<Box<[u8]>>;
    /// The next random draw: asked only for a request the split assigns without a key.
    fn next_draw(&mut self) -> u64;
    /// Ready endpoints of `arm` per a fresh endpoint map; `None` when there is none.
    fn ready_endpoints(&mut self, arm: ArmId) -> Option<u32>;
}

/// A change to the request's or the response's headers. Names borrow from the plan, values from
/// the plan or the host's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEdit<'a> {
    Set(&'a str, &'a [u8]),
    Remove(&'a str),
}

/// Most edits one request needs: the forged endpoint tag, the arm header and the source tag.
const MAX_EDITS: usize = 3;
/// Most counters one request bumps: an invalid value, an unavailable arm, and the request or its
/// rejection.
const MAX_COUNTS: usize = 3;

/// What to do with one request's headers. Fixed-size: nothing is allocated per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEffects<'p> {
    edits: [Option<HeaderEdit<'p>>; MAX_EDITS],
    /// Indexes into the plan's `MetricLayout`.
    counts: [Option<usize>; MAX_COUNTS],
    /// Answer the request locally with this rejection (its body: `Plan::rejection_body`).
    pub reply: Option<(Rejection, Option<ArmId>)>,
    /// The arm the request goes on with and how it was chosen; `None` when untagged or answered locally.
    pub tag: Option<(ArmId, Source)>,
}

impl<'p> RequestEffects<'p> {
    fn new() -> Self {
        RequestEffects {
            edits: [None; MAX_EDITS],
            counts: [None; MAX_COUNTS],
            reply: None,
            tag: None,
        }
    }

    fn edit(&mut self, edit: HeaderEdit<'p>) {
        if let Some(slot) = self.edits.iter_mut().find(|e| e.is_none()) {
            *slot = Some(edit);
        }
    }

    fn count(&mut self, index: usize) {
        if let Some(slot) = self.counts.iter_mut().find(|c| c.is_none()) {
            *slot = Some(index);
        }
    }

    pub fn edits(&self) -> impl Iterator<Item = HeaderEdit<'p>> + '_ {
        self.edits.iter().flatten().copied()
    }

    pub fn counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.counts.iter().flatten().copied()
    }

    /// The arm the request goes on with.
    pub fn arm(&self) -> Option<ArmId> {
        self.tag.map(|(arm, _)| arm)
    }
}

/// Decides one request from its serialized request headers (proxy-wasm pair form).
pub fn on_request_headers<'p>(
    plan: &'p Plan,
    layout: &MetricLayout,
    headers: &[u8],
    inputs: &mut impl RequestInputs,
) -> RequestEffects<'p> {
    let mut effects = RequestEffects::new();
    let scan = scan_request_headers(plan, headers);
    let may_choose = scan.may_choose(plan, || inputs.source_address());
    let verdict = plan.decide_for(&scan.reading, may_choose, scan.split_key, || {
        inputs.next_draw()
    });
    if let Some(why) = verdict.invalid {
        effects.count(layout.invalid_values(why));
    }
    if scan.forged_tags {
        effects.edit(HeaderEdit::Remove(plan.endpoint_header()));
    }
    match verdict.decision {
        Decision::Reject(rejection) => {
            effects.count(layout.rejected(rejection));
            effects.reply = Some((rejection, None));
        }
        Decision::Tag { arm, source } => match plan.admit(inputs.ready_endpoints(arm)) {
            Admission::Reject(rejection) => {
                effects.count(layout.unavailable(arm));
                effects.count(layout.rejected(rejection));
                effects.reply = Some((rejection, Some(arm)));
            }
            admission => {
                if admission == Admission::Unavailable {
                    effects.count(layout.unavailable(arm));
                }
                if !scan.reading.already_canonical(arm) {
                    let name = plan.arm_label(Some(arm));
                    effects.edit(HeaderEdit::Set(plan.header(), name.as_bytes()));
                }
                effects.edit(HeaderEdit::Set(
                    plan.source_header(),
                    source.label().as_bytes(),
                ));
                effects.count(layout.requests(Some((arm, source))));
                effects.tag = Some((arm, source));
            }
        },
        Decision::Untagged => {
            if scan.reading.present() {
                effects.edit(HeaderEdit::Remove(plan.header()));
            }
            if scan.forged_tags {
                effects.edit(HeaderEdit::Remove(plan.source_header()));
            }
            effects.count(layout.requests(None));
        }
    }
    effects
}

/// The host refused the local reply: the request goes on untagged rather than hang.
pub fn on_reply_refused<'p>(plan: &'p Plan, layout: &MetricLayout) -> RequestEffects<'p> {
    let mut effects = RequestEffects::new();
    effects.edit(HeaderEdit::Remove(plan.header()));
    effects.edit(HeaderEdit::Remove(plan.source_header()));
    effects.count(layout.requests(None));
    effects
}

/// What to do with an admitted request's response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseEffects<'a> {
    /// The arm tag, then the endpoint tag.
    edits: [Option<HeaderEdit<'a>>; 2],
    /// Which arm served the request, per the endpoint map: counted when the stream ends.
    pub served: Served,
}

impl<'a> ResponseEffects<'a> {
    pub fn edits(&self) -> impl Iterator<Item = HeaderEdit<'a>> + '_ {
        self.edits.iter().flatten().copied()
    }
}

/// Tags an admitted request's response. `arm` is the request's arm (`None`: untagged), `upstream`
/// the `ip:port` that answered (`None`: a local reply), `map` a fresh endpoint map if any.
pub fn on_response_headers<'a>(
    plan: &'a Plan,
    arm: Option<ArmId>,
    upstream: Option<&'a [u8]>,
    map: Option<&ArmMap>,
) -> ResponseEffects<'a> {
    let served = match (upstream, map) {
        (None, _) => Served::None,
        (Some(address), Some(map)) => map.arm_of(address),
        (Some(_), None) => Served::Unknown,
    };
    // The arm that served it when the map knows, else the arm the request was tagged with.
    let shown = match served {
        Served::Arm(served) => Some(served),
        Served::Unknown | Served::None => arm,
    };
    let tag =
        shown.map(|shown| HeaderEdit::Set(plan.header(), plan.arm_label(Some(shown)).as_bytes()));
    let endpoint = match upstream {
        Some(address) if plan.response_endpoint_header() => {
            HeaderEdit::Set(plan.endpoint_header(), address)
        }
        // No upstream (e.g. an Envoy local reply), or the tag is off: make sure nobody else's
        // value shows.
        _ => HeaderEdit::Remove(plan.endpoint_header()),
    };
    ResponseEffects {
        edits: [tag, Some(endpoint)],
        served,
    }
}

/// What the end of a request counts: its response status class, the response counter and the
/// served counter (indexes into the plan's `MetricLayout`), and, for an answered request, the
/// histograms its timings go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    pub class: CodeClass,
    pub counts: [usize; 2],
    /// `[request duration, time to first byte]` of an answered request (`CodeClass::answered`): a
    /// failure is counted by its class, never timed, so an arm that fails fast does not look fast.
    pub timed: Option<[usize; 2]>,
}

/// The end of a request that reached the filter (admitted or answered by it). `tag` is the
/// request's arm and how it was chosen (`None`: untagged or answered by the filter), `status` the
/// response code, 0 when there was none.
pub fn on_stream_end(
    layout: &MetricLayout,
    tag: Option<(ArmId, Source)>,
    served: Served,
    status: u64,
) -> StreamEnd {
    let class = CodeClass::of(status);
    let arm = tag.map(|(arm, _)| arm);
    StreamEnd {
        class,
        counts: [layout.responses(tag, class), layout.served(arm, served)],
        timed: class
            .answered()
            .then(|| [layout.request_duration(tag), layout.time_to_first_byte(tag)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::headers::serialize_pairs;
    use crate::plan::{Invalid, Source};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Host inputs that record what was asked.
    #[derive(Default)]
    struct Host {
        source: Option<&'static [u8]>,
        ready: Option<u32>,
        asked_source: usize,
        asked_draw: usize,
        asked_ready: Vec<ArmId>,
    }

    impl RequestInputs for Host {
        fn source_address(&mut self) -> Option<Box<[u8]>> {
            self.asked_source += 1;
            self.source.map(Box::from)
        }
        fn next_draw(&mut self) -> u64 {
            self.asked_draw += 1;
            u64::MAX / 3
        }
        fn ready_endpoints(&mut self, arm: ArmId) -> Option<u32> {
            self.asked_ready.push(arm);
            self.ready
        }
    }

    fn run<'p>(
        plan: &'p Plan,
        headers: &[(&[u8], &[u8])],
        host: &mut Host,
    ) -> (RequestEffects<'p>, MetricLayout) {
        let layout = MetricLayout::new(plan);
        let effects = on_request_headers(plan, &layout, &serialize_pairs(headers), host);
        (effects, layout)
    }

    #[test]
    fn an_alias_is_tagged_with_the_canonical_name_and_counted_once() {
        let plan = parse(b"{}").unwrap();
        let mut host = Host::default();
        let (effects, layout) = run(&plan, &[(b"x-kv-backend", b" P2P ")], &mut host);
        let nvlink = plan.arm_by_name("nvlink").unwrap();
        assert_eq!(effects.arm(), Some(nvlink));
        assert_eq!(effects.reply, None);
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [
                HeaderEdit::Set("x-kv-backend", b"nvlink"),
                HeaderEdit::Set("x-kv-backend-source", b"alias")
            ]
        );
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [layout.requests(Some((nvlink, Source::Alias)))]
        );
        // No split, no policy, no map: nothing else was asked of the host but the map.
        assert_eq!(
            (host.asked_source, host.asked_draw, host.asked_ready),
            (0, 0, vec![nvlink])
        );
    }

    #[test]
    fn a_canonical_name_is_left_as_sent() {
        let plan = parse(b"{}").unwrap();
        let (effects, _) = run(&plan, &[(b"x-kv-backend", b"fs")], &mut Host::default());
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [HeaderEdit::Set("x-kv-backend-source", b"header")]
        );
    }

    #[test]
    fn an_unknown_value_is_answered_locally_and_counted_as_invalid_and_rejected() {
        let plan = parse(b"{}").unwrap();
        let (effects, layout) = run(
            &plan,
            &[
                (b"x-kv-backend", b"bogus"),
                (b"x-kv-backend-endpoint", b"6.6.6.6:1"),
            ],
            &mut Host::default(),
        );
        assert_eq!(effects.reply, Some((Rejection::UnknownBackend, None)));
        assert_eq!(effects.arm(), None);
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [HeaderEdit::Remove("x-kv-backend-endpoint")]
        );
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [
                layout.invalid_values(Invalid::Unknown),
                layout.rejected(Rejection::UnknownBackend)
            ]
        );
    }

    #[test]
    fn an_untagged_request_loses_forged_tags_and_counts_as_untagged() {
        let plan = parse(b"{}").unwrap();
        let (effects, layout) = run(
            &plan,
            &[(b"x-kv-backend", b" "), (b"x-kv-backend-source", b"split")],
            &mut Host::default(),
        );
        assert_eq!((effects.arm(), effects.reply), (None, None));
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [
                HeaderEdit::Remove("x-kv-backend-endpoint"),
                HeaderEdit::Remove("x-kv-backend"),
                HeaderEdit::Remove("x-kv-backend-source")
            ]
        );
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [layout.requests(None)]
        );
    }

    #[test]
    fn an_arm_without_ready_endpoints_is_rejected_or_let_through_as_configured() {
        let reject = parse(b"{}").unwrap();
        let fs = reject.arm_by_name("fs").unwrap();
        let mut host = Host {
            ready: Some(0),
            ..Host::default()
        };
        let (effects, layout) = run(&reject, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!(effects.reply, Some((Rejection::Unavailable, Some(fs))));
        assert_eq!(effects.edits().count(), 0);
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [
                layout.unavailable(fs),
                layout.rejected(Rejection::Unavailable)
            ]
        );

        let pass = parse(br#"{"onUnavailable":"passthrough"}"#).unwrap();
        let (effects, layout) = run(&pass, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!((effects.arm(), effects.reply), (Some(fs), None));
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [
                layout.unavailable(fs),
                layout.requests(Some((fs, Source::Header)))
            ]
        );
    }

    #[test]
    fn the_split_draws_only_for_requests_without_an_arm_or_a_key() {
        let plan = parse(br#"{"onMissing":"split","split":{"weights":{"nvlink":1,"fs":1},"keyHeader":"x-session"}}"#).unwrap();
        let mut host = Host::default();
        let (effects, _) = run(&plan, &[], &mut host);
        assert!(effects.arm().is_some() && host.asked_draw == 1);
        let (keyed, _) = run(&plan, &[(b"x-session", b"abc")], &mut host);
        let (again, _) = run(&plan, &[(b"x-session", b" abc\t")], &mut host);
        assert_eq!(host.asked_draw, 1, "a key decides without a draw");
        assert_eq!(keyed.arm(), again.arm(), "the key's arm is sticky");
        run(&plan, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!(host.asked_draw, 1);
    }

    #[test]
    fn the_source_address_is_read_only_when_it_decides() {
        let plan = parse(br#"{"allowChoice":{"sourceRanges":["10.0.0.0/8"]}}"#).unwrap();
        let mut host = Host {
            source: Some(b"10.1.2.3:5555"),
            ..Host::default()
        };
        let (allowed, _) = run(&plan, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!(host.asked_source, 1);
        assert_eq!(allowed.arm(), plan.arm_by_name("fs"));
        run(&plan, &[], &mut host);
        assert_eq!(host.asked_source, 1, "no arm asked for: nothing to allow");

        host.source = Some(b"192.0.2.1:5555");
        let (refused, layout) = run(&plan, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!((refused.arm(), refused.reply), (None, None));
        assert_eq!(
            refused.counts().collect::<Vec<_>>(),
            [
                layout.invalid_values(Invalid::NotAllowed),
                layout.requests(None)
            ]
        );

        let open = parse(b"{}").unwrap();
        run(&open, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!(
            host.asked_source, 2,
            "without a policy the address is never read"
        );
    }

    #[test]
    fn a_refused_local_reply_lets_the_request_through_untagged() {
        let plan = parse(b"{}").unwrap();
        let layout = MetricLayout::new(&plan);
        let effects = on_reply_refused(&plan, &layout);
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [
                HeaderEdit::Remove("x-kv-backend"),
                HeaderEdit::Remove("x-kv-backend-source")
            ]
        );
        assert_eq!(
            effects.counts().collect::<Vec<_>>(),
            [layout.requests(None)]
        );
        assert_eq!((effects.arm(), effects.reply), (None, None));
    }

    #[test]
    fn a_response_is_tagged_with_the_arm_that_served_it_when_the_map_knows() {
        let plan = parse(b"{}").unwrap();
        let (nvlink, fs) = (
            plan.arm_by_name("nvlink").unwrap(),
            plan.arm_by_name("fs").unwrap(),
        );
        let map = ArmMap::parse(
            &plan,
            br#"{"version":"1","backends":{"fs":{"endpoints":[{"address":"10.0.0.1:8000","ready":true}]}}}"#,
        )
        .unwrap();
        let effects = on_response_headers(&plan, Some(nvlink), Some(b"10.0.0.1:8000"), Some(&map));
        assert_eq!(effects.served, Served::Arm(fs));
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [
                HeaderEdit::Set("x-kv-backend", b"fs"),
                HeaderEdit::Set("x-kv-backend-endpoint", b"10.0.0.1:8000")
            ]
        );
        let unknown = on_response_headers(&plan, Some(nvlink), Some(b"10.9.9.9:1"), Some(&map));
        assert_eq!(unknown.served, Served::Unknown);
        assert_eq!(
            unknown.edits().next(),
            Some(HeaderEdit::Set("x-kv-backend", b"nvlink"))
        );
    }

    #[test]
    fn without_a_map_or_an_upstream_the_response_shows_the_request_arm_and_no_endpoint() {
        let plan = parse(br#"{"responseEndpointHeader":false}"#).unwrap();
        let fs = plan.arm_by_name("fs").unwrap();
        let effects = on_response_headers(&plan, Some(fs), Some(b"10.0.0.1:8000"), None);
        assert_eq!(effects.served, Served::Unknown);
        assert_eq!(
            effects.edits().collect::<Vec<_>>(),
            [
                HeaderEdit::Set("x-kv-backend", b"fs"),
                HeaderEdit::Remove("x-kv-backend-endpoint")
            ]
        );
        let local = on_response_headers(&plan, None, None, None);
        assert_eq!(local.served, Served::None);
        assert_eq!(
            local.edits().collect::<Vec<_>>(),
            [HeaderEdit::Remove("x-kv-backend-endpoint")]
        );
    }

    #[test]
    fn the_end_of_a_request_counts_its_status_class_and_who_served_it() {
        let plan = parse(b"{}").unwrap();
        let layout = MetricLayout::new(&plan);
        let fs = plan.arm_by_name("fs");
        let tag = fs.map(|arm| (arm, Source::Split));
        let end = on_stream_end(&layout, tag, Served::Unknown, 503);
        assert_eq!(end.class, CodeClass::C5xx);
        assert_eq!(
            end.counts,
            [
                layout.responses(tag, CodeClass::C5xx),
                layout.served(fs, Served::Unknown)
            ]
        );
        assert_eq!(
            on_stream_end(&layout, None, Served::None, 0).class,
            CodeClass::None
        );
    }

    /// Only answers are timed, in the histograms of their arm and source: a failure (5xx, or no status)
    /// is counted by its class alone, so an arm that fails fast does not look fast.
    #[test]
    fn only_answered_requests_are_timed_by_arm_and_source() {
        let plan = parse(b"{}").unwrap();
        let layout = MetricLayout::new(&plan);
        let fs = plan.arm_by_name("fs").unwrap();
        for (status, answered) in [
            (200, true),
            (404, true),
            (101, true),
            (503, false),
            (0, false),
        ] {
            for source in Source::ALL {
                let tag = Some((fs, source));
                let end = on_stream_end(&layout, tag, Served::Arm(fs), status);
                let expected = answered
                    .then(|| [layout.request_duration(tag), layout.time_to_first_byte(tag)]);
                assert_eq!(end.timed, expected, "{status} {source:?}");
            }
        }
        let split = layout.request_duration(Some((fs, Source::Split)));
        let other = layout.request_duration(Some((fs, Source::Header)));
        assert_ne!(split, other);
        assert_eq!(other, layout.request_duration(Some((fs, Source::Key))));
    }
}
