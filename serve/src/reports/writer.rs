//! The writer thread of `POST /v1/reports`, the one that changes the ledger: it applies the reports
//! waiting in batches, makes room at the caps, saves each batch with one sync, then publishes and answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvab_contract::report::{Report, ReportAck};
use tokio::sync::mpsc;
use warp::http::StatusCode;

use super::{counts, now_ms, reject, Answer, Job, MAX_BATCH};
use crate::state::{lock, State};
use kvab_ledger::store::Store;
use kvab_ledger::{Growth, Ledger, Limits, Line, Outcome};

/// The one thread that changes the ledger.
pub(super) struct Writer {
    pub(super) ledger: Arc<Mutex<Ledger>>,
    pub(super) arms: Vec<String>,
    pub(super) store: Option<Store>,
    pub(super) state: Arc<State>,
    /// `reports.retire_after_seconds`.
    pub(super) retire_after: Duration,
    pub(super) evict_idle_after: Duration,
    pub(super) limits: Limits,
    pub(super) started_ms: u64,
    pub(super) last_sweep_ms: u64,
}

impl Writer {
    pub(super) fn run(mut self, mut queue: mpsc::Receiver<Job>) {
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
