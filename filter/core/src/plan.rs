//! The validated configuration in the form the request path uses, and the per-request decision:
//! which arm a request is tagged with, or whether it is left untagged or rejected.

pub use crate::arm::ArmId;
use crate::assign::Split;
use crate::choice::ChoicePolicy;
use crate::field::trim_ows;
pub use crate::reply::Rejection;
use crate::sidecar::Sidecar;
use kvab_contract::metrics::source;
use kvab_contract::report::NO_ARM;

/// What to do when the request carries no arm header (or only an empty value). `Arm` is the
/// default arm: `()` as configured (`onMissing: "default"`), an `ArmId` once `defaultArm` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing<Arm = ArmId> {
    /// Leave it untagged: the scheduler may pick any proxy (the runbook's Step 4).
    Passthrough,
    Default(Arm),
    Split,
}

/// What to do when the header names no configured arm or several different ones.
/// `Arm` as in `Missing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown<Arm = ArmId> {
    Reject,
    /// Strip the value and leave the request untagged.
    Passthrough,
    Default(Arm),
}

/// What to do when the endpoint map says the requested arm has no ready endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Answer 503 `kv_backend_unavailable` naming the arm (instead of the scheduler's 429).
    Reject,
    /// Let it through and count it.
    Passthrough,
}

/// How the arm of a tagged request was chosen: the `x-kv-backend-source` tag and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Alias,
    /// The split, by a random draw.
    Split,
    /// The split, by the key header's value: the key is the unit of randomization.
    Key,
    Default,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Header,
        Source::Alias,
        Source::Split,
        Source::Key,
        Source::Default,
    ];

    /// The `source` label and source header value (the contract's `metrics::source`).
    pub fn label(self) -> &'static str {
        match self {
            Source::Header => source::HEADER,
            Source::Alias => source::ALIAS,
            Source::Split => source::SPLIT,
            Source::Key => source::KEY,
            Source::Default => source::DEFAULT,
        }
    }
}

/// Why a header value was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// No configured arm or alias matches.
    Unknown,
    /// Several different values (repeated header or a comma list).
    Ambiguous,
    /// Any value, from a request the `allowChoice` policy does not let choose.
    NotAllowed,
}

impl Invalid {
    pub const ALL: [Invalid; 3] = [Invalid::Unknown, Invalid::Ambiguous, Invalid::NotAllowed];

    /// Label of `kvab_invalid_values_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Invalid::Unknown => "unknown",
            Invalid::Ambiguous => "ambiguous",
            Invalid::NotAllowed => "not_allowed",
        }
    }
}

/// The outcome for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Tag { arm: ArmId, source: Source },
    Untagged,
    Reject(Rejection),
}

/// Whether an arm with no ready endpoint lets a request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Admitted although the arm has no ready endpoint (counted).
    Unavailable,
    Reject(Rejection),
}

/// A decision plus whether the header value was unusable (counted even when policy lets it pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub invalid: Option<Invalid>,
}

/// Accumulates every occurrence of the arm header of one request, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    state: ReadState,
    occurrences: u32,
    /// The single occurrence is byte-for-byte the canonical name: no rewrite needed.
    canonical_bytes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ReadState {
    /// No occurrence, or only empty / blank list elements.
    #[default]
    Empty,
    Arm(ArmId, Source),
    Unknown,
    Ambiguous,
}

impl Reading {
    /// Whether the header arrived at all (even empty); an untagged request must lose it.
    pub fn present(&self) -> bool {
        self.occurrences > 0
    }

    /// Whether forwarding the header as received already carries exactly `arm`'s canonical name.
    pub fn already_canonical(&self, arm: ArmId) -> bool {
        self.occurrences == 1
            && self.canonical_bytes
            && matches!(self.state, ReadState::Arm(a, _) if a == arm)
    }

