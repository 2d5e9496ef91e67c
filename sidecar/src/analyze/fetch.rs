//! The queries of a run and their answers, from whichever `Source`: what analyze asks (docs/analyze.md,
//! "What it queries"), in order, each kept for the report.

use super::options::AnalyzeArgs;
use super::prometheus::Labels;
use super::series::Samples;
use super::source::Source;
use kvab_contract::metrics::{self, label};
use kvab_judge::report::production::Window;

/// Runs a query, keeping it for the report.
struct Queries<'a> {
    source: &'a mut Source,
    selector: String,
    range: String,
    run: Vec<String>,
}

impl Queries<'_> {
    /// `sum by (<by>) (increase(<metric>{<selector>}[<window>]))`.
    async fn increase(&mut self, metric: &str, by: &str) -> Result<Vec<(Labels, f64)>, String> {
        let selector = self.selector.clone();
        self.increase_with(metric, by, &selector).await
    }

    async fn increase_with(
        &mut self,
        metric: &str,
        by: &str,
        selector: &str,
    ) -> Result<Vec<(Labels, f64)>, String> {
        let query = format!(
            "sum by ({by}) (increase({metric}{{{selector}}}[{}]))",
            self.range
        );
        self.run.push(query.clone());
        self.source.vector(&query).await
    }

    /// vLLM's own histogram per arm (seconds, as `_ms` here): by `--vllm-selector` per arm when given, else
    /// grouped by `--vllm-arm-label`. Empty when vLLM is not scraped (vLLM's series are optional).
    async fn vllm(
        &mut self,
        metric: &str,
        args: &AnalyzeArgs,
    ) -> Result<Vec<(Labels, f64)>, String> {
        let mut samples = Vec::new();
        if args.vllm_selector.is_empty() {
            let by = format!("{}, le", args.vllm_arm_label);
            for (mut labels, value) in self.increase_with(metric, &by, "").await? {
                let arm = labels.remove(&args.vllm_arm_label).unwrap_or_default();
                labels.insert(label::BACKEND.into(), arm);
                samples.push((labels, value));
            }
        } else {
            for (arm, selector) in &args.vllm_selector {
                for (mut labels, value) in self.increase_with(metric, "le", selector).await? {
                    labels.insert(label::BACKEND.into(), arm.clone());
                    samples.push((labels, value));
                }
            }
        }
        // Seconds to milliseconds, on the finite bucket bounds (any other `le` is left for
        // `Histogram::from_cumulative` to judge).
        for (labels, _) in &mut samples {
            if let Some(le) = labels.get_mut("le") {
                if let Some(seconds) = le.parse::<f64>().ok().filter(|s| s.is_finite()) {
                    *le = format!("{}", seconds * 1000.0);
                }
            }
        }
        Ok(samples)
    }

    /// As `increase`, with "no series" an error naming the query: the metric is not scraped at all.
    async fn required(&mut self, metric: &str, by: &str) -> Result<Vec<(Labels, f64)>, String> {
        let result = self.increase(metric, by).await?;
        if result.is_empty() {
            return Err(format!(
                "query {}: no series in the window (is the gateway's /stats/prometheus scraped, and does \
                 --selector match it?)",
                self.run.last().map_or("", String::as_str)
            ));
        }
        Ok(result)
    }
}

/// What the queries answered, before any judging.
pub struct Answers {
    pub duration: Samples,
    pub ttfb: Samples,
    pub requests: Samples,
    pub responses: Samples,
    pub served: Samples,
    pub routed: Samples,
    /// vLLM's histograms, (report name, metric, samples), empty where not scraped.
    pub vllm: Vec<(&'static str, &'static str, Samples)>,
}

/// Asks `source` every query of a run over `window`: the answers, and the queries in the order asked.
pub async fn fetch(
    source: &mut Source,
    args: &AnalyzeArgs,
    window: &Window,
) -> Result<(Answers, Vec<String>), String> {
    let mut q = Queries {
        source,
        selector: args.selector.clone(),
        range: format!("{}s", window.seconds),
        run: Vec::new(),
    };
    let mut answers = Answers {
        duration: q
            .required(metrics::REQUEST_DURATION_BUCKET, "backend, source, le")
            .await?,
        ttfb: q
            .required(metrics::TIME_TO_FIRST_BYTE_BUCKET, "backend, source, le")
            .await?,
        requests: q.required(metrics::REQUESTS, "backend, source").await?,
        responses: q
            .required(metrics::RESPONSES, "backend, source, code_class")
            .await?,
        served: q.increase(metrics::SERVED, "requested, served").await?,
        routed: q.increase(metrics::ROUTED_REQUESTS, "requested").await?,
        vllm: Vec::new(),
    };
    // vLLM's own latencies per arm (vllm/v1/metrics: these three names on current vLLM), when scraped.
    for (name, metric) in [
        ("vllm_ttft_ms", "vllm:time_to_first_token_seconds_bucket"),
        ("vllm_itl_ms", "vllm:inter_token_latency_seconds_bucket"),
        ("vllm_e2e_ms", "vllm:e2e_request_latency_seconds_bucket"),
    ] {
        let samples = q.vllm(metric, args).await?;
        answers.vllm.push((name, metric, samples));
    }
    Ok((answers, q.run))
}
