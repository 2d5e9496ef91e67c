//! Checks shared by the fuzz targets: an independent model of the documented behaviour (the
//! tables of docs/filter.md ("What it does to a request", "Configuration"), written again here the simple, allocating way) and the invariants every
//! output must keep. Any disagreement or broken invariant panics, which libFuzzer reports.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::LazyLock;

use kvab_filter_core::endpoints::{ArmMap, Served};
use kvab_filter_core::headers::{scan_request_headers, serialize_pairs, HeaderPairs};
use kvab_filter_core::metrics::{CodeClass, MetricLayout};
use kvab_filter_core::request::{
    on_request_headers, on_response_headers, on_stream_end, HeaderEdit, RequestInputs,
};
use kvab_filter_core::{parse, ArmId, Decision, Invalid, Plan, Rejection, Source, Verdict};

/// What the model needs to know about one configuration.
pub struct Model {
    pub json: &'static str,
    pub plan: Plan,
    header: &'static str,
    arms: &'static [(&'static str, &'static [&'static str])],
    on_missing: Policy,
    on_unknown: Policy,
    /// `(arm name, weight)` for split, and its key header.
    weights: &'static [(&'static str, u64)],
    key_header: Option<&'static str>,
    /// `allowChoice`: ranges as `(network, prefix)`, header, accepted values.
    choice: Option<ChoiceModel>,
}

pub struct ChoiceModel {
    ranges: &'static [(&'static str, usize)],
    header: Option<&'static str>,
    values: &'static [&'static str],
}

#[derive(Clone, Copy)]
enum Policy {
    Reject,
    Passthrough,
    Default(&'static str),
    Split,
}

const RUNBOOK_ARMS: &[(&str, &[&str])] = &[
    ("nvlink", &["p2p", "nccl"]),
    ("fs", &["filesystem", "file"]),
];

fn model(
    json: &'static str,
    header: &'static str,
    arms: &'static [(&'static str, &'static [&'static str])],
    on_missing: Policy,
    on_unknown: Policy,
    weights: &'static [(&'static str, u64)],
    key_header: Option<&'static str>,
) -> Model {
    let plan = parse(json.as_bytes()).unwrap_or_else(|e| panic!("fuzz plan {json}: {e}"));
    Model {
        json,
        plan,
        header,
        arms,
        on_missing,
        on_unknown,
        weights,
        key_header,
        choice: None,
    }
}

/// The configurations the request target exercises: every policy, a custom header, a split key.
pub static PLANS: LazyLock<Vec<Model>> = LazyLock::new(|| {
    vec![
        model(
            "{}",
            "x-kv-backend",
            RUNBOOK_ARMS,
            Policy::Passthrough,
            Policy::Reject,
            &[],
            None,
        ),
        model(
            r#"{"onMissing":"split","split":{"weights":{"nvlink":3,"fs":1},"keyHeader":"x-session-id"}}"#,
            "x-kv-backend",
            RUNBOOK_ARMS,
            Policy::Split,
            Policy::Reject,
            &[("fs", 1), ("nvlink", 3)],
            Some("x-session-id"),
        ),
        model(
            r#"{"onMissing":"default","onUnknown":"default","defaultArm":"fs"}"#,
            "x-kv-backend",
            RUNBOOK_ARMS,
            Policy::Default("fs"),
            Policy::Default("fs"),
            &[],
            None,
        ),
        model(
            r#"{"arms":[{"name":"a","aliases":["x"]},{"name":"b"},{"name":"c.d_e-9","aliases":["NVLink"]}],"onUnknown":"passthrough","onMissing":"split","split":{"weights":{"b":1000000,"a":1}}}"#,
            "x-kv-backend",
            &[("a", &["x"]), ("b", &[]), ("c.d_e-9", &["nvlink"])],
            Policy::Split,
            Policy::Passthrough,
            &[("a", 1), ("b", 1_000_000)],
            None,
        ),
        model(
            r#"{"header":"X-Arm","arms":[{"name":"nvlink","aliases":["p2p"]}],"onMissing":"default","defaultArm":"nvlink"}"#,
            "x-arm",
            &[("nvlink", &["p2p"])],
            Policy::Default("nvlink"),
            Policy::Reject,
            &[],
            None,
        ),
        Model {
            choice: Some(ChoiceModel {
                ranges: &[("10.0.0.0", 8), ("127.0.0.2", 32), ("2001:db8::", 32)],
                header: Some("x-ab"),
                values: &["team-kv", "b c"],
            }),
            ..model(
                r#"{"onMissing":"split","split":{"weights":{"nvlink":1,"fs":1},"keyHeader":"x-ab"},"allowChoice":{"sourceRanges":["10.0.0.0/8","127.0.0.2","2001:db8::/32"],"header":"X-AB","headerValues":["team-kv"," b c "]}}"#,
                "x-kv-backend",
                RUNBOOK_ARMS,
                Policy::Split,
                Policy::Reject,
                &[("fs", 1), ("nvlink", 1)],
                Some("x-ab"),
            )
        },
        Model {
            choice: Some(ChoiceModel {
                ranges: &[],
                header: Some("x-ab"),
                values: &[],
            }),
            ..model(
                r#"{"allowChoice":{"header":"x-ab"}}"#,
                "x-kv-backend",
                RUNBOOK_ARMS,
                Policy::Passthrough,
                Policy::Reject,
                &[],
                None,
            )
        },
        Model {
            choice: Some(ChoiceModel {
                ranges: &[("::", 0), ("0.0.0.0", 1)],
                header: None,
                values: &[],
            }),
            ..model(
                r#"{"allowChoice":{"sourceRanges":["::/0","0.0.0.0/1"]},"onMissing":"default","defaultArm":"nvlink"}"#,
                "x-kv-backend",
                RUNBOOK_ARMS,
                Policy::Default("nvlink"),
                Policy::Reject,
                &[],
                None,
            )
        },
    ]
});

