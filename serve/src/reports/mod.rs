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
use crate::state::{lock, State};
use kvab_ledger::store::{OpenError, StateLock, Store};
use kvab_ledger::{Growth, Ledger, Limits, Line, Outcome};

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

/// The one thread that changes the ledger.
struct Writer {
    ledger: Arc<Mutex<Ledger>>,
    arms: Vec<String>,
    store: Option<Store>,
    state: Arc<State>,
    /// `reports.retire_after_seconds`.
    retire_after: Duration,
    evict_idle_after: Duration,
    limits: Limits,
    started_ms: u64,
    last_sweep_ms: u64,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        while let Some(first) = queue.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.apply(batch);
            self.retire_idle();
        }
        if let Some(store) = &mut self.store {
            store.finish_compaction();
            count_errors(&self.state, store);
        }
    }

    /// Retires the reporters that sent nothing for `retire_after`, checked a few times per period (at most
    /// once a minute): journaled first, like a report, so a restart does not bring them back.
    fn retire_idle(&mut self) {
        let now = now_ms();
        let period = u64::try_from(self.retire_after.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.last_sweep_ms) < (period / 4).min(60_000) {
            return;
        }
        self.last_sweep_ms = now;
        let mut ledger = lock(&self.ledger);
        let idle = ledger.idle_reporters(now.saturating_sub(period), self.started_ms);
        if idle.is_empty() {
            return;
        }
        if let Some(store) = &mut self.store {
            let line = Line::Retired {
                retired: idle.clone(),
                at_ms: now,
            };
            let appended = store.append(&[line]);
            count_errors(&self.state, store);
            if let Err(e) = appended {
                log::error!("cannot save the retirement of idle reporters: {e:#}; kept for now");
                return;
            }
        }
        ledger.retire(&idle, now);
        self.state.publish_routed(counts(&ledger));
        log::info!(
            "retired {} reporters idle for more than {:?} (their counts stay; {} reporters active)",
            idle.len(),
            self.retire_after,
            ledger.reporters()
        );
    }

    /// Apply every report, append what changed with one sync, then publish and answer; a failed append
    /// undoes the batch.
    fn apply(&mut self, batch: Vec<Job>) {
        let snapshot = self.state.snapshot();
        let pod_of = |address: &str| {
            snapshot
                .as_ref()
                .and_then(|s| s.pod_by_address.get(address).cloned())
        };
        let now = now_ms();
        let mut ledger = lock(&self.ledger);
        let mut results = Vec::with_capacity(batch.len());
        let mut records = Vec::new();
        let mut undos = Vec::new();
        // Reporters retired (and journaled) to make room: shown with the batch, or alone if it is not.
        let mut retired_early = false;
        for job in &batch {
            let report = &job.report;
            if let Some(growth) = ledger.growth_past(report, &self.limits) {
                let before_ms = now.saturating_sub(
                    u64::try_from(self.evict_idle_after.as_millis()).unwrap_or(u64::MAX),
                );
                let room = make_room(
                    &mut self.store,
                    &mut ledger,
                    &self.limits,
                    report,
                    growth,
                    (before_ms, self.started_ms, now),
                );
                match room {
                    Ok(()) => retired_early = true,
                    Err(message) => {
                        results.push(Err(Refused::Full(message)));
                        continue;
                    }
                }
            }
            match ledger.apply_logged(report, &self.arms, &pod_of, job.baseline, now) {
                Ok((outcome, change)) => {
                    if let Some((record, undo)) = change {
                        records.push(record);
                        undos.push(undo);
                    }
                    results.push(Ok(outcome));
                }
                Err(message) => {
                    log::warn!("report from {:?} refused: {message}", report.reporter);
                    results.push(Err(Refused::Invalid(message)));
                }
            }
        }
        for id in ledger.take_shared() {
            self.state.metrics.shared_reporter_ids.inc();
            log::warn!(
                "reporter id {id:?} is used by two or more filter VMs at once (its reports keep going back or repeating): about half of their counts are refused or ignored; give every filter VM its own id"
            );
        }
        let saved = match (&mut self.store, records.is_empty()) {
            (Some(store), false) => store.append(&records),
            _ => Ok(()),
        };
        if let Err(e) = &saved {
            for undo in undos.into_iter().rev() {
                ledger.undo(undo);
            }
            log::error!(
                "cannot save the report state (key reports.state_file): {e:#}; {} reports refused, the filter sends them again",
                records.len()
            );
        } else if !records.is_empty() {
            // Saved: now, and not before, it is visible.
            self.state.publish_routed(counts(&ledger));
            if let Some(store) = &mut self.store {
                store.compact_if_due(&ledger);
            }
        }
        if retired_early && (saved.is_err() || records.is_empty()) {
            // The batch is undone or changed nothing: what is left is saved.
            self.state.publish_routed(counts(&ledger));
        }
        if let Some(store) = &mut self.store {
            count_errors(&self.state, store);
        }
        drop(ledger);
        for (job, result) in batch.into_iter().zip(results) {
            let answer = match (result, &saved) {
                (Err(Refused::Invalid(message)), _) => reject(
                    &self.state,
                    StatusCode::BAD_REQUEST,
                    "invalid_report",
                    message,
                    "invalid",
                ),
                (Err(Refused::Full(message)), _) => reject(
                    &self.state,
                    StatusCode::INSUFFICIENT_STORAGE,
                    "ledger_full",
                    message,
                    "full",
                ),
                (Ok(Outcome::Applied(_) | Outcome::Baselined), Err(e)) => reject(
                    &self.state,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "state_unavailable",
                    format!("cannot save the report state: {e:#}; send the report again"),
                    "unsaved",
                ),
                (Ok(outcome), _) => {
                    self.state
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
            };
            // The client may have gone away; the report is applied (or not) all the same.
            let _ = job.answer.send(answer);
        }
    }
}

