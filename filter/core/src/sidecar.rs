//! Where the filter reaches `kvab serve`: an Envoy cluster (never a URL: proxy-wasm calls go to
//! clusters), how often, and how long a map stays trustworthy.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// Envoy cluster name; under Istio `outbound|PORT||SERVICE.NAMESPACE.svc.cluster.local`.
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Map refresh and report interval.
    pub refresh_ms: u64,
    /// Timeout of one call.
    pub timeout_ms: u64,
    /// A map not confirmed by the sidecar for this long is treated as unknown.
    pub stale_after_ms: u64,
    /// Sent as `Authorization: Bearer …` with reports, when the sidecar requires one.
    pub report_token: Option<String>,
}

impl Sidecar {
    /// `SERVICE:PORT` from an Istio cluster name, else the cluster name itself.
    pub fn default_authority(cluster: &str) -> String {
        let mut parts = cluster.split('|');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("outbound"), Some(port), Some(_subset), Some(host), None)
                if !host.is_empty() && !port.is_empty() =>
            {
                format!("{host}:{port}")
            }
            _ => cluster.to_owned(),
        }
    }
}