/// Name of the pseudo header line that carries the request's source address (Envoy's
/// `source.address`); it is not part of the header map.
pub const SOURCE_LINE: &[u8] = b"@source";

/// A request's headers as the fuzzer gave them.
pub enum Request<'a> {
    /// A proxy-wasm serialized header map, possibly malformed.
    Raw(&'a [u8]),
    /// `(name, value)` pairs.
    Pairs(Vec<(&'a [u8], &'a [u8])>),
}

impl<'a> Request<'a> {
    /// `name: value` lines separated by `\n`; the value is everything after the first `:` and
    /// one optional space. A line without `:` is a name with an empty value.
    pub fn lines(text: &'a [u8]) -> Request<'a> {
        let pairs = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let value = &line[i + 1..];
                    (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            })
            .collect();
        Request::Pairs(pairs)
    }
}

/// Runs the filter's scan and decision on `request` and checks them against the model.
pub fn check_request(m: &Model, request: &Request, draw: u64) {
    let mut source: Option<&[u8]> = None;
    let mut given: Vec<(&[u8], &[u8])> = Vec::new();
    let owned;
    let map: &[u8] = match request {
        Request::Raw(raw) => raw,
        Request::Pairs(all) => {
            for &(k, v) in all {
                if k == SOURCE_LINE {
                    source = Some(v);
                } else {
                    given.push((k, v));
                }
            }
            owned = serialize_pairs(&given);
            &owned
        }
    };
    let pairs: Vec<(&[u8], &[u8])> = HeaderPairs::new(map).collect();
    if let Request::Pairs(_) = request {
        assert_eq!(pairs, given, "header map round trip");
    }
    let scan = scan_request_headers(&m.plan, map);
    let mut source_reads = 0;
    let may_choose = scan.may_choose(&m.plan, || {
        source_reads += 1;
        source
    });
    assert_eq!(
        may_choose,
        model_may_choose(m, &pairs, source),
        "allowChoice for {pairs:?} from {source:?}"
    );
    if m.choice.as_ref().is_none_or(|c| c.ranges.is_empty()) {
        assert_eq!(source_reads, 0, "source address read without source ranges");
    }
    let mut draws = 0;
    let verdict = m
        .plan
        .decide_for(&scan.reading, may_choose, scan.split_key, || {
            draws += 1;
            draw
        });
    assert!(draws <= 1, "the draw is taken at most once");
    check_invariants(m, &verdict);

    let expected = if may_choose {
        expected_verdict(m, &pairs, draw)
    } else {
        // May not choose: assigned as if no arm header had come, and counted as not_allowed.
        let without: Vec<(&[u8], &[u8])> = pairs
            .iter()
            .filter(|(k, _)| *k != m.header.as_bytes())
            .copied()
            .collect();
        let assigned = expected_verdict(m, &without, draw);
        Verdict {
            decision: assigned.decision,
            invalid: Some(Invalid::NotAllowed),
        }
    };
    assert_eq!(verdict, expected, "model disagrees for {pairs:?}");

    // Forged tags are always noticed, so they can be stripped.
    let tags = [
        format!("{}-source", m.header),
        format!("{}-endpoint", m.header),
    ];
    let forged = pairs
        .iter()
        .any(|(k, _)| tags.iter().any(|t| t.as_bytes() == *k));
    assert_eq!(scan.forged_tags, forged);
    // The header is reported present exactly when it occurred.
    let present = pairs.iter().any(|(k, _)| *k == m.header.as_bytes());
    assert_eq!(scan.reading.present(), present);
    if let Decision::Tag { arm, .. } = verdict.decision {
        if scan.reading.already_canonical(arm) {
            // Forwarded untouched only when it is the single, exact canonical tag of that arm.
            let values: Vec<&[u8]> = pairs
                .iter()
                .filter(|(k, _)| *k == m.header.as_bytes())
                .map(|(_, v)| *v)
                .collect();
            assert_eq!(values, [m.plan.arm_label(Some(arm)).as_bytes()]);
        }
    }
    check_effects(m, map, source, draw, &verdict, forged, present);
}

