//! `POST /v1/reports`: the filter's routing counts in, `kvab_routed_requests_total` out.
//!
//! Across a restart the counters must neither go back (Prometheus would take it for a reset and
//! `rate()` would count everything again) nor count anything twice. So a count is visible on
//! `/metrics` if and only if it is in the saved ledger: a report is applied to a copy of the
//! ledger, the copy is saved (with `reports.state_file`), and only then does it replace the ledger
//! and get published, with no await in between. That sequence runs on a task of its own, so a
//! client that goes away mid-report (the filter's call timeout) cannot stop it half done; a failed
//! save answers 503 and changes nothing, and the filter's next cumulative report applies it once.
//! Without a state file a restarted sidecar starts at zero and takes the first report of every
//! filter VM older than itself as a baseline: it may have been counted by the previous run, and
//! counting it again is worse than missing the requests of the seconds the sidecar was down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kvab_contract::report::{Report, ReportAck, MAX_REPORT_BYTES};
use warp::http::StatusCode;

use crate::ledger::{Ledger, Outcome};
use crate::state::{RoutedCounts, State};

pub struct Reports {
    /// The ledger as saved and published. Locked across apply, save and publish, so reports are
    /// applied one at a time.
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

fn counts(ledger: &Ledger) -> RoutedCounts {
    RoutedCounts {
        counters: ledger.routed().map(|(k, v)| (k.clone(), v)).collect(),
        reporters: ledger.reporters(),
    }
}

impl Reports {
    /// Restores the ledger from `state_file` when it exists and publishes its counts. A file that
    /// cannot be read as a ledger is moved aside (`.corrupt`) and the sidecar starts as if it had none.
    pub fn open(
        arms: Vec<String>,
        state_file: Option<PathBuf>,
        token: Option<String>,
        state: &State,
    ) -> anyhow::Result<Reports> {
        let restored = match &state_file {
            Some(path) => restore(path)?,
            None => None,
        };
        let baseline_before_ms = restored.is_none().then(now_ms);
        let ledger = restored.unwrap_or_default();
        state.publish_routed(counts(&ledger));
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
        self: &Arc<Self>,
        state: &Arc<State>,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: S,
    ) -> Answer
    where
        S: Stream<Item = Result<B, warp::Error>> + Unpin,
        B: bytes::Buf,
    {
        if let Some(token) = &self.token {
            let offered = authorization
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(offered.trim().as_bytes(), token.as_bytes()) {
                return reject(
                    state,
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
                state,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "reports are JSON: send content-type: application/json".into(),
                "invalid",
            );
        }
        let bytes = match read_capped(body, MAX_REPORT_BYTES).await {
            Ok(bytes) => bytes,
            Err(BodyError::TooLarge) => {
                return reject(
                    state,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("a report is at most {MAX_REPORT_BYTES} bytes"),
                    "too_large",
                )
            }
            Err(BodyError::TimedOut) => {
                return reject(
                    state,
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the report body did not arrive within {} s",
                        crate::server::BODY_READ_TIMEOUT.as_secs()
                    ),
                    "invalid",
                )
            }
            Err(BodyError::Broken(e)) => {
                return reject(
                    state,
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
                    state,
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    e.to_string(),
                    "invalid",
                )
            }
        };
        // From here on the report is applied to completion whatever happens to the request.
        let (reports, task_state) = (Arc::clone(self), Arc::clone(state));
        match tokio::spawn(async move { reports.apply(&task_state, report).await }).await {
            Ok(answer) => answer,
            Err(e) => {
                log::error!("applying a report failed: {e}");
                Answer {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    body: Err(("internal", "applying the report failed".into())),
                }
            }
        }
    }