/// Counts the store's failures: every one on `kvab_state_errors_total{op}`, the writes (append,
/// compact) also on `kvab_state_write_errors_total`.
fn count_errors(state: &State, store: &mut Store) {
    for op in store.take_errors() {
        state.metrics.state_errors.with_label_values(&[op]).inc();
        if op != "cleanup" {
            state.metrics.state_write_errors.inc();
        }
    }
}

/// Why the writer refused a report.
enum Refused {
    /// 400 `invalid_report`.
    Invalid(String),
    /// 507 `ledger_full`: it is fine, but the ledger is at a cap; nothing changed.
    Full(String),
}

/// Retires the longest-idle reporters (idle since before `before_ms`, journaled first) so that
/// `growth` fits under `limits`; `Err` says why it does not fit, and then nothing changed. Publishing
/// is the caller's: reports applied before it in the batch are not saved yet.
fn make_room(
    store: &mut Option<Store>,
    ledger: &mut Ledger,
    limits: &Limits,
    report: &Report,
    growth: Growth,
    (before_ms, loaded_ms, now): (u64, u64, u64),
) -> Result<(), String> {
    let full = || {
        format!(
            "the report ledger is full ({} of reports.max_reporters = {} reporters, {} of reports.max_entries = {} entries; this report adds {} reporter and {} entries) and no reporter is idle long enough to retire early; nothing changed, send the report again later",
            ledger.reporters(),
            limits.max_reporters,
            ledger.entries(),
            limits.max_entries,
            growth.reporters,
            growth.entries
        )
    };
    let Some(idle) = ledger.make_room(growth, limits, before_ms, loaded_ms, &report.reporter)
    else {
        return Err(full());
    };
    if idle.is_empty() {
        return Ok(());
    }
    if let Some(store) = store {
        let line = Line::Retired {
            retired: idle.clone(),
            at_ms: now,
        };
        // A failed append is counted with the batch's store errors (`count_errors`).
        if let Err(e) = store.append(&[line]) {
            log::error!("cannot save the early retirement of idle reporters: {e:#}");
            return Err(full());
        }
    }
    ledger.retire(&idle, now);
    log::info!(
        "the report ledger is at a cap: retired {} reporters idle the longest to make room (their counts stay)",
        idle.len()
    );
    Ok(())
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
pub mod tests {
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

    fn saved(path: &std::path::Path) -> f64 {
        kvab_ledger::store::load(path)
            .unwrap()
            .ledger
            .map_or(0.0, |l| l.routed().map(|(_, n)| n as f64).sum())
    }

    pub fn settings(state_file: Option<PathBuf>) -> Settings {
        Settings {
            arms: vec!["nvlink".into(), "fs".into()],
            state_file,
            token: None,
            retire_after: Duration::from_secs(86_400),
            repair: false,
            evict_idle_after: EVICT_IDLE_AFTER,
            limits: Limits {
                max_reporters: 4096,
                max_entries: 200_000,
            },
        }
    }

    /// Reports on the state at `path`, retiring after `retire_after`, compacting after
    /// `compact_after` bytes when given.
    fn start_on(
        path: &std::path::Path,
        state: &Arc<State>,
        retire_after: Duration,
        compact_after: Option<u64>,
    ) -> Arc<Reports> {
        let (restored, mut store) = Store::open(path, false).unwrap();
        if let Some(bytes) = compact_after {
            store.set_compact_after(bytes);
        }
        let settings = Settings {
            retire_after,
            ..settings(Some(path.to_path_buf()))
        };
        Arc::new(Reports::start(settings, restored, Some(store), state).unwrap())
    }

    fn open(state_file: Option<PathBuf>, state: &Arc<State>) -> Arc<Reports> {
        Arc::new(Reports::open(settings(state_file), state).unwrap())
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
            let ledger = lock(&reports.ledger);
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
        let reports = start_on(&path, &state, Duration::from_secs(86_400), Some(1));
        // The first report moves the journal to generation 1, a device that is always full: every
        // write there fails (ENOSPC), as on a full volume.
        std::os::unix::fs::symlink("/dev/full", dir.join("reports.json.log.1")).unwrap();
        let answer = receive(&reports, &state, body("vm", 1, 100)).await;
        assert_eq!(answer.status, StatusCode::OK);
        for sequence in [2, 3] {
            let answer = receive(&reports, &state, body("vm", sequence, 300)).await;
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(matches!(answer.body, Err(("state_unavailable", _))));
        }
        assert_eq!(shown(&state), 100.0, "the refused reports changed nothing");
        assert_eq!(state.metrics.state_write_errors.get(), 2);
        drop(reports);
        // Once the state can be written, the filter's resend counts the rest exactly once.
        std::fs::remove_file(dir.join("reports.json.log.1")).unwrap();
        std::fs::write(dir.join("reports.json.log.1"), b"").unwrap();
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        assert_eq!(shown(&state), 100.0);
        let answer = receive(&reports, &state, body("vm", 4, 300)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 300.0);
        assert_eq!(saved(&path), 300.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_restart_restores_every_acknowledged_report_from_the_journal() {
        let dir = scratch("restart");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        for sequence in 1..=40u64 {
            let vm = if sequence % 2 == 0 { "a" } else { "b" };
            let answer = receive(&reports, &state, body(vm, sequence, sequence)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let before = shown(&state);
        assert_eq!(before, 40.0 + 39.0);
        drop(reports);
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        assert_eq!(shown(&state), before, "restored, not restarted");
        // A resend of the last report adds nothing; the next one only its difference.
        let answer = receive(&reports, &state, body("a", 40, 40)).await;
        assert!(matches!(&answer.body, Ok(ack) if ack.result == "duplicate"));
        let answer = receive(&reports, &state, body("a", 41, 45)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), before + 5.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn idle_reporters_are_retired_for_good_and_their_counts_stay() {
        let dir = scratch("retire");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = start_on(&path, &state, Duration::from_millis(100), None);
        assert_eq!(
            receive(&reports, &state, body("a", 1, 10)).await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            receive(&reports, &state, body("b", 1, 3)).await.status,
            StatusCode::OK
        );
        // The writer retires after answering: wait for it (under load the answer comes first).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&reports.ledger).retired() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(lock(&reports.ledger).retired(), 1, "a was retired");
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        assert!(text.contains("kvab_retired_reporters 1"), "{text}");
        assert!(text.contains("kvab_reporters 1"), "{text}");
        assert_eq!(shown(&state), 13.0);
        drop(reports);
        // After a restart a is still retired (the retirement was journaled), so its cumulative
        // report is a starting point, and only what follows counts.
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = start_on(&path, &state, Duration::from_secs(3600), None);
        assert_eq!(shown(&state), 13.0);
        let answer = receive(&reports, &state, body("a", 2, 15)).await;
        assert!(
            matches!(&answer.body, Ok(ack) if ack.result == "baselined"),
            "{:?}",
            answer.body.err()
        );
        assert_eq!(
            receive(&reports, &state, body("a", 3, 20)).await.status,
            StatusCode::OK
        );
        assert_eq!(shown(&state), 18.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A report of `n` distinct endpoints, each counted `count` times.
    fn wide(reporter: &str, sequence: u64, n: usize, count: u64) -> Vec<u8> {
        let totals: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"requested":"fs","served":"fs","endpoint":"10.1.{}.{}:8080","code_class":"2xx","count":{count}}}"#,
                    i / 256,
                    i % 256
                )
            })
            .collect();
        format!(
            r#"{{"reporter":"{reporter}","sequence":{sequence},"started_at_ms":{},"totals":[{}]}}"#,
            u64::MAX / 2,
            totals.join(",")
        )
        .into_bytes()
    }

    fn scrape(state: &State, name: &str) -> f64 {
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    #[tokio::test]
    async fn a_flood_of_reporters_and_keys_is_bounded_while_known_reporters_keep_counting() {
        let dir = scratch("caps");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let limits = Limits {
            max_reporters: 3,
            max_entries: 40,
        };
        let capped = Settings {
            limits,
            ..settings(Some(path.clone()))
        };
        let reports = Arc::new(Reports::open(capped, &state).unwrap());
        for vm in ["a", "b"] {
            let answer = receive(&reports, &state, wide(vm, 1, 10, 1)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        // A flood of new reporters, each with new keys: one more fits, then every one is refused
        // with 507 ledger_full, and nothing of them is kept.
        let mut full = 0;
        for i in 0..50 {
            let answer = receive(&reports, &state, wide(&format!("flood{i}"), 1, 5, 1)).await;
            match answer.body {
                Ok(_) => assert_eq!(answer.status, StatusCode::OK),
                Err((code, message)) => {
                    assert_eq!(
                        (answer.status, code),
                        (StatusCode::INSUFFICIENT_STORAGE, "ledger_full")
                    );
                    assert!(message.contains("reports.max_reporters"), "{message}");
                    full += 1;
                }
            }
        }
        assert_eq!(full, 49);
        assert_eq!(shown(&state), 25.0);
        // A known reporter with more keys than the room left is refused too; within the room it counts.
        let answer = receive(&reports, &state, wide("a", 2, 30, 2)).await;
        assert_eq!(answer.status, StatusCode::INSUFFICIENT_STORAGE);
        let answer = receive(&reports, &state, wide("a", 3, 25, 2)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 25.0 + 10.0 + 15.0 * 2.0);
        assert_eq!(scrape(&state, "kvab_ledger_entries"), 40.0);
        assert_eq!(scrape(&state, "kvab_ledger_entries_limit"), 40.0);
        assert_eq!(scrape(&state, "kvab_reporters"), 3.0);
        assert_eq!(scrape(&state, "kvab_reporters_limit"), 3.0);
        assert_eq!(
            scrape(&state, "kvab_reports_received_total{result=\"full\"}"),
            50.0
        );
        drop(reports);
        // The bound holds across a restart: the state is what was acknowledged, no more.
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let capped = Settings {
            limits,
            ..settings(Some(path.clone()))
        };
        let reports = Arc::new(Reports::open(capped, &state).unwrap());
        assert_eq!(scrape(&state, "kvab_ledger_entries"), 40.0);
        let answer = receive(&reports, &state, wide("b", 2, 10, 3)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 65.0 + 20.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn at_a_cap_the_reporter_idle_longest_is_retired_early_and_its_counts_stay() {
        let dir = scratch("evict");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let settings = Settings {
            evict_idle_after: Duration::from_millis(200),
            limits: Limits {
                max_reporters: 2,
                max_entries: 1000,
            },
            ..settings(Some(path.clone()))
        };
        let reports = Arc::new(Reports::open(settings, &state).unwrap());
        for vm in ["old", "older"] {
            assert_eq!(
                receive(&reports, &state, body(vm, 1, 5)).await.status,
                StatusCode::OK
            );
        }
        // Not idle long enough: refused.
        let answer = receive(&reports, &state, body("new", 1, 7)).await;
        assert_eq!(answer.status, StatusCode::INSUFFICIENT_STORAGE);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            receive(&reports, &state, body("old", 2, 6)).await.status,
            StatusCode::OK
        );
        // Now "older" is idle past the bound: retired for the new reporter, its 5 stay.
        let answer = receive(&reports, &state, body("new", 2, 7)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(shown(&state), 6.0 + 5.0 + 7.0);
        assert_eq!(scrape(&state, "kvab_retired_reporters"), 1.0);
        assert_eq!(scrape(&state, "kvab_reporters"), 2.0);
        drop(reports);
        // Journaled: after a restart "older" is still retired, so its return is a starting point.
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        assert_eq!(shown(&state), 18.0);
        let answer = receive(&reports, &state, body("older", 2, 9)).await;
        assert!(matches!(&answer.body, Ok(ack) if ack.result == "baselined"));
        assert_eq!(shown(&state), 18.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_reporter_id_sent_by_two_vms_is_counted_from_stale_and_duplicate_answers() {
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(None, &state);
        // Two VMs under one id, each with its own sequence; their counts only grow here, so no
        // regression ever names them: A is ahead, B's reports are stale or repeat A's sequences.
        let mut results = Vec::new();
        for i in 1..=10u64 {
            for (sequence, count) in [(10 + 2 * i, 100 + i), (5 + i, 1000 + i)] {
                let answer = receive(&reports, &state, body("shared", sequence, count)).await;
                results.push(answer.body.map(|ack| ack.result).unwrap());
            }
        }
        assert!(results.iter().any(|r| r == "stale"), "{results:?}");
        assert_eq!(
            scrape(&state, "kvab_shared_reporter_ids_total"),
            1.0,
            "named once"
        );
        // One VM alone never is.
        for sequence in 1..=20u64 {
            receive(&reports, &state, body("alone", sequence, sequence)).await;
        }
        assert_eq!(scrape(&state, "kvab_shared_reporter_ids_total"), 1.0);
    }

    #[tokio::test]
    async fn a_damaged_state_refuses_reports_with_a_code_and_a_gauge_instead_of_stopping() {
        let dir = scratch("damaged");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = open(Some(path.clone()), &state);
        assert_eq!(
            receive(&reports, &state, body("vm", 1, 10)).await.status,
            StatusCode::OK
        );
        drop(reports);
        // The snapshot deleted, the journal kept.
        std::fs::remove_file(&path).unwrap();
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let reports = Arc::new(Reports::open(settings(Some(path.clone())), &state).unwrap());
        let answer = receive(&reports, &state, body("vm", 2, 20)).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        match &answer.body {
            Err(("state_damaged", message)) => assert!(
                message.contains("--repair-state") && message.contains("reports.json"),
                "{message}"
            ),
            other => panic!("{:?}", other.as_ref().err()),
        }
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        assert!(text.contains("kvab_state_damaged 1"), "{text}");
        assert_eq!(shown(&state), 0.0, "nothing counted while refusing");
        // While it refuses, it holds the lock.
        assert!(matches!(
            kvab_ledger::store::lock(&path),
            Err(kvab_ledger::store::OpenError::Locked(_))
        ));
        drop(reports);
        // --repair-state: the next reports are baselines, then counting goes on.
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let repair = Settings {
            repair: true,
            ..settings(Some(path.clone()))
        };
        let reports = Arc::new(Reports::open(repair, &state).unwrap());
        assert!(dir.join("reports.json.log.0.damaged.1").exists());
        let answer = receive(&reports, &state, body("vm", 3, 30)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let answer = receive(&reports, &state, body("vm", 4, 35)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let text = String::from_utf8(state.render_metrics().unwrap()).unwrap();
        assert!(text.contains("kvab_state_damaged 0"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_second_process_on_the_state_is_refused_naming_the_holder() {
        let dir = scratch("locked");
        let path = dir.join("reports.json");
        let state = Arc::new(State::new(Duration::from_secs(30)).unwrap());
        let _held = kvab_ledger::store::lock(&path).unwrap();
        let error = match Reports::open(settings(Some(path)), &state) {
            Err(e) => format!("{e:#}"),
            Ok(_) => panic!("started on a locked state"),
        };
        assert!(
            error.contains(&format!("PID {}", std::process::id()))
                && error.contains("reports.json.lock"),
            "{error}"
        );
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
