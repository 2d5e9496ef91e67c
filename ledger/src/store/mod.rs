//! `reports.state_file` on disk: a checksummed snapshot of the ledger and a checksummed journal of what was
//! applied since, under an exclusive lock.
//!
//! A batch of reports is durable once its journal lines are synced: one append and one `fsync` per batch,
//! whatever the size of the ledger. When the journal has grown past the snapshot (and past
//! `COMPACT_AFTER_BYTES`), the journal moves to a new generation and the ledger as it stands is written as
//! the new snapshot on a thread of its own, so reports keep being applied meanwhile.
//!
//! For `reports.state_file = /var/lib/kvab/reports.json`:
//! - `reports.json`: the snapshot: a header line `kvab-report-snapshot 2 sha256=<hex> bytes=<n>`, then the
//!   JSON ledger (`n` bytes, that SHA-256), holding every record of the journal generations before its
//!   `journal_generation`;
//! - `reports.json.log.<generation>`: the journal, one line per record: the first 16 hex digits of the
//!   record's SHA-256, a space, the JSON record, a newline; replayed in order on start;
//! - `reports.json.lock`: held with `flock` while a `kvab serve` uses the state; holds its PID.
//!
//! Rules on start (any break of them is damage, named with its file, never skipped):
//! - the snapshot's checksum holds; the journals from the snapshot's generation on are all there, one per
//!   generation, without a gap; a journal without a snapshot is a deleted snapshot (the first start writes
//!   an empty snapshot, so a snapshot is always there);
//! - every line ending in a newline is complete and its checksum holds. Only the newest journal's final
//!   piece without its newline is a tail cut by a crash (never acknowledged: the sync had not returned);
//!   it is dropped and the filter sends those counts again.
//!
//! The format before checksums (`reports.json` as plain JSON, `reports.json.journal.<generation>` of plain
//! JSON lines) is read once on the first start, written as a snapshot in this format, and its journals
//! are removed.
//!
//! Crash safety: the snapshot is replaced by a rename after the new file and then the directory are synced;
//! a journal file exists (directory synced) before the snapshot that names its generation.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::Context;

use crate::{Ledger, Line};

/// The journal is compacted into a new snapshot once it is larger than this and than the snapshot.
pub const COMPACT_AFTER_BYTES: u64 = 4 << 20;

/// The first word of a snapshot's header line.
pub(super) const SNAPSHOT_MAGIC: &[u8] = b"kvab-report-snapshot 2 ";

/// State files are the operator's counts and nobody else's.
pub(super) const MODE: u32 = 0o600;

/// What to do with the damaged files, said in every refusal.
pub const REMEDY: &str = "restore the report state files from a backup, or restart with `kvab serve --repair-state`, which moves the damaged files aside (suffix .damaged.<n>) and counts from zero again, each filter's next report a baseline";

