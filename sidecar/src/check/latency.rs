//! Per-arm latency and time to first byte of the burst: an observation, not the A/B verdict (the
//! scheduler chose the arms; `kvab experiment` randomizes them).

use serde_json::{json, Value};

use super::burst::Shot;
use super::options::Arm;
use super::report::{Check, Outcome};
use kvab_judge::report::latency::Percentiles;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmSamples {
    /// Milliseconds, request start to last byte.
    pub total: Vec<f64>,
    /// Milliseconds, request start to first body byte.
    pub first_byte: Vec<f64>,
}

/// Splits the burst's successful responses by the arm that served them (the response tag).
pub fn samples_by_arm(shots: &[Shot], header: &str, arms: &[Arm]) -> Vec<(String, ArmSamples)> {
    arms.iter()
        .map(|arm| {
            let mut samples = ArmSamples::default();
            for exchange in shots.iter().flatten() {
                if exchange.status == 200 && exchange.header(header) == Some(arm.name.as_str()) {
                    samples.total.push(exchange.total.as_secs_f64() * 1000.0);
                    samples
                        .first_byte
                        .push(exchange.time_to_first_byte.as_secs_f64() * 1000.0);
                }
            }
            (arm.name.clone(), samples)
        })
        .collect()
}

fn render(name: &str, s: &ArmSamples) -> String {
    let (total, first_byte) = (Percentiles::of(&s.total), Percentiles::of(&s.first_byte));
    let ttfb = first_byte.p50.map_or("-".into(), |x| format!("{x:.1}"));
    format!(
        "{name} n={} p50/p95/p99 {} ms, ttfb p50 {ttfb} ms",
        total.n,
        total.text()
    )
}

/// The burst's latencies per arm, shown as an observation: the scheduler chose the arms by load, so
/// the arms saw different requests at different moments and no comparison of them is a verdict. The row is
/// neutral (`skip`) and points to `kvab experiment`, which randomizes the arms.
pub fn observe(by_arm: &[(String, ArmSamples)]) -> (Check, Value) {
    let name = "ab/latency";
    let expected =
        "observational (arms chosen by the scheduler): per-arm latency of the burst; the A/B \
                    verdict is kvab experiment's";
    let arms_json: serde_json::Map<String, Value> = by_arm
        .iter()
        .map(|(arm, s)| {
            (
                arm.clone(),
                json!({"latency_ms": Percentiles::of(&s.total), "ttfb_ms": Percentiles::of(&s.first_byte)}),
            )
        })
        .collect();
    let report = json!({"arms": arms_json, "observational": true});
    let rendered: Vec<String> = by_arm.iter().map(|(a, s)| render(a, s)).collect();
    let check = Check::new(name, expected, rendered.join("; "), Outcome::Skip).diagnosis(
        "not a comparison: the active-request-scorer sends fewer and different requests to the slower arm. \
         `kvab experiment` assigns the arms at random per request and judges which is faster (docs/experiment.md)",
    );
    (check, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(name: &str, total: &[f64]) -> (String, ArmSamples) {
        (
            name.to_string(),
            ArmSamples {
                total: total.to_vec(),
                first_byte: total.to_vec(),
            },
        )
    }

    #[test]
    fn the_row_is_an_observation_and_never_names_a_faster_arm() {
        let nvlink: Vec<f64> = (0..10).map(|i| 10.0 + f64::from(i)).collect();
        let fs: Vec<f64> = (0..10).map(|i| 100.0 + f64::from(i)).collect();
        let (check, report) = observe(&[arm("nvlink", &nvlink), arm("fs", &fs)]);
        assert_eq!(check.result, Outcome::Skip);
        assert!(
            check.measured.contains("fs n=10 p50/p95/p99 104.5/"),
            "{}",
            check.measured
        );
        assert!(!check.measured.contains("faster"), "{}", check.measured);
        assert!(check
            .diagnosis
            .as_deref()
            .is_some_and(|d| d.contains("kvab experiment")));
        assert_eq!(report["arms"]["fs"]["latency_ms"]["p50"], 104.5);
        assert_eq!(report["observational"], true);
        let (check, _) = observe(&[arm("nvlink", &[]), arm("fs", &[])]);
        assert_eq!(check.result, Outcome::Skip);
    }
}