/// The request path as one step (`request::on_request_headers`, no endpoint map) does what the verdict
/// says: its edits, counts, reply and arm follow from the decision, the forged tags and the header.
fn check_effects(
    m: &Model,
    map: &[u8],
    source: Option<&[u8]>,
    draw: u64,
    verdict: &Verdict,
    forged: bool,
    present: bool,
) {
    struct Host<'a>(Option<&'a [u8]>, u64);
    impl RequestInputs for Host<'_> {
        fn source_address(&mut self) -> Option<Box<[u8]>> {
            self.0.map(Box::from)
        }
        fn next_draw(&mut self) -> u64 {
            self.1
        }
        fn ready_endpoints(&mut self, _arm: ArmId) -> Option<u32> {
            None
        }
    }
    let layout = MetricLayout::new(&m.plan);
    let effects = on_request_headers(&m.plan, &layout, map, &mut Host(source, draw));
    let plan = &m.plan;
    let mut edits = Vec::new();
    if forged {
        edits.push(HeaderEdit::Remove(plan.endpoint_header()));
    }
    let mut counts: Vec<usize> = verdict
        .invalid
        .map(|why| layout.invalid_values(why))
        .into_iter()
        .collect();
    match verdict.decision {
        Decision::Reject(r) => {
            counts.push(layout.rejected(r));
            assert_eq!(effects.reply, Some((r, None)));
            assert_eq!(effects.tag, None);
        }
        Decision::Tag { arm, source } => {
            let canonical = plan.arm_label(Some(arm));
            let values: Vec<&[u8]> = HeaderPairs::new(map)
                .filter(|(k, _)| *k == plan.header().as_bytes())
                .map(|(_, v)| v)
                .collect();
            if values != [canonical.as_bytes()] {
                edits.push(HeaderEdit::Set(plan.header(), canonical.as_bytes()));
            }
            edits.push(HeaderEdit::Set(
                plan.source_header(),
                source.label().as_bytes(),
            ));
            counts.push(layout.requests(Some((arm, source))));
            assert_eq!((effects.reply, effects.tag), (None, Some((arm, source))));
        }
        Decision::Untagged => {
            if present {
                edits.push(HeaderEdit::Remove(plan.header()));
            }
            if forged {
                edits.push(HeaderEdit::Remove(plan.source_header()));
            }
            counts.push(layout.requests(None));
            assert_eq!((effects.reply, effects.tag), (None, None));
        }
    }
    assert_eq!(
        effects.edits().collect::<Vec<_>>(),
        edits,
        "edits for {verdict:?}"
    );
    assert_eq!(
        effects.counts().collect::<Vec<_>>(),
        counts,
        "counts for {verdict:?}"
    );
    if effects.reply.is_none() {
        check_response(m, &layout, effects.tag, draw);
    }
}

/// The response of an admitted request (`request::on_response_headers`, then `on_stream_end`),
/// answered by an upstream the draw picks (none, one the endpoint map lists, one it does not), with
/// or without a map: the arm tag shows the served arm when the map knows it, else the request's;
/// the endpoint tag is the upstream's address only when there is one and the tag is on; the end
/// counts the status class and who served it, and times an answered request (any status but a 5xx, and a
/// status at all) by its arm and source, never a failed one.
fn check_response(m: &Model, layout: &MetricLayout, tag: Option<(ArmId, Source)>, draw: u64) {
    let plan = &m.plan;
    let arm = tag.map(|(arm, _)| arm);
    let listed = plan
        .arm_names()
        .get((draw >> 8) as usize % plan.arm_names().len())
        .cloned();
    let map = listed.as_ref().map(|name| {
        let json = format!(
            r#"{{"version":"v","backends":{{"{name}":{{"endpoints":[{{"address":"10.0.0.1:8000","ready":true}}]}}}}}}"#
        );
        ArmMap::parse(plan, json.as_bytes()).expect("a one-endpoint map parses")
    });
    let upstream: Option<&[u8]> = match draw % 3 {
        0 => None,
        1 => Some(b"10.0.0.1:8000"),
        _ => Some(b"10.9.9.9:1"),
    };
    let map = if draw & 4 == 0 { map.as_ref() } else { None };
    let effects = on_response_headers(plan, arm, upstream, map);
    let served = match (upstream, map, &listed) {
        (None, _, _) => Served::None,
        (Some(b"10.0.0.1:8000"), Some(_), Some(name)) => Served::Arm(arm_id(m, name)),
        (Some(_), _, _) => Served::Unknown,
    };
    assert_eq!(
        effects.served, served,
        "served by {upstream:?} with {map:?}"
    );
    let shown = match served {
        Served::Arm(served) => Some(served),
        _ => arm,
    };
    let mut edits: Vec<HeaderEdit> = shown
        .map(|shown| HeaderEdit::Set(plan.header(), plan.arm_label(Some(shown)).as_bytes()))
        .into_iter()
        .collect();
    edits.push(match upstream {
        Some(address) if plan.response_endpoint_header() => {
            HeaderEdit::Set(plan.endpoint_header(), address)
        }
        _ => HeaderEdit::Remove(plan.endpoint_header()),
    });
    assert_eq!(effects.edits().collect::<Vec<_>>(), edits);

    let status = (draw >> 16) % 700;
    let end = on_stream_end(layout, tag, served, status);
    assert_eq!(end.class, CodeClass::of(status));
    assert_eq!(
        end.counts,
        [layout.responses(tag, end.class), layout.served(arm, served)]
    );
    let answered = (100..500).contains(&status);
    assert_eq!(
        end.timed,
        answered.then(|| [layout.request_duration(tag), layout.time_to_first_byte(tag)]),
        "timed at status {status}"
    );
}

/// Every decision is a configured arm, untagged (`none`), or a rejection with its code.
fn check_invariants(m: &Model, verdict: &Verdict) {
    let arms = m.plan.arm_names();
    match verdict.decision {
        Decision::Tag { arm, source } => {
            assert!(arm.0 < arms.len(), "arm {arm:?} of {arms:?}");
            assert_ne!(m.plan.arm_label(Some(arm)), "none");
            if matches!(source, Source::Header | Source::Alias) {
                assert!(verdict.invalid.is_none());
            }
        }
        Decision::Untagged => {}
        Decision::Reject(_) if verdict.invalid == Some(Invalid::NotAllowed) => {
            panic!("a request that may not choose was rejected")
        }
        Decision::Reject(r) => {
            assert_eq!(r.status(), 400);
            assert!(verdict.invalid.is_some(), "rejected a valid value");
            let body: serde_json::Value =
                serde_json::from_slice(m.plan.rejection_body(r, None)).unwrap();
            assert_eq!(body["error"]["code"], r.code());
            assert_eq!(body["error"]["param"], m.header);
        }
    }
}

