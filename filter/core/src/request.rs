//! One request's headers through the filter as a single pure step: what the host provides goes in
//! (the serialized header map, and on demand the source address, a split draw and the endpoint map's
//! answer), what to do comes out as a value (header edits, counters to bump, a local reply). The host
//! glue only reads the inputs and applies the effects, in any order: none depends on another.

use crate::headers::scan_request_headers;
use crate::metrics::MetricLayout;
use crate::plan::{Admission, ArmId, Decision, Plan, Rejection};

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

/// A change to the request's headers. Names and values borrow from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEdit<'p> {
    Set(&'p str, &'p [u8]),
    Remove(&'p str),
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
    /// The arm the request goes on with; `None` when untagged or answered locally.
    pub arm: Option<ArmId>,
}

impl<'p> RequestEffects<'p> {
    fn new() -> Self {
        RequestEffects {
            edits: [None; MAX_EDITS],
            counts: [None; MAX_COUNTS],
            reply: None,
            arm: None,
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
                effects.arm = Some(arm);
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
        assert_eq!(effects.arm, Some(nvlink));
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
        assert_eq!(effects.arm, None);
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
        assert_eq!((effects.arm, effects.reply), (None, None));
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
        assert_eq!((effects.arm, effects.reply), (Some(fs), None));
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
        assert!(effects.arm.is_some() && host.asked_draw == 1);
        let (keyed, _) = run(&plan, &[(b"x-session", b"abc")], &mut host);
        let (again, _) = run(&plan, &[(b"x-session", b" abc\t")], &mut host);
        assert_eq!(host.asked_draw, 1, "a key decides without a draw");
        assert_eq!(keyed.arm, again.arm, "the key's arm is sticky");
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
        assert_eq!(allowed.arm, plan.arm_by_name("fs"));
        run(&plan, &[], &mut host);
        assert_eq!(host.asked_source, 1, "no arm asked for: nothing to allow");

        host.source = Some(b"192.0.2.1:5555");
        let (refused, layout) = run(&plan, &[(b"x-kv-backend", b"fs")], &mut host);
        assert_eq!((refused.arm, refused.reply), (None, None));
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
        assert_eq!((effects.arm, effects.reply), (None, None));
    }
}
