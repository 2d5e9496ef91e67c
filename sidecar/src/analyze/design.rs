//! The design, read from how requests chose their arm (`source`), and the sample-ratio check of the
//! split-assigned requests against the split weights. No I/O here.

use kvab_contract::metrics::{label, source};
use std::collections::BTreeMap;

use kvab_judge::report::production::{Assignment, Design};
use kvab_judge::stats::split_test;

use super::prometheus::Labels;
use super::series::{label, ALL};

/// The design of the window from `kvab_requests_total` by (backend, source):
/// - `sticky` when any request of the two arms was assigned by its key (`split.keyHeader`): a key's requests
///   share an arm, so the key is the unit of randomization, and Prometheus holds no per-key data;
/// - `randomized` when some were assigned by the split's random draw: those alone are compared;
/// - `observational` when tagged requests all chose their arm otherwise (header, alias, default);
/// - `none` without a tagged request.
pub fn design(requests: &[(Labels, f64)], arms: &[String]) -> Design {
    let mut by_arm: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut all = 0.0;
    for (l, v) in requests {
        all += v;
        let arm = label(l, label::BACKEND);
        if arms.iter().any(|a| a == arm) {
            *by_arm
                .entry(arm.to_string())
                .or_default()
                .entry(label(l, label::SOURCE).to_string())
                .or_default() += v;
        }
    }
    let total: f64 = by_arm.values().flat_map(|s| s.values()).sum();
    let of = |source: &str| by_arm.values().filter_map(|s| s.get(source)).sum::<f64>();
    let share = |source: &str| (total > 0.0).then(|| of(source) / total);
    let (split_share, header_share, key_share) = (
        share(source::SPLIT),
        share(source::HEADER),
        share(source::KEY),
    );
    let kind = if total <= 0.0 {
        "none"
    } else if of(source::KEY) > 0.0 {
        "sticky"
    } else if of(source::SPLIT) > 0.0 {
        "randomized"
    } else {
        "observational"
    };
    let compared = if kind == "randomized" {
        source::SPLIT
    } else {
        ALL
    };
    // Every request in the window, untagged and other arms' too: what vLLM's pods may have served.
    let other = (all - of(source::SPLIT)).max(0.0);
    Design {
        kind,
        compared,
        requests: by_arm,
        split_share,
        header_share,
        key_share,
        other_requests: other,
    }
}

/// The split-assigned requests per arm, tested against `split`'s weights (none: not checked).
pub fn assignment(
    requests: &[(Labels, f64)],
    arms: &[String],
    split: &[(String, f64)],
    threshold: f64,
) -> Assignment {
    let counts: BTreeMap<String, f64> = arms
        .iter()
        .map(|arm| {
            let n = requests
                .iter()
                .filter(|(l, _)| {
                    label(l, label::BACKEND) == arm && label(l, label::SOURCE) == source::SPLIT
                })
                .map(|(_, v)| v)
                .sum();
            (arm.clone(), n)
        })
        .collect();
    if split.is_empty() {
        return Assignment {
            split: counts,
            weights: None,
            srm_p: None,
            srm_ok: None,
        };
    }
    let weights: BTreeMap<String, f64> = split.iter().cloned().collect();
    let observed: Vec<u64> = arms
        .iter()
        .map(|a| counts.get(a).copied().unwrap_or(0.0).round() as u64)
        .collect();
    // An arm left out of --split has weight 0: any split request to it is a mismatch by itself.
    let weight: Vec<f64> = arms
        .iter()
        .map(|a| weights.get(a).copied().unwrap_or(0.0))
        .collect();
    let srm_p = if weight.iter().any(|w| *w <= 0.0) {
        let stray = observed
            .iter()
            .zip(&weight)
            .any(|(o, w)| *w <= 0.0 && *o > 0);
        observed
            .iter()
            .any(|o| *o > 0)
            .then_some(if stray { 0.0 } else { 1.0 })
    } else {
        split_test(&observed, &weight).map(|t| t.p_value)
    };
    Assignment {
        split: counts,
        weights: Some(weights),
        srm_p,
        srm_ok: srm_p.map(|p| p >= threshold),
    }
}
