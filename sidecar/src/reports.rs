//! `POST /v1/reports`: the filter's routing counts in, `kvab_routed_requests_total` out.
//!
//! Across a restart the counters must neither go back (Prometheus would take it for a reset and
//! `rate()` would count everything again) nor count anything twice. With `reports.state_file`
//! the ledger is written (atomically) before a report's increments show on `/metrics`, and read
//! back at start, so the counters continue where they were. Without it, a restarted sidecar
//! starts at zero and takes the first report of every filter VM older than itself as a baseline:
//! it may have been counted by the previous run, and counting it again is worse than missing the
//! requests of the seconds the sidecar was down.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kvab_contract::report::{Report, ReportAck, MAX_REPORT_BYTES};
use warp::http::StatusCode;

use crate::ledger::{Ledger, Outcome};
use crate::metrics::Metrics;
use crate::state::State;

pub struct Reports {
    ledger: tokio::sync::Mutex<Ledger>,
    arms: Vec<String>,
    state_file: Option<PathBuf>,
    /// When set, a report must carry `Authorization: Bearer <token>`.
    token: Option<String>,
    /// Set when no saved ledger was restored: reporters started before this time may have been
    /// counted by a previous run, so their first report is a baseline.
    baseline_before_ms: Option<u64>,
}

/// An answer for the HTTP layer: status, machine-readable code or result, message.
pub struct Answer {
    pub status: StatusCode,
    pub body: Result<ReportAck, (&'static str, String)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Reports {
    /// Restores the ledger from `state_file` when it exists. A file that cannot be read as a
    /// ledger is moved aside (`.corrupt`) and the sidecar starts as if it had none.
    pub fn open(
        arms: Vec<String>,
        state_file: Option<PathBuf>,
        token: Option<String>,
        metrics: &Metrics,
    ) -> anyhow::Result<Reports> {
        let restored = match &state_file {
            Some(path) => restore(path)?,
            None => None,
        };
        let baseline_before_ms = restored.is_none().then(now_ms);
        let ledger = restored.unwrap_or_default();
        for (key, count) in ledger.routed() {
            metrics
                .routed_requests
                .with_label_values(&[&key.requested, &key.served, &key.pod, &key.code_class])
                .inc_by(count);
        }
        metrics
            .reporters
            .set(i64::try_from(ledger.reporters()).unwrap_or(i64::MAX));
        Ok(Reports {
            ledger: tokio::sync::Mutex::new(ledger),
            arms,
            state_file,
            token,
            baseline_before_ms,
        })
    }

    /// Reads, checks and applies one report body.
    pub async fn receive<S, B>(
        &self,
        state: &State,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: S,
    ) -> Answer
    where
        S: Stream<Item = Result<B, warp::Error>> + Unpin,
        B: bytes::Buf,
    {
        let metrics = &state.metrics;
        let reject = |status, code, message: String, result: &str| {
            metrics.reports_received.with_label_values(&[result]).inc();
            Answer {
                status,
                body: Err((code, message)),
            }
        };
        if let Some(token) = &self.token {
            let offered = authorization
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(offered.trim().as_bytes(), token.as_bytes()) {
                return reject(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "reports need Authorization: Bearer <the token of reports.token_file>".into(),
                    "unauthorized",
                );
            }
        }
        if !content_type.is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim() == "application/json")
        }) {
            return reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "reports are JSON: send content-type: application/json".into(),
                "invalid",
            );
        }
        let bytes = match read_capped(body, MAX_REPORT_BYTES).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return reject(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("a report is at most {MAX_REPORT_BYTES} bytes"),
                    "too_large",
                )
            }
            Err(e) => {
                return reject(
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    format!("cannot read the body: {e}"),
                    "invalid",
                )
            }
        };
        let report: Report = match serde_json::from_slice(&bytes) {
            Ok(report) => report,
            Err(e) => {
                return reject(
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    e.to_string(),
                    "invalid",
                )
            }
        };
        let snapshot = state.snapshot();
        let pod_of = |address: &str| {
            snapshot
                .as_ref()
                .and_then(|s| s.pod_by_address.get(address).cloned())
        };
        let baseline = self
            .baseline_before_ms
            .is_some_and(|since| report.started_at_ms < since);

        let mut ledger = self.ledger.lock().await;
        let outcome = match ledger.apply(&report, &self.arms, &pod_of, baseline) {
            Ok(outcome) => outcome,
            Err(message) => {
                log::warn!("report from {:?} refused: {message}", report.reporter);
                return reject(
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    message,
                    "invalid",
                );
            }
        };
        if matches!(outcome, Outcome::Applied(_) | Outcome::Baselined) {
            // Saved before the increments show, so /metrics never shows a count a restart would lose.
            if let Some(path) = &self.state_file {
                if let Err(e) = save(path, &ledger).await {
                    metrics.state_write_errors.inc();
                    log::error!(
                        "cannot save the report state to {} (key reports.state_file): {e:#}",
                        path.display()
                    );
                }
            }
        }
        if let Outcome::Applied(increments) = &outcome {
            for (key, n) in increments {
                metrics
                    .routed_requests
                    .with_label_values(&[&key.requested, &key.served, &key.pod, &key.code_class])
                    .inc_by(*n);
            }
        }
        metrics
            .reporters
            .set(i64::try_from(ledger.reporters()).unwrap_or(i64::MAX));
        metrics
            .reports_received
            .with_label_values(&[outcome.label()])
            .inc();
        Answer {
            status: StatusCode::OK,
            body: Ok(ReportAck {
                result: outcome.label().to_owned(),
            }),
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
fn same_secret(offered: &[u8], expected: &[u8]) -> bool {
    offered.len() == expected.len()
        && offered
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The body, or `None` when it is longer than `limit` (reading stops there).
async fn read_capped<S, B>(mut body: S, limit: usize) -> Result<Option<Bytes>, warp::Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk?;
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            if out.len() + piece.len() > limit {
                return Ok(None);
            }
            out.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(Some(Bytes::from(out)))
}

fn restore(path: &Path) -> anyhow::Result<Option<Ledger>> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!(
            "cannot read {} (key reports.state_file): {e}",
            path.display()
        ),
    };
    match serde_json::from_slice::<Ledger>(&text) {
        Ok(ledger) => {
            log::info!(
                "report state restored from {}: {} reporters",
                path.display(),
                ledger.reporters()
            );
            Ok(Some(ledger))
        }
        Err(e) => {
            let aside = path.with_extension("corrupt");
            log::error!(
                "report state {} is unreadable ({e}); moved to {} and starting without it",
                path.display(),
                aside.display()
            );
            std::fs::rename(path, &aside)?;
            Ok(None)
        }
    }
}

/// Writes the ledger next to `path` and renames it into place, so a crash leaves the old or the
/// new state, never half of one.
async fn save(path: &Path, ledger: &Ledger) -> anyhow::Result<()> {
    let json = serde_json::to_vec(ledger)?;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    })
    .await?
}
