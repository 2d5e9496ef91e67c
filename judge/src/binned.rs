//! Statistics on Prometheus histograms: counts per bucket, not samples. Every figure here is valid on
//! binned data: a quantile is known only to lie in its bucket (the bounds are reported with Prometheus's
//! linear-interpolation estimate); the two-sample test is Mann-Whitney with every bucket one group of
//! ties; the interval of the difference of medians is built from distribution-free median intervals
//! widened to bucket edges, so it holds whatever the values inside the buckets are.

use std::fmt;

use crate::stats::{count, median_rank, normal_sf, quantile_ranks, InvalidCount};

/// A dip between cumulative buckets up to which it is taken as `increase()`'s noise and clamped: one
/// request, or 0.1 % of the bucket below when more. `increase()` extrapolates each bucket series to the
/// window's edges on its own, so buckets scraped together can disagree by a fraction of the requests of
/// one scrape interval (PromQL's `histogram_quantile` silently absorbs relative differences below 1e-12
/// and forces larger dips away with only an info annotation). A larger dip means the buckets are not one
/// histogram (targets with different bucket layouts summed, a broken exporter): refused, not clamped.
pub const DIP_TOLERANCE: (f64, f64) = (1.0, 1e-3);

/// A histogram's increase over a window: per bucket (upper bounds ascending, the last `+Inf`), the count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub upper: Vec<f64>,
    pub counts: Vec<f64>,
}

/// Why cumulative buckets are no histogram.
#[derive(Debug, Clone, PartialEq)]
pub enum InvalidHistogram {
    /// An `le` that is no number (or NaN, or −Inf).
    Bound(String),
    /// Two buckets with the same upper bound.
    DuplicateBound(String),
    /// No `le="+Inf"` bucket: the total is unknown.
    NoInfBucket,
    /// A bucket's value is no count.
    Count { le: String, problem: InvalidCount },
    /// A bucket holds fewer requests than the one below it, beyond `DIP_TOLERANCE`.
    Decreasing { le: String, count: f64, below: f64 },
}

impl fmt::Display for InvalidHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidHistogram::Bound(le) => write!(f, "le={le:?} is no bucket bound"),
            InvalidHistogram::DuplicateBound(le) => write!(f, "two buckets le={le:?}"),
            InvalidHistogram::NoInfBucket => write!(f, "no le=\"+Inf\" bucket, so no total"),
            InvalidHistogram::Count { le, problem } => write!(f, "bucket le={le:?}: {problem}"),
            InvalidHistogram::Decreasing { le, count, below } => write!(
                f,
                "bucket le={le:?} counts {count} requests, fewer than the {below} of the bucket below it \
                 (cumulative buckets never decrease)"
            ),
        }
    }
}

/// An `le` label's bound: a number, `+Inf` for the last bucket.
fn bound(le: &str) -> Result<f64, InvalidHistogram> {
    match le.parse::<f64>() {
        Ok(bound) if !bound.is_nan() && bound != f64::NEG_INFINITY => Ok(bound),
        _ => Err(InvalidHistogram::Bound(le.to_string())),
    }
}