/// The allowChoice rule, written out: no policy, no non-blank value, an accepted header value,
/// or a source address inside a range (compared bit by bit).
fn model_may_choose(m: &Model, pairs: &[(&[u8], &[u8])], source: Option<&[u8]>) -> bool {
    let Some(choice) = &m.choice else {
        return true;
    };
    let names_something = pairs.iter().any(|(k, v)| {
        *k == m.header.as_bytes() && v.split(|&b| b == b',').any(|e| !trim_blanks(e).is_empty())
    });
    if !names_something {
        return true;
    }
    let accepted = |v: &[u8]| {
        let v = trim_blanks(v);
        if choice.values.is_empty() {
            !v.is_empty()
        } else {
            choice.values.iter().any(|x| x.as_bytes() == v)
        }
    };
    if choice
        .header
        .is_some_and(|h| pairs.iter().any(|(k, v)| *k == h.as_bytes() && accepted(v)))
    {
        return true;
    }
    let ip = source
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| {
            s.parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .or_else(|_| s.parse::<std::net::IpAddr>())
                .ok()
        });
    let Some(ip) = ip else {
        return false;
    };
    let bits = |octets: &[u8]| -> Vec<bool> {
        octets
            .iter()
            .flat_map(|o| (0..8).rev().map(move |i| (o >> i) & 1 == 1))
            .collect()
    };
    let family_bits = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => (true, bits(&a.octets())),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a4) => (true, bits(&a4.octets())),
            None => (false, bits(&a.octets())),
        },
    };
    let (v4, addr) = family_bits(ip);
    choice.ranges.iter().any(|(net, prefix)| {
        let (net_v4, net_bits) = family_bits(net.parse().unwrap());
        net_v4 == v4 && addr[..*prefix] == net_bits[..*prefix]
    })
}

fn arm_id(m: &Model, name: &str) -> ArmId {
    ArmId(m.arms.iter().position(|(n, _)| *n == name).unwrap())
}

/// The decision table of docs/filter.md ("What it does to a request"), computed the plain way.
fn expected_verdict(m: &Model, pairs: &[(&[u8], &[u8])], draw: u64) -> Verdict {
    let mut elements: Vec<Option<(ArmId, bool)>> = Vec::new();
    for (name, value) in pairs {
        if *name != m.header.as_bytes() {
            continue;
        }
        for element in value.split(|&b| b == b',') {
            let element = trim_blanks(element);
            if element.is_empty() {
                continue;
            }
            let lower = element.to_ascii_lowercase();
            let found = m.arms.iter().enumerate().find_map(|(i, (name, aliases))| {
                if name.as_bytes() == lower {
                    Some((ArmId(i), true))
                } else if aliases.iter().any(|a| a.as_bytes() == lower) {
                    Some((ArmId(i), false))
                } else {
                    None
                }
            });
            elements.push(found);
        }
    }
    let invalid = if elements.is_empty() {
        None
    } else if elements.iter().all(Option::is_none) {
        Some(Invalid::Unknown)
    } else {
        let first = elements[0];
        match first {
            Some((arm, _)) if elements.iter().all(|e| e.is_some_and(|(a, _)| a == arm)) => {
                let alias = elements
                    .iter()
                    .any(|e| e.is_some_and(|(_, canonical)| !canonical));
                let source = if alias { Source::Alias } else { Source::Header };
                return Verdict {
                    decision: Decision::Tag { arm, source },
                    invalid: None,
                };
            }
            _ => Some(Invalid::Ambiguous),
        }
    };
    let decision = match invalid {
        None => match m.on_missing {
            Policy::Passthrough => Decision::Untagged,
            Policy::Default(arm) => Decision::Tag {
                arm: arm_id(m, arm),
                source: Source::Default,
            },
            Policy::Split => {
                let key = m.key_header.and_then(|k| {
                    pairs
                        .iter()
                        .find(|(name, _)| *name == k.as_bytes())
                        .map(|(_, v)| trim_blanks(v))
                });
                // A key pins the arm and says so (`key`); without one, the draw (`split`).
                let (point, source) = match key.filter(|k| !k.is_empty()) {
                    Some(key) => (documented_key_hash(key), Source::Key),
                    None => (draw, Source::Split),
                };
                Decision::Tag {
                    arm: split_arm(m, point),
                    source,
                }
            }
            Policy::Reject => unreachable!("not a missing policy"),
        },
        Some(why) => match m.on_unknown {
            Policy::Reject => Decision::Reject(match why {
                Invalid::Unknown => Rejection::UnknownBackend,
                _ => Rejection::AmbiguousBackend,
            }),
            Policy::Passthrough => Decision::Untagged,
            Policy::Default(arm) => Decision::Tag {
                arm: arm_id(m, arm),
                source: Source::Default,
            },
            Policy::Split => unreachable!("not an unknown policy"),
        },
    };
    Verdict { decision, invalid }
}