    /// Apply to a copy, save the copy, then make it the ledger and publish it.
    async fn apply(&self, state: &State, report: Report) -> Answer {
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
        let mut next = ledger.clone();
        let outcome = match next.apply(&report, &self.arms, &pod_of, baseline) {
            Ok(outcome) => outcome,
            Err(message) => {
                // Only the refusal streak changed (not saved): keep it to name a shared id.
                *ledger = next;
                log::warn!("report from {:?} refused: {message}", report.reporter);
                return reject(
                    state,
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    message,
                    "invalid",
                );
            }
        };
        if matches!(outcome, Outcome::Applied(_) | Outcome::Baselined) {
            if let Some(path) = &self.state_file {
                if let Err(e) = save(path, &next).await {
                    state.metrics.state_write_errors.inc();
                    log::error!(
                        "cannot save the report state to {} (key reports.state_file): {e:#}; report refused, the filter sends it again",
                        path.display()
                    );
                    return reject(
                        state,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "state_unavailable",
                        format!("cannot save the report state: {e:#}; send the report again"),
                        "unsaved",
                    );
                }
            }
            // Saved: now, and not before, it is the ledger and visible.
            state.publish_routed(counts(&next));
            *ledger = next;
        }
        state
            .metrics
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

fn reject(
    state: &State,
    status: StatusCode,
    code: &'static str,
    message: String,
    result: &str,
) -> Answer {
    state
        .metrics
        .reports_received
        .with_label_values(&[result])
        .inc();
    Answer {
        status,
        body: Err((code, message)),
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

/// Why a body could not be read whole.
enum BodyError {
    TooLarge,
    TimedOut,
    Broken(warp::Error),
}

/// The body, read until `limit` bytes or `BODY_READ_TIMEOUT` (reading stops there).
async fn read_capped<S, B>(mut body: S, limit: usize) -> Result<Bytes, BodyError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    let deadline = tokio::time::Instant::now() + crate::server::BODY_READ_TIMEOUT;
    let mut out = Vec::new();
    loop {
        let mut chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Err(_) => return Err(BodyError::TimedOut),
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(chunk)) => chunk.map_err(BodyError::Broken)?,
        };
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            if out.len() + piece.len() > limit {
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
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

/// Distinguishes this process's temporary files: a save cut off by a crash never shares a name
/// with the next one.
static SAVES: AtomicU64 = AtomicU64::new(0);

/// Writes the ledger to a temporary file next to `path`, syncs it, renames it into place and syncs
/// the directory, so a crash at any point leaves the old or the new state, never half of one.
async fn save(path: &Path, ledger: &Ledger) -> anyhow::Result<()> {
    let json = serde_json::to_vec(ledger)?;
    let path = path.to_path_buf();
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SAVES.fetch_add(1, Ordering::Relaxed)
    ));
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use std::io::Write;
        let written = (|| -> anyhow::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    })
    .await?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;
    use std::time::Duration;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvab-reports-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn body(reporter: &str, sequence: u64, count: u64) -> Vec<u8> {
        format!(
            r#"{{"reporter":"{reporter}","sequence":{sequence},"started_at_ms":{},"totals":[{{"requested":"fs","served":"fs","endpoint":"","code_class":"2xx","count":{count}}}]}}"#,
            u64::MAX / 2
        )
        .into_bytes()
    }

    fn receive<'a>(
        reports: &'a Arc<Reports>,
        state: &'a Arc<State>,
        body: Vec<u8>,
    ) -> impl Future<Output = Answer> + 'a {
        let stream = futures::stream::iter([Ok::<_, warp::Error>(Bytes::from(body))]);
        reports.receive(state, None, Some("application/json"), stream)
    }

    /// `kvab_routed_requests_total` summed, as a scrape of /metrics shows it.
    fn shown(state: &State) -> f64 {
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        text.lines()
            .filter(|l| l.starts_with("kvab_routed_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    fn saved(path: &Path) -> f64 {
        restore(path)
            .unwrap()
            .map_or(0.0, |l| l.routed().map(|(_, n)| n as f64).sum())
    }

    fn open(state_file: Option<PathBuf>, state: &State) -> Arc<Reports> {
        Arc::new(
            Reports::open(vec!["nvlink".into(), "fs".into()], state_file, None, state).unwrap(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_cut_off_at_any_point_is_shown_exactly_when_saved() {
        let dir = scratch("cut");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let waker = futures::task::noop_waker();
        for sequence in 1..=150u64 {
            // The client goes away after 0 to 11 polls, some of them with the save under way.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let polls = rng % 12;
            {
                let mut answer = pin!(receive(
                    &reports,
                    &state,
                    body("vm", sequence, sequence * 10)
                ));
                for _ in 0..polls {
                    if answer
                        .as_mut()
                        .poll(&mut Context::from_waker(&waker))
                        .is_ready()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_micros(rng % 400)).await;
                }
            }
            // Under the ledger's lock no report is half applied: shown == ledger == saved.
            let ledger = reports.ledger.lock().await;
            let kept: f64 = ledger.routed().map(|(_, n)| n as f64).sum();
            assert_eq!(
                shown(&state),
                kept,
                "after report {sequence} cut at poll {polls}"
            );
            assert_eq!(
                saved(&path),
                kept,
                "after report {sequence} cut at poll {polls}"
            );
        }
        // The filter's next cumulative report brings what the cut ones did not.
        let answer = receive(&reports, &state, body("vm", 151, 1510)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 1510.0);
        assert_eq!(saved(&path), 1510.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_failed_save_answers_503_and_changes_nothing() {
        let dir = scratch("unsaved");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        // A non-empty directory where the file goes: the rename into place fails.
        std::fs::create_dir_all(path.join("in-the-way")).unwrap();
        let answer = receive(&reports, &state, body("vm", 1, 100)).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(matches!(answer.body, Err(("state_unavailable", _))));
        assert_eq!(shown(&state), 0.0);
        assert_eq!(state.metrics.state_write_errors.get(), 1);
        assert_eq!(reports.ledger.lock().await.reporters(), 0);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("reports.json")]);
        // Once the state can be written, the filter's resend counts it exactly once.
        std::fs::remove_dir_all(&path).unwrap();
        let answer = receive(&reports, &state, body("vm", 2, 100)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 100.0);
        assert_eq!(saved(&path), 100.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn metrics_saturate_like_the_ledger() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(None, &state);
        for (vm, count) in [("a", u64::MAX - 1), ("b", 10)] {
            let answer = receive(&reports, &state, body(vm, 1, count)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        // The ledger stays at 2^64-1, and so does /metrics (a wrapping counter would show 8).
        assert_eq!(shown(&state), u64::MAX as f64);
    }
}
