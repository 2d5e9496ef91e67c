//! Every request the check sends, built in one place: the run sends these and `--dry-run` prints them, so
//! the two cannot disagree.

use serde_json::json;

use super::options::Options;
use kvab_serve::client::Request;

fn completion_body(options: &Options) -> serde_json::Value {
    json!({"model": options.model, "prompt": "Hello", "max_tokens": 5})
}

/// Step 1: a completion straight to an arm's proxy.
pub fn direct(options: &Options, proxy: &str) -> Request {
    Request::post_json(format!("{proxy}/v1/completions"), &completion_body(options))
}

/// Step 3: a completion through the gateway with the arm header set to `value`.
pub fn header(options: &Options, gateway: &str, value: &str) -> Request {
    Request::post_json(
        format!("{gateway}/v1/completions"),
        &completion_body(options),
    )
    .with_header(&options.header, value)
}

/// Step 4: one untagged request of the burst.
pub fn burst(options: &Options, gateway: &str) -> Request {
    let body = json!({
        "model": options.model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": options.stream,
    });
    Request::post_json(format!("{gateway}{}", options.burst_path), &body)
}

/// The endpoint map of `kvab serve`.
pub fn endpoint_map(sidecar: &str) -> Request {
    Request::get(format!("{sidecar}{}", kvab_contract::ENDPOINTS_PATH))
}

/// Prometheus metrics of `kvab serve` or of a proxy.
pub fn metrics(base: &str) -> Request {
    Request::get(format!("{base}/metrics"))
}

/// Envoy admin's statistics, where the filter's `kvab_served_total` is.
pub fn envoy_stats(admin: &str) -> Request {
    Request::get(format!("{admin}/stats/prometheus"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_request_carries_the_configured_header_and_the_burst_its_path() {
        let mut options = Options {
            header: "x-arm".into(),
            burst_path: "/v1/completions".into(),
            stream: true,
            ..Options::default()
        };
        let tagged = header(&options, "http://gw", "fs");
        assert_eq!(tagged.url, "http://gw/v1/completions");
        assert!(tagged.headers.contains(&("x-arm".into(), "fs".into())));
        let untagged = burst(&options, "http://gw");
        assert_eq!(untagged.url, "http://gw/v1/completions");
        assert!(String::from_utf8_lossy(&untagged.body).contains("\"stream\":true"));
        assert!(!untagged.headers.iter().any(|(name, _)| name == "x-arm"));
        options.model = "m".into();
        assert!(
            String::from_utf8_lossy(&direct(&options, "http://p").body).contains("\"model\":\"m\"")
        );
        assert_eq!(endpoint_map("http://s").url, "http://s/v1/endpoints");
    }
}
