//! The filter ↔ sidecar wire contract.
//!
//! These types are the public JSON shapes the sidecar (`kvab serve`) serves and the filter reads. The crate
//! depends on serde alone so that it also builds for `wasm32-wasip1`. Deserialization ignores unknown fields
//! on purpose: a newer sidecar may add fields without breaking an older filter.

use std::collections::BTreeMap;

pub mod arm;
pub mod metrics;
pub mod report;

pub use arm::{ArmName, ArmNameError, ARM_NAME_PATTERN, ARM_NAME_RULE, MAX_ARM_NAME_LEN};

use serde::{Deserialize, Serialize};

/// The arm header's default name (the filter's `header`, the tools' `--header`): the request header that
/// names the arm, and the response header that tags the arm that served.
pub const ARM_HEADER: &str = "x-kv-backend";

/// Path of the endpoint map on the sidecar.
pub const ENDPOINTS_PATH: &str = "/v1/endpoints";

/// The response header in which the filter names the upstream endpoint that served a request:
/// the arm header (`x-kv-backend` by default) with `-endpoint` appended.
pub fn endpoint_header(arm_header: &str) -> String {
    format!("{arm_header}-endpoint")
}

/// The request and response header in which the filter says how the arm was chosen.
pub fn source_header(arm_header: &str) -> String {
    format!("{arm_header}-source")
}

/// FNV-1a, 64 bit. The filter's session-key hash (which arm a key sticks to) and the sidecar's map version
/// (the ETag a restarted sidecar must reproduce) are both built on it, so both are stable across releases.
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash: u64, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// Largest endpoint map a filter reads (a 10,000-pod map is about 0.8 MB); a larger answer is
/// refused without being copied into the filter.
pub const MAX_MAP_BYTES: usize = 16 << 20;

/// `GET /v1/endpoints`: which proxy endpoints serve which arm.
///
/// Every configured arm is present in `backends`, even when it has no endpoints, so that a reader can tell
/// "arm with no endpoints" from "unknown arm".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointMap {
    /// Content version: changes exactly when `backends` changes. Also the (quoted) `ETag` of the response.
    pub version: String,
    /// RFC 3339 time at which this content was first published.
    pub generated_at: String,
    /// Arm name (canonical, e.g. `nvlink`, `fs`) → its endpoints.
    pub backends: BTreeMap<String, Backend>,
}

/// The endpoints of one arm, sorted by pod (namespace/name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub endpoints: Vec<Endpoint>,
}

/// One proxy endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ip:port` the proxy listens on (IPv6 addresses are bracketed: `[fd00::1]:8080`).
    pub address: String,
    /// `namespace/name` of the pod (or the name given in a static configuration).
    pub pod: String,
    /// True when the endpoint may receive traffic (for pods: has an IP, Running, Ready, not terminating).
    pub ready: bool,
}

/// Body of every error answer of the sidecar: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_synced`, `not_found`, `method_not_allowed`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_map_has_the_documented_json_shape() {
        let map = EndpointMap {
            version: "abc".into(),
            generated_at: "2026-01-01T00:00:00Z".into(),
            backends: BTreeMap::from([
                (
                    "nvlink".to_string(),
                    Backend {
                        endpoints: vec![Endpoint {
                            address: "10.0.0.5:8080".into(),
                            pod: "llm-d-vllm/vllm-p2p-proxy-abc".into(),
                            ready: true,
                        }],
                    },
                ),
                ("fs".to_string(), Backend::default()),
            ]),
        };
        let json: serde_json::Value = serde_json::to_value(&map).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": "abc",
                "generated_at": "2026-01-01T00:00:00Z",
                "backends": {
                    "fs": {"endpoints": []},
                    "nvlink": {"endpoints": [
                        {"address": "10.0.0.5:8080", "pod": "llm-d-vllm/vllm-p2p-proxy-abc", "ready": true}
                    ]}
                }
            })
        );
        let back: EndpointMap = serde_json::from_value(json).unwrap();
        assert_eq!(back, map);
    }

    #[test]
    fn unknown_fields_from_a_newer_sidecar_are_ignored() {
        let body = r#"{"version":"v","generated_at":"t","extra":1,
            "backends":{"fs":{"endpoints":[{"address":"a:1","pod":"p","ready":false,"zone":"z"}],"weight":3}}}"#;
        let map: EndpointMap = serde_json::from_str(body).unwrap();
        assert_eq!(map.backends["fs"].endpoints[0].address, "a:1");
    }

    #[test]
    fn error_body_shape() {
        let json = serde_json::to_string(&ErrorBody::new("not_synced", "waiting")).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"not_synced","message":"waiting"}}"#
        );
    }
}
