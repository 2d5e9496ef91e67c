//! What an inconclusive comparison could have shown: the smallest effect its window would have found
//! (the minimum detectable effect), and the further requests its interval needs to decide.

use statrs::distribution::{ContinuousCDF, Normal};

/// The power the detectable effect is stated at.
pub const POWER: f64 = 0.8;

/// The smallest ratio (either way: ×r or ×1/r) a comparison whose ratio interval at `level` is
/// `ratio_ci` would decide `faster` with probability `POWER`, as a ratio above 1. The interval's half
/// width `w` on the log scale is taken as `z_{1−level/2}` standard errors (`se = w / z_{1−level/2}`)
/// and the log ratio as normal: `faster` needs the interval's near end beyond `1 + min_effect`, which a
/// true ratio of `(1 + min_effect) · exp((z_{1−level/2} + z_{POWER}) · se)` clears with probability
/// `POWER`. For histograms part of the width is the buckets', which more data would not shrink and
/// which this scales as if it were noise: there the figure errs high. `None` without a bounded interval.
pub fn detectable_ratio(ratio_ci: Option<[f64; 2]>, level: f64, min_effect: f64) -> Option<f64> {
    let [lo, hi] = ratio_ci?;
    if !(lo > 0.0 && hi.is_finite() && hi >= lo && level > 0.0 && level < 1.0) {
        return None;
    }
    let normal = Normal::standard();
    let z = normal.inverse_cdf(1.0 - level / 2.0);
    let se = (hi.ln() - lo.ln()) / 2.0 / z;
    let ratio = (1.0 + min_effect.max(0.0)) * ((z + normal.inverse_cdf(POWER)) * se).exp();
    ratio.is_finite().then_some(ratio)
}

/// Further requests (this class, both arms) until the ratio's interval is narrow enough to decide,
/// assuming its width on the log scale shrinks as 1/√n: to clear the margin when the ratio is beyond
/// it, else to fit inside it. `intervals`: the ratio's at the Holm level and for equivalence.
pub fn more_requests(
    ratio: Option<f64>,
    [ratio_ci, equivalence_ci]: [Option<[f64; 2]>; 2],
    min_effect: f64,
    n: u64,
) -> Option<u64> {
    let ratio = ratio.filter(|r| *r > 0.0)?;
    let band = (1.0 + min_effect).ln();
    let effect = ratio.ln().abs();
    let (interval, target) = if effect >= band {
        (ratio_ci?, effect - band)
    } else {
        (equivalence_ci?, band - effect)
    };
    let [lo, hi] = interval;
    if !(lo > 0.0 && hi > 0.0) {
        return None;
    }
    let half = (hi.ln() - lo.ln()) / 2.0;
    if !(target > 0.0 && half > 0.0 && n > 0) {
        return None;
    }
    let factor = (half / target).powi(2);
    let more = (n as f64 * (factor - 1.0)).ceil();
    (more.is_finite() && more < 1e12).then(|| more.max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detectable_effect_follows_the_intervals_width() {
        // se 0.05 on the log scale at the 95 % level: half width 1.96 · 0.05; detectable with margin 0
        // at exp((1.96 + 0.8416) · 0.05) = ×1.1504.
        let w: f64 = 1.959964 * 0.05;
        let r = detectable_ratio(Some([(-w).exp(), w.exp()]), 0.05, 0.0);
        assert!(r.is_some_and(|r| (r - 1.15039).abs() < 1e-4), "{r:?}");
        // The margin multiplies it; where the interval sits does not matter, only its width.
        let shifted = detectable_ratio(Some([1.3 * (-w).exp(), 1.3 * w.exp()]), 0.05, 0.05);
        assert!(
            shifted.is_some_and(|s| (s - 1.05 * 1.15039).abs() < 1e-4),
            "{shifted:?}"
        );
        // A stricter level widens the same interval's standard error less: fewer z's in it.
        let strict = detectable_ratio(Some([(-w).exp(), w.exp()]), 0.01, 0.0);
        assert!(strict.is_some_and(|s| s < 1.15039));
        for none in [
            None,
            Some([0.0, 2.0]),
            Some([0.9, f64::INFINITY]),
            Some([1.2, 1.1]),
        ] {
            assert_eq!(detectable_ratio(none, 0.05, 0.05), None, "{none:?}");
        }
    }
}