fn trim_blanks(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// FNV-1a 64 then the SplitMix64 finalizer (docs/filter.md, "Sticky split").
fn documented_key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Multiply-shift onto the cumulative weights, arms in name order.
fn split_arm(m: &Model, draw: u64) -> ArmId {
    let total: u64 = m.weights.iter().map(|(_, w)| w).sum();
    let point = ((u128::from(draw) * u128::from(total)) >> 64) as u64;
    let mut upper = 0;
    for (name, w) in m.weights {
        upper += w;
        if point < upper {
            return arm_id(m, name);
        }
    }
    panic!("point {point} beyond total {total}");
}

/// The configuration parser on arbitrary bytes.
pub fn check_config(data: &[u8]) {
    match parse(data) {
        Err(e) => {
            let line = e.to_string();
            assert!(!line.is_empty());
            // One log line: no line breaks or other control characters from the input.
            assert!(
                !line.chars().any(char::is_control),
                "control character in {line:?}"
            );
        }
        Ok(plan) => check_plan(&plan),
    }
}

fn check_plan(plan: &Plan) {
    let arms = plan.arm_names();
    assert!((1..=16).contains(&arms.len()));
    for (i, name) in arms.iter().enumerate() {
        assert!(is_token(name), "{name:?}");
        assert_ne!(name, "none");
        assert!(!arms[..i].contains(name), "duplicate arm {name}");
        // Each canonical name selects its arm, exactly as configured.
        let map = serialize_pairs(&[(plan.header().as_bytes(), name.as_bytes())]);
        let scan = scan_request_headers(plan, &map);
        assert!(scan.reading.already_canonical(ArmId(i)));
        let verdict = plan.decide(&scan.reading, None, || 0);
        assert_eq!(
            verdict.decision,
            Decision::Tag {
                arm: ArmId(i),
                source: Source::Header
            }
        );
    }
    for header in [plan.header(), plan.source_header(), plan.endpoint_header()] {
        assert!(
            !header.is_empty()
                && header
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase())
        );
    }
    for r in Rejection::ALL {
        // kv_backend_unavailable names the arm: one body per arm.
        for arm in (0..arms.len()).map(|a| Some(ArmId(a))) {
            let body: serde_json::Value =
                serde_json::from_slice(plan.rejection_body(r, arm)).unwrap();
            assert_eq!(body["error"]["code"], r.code());
        }
    }
    assert!(!plan.describe().chars().any(char::is_control));
    // Missing header: whatever the policy, a configured arm or untagged.
    let verdict = plan.decide(&Default::default(), Some(b"k"), || u64::MAX);
    if let Decision::Tag { arm, .. } = verdict.decision {
        assert!(arm.0 < arms.len());
    }
    assert!(!matches!(verdict.decision, Decision::Reject(_)));
    // The metric table: one distinct, well-formed stat per lookup.
    let layout = MetricLayout::new(plan);
    let defs = layout.definitions(plan);
    assert_eq!(defs.len(), layout.len());
    let mut names: Vec<&str> = defs.iter().map(|(_, n)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), defs.len());
}