impl Histogram {
    /// From cumulative `le` buckets (any order, `+Inf` included), as `increase(..._bucket[w])` returns.
    /// Counter resets are Prometheus's business (`increase`). Refused: a bound that is no number, two
    /// buckets with one bound, no `+Inf` bucket, a value that is no count (`stats::count`), a bucket
    /// below the one before it by more than `DIP_TOLERANCE` (a smaller dip is clamped).
    pub fn from_cumulative<'a>(
        buckets: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<Self, InvalidHistogram> {
        let mut parsed = Vec::new();
        for (le, value) in buckets {
            let problem = |problem| InvalidHistogram::Count {
                le: le.to_string(),
                problem,
            };
            parsed.push((bound(le)?, le, count(value).map_err(problem)?));
        }
        parsed.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(pair) = parsed.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(InvalidHistogram::DuplicateBound(pair[1].1.to_string()));
        }
        if parsed.last().is_none_or(|(le, _, _)| *le != f64::INFINITY) {
            return Err(InvalidHistogram::NoInfBucket);
        }
        let mut previous = 0.0f64;
        let (mut upper, mut counts) = (Vec::new(), Vec::new());
        for (le, text, cumulative) in parsed {
            let (absolute, relative) = DIP_TOLERANCE;
            if cumulative < previous - absolute.max(relative * previous) {
                return Err(InvalidHistogram::Decreasing {
                    le: text.to_string(),
                    count: cumulative,
                    below: previous,
                });
            }
            let cumulative = cumulative.max(previous).round();
            upper.push(le);
            counts.push(cumulative - previous);
            previous = cumulative;
        }
        Ok(Histogram { upper, counts })
    }

    pub fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// (upper bound, fraction of the requests at or below it) for every finite bound.
    pub fn cumulative_fractions(&self) -> Vec<[f64; 2]> {
        let total = self.total();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut below = 0.0;
        self.upper
            .iter()
            .zip(&self.counts)
            .filter_map(|(&le, &count)| {
                below += count;
                le.is_finite().then_some([le, below / total])
            })
            .collect()
    }

    fn lower(&self, bucket: usize) -> f64 {
        if bucket == 0 {
            0.0f64.min(self.upper[0])
        } else {
            self.upper[bucket - 1]
        }
    }

    /// The bucket holding the `rank`-th smallest value (1-based).
    fn bucket_of_rank(&self, rank: f64) -> Option<usize> {
        let mut cumulative = 0.0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            if cumulative >= rank && *count > 0.0 {
                return Some(i);
            }
        }
        None
    }

    /// The `q` quantile (0..1): (lower bound, upper bound, estimate). The estimate interpolates linearly
    /// inside the bucket, as PromQL's `histogram_quantile`; in the `+Inf` bucket it is the lower bound.
    pub fn quantile(&self, q: f64) -> Option<(f64, f64, f64)> {
        let n = self.total();
        if n <= 0.0 {
            return None;
        }
        let rank = (q * n).max(1.0);
        let bucket = self.bucket_of_rank(rank)?;
        let (low, high) = (self.lower(bucket), self.upper[bucket]);
        let below: f64 = self.counts[..bucket].iter().sum();
        let estimate = if high.is_finite() {
            low + (high - low) * ((q * n - below) / self.counts[bucket]).clamp(0.0, 1.0)
        } else {
            low
        };
        Some((low, high, estimate))
    }

    /// A distribution-free `1 − alpha` interval of the median: the binomial order statistics' ranks, each
    /// widened to its bucket's edges. `None` when the sample is too small for the level.
    pub fn median_interval(&self, alpha: f64) -> Option<(f64, f64)> {
        let n = self.total().round() as u64;
        let j = median_rank(n, alpha)?;
        let low = self.lower(self.bucket_of_rank(j as f64)?);
        let high = self.upper[self.bucket_of_rank((n + 1 - j) as f64)?];
        Some((low, high))
    }

    /// Distribution-free bounds of the `q`-quantile (`stats::quantile_ranks`), widened to bucket edges:
    /// the lower edge of the bucket holding rank `l`, the upper edge of the one holding rank `u`. A side is
    /// `None` when the count is too small to bound it, or its rank falls in the `+Inf` bucket.
    pub fn quantile_interval(&self, q: f64, alpha: f64) -> (Option<f64>, Option<f64>) {
        let n = self.total().round() as u64;
        let (l, u) = quantile_ranks(n, q, alpha);
        let low = l.and_then(|l| Some(self.lower(self.bucket_of_rank(l as f64)?)));
        let high = u
            .and_then(|u| self.upper.get(self.bucket_of_rank(u as f64)?).copied())
            .filter(|h| h.is_finite());
        (low, high)
    }
}

