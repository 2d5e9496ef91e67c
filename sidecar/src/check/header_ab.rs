//! Step 3, header A/B through the gateway: requests carrying `x-kv-backend: <arm>` must be served by that arm,
//! according to the response (tag and completion id) and to the counters (sidecar and filter); an unknown
//! value must get the filter's JSON 400.

use std::collections::BTreeMap;

use kvab_contract::report::RESERVED_ARM_NAMES;

use super::direct::{completion_id, identify, Identity};
use super::observe::{render_counts, Counters};
use super::options::Arm;
use super::report::{signals, Check, Outcome};
use kvab_serve::client::Exchange;

/// Judges the header requests of one arm, given what the counters did meanwhile.
pub fn judge_arm(
    arm: &Arm,
    arms: &[Arm],
    header: &str,
    outcomes: &[Result<Exchange, String>],
    delta: &Counters,
) -> Check {
    let name = format!("step3/header-{}", arm.name);
    let expected = format!(
        "{header}: {0} served by {0}: status 200, response tag, id path and counters",
        arm.name
    );
    let sent = outcomes.len();
    if sent == 0 {
        return Check::new(
            &name,
            expected,
            "no request sent (--header-requests 0)",
            Outcome::Inconclusive,
        );
    }
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut tags: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong_ids = Vec::new();
    let mut unidentified = 0;
    for outcome in outcomes {
        match outcome {
            Ok(e) => {
                *statuses.entry(e.status.to_string()).or_default() += 1;
                *tags
                    .entry(e.header(header).unwrap_or("-").to_string())
                    .or_default() += 1;
                if e.status == 200 {
                    match identify(completion_id(e).as_deref(), arm, arms) {
                        Identity::ThisArm => {}
                        Identity::NotConfigured => unidentified += 1,
                        Identity::OtherArm(other) => wrong_ids.push(other),
                        Identity::Unknown(p, _) => wrong_ids.push(p),
                        Identity::NoPath => wrong_ids.push("no path".into()),
                    }
                }
            }
            Err(_) => *statuses.entry("error".into()).or_default() += 1,
        }
    }
    let ok = statuses.get("200").copied().unwrap_or(0);
    let tagged_right = tags.get(&arm.name).copied().unwrap_or(0);
    let sidecar = delta.routed_by_served(&arm.name);
    let envoy = delta.served_by_served(&arm.name);
    // `unknown`: the filter had no current map to tell; `none`: no upstream answered. Neither is a misroute.
    let misrouted = |counts: &BTreeMap<String, f64>| -> f64 {
        counts
            .iter()
            .filter(|(s, _)| *s != &arm.name && !RESERVED_ARM_NAMES.contains(&s.as_str()))
            .map(|(_, v)| v)
            .sum()
    };
    let counted_right = sidecar.get(&arm.name).copied().unwrap_or(0.0);

    let mut measured = vec![
        format!("status {}", render(&statuses)),
        format!("tag {}", render(&tags)),
    ];
    if !wrong_ids.is_empty() {
        measured.push(format!("id names {}", wrong_ids.join(", ")));
    }
    if delta.routed.is_some() {
        measured.push(format!("sidecar served {}", render_counts(&sidecar)));
    }
    if delta.served.is_some() {
        measured.push(format!("filter served {}", render_counts(&envoy)));
    }
    let measured = measured.join("; ");

    let misroutes = misrouted(&sidecar) + misrouted(&envoy);
    let answered_wrong = ok < sent || tagged_right < sent || !wrong_ids.is_empty();
    if answered_wrong || misroutes > 0.0 {
        let diagnosis = if ok < sent && wrong_ids.is_empty() && misroutes == 0.0 {
            format!(
                "requests for {} were not answered 200: the arm is down or has no ready proxy (a 503 \
                 kv_backend_unavailable means the sidecar's map has none)",
                arm.name
            )
        } else {
            signals::HEADER_MISMATCH.to_string()
        };
        return Check::new(&name, expected, measured, Outcome::Fail).diagnosis(diagnosis);
    }
    if unidentified > 0 {
        return Check::new(&name, expected, measured, Outcome::Inconclusive).diagnosis(format!(
            "no --id-path for {}: responses cannot be identified by their id",
            arm.name
        ));
    }
    match delta.routed {
        None => Check::new(&name, expected, measured, Outcome::Inconclusive)
            .diagnosis("no sidecar to count with (--sidecar-url): the responses agree, the counters were not read"),
        Some(_) if counted_right < ok as f64 => Check::new(&name, expected, measured, Outcome::Inconclusive).diagnosis(
            format!(
                "the sidecar counted {counted_right} of {ok} requests: is the filter linked to kvab serve (its \
                 `sidecar` block) and are its reports arriving (kvab_reports_total)?"
            ),
        ),
        Some(_) => Check::new(&name, expected, measured, Outcome::Pass),
    }
}

/// An unknown arm name gets the filter's 400 `unknown_kv_backend` in the OpenAI error shape.
pub fn judge_unknown(header: &str, value: &str, outcome: &Result<Exchange, String>) -> Check {
    let expected = "400 {\"error\":{\"code\":\"unknown_kv_backend\",…}}";
    let name = "step3/unknown-value";
    let exchange = match outcome {
        Ok(e) => e,
        Err(e) => return Check::new(name, expected, e.clone(), Outcome::Fail),
    };
    let code = exchange.json().and_then(|j| {
        j.pointer("/error/code")
            .and_then(|c| c.as_str())
            .map(str::to_string)
    });
    let measured = format!(
        "{header}: {value} -> {} {}",
        exchange.status,
        code.as_deref().unwrap_or("(no JSON error code)")
    );
    let result = if exchange.status == 400 && code.as_deref() == Some("unknown_kv_backend") {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    Check::new(name, expected, measured, result).diagnosis_unless_pass(
        "the kvab filter is not validating the header on this gateway (WasmPlugin missing, or onUnknown is not \
         \"reject\"): an unknown value reaching the EPP is answered 429",
    )
}

fn render(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
