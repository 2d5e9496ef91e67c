//! The A/B verdict: per-arm latency and time to first byte from the burst, and a Mann-Whitney U test of
//! whether one KV backend is faster than the other.

use serde_json::{json, Value};

use super::burst::{format_p, Shot};
use super::options::Arm;
use super::report::{Check, Outcome};
use super::stats::{mann_whitney_u, percentile};

/// Fewer successful responses than this per arm give no verdict.
pub const MIN_SAMPLES: usize = 3;

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

fn summary(samples: &[f64]) -> Value {
    let p = |q| percentile(samples, q).map(|v| (v * 10.0).round() / 10.0);
    json!({"n": samples.len(), "p50": p(50.0), "p95": p(95.0), "p99": p(99.0)})
}

fn render(name: &str, s: &ArmSamples) -> String {
    let p = |v: &[f64], q| percentile(v, q).map_or("-".into(), |x| format!("{x:.1}"));
    format!(
        "{name} n={} p50/p95/p99 {}/{}/{} ms, ttfb p50 {} ms",
        s.total.len(),
        p(&s.total, 50.0),
        p(&s.total, 95.0),
        p(&s.total, 99.0),
        p(&s.first_byte, 50.0)
    )
}

/// Compares the first two arms. Passes when a comparison could be made (whichever arm wins; this is the
/// measurement the A/B test exists for), inconclusive with too few samples.
pub fn judge(by_arm: &[(String, ArmSamples)], alpha: f64) -> (Check, Value) {
    let name = "ab/latency";
    let expected = format!("≥ {MIN_SAMPLES} answers per arm; Mann-Whitney U at α={alpha}");
    let arms_json: serde_json::Map<String, Value> = by_arm
        .iter()
        .map(|(arm, s)| {
            (
                arm.clone(),
                json!({"latency_ms": summary(&s.total), "ttfb_ms": summary(&s.first_byte)}),
            )
        })
        .collect();
    let mut report = json!({"arms": arms_json});
    let rendered: Vec<String> = by_arm.iter().map(|(a, s)| render(a, s)).collect();
    let [(first, a), (second, b), ..] = by_arm else {
        return (
            Check::new(name, expected, rendered.join("; "), Outcome::Inconclusive),
            report,
        );
    };
    if a.total.len() < MIN_SAMPLES || b.total.len() < MIN_SAMPLES {
        return (
            Check::new(name, expected, rendered.join("; "), Outcome::Inconclusive).diagnosis(
                "too few answers per arm for a verdict: the burst did not reach both arms often enough (raise \
                 --burst-requests)",
            ),
            report,
        );
    }
    let Some(test) = mann_whitney_u(&a.total, &b.total) else {
        return (
            Check::new(name, expected, rendered.join("; "), Outcome::Inconclusive),
            report,
        );
    };
    // shift = typical (second − first): positive means the first arm is faster.
    let (faster, slower, by) = if test.shift >= 0.0 {
        (first, second, test.shift)
    } else {
        (second, first, -test.shift)
    };
    let median = |v: &[f64]| percentile(v, 50.0).unwrap_or(0.0);
    let (fast_median, slow_median) = if faster == first {
        (median(&a.total), median(&b.total))
    } else {
        (median(&b.total), median(&a.total))
    };
    let significant = test.p_value < alpha;
    let verdict = format!(
        "{faster} faster than {slower}: median {fast_median:.1} vs {slow_median:.1} ms ({:+.0}%), shift {by:.1} ms \
         (Hodges-Lehmann), U={}, p={} {}",
        100.0 * (fast_median - slow_median) / slow_median.max(f64::MIN_POSITIVE),
        test.u_first,
        format_p(test.p_value),
        if significant {
            format!("< {alpha}: significant")
        } else {
            format!("≥ {alpha}: not significant")
        }
    );
    report["mann_whitney"] = json!({
        "first": first, "second": second, "u_first": test.u_first, "z": test.z, "p_value": test.p_value,
        "shift_ms": test.shift, "faster": faster, "significant": significant,
    });
    let measured = format!("{}; {verdict}", rendered.join("; "));
    (Check::new(name, expected, measured, Outcome::Pass), report)
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
    fn a_clearly_slower_arm_is_named_with_its_margin() {
        let nvlink: Vec<f64> = (0..10).map(|i| 10.0 + f64::from(i)).collect();
        let fs: Vec<f64> = (0..10).map(|i| 100.0 + f64::from(i)).collect();
        let (check, report) = judge(&[arm("nvlink", &nvlink), arm("fs", &fs)], 0.01);
        assert_eq!(check.result, Outcome::Pass);
        assert!(
            check
                .measured
                .contains("nvlink faster than fs: median 14.5 vs 104.5 ms (-86%), shift 90.0 ms"),
            "{}",
            check.measured
        );
        assert!(
            check.measured.contains("U=0, p=0.0002 < 0.01: significant"),
            "{}",
            check.measured
        );
        assert_eq!(report["mann_whitney"]["faster"], "nvlink");
        assert_eq!(report["arms"]["fs"]["latency_ms"]["p50"], 104.5);
    }

    #[test]
    fn overlapping_arms_are_not_significant_and_few_samples_are_inconclusive() {
        let (check, _) = judge(
            &[
                arm("nvlink", &[10.0, 12.0, 14.0, 16.0]),
                arm("fs", &[11.0, 13.0, 15.0, 17.0]),
            ],
            0.01,
        );
        assert_eq!(check.result, Outcome::Pass);
        assert!(
            check.measured.contains("not significant"),
            "{}",
            check.measured
        );
        let (check, _) = judge(
            &[arm("nvlink", &[10.0]), arm("fs", &[11.0, 13.0, 15.0])],
            0.01,
        );
        assert_eq!(check.result, Outcome::Inconclusive);
    }
}
