//! Reads the Prometheus text format (`kvab serve` /metrics, Envoy /stats/prometheus) into samples.
//!
//! Hand-written on purpose: the maintained crates either cut a label set at the first `}` even inside a
//! quoted value (`prometheus-parse` 0.2.5, its `[^}]+` pattern) or are LGPL (`openmetrics-parser`). The test
//! below feeds it the `prometheus` crate's own encoder output with values that look like syntax.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses sample lines; comments and lines that are not samples are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, rest) = line.split_at(name_end);
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(label_set) => parse_labels(label_set)?,
        None => (BTreeMap::new(), rest),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Reads `name="value",...}` (after the `{`) and returns the labels and what follows the closing brace.
/// The brace is found by reading the quoted values, so a `}` inside one does not end the set.
fn parse_labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        rest = after.get(end + 1..)?;
    }
}

/// Sum of the samples named `name` whose labels include every pair of `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    select(samples, name, filter).map(|s| s.value).sum()
}

pub fn select<'a>(
    samples: &'a [Sample],
    name: &'a str,
    filter: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name
            && filter
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_plain_samples() {
        let text = "# HELP x y\n# TYPE kvab_ready gauge\nkvab_ready 1\n\
                    kvab_routed_requests_total{code_class=\"2xx\",pod=\"local/a \\\"b\\\"\",requested=\"none\",served=\"fs\"} 7\n\
                    envoy_x{a=\"1\",} 2.5e1\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "kvab_ready");
        assert_eq!(samples[1].labels["pod"], "local/a \"b\"");
        assert_eq!(
            sum(&samples, "kvab_routed_requests_total", &[("served", "fs")]),
            7.0
        );
        assert_eq!(
            sum(
                &samples,
                "kvab_routed_requests_total",
                &[("served", "nvlink")]
            ),
            0.0
        );
        assert_eq!(samples[2].value, 25.0);
    }

    #[test]
    fn label_values_round_trip_from_the_prometheus_encoder() {
        // Braces, quotes, backslashes and newlines in a value: the exposition escapes only `\`, `"` and
        // newline, so a `}` inside quotes must not end the label set.
        let hostile = ["a}b", "{x=\"1\"}", "back\\slash", "two\nlines", "} 99", ""];
        let registry = prometheus::Registry::new();
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new("kvab_hostile_total", "labels that look like syntax"),
            &["pod", "n"],
        )
        .unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        for (i, value) in hostile.iter().enumerate() {
            counter
                .with_label_values(&[*value, i.to_string().as_str()])
                .inc_by(i as u64 + 1);
        }
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let samples = parse(&String::from_utf8(text).unwrap());
        assert_eq!(samples.len(), hostile.len());
        for (i, value) in hostile.iter().enumerate() {
            let n = i.to_string();
            assert_eq!(
                sum(&samples, "kvab_hostile_total", &[("pod", value), ("n", &n)]),
                i as f64 + 1.0,
                "pod={value:?}"
            );
        }
    }
}