/// Two-sided Mann-Whitney U p-value on two histograms with the same buckets: every bucket is one group
/// of ties (tie-corrected variance, continuity correction), the test for ordinal data. `None` when the
/// buckets differ or a side is empty.
pub fn mann_whitney(first: &Histogram, second: &Histogram) -> Option<f64> {
    if first.upper != second.upper {
        return None;
    }
    let (n1, n2) = (first.total(), second.total());
    if n1 <= 0.0 || n2 <= 0.0 {
        return None;
    }
    let n = n1 + n2;
    // U of the first: pairs (a, b) with a > b, ties one half.
    let (mut u, mut second_below, mut tie_term) = (0.0, 0.0, 0.0);
    for (a, b) in first.counts.iter().zip(&second.counts) {
        u += a * (second_below + b / 2.0);
        second_below += b;
        let t = a + b;
        tie_term += t * t * t - t;
    }
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if variance <= 0.0 {
        return Some(1.0);
    }
    let mean = n1 * n2 / 2.0;
    let z = ((u - mean).abs() - 0.5).max(0.0) / variance.sqrt();
    Some((2.0 * normal_sf(z)).min(1.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn histogram(upper: &[f64], counts: &[f64]) -> Histogram {
        Histogram {
            upper: upper.to_vec(),
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn cumulative_fractions_stop_at_the_last_finite_bound() {
        let h = histogram(&[50.0, 100.0, f64::INFINITY], &[4.0, 5.0, 1.0]);
        assert_eq!(h.cumulative_fractions(), vec![[50.0, 0.4], [100.0, 0.9]]);
        assert!(histogram(&[f64::INFINITY], &[0.0])
            .cumulative_fractions()
            .is_empty());
    }

    #[test]
    fn cumulative_buckets_become_counts_and_need_inf() {
        let h = Histogram::from_cumulative([("+Inf", 10.0), ("50", 4.0), ("100", 9.0)]).unwrap();
        assert_eq!(h.upper, vec![50.0, 100.0, f64::INFINITY]);
        assert_eq!(h.counts, vec![4.0, 5.0, 1.0]);
        // increase() extrapolates each bucket on its own: a dip of a fraction of a request is clamped,
        // never negative.
        let h = Histogram::from_cumulative([("50", 4.2), ("100", 3.9), ("+Inf", 5.0)]).unwrap();
        assert!(h.counts.iter().all(|c| *c >= 0.0) && h.total() == 5.0);
        // Up to 0.1 % of a large bucket too.
        assert!(Histogram::from_cumulative([("50", 100_000.0), ("+Inf", 99_950.0)]).is_ok());
    }

    #[test]
    fn buckets_that_are_no_histogram_are_refused() {
        use InvalidHistogram::*;
        let refused = |buckets: &[(&str, f64)]| Histogram::from_cumulative(buckets.iter().copied());
        // Was "too little traffic": no +Inf bucket means no total.
        assert_eq!(refused(&[("50", 4.0)]), Err(NoInfBucket));
        // Was a NaN cast to 0 and a verdict.
        assert_eq!(
            refused(&[("50", f64::NAN), ("+Inf", 10.0)]),
            Err(Count {
                le: "50".into(),
                problem: InvalidCount::NotANumber
            })
        );
        assert_eq!(
            refused(&[("50", 1.0), ("+Inf", f64::INFINITY)]),
            Err(Count {
                le: "+Inf".into(),
                problem: InvalidCount::Infinite(f64::INFINITY)
            })
        );
        assert_eq!(
            refused(&[("50", -2.0), ("+Inf", 1.0)]),
            Err(Count {
                le: "50".into(),
                problem: InvalidCount::Negative(-2.0)
            })
        );
        assert_eq!(
            refused(&[("50", 1.0), ("+Inf", 1e18)]),
            Err(Count {
                le: "+Inf".into(),
                problem: InvalidCount::Absurd(1e18)
            })
        );
        // Was clamped silently into a verdict: 900 requests at or below 50 ms, 300 at or below 100 ms.
        assert_eq!(
            refused(&[("50", 900.0), ("100", 300.0), ("+Inf", 1000.0)]),
            Err(Decreasing {
                le: "100".into(),
                count: 300.0,
                below: 900.0
            })
        );
        assert_eq!(
            refused(&[("50", 1.0), ("50.0", 2.0), ("+Inf", 3.0)]),
            Err(DuplicateBound("50.0".into()))
        );
        for le in ["fast", "", "NaN", "-Inf"] {
            assert_eq!(refused(&[(le, 1.0), ("+Inf", 3.0)]), Err(Bound(le.into())));
        }
        assert_eq!(
            Decreasing {
                le: "100".into(),
                count: 300.0,
                below: 900.0
            }
            .to_string(),
            "bucket le=\"100\" counts 300 requests, fewer than the 900 of the bucket below it (cumulative \
             buckets never decrease)"
        );
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile_and_carry_their_bucket() {
        // PromQL: histogram_quantile(0.5) of 4 in (0,50], 5 in (50,100], 1 above: rank 5 is in (50,100],
        // 50 + 50 · (5 − 4)/5 = 60.
        let h = histogram(&[50.0, 100.0, f64::INFINITY], &[4.0, 5.0, 1.0]);
        assert_eq!(h.quantile(0.5), Some((50.0, 100.0, 60.0)));
        assert_eq!(
            h.quantile(0.99).map(|q| (q.0, q.1)),
            Some((100.0, f64::INFINITY))
        );
        assert_eq!(histogram(&[f64::INFINITY], &[0.0]).quantile(0.5), None);
    }

    #[test]
    fn the_binned_test_separates_shifted_histograms_and_not_equal_ones() {
        let edges = [10.0, 20.0, 30.0, 40.0, f64::INFINITY];
        let fast = histogram(&edges, &[300.0, 600.0, 100.0, 0.0, 0.0]);
        let slow = histogram(&edges, &[0.0, 100.0, 600.0, 300.0, 0.0]);
        assert!(mann_whitney(&fast, &slow).unwrap() < 1e-10);
        assert!(mann_whitney(&fast, &fast.clone()).unwrap() > 0.9);
        assert!(mann_whitney(&fast, &histogram(&[1.0, f64::INFINITY], &[1.0, 1.0])).is_none());
        // By hand, one bucket each side: all tied, U = n1·n2/2, p = 1.
        let one = histogram(&[f64::INFINITY], &[5.0]);
        assert_eq!(mann_whitney(&one, &one), Some(1.0));
    }

    #[test]
    fn the_median_interval_is_widened_to_bucket_edges() {
        // 10 values in buckets of one each: ranks 2 and 9 at 95 % (as for raw samples), so the interval
        // runs from bucket 2's lower edge to bucket 9's upper edge.
        let edges: Vec<f64> = (1..=10)
            .map(|i| f64::from(i) * 10.0)
            .chain([f64::INFINITY])
            .collect();
        let mut counts = vec![1.0; 10];
        counts.push(0.0);
        assert_eq!(
            histogram(&edges, &counts).median_interval(0.05),
            Some((10.0, 90.0))
        );
        assert_eq!(
            histogram(&edges[..5], &[1.0; 5]).median_interval(0.05),
            None
        );
    }
}