fn is_token(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// An endpoint map (`GET /v1/endpoints`) read for the default arms: a refusal is an error, never a
/// panic; an accepted map resolves every address it lists to an arm, counts no more ready
/// endpoints than it lists, and resolves any other address to `unknown`.
pub fn check_map(data: &[u8]) {
    use kvab_filter_core::endpoints::{ArmMap, Served};
    let plan = parse(b"{}").unwrap();
    let Ok(map) = ArmMap::parse(&plan, data) else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        panic!("accepted a map that is not JSON");
    };
    let mut listed = 0u32;
    for (i, arm) in plan.arm_names().iter().enumerate() {
        let endpoints = value["backends"][arm]["endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        listed += endpoints.len() as u32;
        assert!(map.ready_endpoints(ArmId(i)) as usize <= endpoints.len());
        for e in &endpoints {
            let address = e["address"].as_str().unwrap();
            assert!(
                matches!(map.arm_of(address.as_bytes()), Served::Arm(_)),
                "{address} not resolved"
            );
        }
    }
    let ready: u32 = (0..plan.arm_names().len())
        .map(|i| map.ready_endpoints(ArmId(i)))
        .sum();
    assert!(ready <= listed);
    assert_eq!(map.arm_of(b"\xff not an address"), Served::Unknown);
}

use kvab_contract::report::Report;
use kvab_ledger::{Ledger, Line, Outcome};

const REPORT_ARMS: [&str; 2] = ["nvlink", "fs"];

fn report_arms() -> Vec<String> {
    REPORT_ARMS.iter().map(|a| a.to_string()).collect()
}

/// Several endpoints share a pod, so increments of different entries land on one counter.
fn pod_of(address: &str) -> Option<String> {
    (address.len() % 3 != 0).then(|| format!("llm-d-vllm/pod-{}", address.len() % 5))
}

fn routed_total(ledger: &Ledger) -> u128 {
    ledger.routed().map(|(_, n)| u128::from(n)).sum()
}

/// Any bytes posted to `/v1/reports`, read as the sidecar reads them: never a panic; an accepted
/// first report adds exactly its totals, a repeat adds nothing, a refused one changes nothing, and
/// the saved state (`reports.state_file`) restores the same counters.
pub fn check_report(data: &[u8]) {
    let Ok(report) = serde_json::from_slice::<Report>(data) else {
        return;
    };
    let arms = report_arms();
    let mut ledger = Ledger::default();
    match ledger.apply(&report, &arms, &pod_of, false) {
        Ok(Outcome::Applied(increments)) => {
            let sent: u128 = report.totals.iter().map(|t| u128::from(t.count)).sum();
            let added: u128 = increments.iter().map(|(_, n)| u128::from(*n)).sum();
            // Counters saturate rather than wrap: totals may fall short only at u64::MAX.
            let saturated = increments.iter().any(|(_, n)| *n == u64::MAX);
            assert!(
                added == sent || saturated,
                "increments {added} != totals sent {sent}"
            );
            assert_eq!(routed_total(&ledger), added);
            let before: Vec<_> = ledger.routed().map(|(k, n)| (k.clone(), n)).collect();
            assert_eq!(
                ledger.apply(&report, &arms, &pod_of, false),
                Ok(Outcome::Duplicate)
            );
            let saved = serde_json::to_vec(&ledger).unwrap();
            let restored: Ledger = serde_json::from_slice(&saved).unwrap();
            let after: Vec<_> = restored.routed().map(|(k, n)| (k.clone(), n)).collect();
            assert_eq!(before, after, "a restored ledger differs");
            // Undone (a failed save), the first report leaves nothing behind.
            let mut undone = Ledger::default();
            let (_, change) = undone
                .apply_logged(&report, &arms, &pod_of, false, 1)
                .unwrap();
            undone.undo(change.unwrap().1);
            assert_eq!(undone.reporters(), 0);
            assert_eq!(routed_total(&undone), 0, "an undone report left counts");
        }
        Ok(other) => panic!("a fresh ledger answered {other:?} to a first report"),
        Err(_) => assert!(ledger.reporters() == 0 && routed_total(&ledger) == 0),
    }
}

/// Upstream addresses a request may have been served by: pod addresses and what Envoy may give
/// instead (internal addresses, pipes, garbage).
const UPSTREAMS: [&[u8]; 8] = [
    b"",
    b"10.0.0.5:8080",
    b"10.0.0.7:8080",
    b"[fd00::5]:8080",
    b"envoy://internal_client_address/",
    b"/var/run/upstream.sock",
    b"other",
    b"10.0.0.5:8080\xff",
];

/// The filter's reports end to end: the input is a stream of finished requests (4 bytes each:
/// requested, served, code class, upstream), tallied as the filter tallies them, sent as the
/// filter's JSON and applied by the sidecar's ledger. An op with a 0xff first byte sends a report
/// with a budget taken from its third byte (so reports are cut), lost on the way when its second
/// byte is odd (not applied, not acknowledged). Every report must be accepted, and once the last
/// one is acknowledged the ledger must hold exactly the requests recorded. The journal lines the
/// sidecar would write, replayed on an empty ledger, must give the same counters.
pub fn check_report_round_trip(data: &[u8]) {
    use kvab_filter_core::endpoints::Served;
    use kvab_filter_core::metrics::CodeClass;
    use kvab_filter_core::tally::Tally;

    let plan = parse(b"{}").unwrap();
    let arms = report_arms();
    let mut tally = Tally::new(&plan);
    let mut ledger = Ledger::default();
    let mut sequence = 0;
    let mut recorded = 0u128;
    let mut added = 0u128;
    let mut journal: Vec<Vec<u8>> = Vec::new();
    // Sends one report; true when it carried every unacknowledged total and was applied.
    let mut send = |tally: &mut Tally, sequence: u64, budget: usize, lost: bool| -> bool {
        let body = tally.report_json(&plan, "fuzz-reporter", sequence, 1, budget);
        let report: Report = serde_json::from_slice(&body.json)
            .unwrap_or_else(|e| panic!("the filter's report is not a contract Report: {e}"));
        assert!(
            body.json.len() <= budget.max(400),
            "report {sequence} over its budget"
        );
        if lost {
            return false;
        }
        match ledger.apply_logged(&report, &arms, &pod_of, false, sequence) {
            Ok((Outcome::Applied(increments), Some((record, _)))) => {
                added += increments.iter().map(|(_, n)| u128::from(*n)).sum::<u128>();
                journal.push(serde_json::to_vec(&Line::Report(record)).unwrap());
            }
            other => panic!("report {sequence} of the filter refused: {other:?}"),
        }
        tally.acknowledge();
        body.complete
    };
    for op in data.chunks_exact(4) {
        if op[0] == 0xff {
            sequence += 1;
            send(
                &mut tally,
                sequence,
                300 + usize::from(op[2]) * 16,
                op[1] % 2 == 1,
            );
            continue;
        }
        let requested = match op[0] % 3 {
            2 => None,
            a => Some(ArmId(usize::from(a))),
        };
        let served = match op[1] % 4 {
            0 => Served::Arm(ArmId(0)),
            1 => Served::Arm(ArmId(1)),
            2 => Served::Unknown,
            _ => Served::None,
        };
        let class = CodeClass::ALL[usize::from(op[2]) % CodeClass::ALL.len()];
        tally.record(
            requested,
            served,
            UPSTREAMS[usize::from(op[3]) % UPSTREAMS.len()],
            class,
        );
        recorded += 1;
    }
    // The filter reports on every tick until nothing is left unacknowledged.
    loop {
        sequence += 1;
        if send(&mut tally, sequence, 4096, false) {
            break;
        }
    }
    drop(send);
    assert_eq!(added, recorded, "the reports added a different count");
    let mut replayed = Ledger::default();
    for line in &journal {
        replayed.replay_line(&serde_json::from_slice(line).unwrap());
    }
    let counters = |l: &Ledger| l.routed().map(|(k, n)| (k.clone(), n)).collect::<Vec<_>>();
    assert_eq!(
        counters(&replayed),
        counters(&ledger),
        "the journal replays to other counters"
    );
}

/// The link of two worker VMs to the sidecar, driven by the fuzzer: 3-byte ops record a request,
/// move the clock, tick a worker, answer a worker's oldest call (a map, 304, garbage, a timeout or
/// an error; a report applied and acknowledged, lost, applied with its answer lost, or refused as
/// too large) or read a worker's map. Checked throughout: one fetch per `refreshMs` across both
/// workers, one report in flight per worker, consecutive sequences, and a map only while some
/// answer confirmed it within `staleAfterMs`. At the end every call is answered until nothing is
/// left, and the sidecar's ledger must hold exactly the requests recorded.
pub fn check_link(data: &[u8]) {
    use std::cell::RefCell;
    use std::collections::{BTreeMap, VecDeque};

    use kvab_contract::report::REPORTS_PATH;
    use kvab_filter_core::endpoints::Served;
    use kvab_filter_core::link::{
        FakeSharedData, HostStatus, Link, LinkHost, Outgoing, SharedValue, MAX_REPORT_BACKOFF_MS,
    };
    use kvab_filter_core::metrics::CodeClass;

    const MS: u64 = 1_000_000;
    const REFRESH_MS: u64 = 100;
    const STALE_MS: u64 = 300;

    struct Sent {
        token: u32,
        report: Option<Report>,
        if_none_match: Option<String>,
    }

    struct Host<'s> {
        store: &'s RefCell<FakeSharedData>,
        tokens: &'s RefCell<u32>,
        pending: VecDeque<Sent>,
        answer_body: Vec<u8>,
    }

    impl LinkHost for Host<'_> {
        fn shared(&mut self, key: &str) -> Result<Option<SharedValue>, HostStatus> {
            Ok(self.store.borrow().get(key))
        }

        fn set_shared(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus> {
            self.store.borrow_mut().set(key, value, cas)
        }

        fn call(&mut self, call: Outgoing<'_>) -> Result<u32, HostStatus> {
            let header = |name: &str| {
                call.headers
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            };
            let report = (header(":path").as_deref() == Some(REPORTS_PATH)).then(|| {
                serde_json::from_slice(call.body)
                    .unwrap_or_else(|e| panic!("the link's report is not a contract Report: {e}"))
            });
            *self.tokens.borrow_mut() += 1;
            let token = *self.tokens.borrow();
            self.pending.push_back(Sent {
                token,
                report,
                if_none_match: header("if-none-match"),
            });
            Ok(token)
        }

        fn call_response_body(&mut self, size: usize) -> Option<Box<[u8]>> {
            Some(self.answer_body.get(..size)?.to_vec().into_boxed_slice())
        }

        fn warn(&mut self, _message: &str) {}
    }

    let plan = parse(
        format!(r#"{{"sidecar":{{"cluster":"kvab","refreshMs":{REFRESH_MS},"timeoutMs":50,"staleAfterMs":{STALE_MS}}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    let sidecar = plan.sidecar().unwrap().clone();
    let store = RefCell::new(FakeSharedData::default());
    let tokens = RefCell::new(0);
    let host = || Host {
        store: &store,
        tokens: &tokens,
        pending: VecDeque::new(),
        answer_body: Vec::new(),
    };
    let mut links = [
        Link::new(&plan, sidecar.clone(), "w0".into(), MS),
        Link::new(&plan, sidecar, "w1".into(), MS),
    ];
    let mut hosts = [host(), host()];
    let arms = report_arms();
    let mut ledger = Ledger::default();
    let (mut recorded, mut added) = (0u128, 0u128);
    let mut now = MS;
    let mut last_fetch: Option<u64> = None;
    let mut last_sequence = [0u64; 2];
    let mut maps_served = 0u32;
    // ETag → map version, and when each ETag was last confirmed (200 or 304).
    let versions: RefCell<BTreeMap<String, String>> = RefCell::default();
    let confirmed: RefCell<BTreeMap<String, u64>> = RefCell::default();

    // Answers worker `w`'s oldest call; `how` picks the answer. Returns false when none is pending.
    let mut answer = |links: &mut [Link; 2],
                      hosts: &mut [Host<'_>; 2],
                      w: usize,
                      how: u8,
                      now: u64,
                      ledger: &mut Ledger,
                      added: &mut u128|
     -> bool {
        let Some(sent) = hosts[w].pending.pop_front() else {
            return false;
        };
        let (status, etag, body): (&[u8], Option<String>, Vec<u8>) = match &sent.report {
            None => match how % 6 {
                0 => {
                    maps_served += 1;
                    let (version, etag) =
                        (format!("v{maps_served}"), format!("\"e{maps_served}\""));
                    versions.borrow_mut().insert(etag.clone(), version.clone());
                    let ready = maps_served % 2 == 0;
                    let map = format!(
                        r#"{{"version":"{version}","backends":{{"nvlink":{{"endpoints":[{{"address":"10.0.0.5:8080","ready":{ready}}}]}},"fs":{{"endpoints":[{{"address":"10.0.0.7:8080","ready":true}}]}}}}}}"#
                    );
                    (b"200", Some(etag), map.into_bytes())
                }
                1 if sent.if_none_match.is_some() => (b"304", None, Vec::new()),
                1 | 2 => (b"200", Some("\"bad\"".into()), b"{\"version\":".to_vec()),
                3 => (b"504", None, Vec::new()),
                4 => (b"", None, Vec::new()),
                _ => (b"500", None, Vec::new()),
            },
            Some(report) => {
                let applied = |ledger: &mut Ledger, added: &mut u128| match ledger
                    .apply(report, &arms, &pod_of, false)
                {
                    Ok(Outcome::Applied(increments)) => {
                        *added += increments.iter().map(|(_, n)| u128::from(*n)).sum::<u128>();
                        "applied"
                    }
                    Ok(Outcome::Duplicate) => "duplicate",
                    Ok(Outcome::Stale) => "stale",
                    other => panic!("the ledger answered {other:?} to a report of the link"),
                };
                match how % 5 {
                    0 => {
                        let result = applied(ledger, added);
                        (
                            b"200",
                            None,
                            format!(r#"{{"result":"{result}"}}"#).into_bytes(),
                        )
                    }
                    1 => (b"500", None, Vec::new()),
                    2 => {
                        applied(ledger, added);
                        (b"", None, Vec::new())
                    }
                    3 => (b"413", None, Vec::new()),
                    // The ledger at a cap (or its state unwritable): nothing changed, send later.
                    _ => (
                        b"507",
                        None,
                        br#"{"error":{"code":"ledger_full","message":"full"}}"#.to_vec(),
                    ),
                }
            }
        };
        if status == b"200" && sent.report.is_none() && etag.as_deref() != Some("\"bad\"") {
            confirmed.borrow_mut().insert(etag.clone().unwrap(), now);
        }
        if status == b"304" {
            confirmed
                .borrow_mut()
                .insert(sent.if_none_match.clone().unwrap(), now);
        }
        let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
        if !status.is_empty() {
            pairs.push((b":status", status));
        }
        if let Some(etag) = &etag {
            pairs.push((b"etag", etag.as_bytes()));
        }
        hosts[w].answer_body = body;
        let size = hosts[w].answer_body.len();
        let answered = links[w].on_response(
            &plan,
            &mut hosts[w],
            sent.token,
            &serialize_pairs(&pairs),
            size,
            now,
        );
        assert!(answered.is_some(), "the link did not know its own call");
        true
    };
    // Ticks worker `w`, checking the lease and the report sequence.
    let mut tick = |links: &mut [Link; 2], hosts: &mut [Host<'_>; 2], w: usize, now: u64| {
        let before = hosts[w].pending.len();
        links[w].tick(&plan, &mut hosts[w], now);
        for sent in hosts[w].pending.iter().skip(before) {
            match &sent.report {
                None => {
                    if let Some(t) = last_fetch {
                        assert!(now >= t + REFRESH_MS * MS, "two fetches within refreshMs");
                    }
                    last_fetch = Some(now);
                }
                Some(report) => {
                    assert_eq!(report.sequence, last_sequence[w] + 1, "sequences skip");
                    last_sequence[w] = report.sequence;
                }
            }
        }
        let in_flight = hosts[w]
            .pending
            .iter()
            .filter(|s| s.report.is_some())
            .count();
        assert!(in_flight <= 1, "{in_flight} reports in flight");
    };

    for op in data.chunks_exact(3) {
        let w = usize::from(op[0] & 1);
        match (op[0] >> 1) % 5 {
            0 => {
                let requested = match op[1] % 3 {
                    2 => None,
                    a => Some(ArmId(usize::from(a))),
                };
                let served = match (op[1] >> 2) % 4 {
                    0 => Served::Arm(ArmId(0)),
                    1 => Served::Arm(ArmId(1)),
                    2 => Served::Unknown,
                    _ => Served::None,
                };
                let class = CodeClass::ALL[usize::from(op[2]) % CodeClass::ALL.len()];
                let upstream = UPSTREAMS[usize::from(op[2] >> 3) % UPSTREAMS.len()];
                links[w].record(requested, served, upstream, class);
                recorded += 1;
            }
            1 => now += u64::from(op[1]) * u64::from(op[2] % 8 + 1) * MS,
            2 => tick(&mut links, &mut hosts, w, now),
            3 => {
                now += u64::from(op[2]) * MS / 4;
                answer(
                    &mut links,
                    &mut hosts,
                    w,
                    op[1],
                    now,
                    &mut ledger,
                    &mut added,
                );
            }
            _ => {
                if let Some(map) = links[w].fresh_map(now) {
                    let fresh = confirmed.borrow().iter().any(|(etag, t)| {
                        versions.borrow().get(etag).map(String::as_str) == Some(map.version())
                            && now - t <= STALE_MS * MS
                    });
                    assert!(
                        fresh,
                        "map {} used unconfirmed for staleAfterMs",
                        map.version()
                    );
                }
            }
        }
    }
    // Drain: every tick's calls answered well until a round sends no report (each round waits out
    // the longest report backoff, so a round without a report has nothing left to send).
    for _ in 0..64 {
        now += MAX_REPORT_BACKOFF_MS.max(REFRESH_MS) * MS;
        let mut reports = 0;
        for w in 0..2 {
            while answer(&mut links, &mut hosts, w, 0, now, &mut ledger, &mut added) {}
            tick(&mut links, &mut hosts, w, now);
            reports += hosts[w]
                .pending
                .iter()
                .filter(|s| s.report.is_some())
                .count();
            while answer(&mut links, &mut hosts, w, 0, now, &mut ledger, &mut added) {}
        }
        if reports == 0 {
            break;
        }
    }
    drop(answer);
    assert_eq!(
        added, recorded,
        "the sidecar's ledger holds a different count"
    );
}
