//! Reads the Prometheus text format (`kvab serve` /metrics, Envoy /stats/prometheus) into samples.

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
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim_start_matches([',', ' ']);
    while !rest.is_empty() {
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
        rest = after[end + 1..].trim_start_matches([',', ' ']);
    }
    Some(labels)
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
}