    /// Whether the request tries to choose an arm (any non-blank value, valid or not).
    pub fn chooses(&self) -> bool {
        self.state != ReadState::Empty
    }

    fn add(&mut self, element: ReadState) {
        self.state = match (self.state, element) {
            (ReadState::Empty, e) => e,
            (ReadState::Arm(a, s1), ReadState::Arm(b, s2)) if a == b => {
                let source = if s1 == Source::Alias || s2 == Source::Alias {
                    Source::Alias
                } else {
                    Source::Header
                };
                ReadState::Arm(a, source)
            }
            (ReadState::Unknown, ReadState::Unknown) => ReadState::Unknown,
            (s, ReadState::Empty) => s,
            _ => ReadState::Ambiguous,
        };
    }
}

/// Names and aliases longer than this cannot match; longer elements are unknown without a scan.
const MAX_SPELLING_LEN: usize = 32;

/// The validated pieces a [`Plan`] is made of (built by `config`).
pub(crate) struct Policies {
    pub header: String,
    pub arms: Vec<String>,
    pub spellings: Vec<(String, ArmId, bool)>,
    pub on_missing: Missing,
    pub on_unknown: Unknown,
    pub on_unavailable: Unavailable,
    pub split: Option<Split>,
    pub sidecar: Option<Sidecar>,
    pub choice: Option<ChoicePolicy>,
    pub response_endpoint_header: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    header: String,
    source_header: String,
    endpoint_header: String,
    arms: Vec<String>,
    /// Lowercase spelling → arm, and whether it is the canonical name (else an alias).
    spellings: Vec<(Box<[u8]>, ArmId, bool)>,
    on_missing: Missing,
    on_unknown: Unknown,
    on_unavailable: Unavailable,
    split: Option<Split>,
    sidecar: Option<Sidecar>,
    choice: Option<ChoicePolicy>,
    /// Whether responses name the upstream `ip:port` in `<header>-endpoint`.
    response_endpoint_header: bool,
    unknown_body: Vec<u8>,
    ambiguous_body: Vec<u8>,
    /// One per arm: the message names the arm.
    unavailable_bodies: Vec<Vec<u8>>,
}

impl Plan {
    pub(crate) fn new(p: Policies) -> Plan {
        let source_header = kvab_contract::source_header(&p.header);
        let endpoint_header = kvab_contract::endpoint_header(&p.header);
        let spellings: Vec<(Box<[u8]>, ArmId, bool)> = p
            .spellings
            .into_iter()
            .map(|(s, id, canonical)| (s.into_bytes().into_boxed_slice(), id, canonical))
            .collect();
        let body = |r, arm| crate::reply::rejection_body(r, arm, &p.header, &p.arms, &spellings);
        let unknown_body = body(Rejection::UnknownBackend, None);
        let ambiguous_body = body(Rejection::AmbiguousBackend, None);
        let unavailable_bodies = (0..p.arms.len())
            .map(|i| body(Rejection::Unavailable, Some(ArmId(i))))
            .collect();
        Plan {
            header: p.header,
            source_header,
            endpoint_header,
            arms: p.arms,
            spellings,
            on_missing: p.on_missing,
            on_unknown: p.on_unknown,
            on_unavailable: p.on_unavailable,
            split: p.split,
            sidecar: p.sidecar,
            unknown_body,
            ambiguous_body,
            unavailable_bodies,
            choice: p.choice,
            response_endpoint_header: p.response_endpoint_header,
        }
    }

    pub fn on_unavailable(&self) -> Unavailable {
        self.on_unavailable
    }

    /// Where to fetch endpoint maps and send reports; `None` runs the filter on its own.
    pub fn sidecar(&self) -> Option<&Sidecar> {
        self.sidecar.as_ref()
    }

    /// The arm with this canonical name (endpoint maps use canonical names only).
    pub fn arm_by_name(&self, name: &str) -> Option<ArmId> {
        self.arms.iter().position(|a| a == name).map(ArmId)
    }

