//! What `kvab serve` publishes, as `State` holds it and `/metrics` and `/v1/endpoints` read it: the
//! endpoint-map snapshot, the probe results and the routing counts. Types only.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use jiff::Timestamp;
use kvab_contract::Endpoint;
use kvab_ledger::RoutedKey;

use crate::index::ArmCounts;

/// The routing counts `/metrics` shows: the report ledger as last saved (or as kept, without a
/// state file). Published whole, so a scrape never sees half a report.
#[derive(Debug, Clone, Default)]
pub struct RoutedCounts {
    pub counters: Vec<(RoutedKey, u64)>,
    pub reporters: usize,
    pub retired: usize,
    /// Per-reporter totals held, all reporters together.
    pub entries: usize,
}

/// One published endpoint map, serialized once and served as is until the content changes.
#[derive(Debug)]
pub struct Snapshot {
    /// Content hash of `backends`; the ETag is this value in quotes.
    pub version: String,
    pub etag: String,
    /// 1 for the first map, +1 at each content change.
    pub generation: u64,
    /// When this content was first published.
    pub generated_at: Timestamp,
    /// The JSON body of `GET /v1/endpoints`.
    pub body: Bytes,
    /// `(arm, endpoint)` for every listed endpoint, for the prober.
    pub endpoints: Vec<(String, Endpoint)>,
    /// Endpoint address → pod, for attributing reported requests.
    pub pod_by_address: HashMap<String, String>,
    pub counts: BTreeMap<String, ArmCounts>,
    pub missing_label: usize,
    pub unknown_arm: usize,
    /// When the source last completed a full sync (static: at start; Kubernetes: the last relist).
    pub last_sync: Timestamp,
}

/// Result of the last `GET <address><probe.path>` of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    /// HTTP status, or `None` when no HTTP answer came (refused, timeout, garbage).
    pub status: Option<u16>,
}

impl ProbeResult {
    pub fn up(&self) -> bool {
        self.status == Some(200)
    }
}
