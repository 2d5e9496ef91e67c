//! Prometheus's HTTP API (`GET /api/v1/query`): instant vectors, every failure one line naming the query.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::client::{HttpClient, Request};

pub type Labels = BTreeMap<String, String>;

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
            client,
            base: base.trim_end_matches('/').to_string(),
            time,
        }
    }

    /// An instant vector query at the evaluation time.
    pub async fn vector(&self, query: &str) -> Result<Vec<(Labels, f64)>, String> {
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("time", &format!("{:.3}", self.time))
            .finish();
        let url = format!("{}/api/v1/query?{encoded}", self.base);
        let fail = |why: String| format!("query {query}: {why}");
        let exchange = self.client.send(&Request::get(url)).await.map_err(fail)?;
        let answer: Answer = serde_json::from_slice(&exchange.body).map_err(|e| {
            fail(format!(
                "status {} and no Prometheus answer ({e})",
                exchange.status
            ))
        })?;
        if answer.status != "success" {
            return Err(fail(format!(
                "{}: {}",
                answer.error_type.unwrap_or_default(),
                answer.error.unwrap_or_default()
            )));
        }
        let data = answer
            .data
            .ok_or_else(|| fail("no data in the answer".into()))?;
        if data.result_type != "vector" {
            return Err(fail(format!(
                "a {} where a vector was expected",
                data.result_type
            )));
        }
        data.result
            .into_iter()
            .map(|s| {
                let value = match s.value.1.as_str() {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v
                        .parse::<f64>()
                        .map_err(|e| fail(format!("value {v:?}: {e}")))?,
                };
                Ok((s.metric, value))
            })
            .collect()
    }
}
