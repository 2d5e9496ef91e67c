//! `POST /v1/reports`: the filter's routing counts in, `kvab_routed_requests_total` out.
//!
//! Across a restart the counters must neither go back (Prometheus would take it for a reset and
//! `rate()` would count everything again) nor count anything twice. So a count is visible on
//! `/metrics` if and only if it is durably in the ledger. One writer thread owns that sequence: it
//! takes the reports waiting (a batch), applies them to the ledger, appends them to the journal with
//! one sync (`kvab_ledger::store`), and only then publishes the ledger and answers; if the append fails it
//! undoes the batch and answers 503, and the filter's next cumulative reports apply it once. A
//! client that goes away (the filter's call timeout) leaves its report to the writer, which is never
//! interrupted. Without a state file a restarted sidecar starts at zero and takes the first report
//! of every filter VM older than itself as a baseline: it may have been counted by the previous
//! run, and counting it again is worse than missing the requests of the seconds the sidecar was down.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kvab_contract::report::{Report, ReportAck, MAX_REPORT_BYTES};
use tokio::sync::{mpsc, oneshot};
use warp::http::StatusCode;

use crate::published::RoutedCounts;
use crate::state::State;
use kvab_ledger::store::{OpenError, StateLock, Store};
use kvab_ledger::{Ledger, Limits};

mod writer;

use writer::Writer;

/// Reports waiting for the writer, at most; a sender waits beyond that (before anything changed).
const QUEUE: usize = 4096;
/// Reports being read, parsed or applied at once, at most: each holds its body (up to 1 MiB, about
/// 2 MiB while it grows) and its parsed form, so a flood of 1 MiB reports over the API listener's
/// 1024 connections would otherwise hold gigabytes; 64 of them peaked at 337 MiB (BENCHMARKS.md,
/// report ledger at its caps). Others wait before reading their body; a sender that waits past its own
/// timeout sends again later (the filter: on its next tick, the counts kept). Fewer (16) cut the
/// ordinary path's batches: 1,000 small reports a second over 64 connections waited 29 ms (p50)
/// instead of under 1.
const MAX_IN_FLIGHT: usize = 64;
/// Reports applied and synced together, at most.
const MAX_BATCH: usize = 512;
/// At a cap, a reporter idle this long (or `retire_after`, if shorter) is retired early to make room
/// for a new one: its counts stay; a filter VM with requests to report sends them within its
/// `refreshMs`, so one silent this long has nothing unacknowledged.
pub const EVICT_IDLE_AFTER: Duration = Duration::from_secs(600);

pub struct Reports {
    /// The writer's ledger, for tests: it holds the lock across apply, save and publish.
    #[cfg(test)]
    ledger: Arc<Mutex<Ledger>>,
    /// `None` once closed (on drop).
    jobs: Option<mpsc::Sender<Job>>,
    /// `MAX_IN_FLIGHT` permits, one held from reading a report's body to its answer.
    in_flight: Arc<tokio::sync::Semaphore>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// When set, a report must carry `Authorization: Bearer <token>`.
    token: Option<String>,
    /// Set when no saved ledger was restored: reporters started before this time may have been
    /// counted by a previous run, so their first report is a baseline.
    baseline_before_ms: Option<u64>,
    /// Set when the state could not be opened: every report is answered 503 with this code and message.
    refusal: Option<(&'static str, String)>,
    /// The state's lock, held while this process runs (also while refusing).
    _lock: Option<StateLock>,
}

/// The `[reports]` settings.
pub struct Settings {
    pub arms: Vec<String>,
    pub state_file: Option<PathBuf>,
    pub token: Option<String>,
    pub retire_after: Duration,
    /// `kvab serve --repair-state`: move damaged state files aside and start an empty ledger.
    pub repair: bool,
    /// `EVICT_IDLE_AFTER` (shorter in tests).
    pub evict_idle_after: Duration,
    /// `reports.max_reporters`, `reports.max_entries`.
    pub limits: Limits,
}

/// One report for the writer, and where its answer goes.
struct Job {
    report: Report,
    baseline: bool,
    answer: oneshot::Sender<Answer>,
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
        retired: ledger.retired(),
        entries: ledger.entries(),
    }
}

