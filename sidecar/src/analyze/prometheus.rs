//! Prometheus's HTTP API (`GET /api/v1/query`): instant vectors, every failure one line naming the query.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;

use kvab_serve::client::{HttpClient, Request};

pub type Labels = BTreeMap<String, String>;

/// The most bytes of one answer read: 16 MiB. kvab's queries answer a few hundred series of about 200
/// bytes (buckets × arms); 16 MiB is some 80,000 series, far beyond any layout of kvab's metrics, and
/// bounds the memory of a run (the whole answer is parsed at once).
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Server-provided text as a message may print it: control characters (C0, DEL, C1: ESC, BEL, line
/// breaks...) written as escapes (`\u{1b}`, `\n`), so an answer cannot drive the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub struct Prometheus {
    client: HttpClient,
    base: String,
    /// Evaluation time of every query, Unix seconds.
    time: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    metric: Labels,
    value: (f64, String),
}

impl Prometheus {
    pub fn new(client: HttpClient, base: &str, time: f64) -> Self {
        Prometheus {
            client: client.with_max_body(MAX_ANSWER_BYTES),
            base: base.trim_end_matches('/').to_string(),
            time,
        }
    }

    /// The `time` parameter of every query: the evaluation time, Unix seconds to the millisecond.
    pub fn time(&self) -> String {
        evaluation_time(self.time)
    }

    /// An instant vector query at the evaluation time: its samples, and the answer's body as it came
    /// (for `--save-answers`).
    pub async fn vector(&self, query: &str) -> Result<(Vec<(Labels, f64)>, Bytes), String> {
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("time", &self.time())
            .finish();
        let url = format!("{}/api/v1/query?{encoded}", self.base);
        let fail = |why: String| format!("query {query}: {}", printable(&why));
        let exchange = self.client.send(&Request::get(url)).await.map_err(fail)?;
        let samples = answer(&exchange.body, exchange.status).map_err(fail)?;
        Ok((samples, exchange.body))
    }
}

/// The `time` parameter of an instant query at `time` (Unix seconds), as kvab sends it: to the millisecond.
pub fn evaluation_time(time: f64) -> String {
    format!("{time:.3}")
}

/// Prometheus's answer to an instant query as samples, or why it is none (the answer's own text, to be
/// made printable).
pub(crate) fn answer(body: &[u8], status: u16) -> Result<Vec<(Labels, f64)>, String> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("status {status} and no Prometheus answer ({e})"))?;
    if answer.status != "success" {
        return Err(format!(
            "{}: {}",
            answer.error_type.unwrap_or_default(),
            answer.error.unwrap_or_default()
        ));
    }
    let data = answer.data.ok_or("no data in the answer")?;
    if data.result_type != "vector" {
        return Err(format!(
            "a {} where a vector was expected",
            data.result_type
        ));
    }
    data.result
        .into_iter()
        .map(|s| {
            let value = match s.value.1.as_str() {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
            };
            Ok((s.metric, value))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use kvab_serve::client::one_shot::{serve_once, Then};

    /// A server answering one request 400 with `body`, and a Prometheus client of it.
    async fn prometheus_answering(body: Vec<u8>) -> Prometheus {
        let mut answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        let url = serve_once(Then::Answer(answer)).await;
        let client = HttpClient::new(Duration::from_secs(10));
        Prometheus::new(client, &url, 1_796_252_038.6)
    }

    #[test]
    fn control_characters_become_escapes() {
        assert_eq!(
            printable("bad\u{1b}[2J\u{7}\u{9b}31m\nquery \u{7f}é"),
            "bad\\u{1b}[2J\\u{7}\\u{9b}31m\\nquery \\u{7f}é"
        );
    }

    #[tokio::test]
    async fn prometheus_error_text_reaches_the_terminal_printable() {
        let body = br#"{"status":"error","errorType":"bad_data","error":"parse error \u001b]0;pwned\u0007\u001b[2J"}"#;
        let error = prometheus_answering(body.to_vec())
            .await
            .vector("up")
            .await
            .unwrap_err();
        assert_eq!(
            error,
            r"query up: bad_data: parse error \u{1b}]0;pwned\u{7}\u{1b}[2J"
        );
    }

    #[tokio::test]
    async fn an_answer_over_the_cap_is_an_error_naming_the_query() {
        let error = prometheus_answering(vec![b' '; MAX_ANSWER_BYTES + 1])
            .await
            .vector("up")
            .await
            .unwrap_err();
        assert_eq!(error, "query up: the answer is longer than 16777216 bytes");
    }
}
