//! The answers as series: labels read, series named as PromQL writes them, and every value checked
//! (`stats::count`, `Histogram::from_cumulative`) so that input that is no count or no histogram is an
//! error naming its series. No I/O here.

use kvab_contract::metrics::label;
use kvab_judge::stats::count;

use super::prometheus::{printable, Labels};
use kvab_judge::binned::Histogram;

/// One answer: `increase()` per series.
pub type Samples = Vec<(Labels, f64)>;

/// A label's value, `""` when the series has none.
pub fn label<'a>(labels: &'a Labels, name: &str) -> &'a str {
    labels.get(name).map_or("", String::as_str)
}

/// A series as PromQL writes it, `metric{label="value", ...}` (`\` and `"` escaped in values), its
/// server-provided text made printable.
pub fn series(metric: &str, labels: &Labels) -> String {
    let labels: Vec<String> = labels
        .iter()
        .map(|(name, value)| {
            let value = value.replace('\\', "\\\\").replace('"', "\\\"");
            format!("{}=\"{}\"", printable(name), printable(&value))
        })
        .collect();
    format!("{metric}{{{}}}", labels.join(", "))
}

/// The one line of input that cannot be judged, naming its series.
pub fn invalid_input(metric: &str, labels: &Labels, problem: impl std::fmt::Display) -> String {
    format!("invalid input: {}: {problem}", series(metric, labels))
}

/// Every value of a counter's answer is a count (`stats::count`), or the answer is refused.
pub fn counts(metric: &str, samples: &[(Labels, f64)]) -> Result<(), String> {
    for (labels, value) in samples {
        count(*value).map_err(|problem| invalid_input(metric, labels, problem))?;
    }
    Ok(())
}

/// Per arm, the histogram of its buckets, of the series whose `source` is `compared` (`all`: every
/// source's, summed bound by bound); `None` for an arm without any. Each source's buckets are checked on
/// their own first (`Histogram::from_cumulative`), so buckets that are no histogram are an error naming
/// their series (arm and source), never hidden in a sum.
pub fn histograms(
    metric: &str,
    samples: &[(Labels, f64)],
    arms: &[String],
    compared: &str,
) -> Result<Vec<Option<Histogram>>, String> {
    arms.iter()
        .map(|arm| {
            // Per source (in the order first met), its buckets.
            let mut sources: Vec<(&str, Vec<(&str, f64)>)> = Vec::new();
            for (l, v) in samples
                .iter()
                .filter(|(l, _)| label(l, label::BACKEND) == arm && is_compared(l, compared))
            {
                let source = label(l, label::SOURCE);
                let bucket = (label(l, "le"), *v);
                match sources.iter_mut().find(|(s, _)| *s == source) {
                    Some((_, buckets)) => buckets.push(bucket),
                    None => sources.push((source, vec![bucket])),
                }
            }
            let mut found = None;
            for (source, buckets) in &sources {
                let histogram =
                    Histogram::from_cumulative(buckets.iter().copied()).map_err(|problem| {
                        let mut labels = Labels::from([(label::BACKEND.to_string(), arm.clone())]);
                        if !source.is_empty() {
                            labels.insert(label::SOURCE.to_string(), source.to_string());
                        }
                        invalid_input(metric, &labels, problem)
                    })?;
                found = Some(match found {
                    None => histogram,
                    Some(sum) => sum_of(metric, arm, sum, &histogram)?,
                });
            }
            Ok(found)
        })
        .collect()
}

/// Two histograms of one arm added bucket by bucket; sources that do not share their bounds are an error
/// naming the arm (the filter gives every source the same bounds).
fn sum_of(metric: &str, arm: &str, a: Histogram, b: &Histogram) -> Result<Histogram, String> {
    if a.upper != b.upper {
        let labels = Labels::from([(label::BACKEND.to_string(), arm.to_string())]);
        return Err(invalid_input(
            metric,
            &labels,
            "its sources' buckets have different bounds, so they cannot be added",
        ));
    }
    let counts = a.counts.iter().zip(&b.counts).map(|(x, y)| x + y).collect();
    Ok(Histogram {
        upper: a.upper,
        counts,
    })
}

/// `compared` for every source's series together.
pub const ALL: &str = "all";

/// Whether a series counts requests of `compared`: its `source` is it, or `compared` is `ALL`.
pub fn is_compared(labels: &Labels, compared: &str) -> bool {
    compared == ALL || label(labels, label::SOURCE) == compared
}

/// Whether some of the arms' series carry no `source` label: histograms of a filter that did not tell
/// split-assigned requests apart.
pub fn without_source(samples: &[(Labels, f64)], arms: &[String]) -> bool {
    samples.iter().any(|(l, _)| {
        arms.iter().any(|a| a == label(l, label::BACKEND)) && label(l, label::SOURCE).is_empty()
    })
}