    /// The request header read (lowercase); also the request and response tag.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// `<header>-source`: how the arm was chosen.
    pub fn source_header(&self) -> &str {
        &self.source_header
    }

    /// `<header>-endpoint`: the upstream `ip:port` that served the response.
    pub fn endpoint_header(&self) -> &str {
        &self.endpoint_header
    }

    /// Whether responses carry [`Plan::endpoint_header`]. Off, the tag is still stripped from
    /// requests and responses, so no other value can pass for it.
    pub fn response_endpoint_header(&self) -> bool {
        self.response_endpoint_header
    }

    pub fn arm_names(&self) -> &[String] {
        &self.arms
    }

    /// Canonical name of an arm, `none` for untagged traffic.
    pub fn arm_label(&self, arm: Option<ArmId>) -> &str {
        arm.and_then(|a| self.arms.get(a.0))
            .map_or(NO_ARM, String::as_str)
    }

    pub fn on_missing(&self) -> Missing {
        self.on_missing
    }

    pub fn on_unknown(&self) -> Unknown {
        self.on_unknown
    }

    pub fn split(&self) -> Option<&Split> {
        self.split.as_ref()
    }

    /// The `allowChoice` policy; `None`: every request may choose its arm.
    pub fn choice(&self) -> Option<&ChoicePolicy> {
        self.choice.as_ref()
    }

    /// One line summarizing the configuration in its own vocabulary, for the log.
    pub fn describe(&self) -> String {
        let name = |arm: ArmId| self.arm_label(Some(arm)).to_owned();
        let missing = match self.on_missing {
            Missing::Passthrough => "passthrough".to_owned(),
            Missing::Default(arm) => format!("default ({})", name(arm)),
            Missing::Split => {
                let weights: Vec<String> = self
                    .split
                    .iter()
                    .flat_map(|s| s.weights())
                    .map(|(arm, w)| format!("{}={w}", name(arm)))
                    .collect();
                format!("split ({})", weights.join(", "))
            }
        };
        let unknown = match self.on_unknown {
            Unknown::Reject => "reject".to_owned(),
            Unknown::Passthrough => "passthrough".to_owned(),
            Unknown::Default(arm) => format!("default ({})", name(arm)),
        };
        let sidecar = match &self.sidecar {
            Some(s) => format!(
                ", sidecar {} every {} ms (stale after {} ms), onUnavailable {}",
                s.cluster,
                s.refresh_ms,
                s.stale_after_ms,
                match self.on_unavailable {
                    Unavailable::Reject => "reject",
                    Unavailable::Passthrough => "passthrough",
                }
            ),
            None => String::new(),
        };
        let choice = match &self.choice {
            Some(c) => format!(", allowChoice {}", c.describe()),
            None => String::new(),
        };
        let endpoint = if self.response_endpoint_header {
            ""
        } else {
            ", responseEndpointHeader off"
        };
        format!(
            "header {}, arms [{}], onMissing {missing}, onUnknown {unknown}{choice}{sidecar}{endpoint}",
            self.header,
            self.arms.join(", ")
        )
    }

    /// Whether a tagged request goes ahead, given its arm's ready endpoints per a
    /// fresh endpoint map (`None`: no fresh map, so nothing is known and nothing is refused).
    pub fn admit(&self, ready_endpoints: Option<u32>) -> Admission {
        match (ready_endpoints, self.on_unavailable) {
            (Some(0), Unavailable::Reject) => Admission::Reject(Rejection::Unavailable),
            (Some(0), Unavailable::Passthrough) => Admission::Unavailable,
            _ => Admission::Admit,
        }
    }

