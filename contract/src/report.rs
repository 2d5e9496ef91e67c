//! `POST /v1/reports`: the filter's routing counts, sent to the sidecar on every tick.
//!
//! Each filter VM is one reporter with an id it never reuses, and every report carries the
//! reporter's cumulative totals since it started plus a sequence number. The sidecar keeps the
//! newest report per reporter and adds only the difference to the previous one, so a lost report
//! is made up by the next, a repeated or reordered one changes nothing, and a restarted VM (a new
//! reporter) starts from zero without touching what was counted before.

use serde::{Deserialize, Serialize};

/// Path of the report endpoint on the sidecar.
pub const REPORTS_PATH: &str = "/v1/reports";

/// Reports larger than this are refused (413) without being read further.
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// Longest reporter id accepted.
pub const MAX_REPORTER_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Unique per filter VM instance (never reused across restarts).
    pub reporter: String,
    /// Increases with every report this reporter sends; starts at 1.
    pub sequence: u64,
    /// When the reporter (the filter VM) started, Unix milliseconds. A sidecar that starts with no
    /// saved state takes the first report of a reporter older than itself as a baseline: those
    /// counts may already have been counted by the sidecar's previous run.
    pub started_at_ms: u64,
    /// Cumulative counts since the reporter started. An entry may be omitted (zero, or unchanged
    /// since the reporter's last acknowledged report): the sidecar keeps its last total.
    pub totals: Vec<RoutedCount>,
}

/// Requests counted by the filter, keyed the way the sidecar exports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutedCount {
    /// Arm the request was tagged with, or `none`.
    pub requested: String,
    /// Arm of the endpoint that served it per the endpoint map, `unknown` (not in the map, or the
    /// map is stale), or `none` (no upstream answered).
    pub served: String,
    /// Upstream `ip:port` that served it, `""` when none did.
    pub endpoint: String,
    /// `1xx` … `5xx`, or `none` when the stream ended without a response status.
    pub code_class: String,
    pub count: u64,
}

/// Values a report may use besides the configured arm names: `requested` of untagged traffic and `served`
/// when no upstream answered (`none`), `served` by an endpoint outside the map (`unknown`).
pub const NO_ARM: &str = "none";
pub const UNKNOWN_ARM: &str = "unknown";
/// Names no arm may take, in the filter's or the sidecar's configuration: they would read as the above.
pub const RESERVED_ARM_NAMES: [&str; 2] = [NO_ARM, UNKNOWN_ARM];
/// `code_class` of a stream that ended without a response status.
pub const NO_CODE_CLASS: &str = "none";
pub const CODE_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", NO_CODE_CLASS];

/// The report token (`Authorization: Bearer …`), as both sides accept it: 16 to 256 printable ASCII
/// characters without spaces. The filter's `sidecar.reportToken` and the sidecar's `reports.token_file`.
pub const MIN_REPORT_TOKEN_LEN: usize = 16;
pub const MAX_REPORT_TOKEN_LEN: usize = 256;

pub fn is_report_token(token: &str) -> bool {
    (MIN_REPORT_TOKEN_LEN..=MAX_REPORT_TOKEN_LEN).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_graphic())
}
/// Endpoint of requests counted after a reporter's endpoint table was full, or served by an
/// upstream whose address is not `ip:port` (e.g. an Envoy internal address).
pub const OVERFLOW_ENDPOINT: &str = "other";
/// Longest endpoint accepted (a bracketed IPv6 address with a port is at most 47 bytes).
pub const MAX_ENDPOINT_LEN: usize = 64;

/// The endpoint values a report may carry: `ip:port` (IPv6 in brackets), [`OVERFLOW_ENDPOINT`],
/// or empty (no upstream answered). The filter folds any other upstream address into
/// [`OVERFLOW_ENDPOINT`] before reporting, because the sidecar refuses a report with any other value.
pub fn is_endpoint(endpoint: &[u8]) -> bool {
    endpoint.is_empty() || endpoint == OVERFLOW_ENDPOINT.as_bytes() || is_socket_address(endpoint)
}

/// Shaped like `ip:port`: hex digits, dots, colons and brackets only, with a colon, bounded length.
pub fn is_socket_address(endpoint: &[u8]) -> bool {
    !endpoint.is_empty()
        && endpoint.len() <= MAX_ENDPOINT_LEN
        && endpoint.contains(&b':')
        && endpoint
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b".:[]".contains(b))
}

/// The sidecar's answer to a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    /// `applied` (newer than anything seen from this reporter), `baselined` (a first report taken as
    /// the starting point, see `started_at_ms`), `duplicate` (same sequence as the newest) or
    /// `stale` (older than the newest). All are 200: the reporter moves on.
    pub result: String,
}

/// The results of an accepted report, as [`ReportAck::result`].
pub const ACK_RESULTS: [&str; 4] = ["applied", "baselined", "duplicate", "stale"];

/// True when `body` is the sidecar's answer to an accepted report: `{"result":"<one of
/// ACK_RESULTS>"}`, compact, as the sidecar writes it. Only then may a reporter leave the totals it
/// sent out of later reports; a 200 from anything else (a proxy, garbage) proves nothing.
pub fn is_ack(body: &[u8]) -> bool {
    body.strip_prefix(b"{\"result\":\"")
        .and_then(|rest| rest.strip_suffix(b"\"}"))
        .is_some_and(|result| ACK_RESULTS.iter().any(|r| r.as_bytes() == result))
}

#[cfg(test)]
mod ack_tests {
    use super::*;

    #[test]
    fn only_the_sidecar_s_own_answers_are_acks() {
        for result in ACK_RESULTS {
            let ack = ReportAck {
                result: result.into(),
            };
            assert!(
                is_ack(&serde_json::to_vec(&ack).unwrap_or_default()),
                "{result}"
            );
        }
        for other in [
            &b""[..],
            b"<html>not a map</html>",
            b"{\"result\":\"invalid\"}",
            b"{\"result\":\"applied\"} ",
            b"{}",
        ] {
            assert!(!is_ack(other), "{other:?}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_ip_port_other_or_empty() {
        for good in ["", "other", "10.0.0.5:8080", "[fd00::5]:8080"] {
            assert!(is_endpoint(good.as_bytes()), "{good:?}");
        }
        let long = format!("{}:1", "1".repeat(MAX_ENDPOINT_LEN));
        for bad in [
            "others",
            "10.0.0.5",
            "pod-a:8080",
            "envoy://x",
            " 10.0.0.5:80",
            &long,
        ] {
            assert!(!is_endpoint(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_endpoint(b"10.0.0.5:80\xff"));
    }
}