impl Reports {
    /// Restores the ledger from `state_file` (snapshot and journal) when there is one, publishes its
    /// counts and starts the writer. The only error is a state locked by another process (two writers
    /// would lose counts): a state that is damaged or cannot be opened is logged with its file and
    /// remedy, shown on `kvab_state_damaged` / `kvab_state_unavailable`, and every report is answered
    /// 503 meanwhile, while the endpoint maps, health and /metrics keep being served.
    pub fn open(settings: Settings, state: &Arc<State>) -> anyhow::Result<Reports> {
        let Some(path) = settings.state_file.clone() else {
            return Self::start(settings, None, None, state);
        };
        let opened = match kvab_ledger::store::lock(&path) {
            Err(OpenError::Locked(message)) => anyhow::bail!(message),
            Err(e) => Err((e, None)),
            // The lock stays held while refusing: a second process must not write meanwhile.
            Ok(lock) => match Store::open(&path, settings.repair) {
                Ok((ledger, store)) => Ok((lock, ledger, store)),
                Err(e) => Err((e, Some(lock))),
            },
        };
        match opened {
            Ok((lock, ledger, store)) => {
                if let Some(ledger) = &ledger {
                    log::info!(
                        "report state restored from {}: {} reporters",
                        path.display(),
                        ledger.reporters()
                    );
                }
                let mut reports = Self::start(settings, ledger, Some(store), state)?;
                reports._lock = Some(lock);
                Ok(reports)
            }
            Err((error, lock)) => {
                log::error!("{error}; the endpoint maps are served all the same");
                let code = match &error {
                    OpenError::Damaged { .. } => {
                        state.metrics.state_damaged.set(1);
                        "state_damaged"
                    }
                    _ => {
                        state.metrics.state_unavailable.set(1);
                        state
                            .metrics
                            .state_errors
                            .with_label_values(&["open"])
                            .inc();
                        "state_unavailable"
                    }
                };
                let mut reports = Self::start(settings, None, None, state)?;
                reports.refusal = Some((code, format!("{error}")));
                reports._lock = lock;
                Ok(reports)
            }
        }
    }

    /// Publishes the restored counts and starts the writer on `store` (`settings.state_file` is its path).
    fn start(
        settings: Settings,
        restored: Option<Ledger>,
        store: Option<Store>,
        state: &Arc<State>,
    ) -> anyhow::Result<Reports> {
        let Settings {
            arms,
            token,
            retire_after,
            evict_idle_after,
            limits,
            ..
        } = settings;
        state.metrics.set_ledger_limits(&limits);
        let baseline_before_ms = restored.is_none().then(now_ms);
        let ledger = restored.unwrap_or_default();
        state.publish_routed(counts(&ledger));
        let ledger = Arc::new(Mutex::new(ledger));
        #[cfg(test)]
        let writer_ledger = ledger.clone();
        let (jobs, queue) = mpsc::channel(QUEUE);
        let writer = Writer {
            ledger,
            arms,
            store,
            state: state.clone(),
            retire_after,
            evict_idle_after: evict_idle_after.min(retire_after),
            limits,
            started_ms: now_ms(),
            last_sweep_ms: now_ms(),
        };
        let writer = std::thread::Builder::new()
            .name("kvab-reports".into())
            .spawn(move || writer.run(queue))?;
        Ok(Reports {
            #[cfg(test)]
            ledger: writer_ledger,
            jobs: Some(jobs),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            writer: Some(writer),
            token,
            baseline_before_ms,
            refusal: None,
            _lock: None,
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
        let Ok(_in_flight) = self.in_flight.acquire().await else {
            return internal("the report writer stopped");
        };
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
        let parsed = serde_json::from_slice(&bytes);
        drop(bytes);
        let report: Report = match parsed {
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
        if let Some((code, message)) = &self.refusal {
            return reject(
                state,
                StatusCode::SERVICE_UNAVAILABLE,
                code,
                message.clone(),
                "unsaved",
            );
        }
        // Once queued, the writer applies the report to completion whatever happens to the request.
        let baseline = self
            .baseline_before_ms
            .is_some_and(|since| report.started_at_ms < since);
        let (answer, answered) = oneshot::channel();
        let Some(jobs) = &self.jobs else {
            return internal("the report writer stopped");
        };
        let queued = jobs.send(Job {
            report,
            baseline,
            answer,
        });
        match queued.await.map(|()| answered) {
            Ok(answered) => match answered.await {
                Ok(answer) => answer,
                Err(_) => internal("the report writer stopped"),
            },
            Err(_) => internal("the report writer stopped"),
        }
    }
}

impl Drop for Reports {
    /// Lets the writer finish the reports queued (and a snapshot being written) before the process goes on.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn internal(message: &str) -> Answer {
    log::error!("{message}");
    Answer {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: Err(("internal", message.into())),
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod tests;