    /// The JSON body answered with a rejection (prepared once at configure time); `arm` is the
    /// requested arm, named in the `kv_backend_unavailable` message.
    pub fn rejection_body(&self, rejection: Rejection, arm: Option<ArmId>) -> &[u8] {
        match rejection {
            Rejection::UnknownBackend => &self.unknown_body,
            Rejection::AmbiguousBackend => &self.ambiguous_body,
            Rejection::Unavailable => arm
                .and_then(|a| self.unavailable_bodies.get(a.0))
                .map_or(&[], Vec::as_slice),
        }
    }

    /// Feeds one occurrence of the arm header: trims blanks, splits comma lists, matches names
    /// and aliases case-insensitively. Any bytes are accepted (non-UTF-8 simply does not match).
    pub fn read(&self, reading: &mut Reading, value: &[u8]) {
        reading.occurrences = reading.occurrences.saturating_add(1);
        reading.canonical_bytes = false;
        for element in value.split(|&b| b == b',') {
            let element = trim_ows(element);
            if element.is_empty() {
                continue;
            }
            let matched = self.match_spelling(element);
            if let Some((arm, canonical)) = matched {
                reading.canonical_bytes = canonical
                    && element.len() == value.len()
                    && self.arms.get(arm.0).is_some_and(|n| n.as_bytes() == value);
            }
            reading.add(match matched {
                Some((arm, true)) => ReadState::Arm(arm, Source::Header),
                Some((arm, false)) => ReadState::Arm(arm, Source::Alias),
                None => ReadState::Unknown,
            });
        }
    }

    fn match_spelling(&self, element: &[u8]) -> Option<(ArmId, bool)> {
        if element.len() > MAX_SPELLING_LEN {
            return None;
        }
        self.spellings
            .iter()
            .find(|(s, _, _)| s.eq_ignore_ascii_case(element))
            .map(|&(_, arm, canonical)| (arm, canonical))
    }

    /// Decides the request's arm. `split_key` is the value of the split key header, if any;
    /// `draw` is called only for a key-less split assignment.
    pub fn decide(
        &self,
        reading: &Reading,
        split_key: Option<&[u8]>,
        draw: impl FnOnce() -> u64,
    ) -> Verdict {
        self.decide_for(reading, true, split_key, draw)
    }

    /// As [`Plan::decide`], for a request that may or may not choose its arm (`allowChoice`).
    /// One that may not is assigned as if it had sent no arm header (`onMissing`), whatever the
    /// value, and its value counts as `not_allowed`; it is never rejected for it.
    pub fn decide_for(
        &self,
        reading: &Reading,
        may_choose: bool,
        split_key: Option<&[u8]>,
        draw: impl FnOnce() -> u64,
    ) -> Verdict {
        if !may_choose && reading.chooses() {
            return Verdict {
                decision: self.assign_missing(split_key, draw),
                invalid: Some(Invalid::NotAllowed),
            };
        }
        let (decision, invalid) = match reading.state {
            ReadState::Arm(arm, source) => (Decision::Tag { arm, source }, None),
            ReadState::Empty => (self.assign_missing(split_key, draw), None),
            ReadState::Unknown => (
                self.handle_invalid(Invalid::Unknown),
                Some(Invalid::Unknown),
            ),
            ReadState::Ambiguous => (
                self.handle_invalid(Invalid::Ambiguous),
                Some(Invalid::Ambiguous),
            ),
        };
        Verdict { decision, invalid }
    }

    fn assign_missing(&self, split_key: Option<&[u8]>, draw: impl FnOnce() -> u64) -> Decision {
        match (self.on_missing, &self.split) {
            (Missing::Passthrough, _) => Decision::Untagged,
            (Missing::Default(arm), _) => Decision::Tag {
                arm,
                source: Source::Default,
            },
            (Missing::Split, Some(split)) => {
                match split_key.map(trim_ows).filter(|k| !k.is_empty()) {
                    Some(key) => Decision::Tag {
                        arm: split.pick_for_key(key),
                        source: Source::Key,
                    },
                    None => Decision::Tag {
                        arm: split.pick(draw()),
                        source: Source::Split,
                    },
                }
            }
            // Configuration guarantees a split exists for Missing::Split.
            (Missing::Split, None) => Decision::Untagged,
        }
    }

