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

/// Per arm, the histogram of its buckets; `None` for an arm without any; an error naming the arm's series
/// when its buckets are no histogram (`Histogram::from_cumulative`).
pub fn histograms(
    metric: &str,
    samples: &[(Labels, f64)],
    arms: &[String],
) -> Result<Vec<Option<Histogram>>, String> {
    arms.iter()
        .map(|arm| {
            let buckets: Vec<(&str, f64)> = samples
                .iter()
                .filter(|(l, _)| label(l, label::BACKEND) == arm)
                .map(|(l, v)| (label(l, "le"), *v))
                .collect();
            if buckets.is_empty() {
                return Ok(None);
            }
            Histogram::from_cumulative(buckets)
                .map(Some)
                .map_err(|problem| {
                    let labels = Labels::from([(label::BACKEND.to_string(), arm.clone())]);
                    invalid_input(metric, &labels, problem)
                })
        })
        .collect()
}