/// Why the state cannot be used.
#[derive(Debug)]
pub enum OpenError {
    /// Another process holds the state's lock: this one must not start.
    Locked(String),
    /// A file does not read as the ledger it should hold.
    Damaged { file: PathBuf, why: String },
    /// The files cannot be read, created or written (permissions, a full disk).
    Unavailable(anyhow::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Locked(message) => f.write_str(message),
            OpenError::Damaged { file, why } => write!(
                f,
                "the report state file {} (key reports.state_file) is damaged: {why}; its counts are not restored and reports are refused (503 state_damaged); to go on, {REMEDY}",
                file.display()
            ),
            OpenError::Unavailable(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for OpenError {}

pub struct Store {
    path: PathBuf,
    generation: u64,
    journal: File,
    journal_len: u64,
    snapshot_len: u64,
    compact_after: u64,
    /// After a failed compaction: not tried again before the journal reaches this length.
    retry_at: u64,
    /// A snapshot being written: its size and the journals it could not remove, once done.
    compaction: Option<JoinHandle<anyhow::Result<(u64, u64)>>>,
    /// Set when a failed append could not be cut back: later appends would follow a broken line.
    broken: bool,
    /// Failures since the last `take_errors`, by operation (`append`, `compact`, `cleanup`).
    errors: Vec<&'static str>,
}

mod files;
mod snapshot;

use files::*;
pub use files::{lock, lock_path, move_aside, StateLock};
use snapshot::*;
pub use snapshot::{load, Loaded};

impl Store {
    /// Restores the ledger (`None` on a first start) and opens the journal for appending; the caller holds
    /// the state's `lock`. A tail cut by a crash is dropped; leftover temporary files and the journals the
    /// snapshot already holds are removed; files of the format before checksums are rewritten in this
    /// one. With `repair`, damaged files are moved aside (`move_aside`) and the state starts empty.
    pub fn open(path: &Path, repair: bool) -> Result<(Option<Ledger>, Store), OpenError> {
        let mut errors = Vec::new();
        errors.extend(std::iter::repeat_n(
            "cleanup",
            remove_temporary_files(path) as usize,
        ));
        let loaded = match load(path) {
            Err(OpenError::Damaged { file, why }) if repair => {
                let moved = move_aside(path).map_err(OpenError::Unavailable)?;
                log::warn!(
                    "--repair-state: {} was damaged ({why}); moved aside: {}; counting starts again from zero, each filter VM's next report a baseline",
                    file.display(),
                    moved
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Loaded::empty()
            }
            other => {
                let loaded = other?;
                if repair {
                    log::info!(
                        "--repair-state: the report state {} reads; nothing moved",
                        path.display()
                    );
                }
                loaded
            }
        };
        let io = |e: anyhow::Error| OpenError::Unavailable(e);
        let (ledger, generation, journal, journal_len, snapshot_len) = match loaded.newest {
            Some((generation, len, intact)) if !loaded.legacy => {
                if intact < len {
                    log::warn!(
                        "report journal {}: dropping a final line cut short by a crash after byte {intact} (never acknowledged; the filter sends it again)",
                        journal_path(path, generation).display()
                    );
                }
                let journal = open_journal_cut_to(path, generation, intact).map_err(io)?;
                (
                    loaded.ledger,
                    generation,
                    journal,
                    intact,
                    loaded.snapshot_len,
                )
            }
            _ => {
                // A first start, or the format before checksums: journal 0, then the snapshot naming it.
                let mut ledger = loaded.ledger;
                let journal = open_journal_cut_to(path, 0, 0).map_err(io)?;
                let mut snapshot = ledger.clone().unwrap_or_default();
                snapshot.journal_generation = 0;
                let len = write_snapshot(path, &snapshot).map_err(io)?;
                if let Some(ledger) = &mut ledger {
                    ledger.journal_generation = 0;
                }
                if loaded.legacy {
                    log::info!(
                        "report state {}: read in the format before checksums and written in the new one",
                        path.display()
                    );
                }
                (ledger, 0, journal, 0, len)
            }
        };
        for file in &loaded.leftovers {
            if let Err(e) = std::fs::remove_file(file) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::error!("cannot remove {}: {e}", file.display());
                    errors.push("cleanup");
                }
            }
        }
        Ok((
            ledger,
            Store {
                path: path.to_path_buf(),
                generation,
                journal,
                journal_len,
                snapshot_len,
                compact_after: COMPACT_AFTER_BYTES,
                retry_at: 0,
                compaction: None,
                broken: false,
                errors,
            },
        ))
    }

    /// The failures since the last call, by operation: `append`, `compact` or `cleanup`.
    pub fn take_errors(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.errors)
    }

    /// Appends the journal lines (`ledger::Line`, or the `Record`s of reports) and syncs them. On failure
    /// the journal is cut back to where it was, so the lines are as if never written.
    pub fn append<T: serde::Serialize>(&mut self, records: &[T]) -> anyhow::Result<()> {
        let appended = self.try_append(records);
        if appended.is_err() {
            self.errors.push("append");
        }
        appended
    }

    fn try_append<T: serde::Serialize>(&mut self, records: &[T]) -> anyhow::Result<()> {
        if self.broken {
            anyhow::bail!(
                "the report journal could not be cut back after a failed write; restart kvab serve"
            );
        }
        let mut lines = Vec::new();
        for record in records {
            let json = serde_json::to_vec(record)?;
            lines.extend_from_slice(line_sum(&json).as_bytes());
            lines.push(b' ');
            lines.extend_from_slice(&json);
            lines.push(b'\n');
        }
        let written = self
            .journal
            .write_all(&lines)
            .and_then(|()| self.journal.sync_data());
        if let Err(e) = written {
            if self
                .journal
                .set_len(self.journal_len)
                .and_then(|()| self.journal.sync_all())
                .is_err()
            {
                self.broken = true;
            }
            return Err(e).with_context(|| {
                format!(
                    "cannot append to {}",
                    journal_path(&self.path, self.generation).display()
                )
            });
        }
        self.journal_len += lines.len() as u64;
        Ok(())
    }

    /// Once the journal has outgrown the snapshot, starts writing `ledger` (which holds every record
    /// appended so far) as the new snapshot and moves the journal to a new generation. A failure is
    /// counted (`take_errors`) and tried again once the journal has grown by `COMPACT_AFTER_BYTES`; the
    /// journals keep everything meanwhile.
    pub fn compact_if_due(&mut self, ledger: &Ledger) {
        if let Some(done) = self.compaction.take_if(|c| c.is_finished()) {
            self.collect(done);
        }
        if self.compaction.is_some()
            || self.journal_len < self.compact_after.max(self.snapshot_len).max(self.retry_at)
        {
            return;
        }
        let next = self.generation + 1;
        let journal = match open_journal(&self.path, next) {
            Ok(journal) => journal,
            Err(e) => {
                self.errors.push("compact");
                self.retry_at = self.journal_len + self.compact_after;
                log::error!("cannot start a new report journal (compaction put off): {e:#}");
                return;
            }
        };
        let mut snapshot = ledger.clone();
        snapshot.journal_generation = next;
        self.journal = journal;
        self.generation = next;
        self.journal_len = 0;
        self.retry_at = 0;
        let path = self.path.clone();
        self.compaction = Some(std::thread::spawn(move || {
            let len = write_snapshot(&path, &snapshot)?;
            Ok((len, remove_older_journals(&path, next)))
        }));
    }

    /// Waits for a snapshot being written (at shutdown, and in tests).
    pub fn finish_compaction(&mut self) {
        if let Some(running) = self.compaction.take() {
            self.collect(running);
        }
    }

    /// The end of a snapshot write: its size, or why it failed (the journals still hold everything).
    fn collect(&mut self, compaction: JoinHandle<anyhow::Result<(u64, u64)>>) {
        match compaction.join() {
            Ok(Ok((len, cleanup_failures))) => {
                self.snapshot_len = len;
                self.errors
                    .extend(std::iter::repeat_n("cleanup", cleanup_failures as usize));
            }
            Ok(Err(e)) => {
                self.errors.push("compact");
                log::error!("cannot write the report snapshot: {e:#}");
            }
            Err(_) => {
                self.errors.push("compact");
                log::error!("the report snapshot writer panicked");
            }
        }
    }

    /// Compacts once the journal is past `bytes` (and the snapshot) instead of `COMPACT_AFTER_BYTES`:
    /// tests use a small threshold to reach compaction quickly.
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests;