    fn handle_invalid(&self, why: Invalid) -> Decision {
        match self.on_unknown {
            Unknown::Reject => Decision::Reject(match why {
                Invalid::Ambiguous => Rejection::AmbiguousBackend,
                Invalid::Unknown | Invalid::NotAllowed => Rejection::UnknownBackend,
            }),
            Unknown::Passthrough => Decision::Untagged,
            Unknown::Default(arm) => Decision::Tag {
                arm,
                source: Source::Default,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NVLINK: ArmId = ArmId(0);
    const FS: ArmId = ArmId(1);

    fn plan(json: &str) -> Plan {
        parse(json.as_bytes()).unwrap()
    }

    fn verdict(plan: &Plan, values: &[&[u8]], key: Option<&[u8]>) -> Verdict {
        let mut reading = Reading::default();
        for v in values {
            plan.read(&mut reading, v);
        }
        plan.decide(&reading, key, || 0)
    }

    fn decide(plan: &Plan, values: &[&[u8]]) -> Decision {
        verdict(plan, values, None).decision
    }

    fn tag(arm: ArmId, source: Source) -> Decision {
        Decision::Tag { arm, source }
    }

    #[test]
    fn canonical_names_and_aliases_normalize() {
        let p = plan("{}");
        assert_eq!(decide(&p, &[b"nvlink"]), tag(NVLINK, Source::Header));
        assert_eq!(decide(&p, &[b"NVLink"]), tag(NVLINK, Source::Header));
        assert_eq!(decide(&p, &[b" \tfs \t"]), tag(FS, Source::Header));
        assert_eq!(decide(&p, &[b"P2P"]), tag(NVLINK, Source::Alias));
        assert_eq!(decide(&p, &[b"nccl"]), tag(NVLINK, Source::Alias));
        assert_eq!(decide(&p, &[b"filesystem"]), tag(FS, Source::Alias));
        assert_eq!(decide(&p, &[b"File"]), tag(FS, Source::Alias));
    }

    #[test]
    fn only_the_exact_canonical_bytes_skip_the_rewrite() {
        let p = plan("{}");
        let read = |values: &[&[u8]]| {
            let mut r = Reading::default();
            for v in values {
                p.read(&mut r, v);
            }
            r
        };
        assert!(read(&[b"nvlink"]).already_canonical(NVLINK));
        assert!(!read(&[b"nvlink"]).already_canonical(FS));
        for values in [
            &[&b"NVLINK"[..]][..],
            &[b" nvlink"],
            &[b"p2p"],
            &[b"nvlink,nvlink"],
            &[b"nvlink", b"nvlink"],
            &[b"fs", b"nvlink"],
        ] {
            assert!(!read(values).already_canonical(NVLINK), "{values:?}");
            assert!(!read(values).already_canonical(FS), "{values:?}");
        }
        assert!(!read(&[]).present());
        assert!(read(&[b""]).present());
    }

    #[test]
    fn repeated_and_listed_values_of_one_arm_are_fine() {
        let p = plan("{}");
        assert_eq!(
            decide(&p, &[b"nvlink", b"nvlink"]),
            tag(NVLINK, Source::Header)
        );
        assert_eq!(decide(&p, &[b"nvlink, p2p"]), tag(NVLINK, Source::Alias));
        assert_eq!(decide(&p, &[b"fs,", b",FS"]), tag(FS, Source::Header));
    }

    #[test]
    fn different_values_are_ambiguous() {
        let p = plan("{}");
        let ambiguous = Decision::Reject(Rejection::AmbiguousBackend);
        assert_eq!(decide(&p, &[b"nvlink", b"fs"]), ambiguous);
        assert_eq!(decide(&p, &[b"nvlink,fs"]), ambiguous);
        assert_eq!(decide(&p, &[b"p2p, file"]), ambiguous);
        assert_eq!(decide(&p, &[b"nvlink, bogus"]), ambiguous);
        assert_eq!(decide(&p, &[b"bogus", b"fs"]), ambiguous);
        let v = verdict(&p, &[b"fs", b"nvlink"], None);
        assert_eq!(v.invalid, Some(Invalid::Ambiguous));
    }

    #[test]
    fn unknown_values_are_rejected_by_default() {
        let p = plan("{}");
        let unknown = Decision::Reject(Rejection::UnknownBackend);
        let long = vec![b'a'; 8192];
        let mut near_misses: Vec<&[u8]> = vec![
            b"nvlink2",
            b"fs.",
            b"f s",
            b"nv link",
            b"none",
            b"\xff\xfe",
            b"nvl\x00ink",
            b"\x80nvlink",
            b"nvlink\x7f",
            b"\xc3\xa9",
        ];
        near_misses.push(&long);
        for value in near_misses {
            let v = verdict(&p, &[value], None);
            assert_eq!(v.decision, unknown, "{value:?}");
            assert_eq!(v.invalid, Some(Invalid::Unknown));
        }
        assert_eq!(decide(&p, &[b"foo, bar"]), unknown);
    }

    #[test]
    fn empty_and_blank_values_count_as_missing() {
        let p = plan("{}");
        for values in [&[][..], &[&b""[..]], &[b"  \t "], &[b","], &[b"", b" , "]] {
            let v = verdict(&p, values, None);
            assert_eq!(v.decision, Decision::Untagged, "{values:?}");
            assert_eq!(v.invalid, None);
        }
    }

    #[test]
    fn unknown_policy_passthrough_and_default() {
        let p = plan(r#"{"onUnknown":"passthrough"}"#);
        let v = verdict(&p, &[b"bogus"], None);
        assert_eq!(v.decision, Decision::Untagged);
        assert_eq!(v.invalid, Some(Invalid::Unknown));
        let p = plan(r#"{"onUnknown":"default","defaultArm":"fs"}"#);
        assert_eq!(decide(&p, &[b"nvlink,fs"]), tag(FS, Source::Default));
        assert_eq!(decide(&p, &[b"nvlink"]), tag(NVLINK, Source::Header));
    }

    #[test]
    fn missing_policy_default_and_split() {
        let p = plan(r#"{"onMissing":"default","defaultArm":"nvlink"}"#);
        assert_eq!(decide(&p, &[]), tag(NVLINK, Source::Default));
        let p = plan(
            r#"{"onMissing":"split","split":{"weights":{"nvlink":1,"fs":1},"keyHeader":"x-session-id"}}"#,
        );
        assert_eq!(p.split().unwrap().key_header(), Some("x-session-id"));
        let mut reading = Reading::default();
        p.read(&mut reading, b"");
        // Draw 0 falls in the first bound, u64::MAX in the last: the draw is used without a key.
        let first = p.decide(&reading, None, || 0).decision;
        let last = p.decide(&reading, Some(b"  "), || u64::MAX).decision;
        assert_eq!(
            first,
            tag(FS, Source::Split),
            "weights are ordered by arm name"
        );
        assert_eq!(last, tag(NVLINK, Source::Split));
        // With a key, the draw is not consulted and the result is stable.
        let keyed = p.decide(&reading, Some(b"user-1"), || panic!("no draw with a key"));
        assert_eq!(keyed, p.decide(&reading, Some(b"user-1"), || 0));
        // A key-assigned request says so: its key, not the request, is the unit of randomization.
        assert!(
            matches!(
                keyed.decision,
                Decision::Tag {
                    source: Source::Key,
                    ..
                }
            ),
            "{keyed:?}"
        );
        // An explicit header still wins over split.
        assert_eq!(decide(&p, &[b"fs"]), tag(FS, Source::Header));
    }

    /// `allowChoice`: a request that may not choose is assigned by `onMissing`, whatever its
    /// value (valid, alias, unknown, ambiguous); it is never rejected for it.
    #[test]
    fn a_request_that_may_not_choose_is_assigned_by_on_missing() {
        for (config, expected) in [
            (r#"{"allowChoice":{"header":"x-ab"}}"#, Decision::Untagged),
            (
                r#"{"allowChoice":{"header":"x-ab"},"onMissing":"default","defaultArm":"fs"}"#,
                tag(FS, Source::Default),
            ),
            (
                r#"{"allowChoice":{"header":"x-ab"},"onMissing":"split","split":{"weights":{"fs":1}}}"#,
                tag(FS, Source::Split),
            ),
        ] {
            let p = plan(config);
            for values in [
                &[&b"nvlink"[..]][..],
                &[b"P2P"],
                &[b"bogus"],
                &[b"nvlink", b"fs"],
                &[b"\xff"],
            ] {
                let mut r = Reading::default();
                for v in values {
                    p.read(&mut r, v);
                }
                let v = p.decide_for(&r, false, None, || 0);
                assert_eq!(v.decision, expected, "{config} {values:?}");
                assert_eq!(v.invalid, Some(Invalid::NotAllowed));
                // Allowed, the same request is decided as usual.
                let allowed = p.decide_for(&r, true, None, || 0);
                assert_eq!(allowed, p.decide(&r, None, || 0));
                assert_ne!(allowed.invalid, Some(Invalid::NotAllowed));
            }
            // Nothing chosen: nothing denied, nothing counted.
            for values in [&[][..], &[&b""[..]], &[b" , "]] {
                let mut r = Reading::default();
                for v in values {
                    p.read(&mut r, v);
                }
                let v = p.decide_for(&r, false, None, || 0);
                assert_eq!(v, p.decide(&r, None, || 0), "{values:?}");
                assert_eq!(v.invalid, None);
            }
        }
    }

    #[test]
    fn an_arm_without_ready_endpoints_is_refused_or_counted() {
        let p = plan("{}");
        assert_eq!(p.admit(Some(0)), Admission::Reject(Rejection::Unavailable));
        assert_eq!(p.admit(Some(2)), Admission::Admit);
        assert_eq!(
            p.admit(None),
            Admission::Admit,
            "no fresh map: nothing is refused"
        );
        let p = plan(r#"{"onUnavailable":"passthrough"}"#);
        assert_eq!(p.admit(Some(0)), Admission::Unavailable);
        assert_eq!(Rejection::Unavailable.status(), 503);
        assert_eq!(Rejection::Unavailable.code(), "kv_backend_unavailable");
    }

    #[test]
    fn labels_and_headers() {
        let p = plan("{}");
        assert_eq!(p.arm_label(Some(FS)), "fs");
        assert_eq!(p.arm_label(None), "none");
        assert_eq!(p.arm_label(Some(ArmId(9))), "none");
        assert_eq!(
            Source::ALL.map(Source::label),
            ["header", "alias", "split", "key", "default"]
        );
        assert_eq!(Rejection::UnknownBackend.code(), "unknown_kv_backend");
        assert_eq!(Rejection::AmbiguousBackend.code(), "ambiguous_kv_backend");
    }

    #[test]
    fn describe_names_the_policies() {
        assert_eq!(
            plan("{}").describe(),
            "header x-kv-backend, arms [nvlink, fs], onMissing passthrough, onUnknown reject"
        );
        let p = plan(
            r#"{"onMissing":"split","split":{"weights":{"nvlink":3,"fs":1}},"onUnknown":"default","defaultArm":"fs"}"#,
        );
        assert_eq!(
            p.describe(),
            "header x-kv-backend, arms [nvlink, fs], onMissing split (fs=1, nvlink=3), onUnknown default (fs)"
        );
    }
}
