//! `reports.state_file` on disk: a snapshot of the ledger and a journal of what was applied since.
//!
//! A batch of reports is durable once its journal lines are synced: one append and one `fsync` per batch,
//! whatever the size of the ledger. When the journal has grown past the snapshot (and past
//! `COMPACT_AFTER_BYTES`), the journal moves to a new generation and the ledger as it stands is written as
//! the new snapshot on a thread of its own, so reports keep being applied meanwhile.
//!
//! For `reports.state_file = /var/lib/kvab/reports.json`:
//! - `reports.json`: the snapshot, a JSON ledger holding every record of the journal generations before
//!   its `journal_generation`;
//! - `reports.json.journal.<generation>`: one JSON record per line, replayed in order on start.
//!
//! Crash safety: the snapshot is replaced by a rename after the new file and then the directory are synced;
//! a journal line counts once synced. A crash can only cut the newest journal's unsynced tail, which was
//! never acknowledged: it is dropped on start and the filter sends those counts again. Anything else that
//! does not read stops the start with the file named, instead of restarting the counters (Prometheus would
//! take a restart for a reset, and the filter's next reports would only be baselines).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::Context;

use crate::ledger::{Ledger, Line};

/// The journal is compacted into a new snapshot once it is larger than this and than the snapshot.
pub const COMPACT_AFTER_BYTES: u64 = 4 << 20;

pub struct Store {
    path: PathBuf,
    generation: u64,
    journal: File,
    journal_len: u64,
    snapshot_len: u64,
    compact_after: u64,
    /// A snapshot being written: its size once done.
    compaction: Option<JoinHandle<anyhow::Result<u64>>>,
    /// Set when a failed append could not be cut back: later appends would follow a broken line.
    broken: bool,
}

fn journal_path(path: &Path, generation: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".journal.{generation}"));
    path.with_file_name(name)
}

fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sync_directory(path: &Path) -> std::io::Result<()> {
    File::open(directory(path))?.sync_all()
}

/// The journal generations present next to `path`, sorted.
fn journal_generations(path: &Path) -> anyhow::Result<Vec<u64>> {
    let prefix = format!(
        "{}.journal.",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut generations = Vec::new();
    let entries = match std::fs::read_dir(directory(path)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(generations),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot list {}", directory(path).display()))
        }
    };
    for entry in entries {
        let name = entry?.file_name();
        if let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|g| g.parse::<u64>().ok())
        {
            generations.push(generation);
        }
    }
    generations.sort_unstable();
    Ok(generations)
}

/// What `load` found.
pub struct Loaded {
    /// `None`: no snapshot and no journal, a first start.
    pub ledger: Option<Ledger>,
    snapshot_len: u64,
    /// The newest journal and, when its tail was cut by a crash, the length of its intact part.
    newest: Option<(u64, u64, Option<u64>)>,
}

/// Reads the snapshot and replays the journals, changing nothing on disk.
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let (mut ledger, snapshot_len) = match std::fs::read(path) {
        Ok(bytes) => {
            let mut ledger: Ledger = serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} (key reports.state_file) is not a kvab report state; refusing to start rather than restart the counters: restore it from a backup, or remove it (and its .journal.* files) to start from zero",
                    path.display()
                )
            })?;
            ledger.share_keys();
            (Some(ledger), bytes.len() as u64)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot read {} (key reports.state_file)", path.display())
            })
        }
    };
    let from = ledger.as_ref().map_or(0, |l| l.journal_generation);
    let generations: Vec<u64> = journal_generations(path)?
        .into_iter()
        .filter(|g| *g >= from)
        .collect();
    let mut newest = None;
    for (i, &generation) in generations.iter().enumerate() {
        let file = journal_path(path, generation);
        // A device or a pipe in a journal's place would be read without end.
        if !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            anyhow::bail!(
                "the report journal {} is not a regular file",
                file.display()
            );
        }
        let bytes = std::fs::read(&file)
            .with_context(|| format!("cannot read the report journal {}", file.display()))?;
        let is_newest = i + 1 == generations.len();
        let intact = replay(
            ledger.get_or_insert_with(Ledger::default),
            &bytes,
            is_newest,
        )
        .with_context(|| format!("report journal {}", file.display()))?;
        if is_newest {
            newest = Some((
                generation,
                bytes.len() as u64,
                (intact < bytes.len()).then_some(intact as u64),
            ));
        }
    }
    Ok(Loaded {
        ledger,
        snapshot_len,
        newest,
    })
}

/// Replays the lines of one journal; returns the length of the part that reads. A line that does not read
/// is a cut tail only in the newest journal and only when no good line follows it.
fn replay(ledger: &mut Ledger, bytes: &[u8], newest: bool) -> anyhow::Result<usize> {
    let mut offset = 0;
    let mut bad_at: Option<usize> = None;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Line>(line)
            .ok()
            .filter(|_| complete)
        {
            Some(line) if bad_at.is_none() => ledger.replay_line(&line),
            Some(_) => {
                anyhow::bail!(
                    "a line at byte {} does not read but later ones do: the file is damaged; refusing to start rather than restart the counters",
                    bad_at.unwrap_or_default()
                );
            }
            None => {
                bad_at.get_or_insert(offset);
            }
        }
        offset += line.len();
    }
    match bad_at {
        Some(at) if !newest => anyhow::bail!(
            "the line at byte {at} does not read, and this is not the newest journal: the file is damaged"
        ),
        Some(at) => Ok(at),
        None => Ok(bytes.len()),
    }
}

impl Store {
    /// Restores the ledger (`None` on a first start) and opens the journal for appending. A tail cut by a
    /// crash is dropped; journals a finished snapshot already holds are removed.
    pub fn open(path: &Path) -> anyhow::Result<(Option<Ledger>, Store)> {
        let loaded = load(path)?;
        let from = loaded.ledger.as_ref().map_or(0, |l| l.journal_generation);
        for generation in journal_generations(path)?.into_iter().filter(|g| *g < from) {
            let _ = std::fs::remove_file(journal_path(path, generation));
        }
        let (generation, journal_len) = match loaded.newest {
            Some((generation, len, None)) => (generation, len),
            Some((generation, _, Some(intact))) => {
                log::warn!(
                    "report journal {}: dropping a tail cut by a crash after byte {intact} (never acknowledged; the filter sends it again)",
                    journal_path(path, generation).display()
                );
                (generation, intact)
            }
            None => (from, 0),
        };
        let journal = open_journal(path, generation)?;
        journal
            .set_len(journal_len)
            .and_then(|()| journal.sync_all())
            .with_context(|| format!("cannot cut {}", journal_path(path, generation).display()))?;
        Ok((
            loaded.ledger,
            Store {
                path: path.to_path_buf(),
                generation,
                journal,
                journal_len,
                snapshot_len: loaded.snapshot_len,
                compact_after: COMPACT_AFTER_BYTES,
                compaction: None,
                broken: false,
            },
        ))
    }

    /// Appends the journal lines (`ledger::Line`, or the `Record`s of reports) and syncs them. On failure
    /// the journal is cut back to where it was, so the lines are as if never written.
    pub fn append<T: serde::Serialize>(&mut self, records: &[T]) -> anyhow::Result<()> {
        if self.broken {
            anyhow::bail!(
                "the report journal could not be cut back after a failed write; restart kvab serve"
            );
        }
        let mut lines = Vec::new();
        for record in records {
            serde_json::to_writer(&mut lines, record)?;
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
    /// logged and retried later; the journals keep everything meanwhile.
    pub fn compact_if_due(&mut self, ledger: &Ledger) {
        if let Some(done) = self.compaction.take_if(|c| c.is_finished()) {
            self.collect(done);
        }
        if self.compaction.is_some() || self.journal_len < self.compact_after.max(self.snapshot_len)
        {
            return;
        }
        let next = self.generation + 1;
        let journal = match open_journal(&self.path, next) {
            Ok(journal) => journal,
            Err(e) => {
                log::error!("cannot start a new report journal: {e:#}");
                return;
            }
        };
        let mut snapshot = ledger.clone();
        snapshot.journal_generation = next;
        self.journal = journal;
        self.generation = next;
        self.journal_len = 0;
        let path = self.path.clone();
        self.compaction = Some(std::thread::spawn(move || write_snapshot(&path, &snapshot)));
    }

    /// Waits for a snapshot being written (at shutdown, and in tests).
    pub fn finish_compaction(&mut self) {
        if let Some(running) = self.compaction.take() {
            self.collect(running);
        }
    }

    /// The end of a snapshot write: its size, or why it failed (the journals still hold everything).
    fn collect(&mut self, compaction: JoinHandle<anyhow::Result<u64>>) {
        match compaction.join() {
            Ok(Ok(len)) => self.snapshot_len = len,
            Ok(Err(e)) => log::error!("cannot write the report snapshot: {e:#}"),
            Err(_) => log::error!("the report snapshot writer panicked"),
        }
    }

    #[cfg(test)]
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }
}

fn open_journal(path: &Path, generation: u64) -> anyhow::Result<File> {
    let file = journal_path(path, generation);
    let journal = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .with_context(|| format!("cannot open the report journal {}", file.display()))?;
    // The new name must be durable before anything in it counts.
    sync_directory(path).with_context(|| format!("cannot sync {}", directory(path).display()))?;
    Ok(journal)
}

/// Distinguishes this process's temporary files: a write cut off by a crash never shares a name with the
/// next one.
static SNAPSHOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes the snapshot next to `path`, syncs it, renames it into place, syncs the directory, then removes
/// the journals it holds. Returns its size.
fn write_snapshot(path: &Path, ledger: &Ledger) -> anyhow::Result<u64> {
    let json = serde_json::to_vec(ledger)?;
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = (|| -> anyhow::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_directory(path)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))?;
    for generation in journal_generations(path)?
        .into_iter()
        .filter(|g| *g < ledger.journal_generation)
    {
        let _ = std::fs::remove_file(journal_path(path, generation));
    }
    Ok(json.len() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use kvab_contract::report::{Report, RoutedCount};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvab-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("reports.json")
    }

    /// Applies `reports` reports of one VM (cumulative `10 * sequence`) and appends each.
    fn feed(
        ledger: &mut Ledger,
        store: &mut Store,
        reporter: &str,
        sequences: std::ops::RangeInclusive<u64>,
    ) {
        let arms = vec!["fs".to_string()];
        for sequence in sequences {
            let report = Report {
                reporter: reporter.into(),
                sequence,
                started_at_ms: 0,
                totals: vec![RoutedCount {
                    requested: "fs".into(),
                    served: "fs".into(),
                    endpoint: "10.0.0.1:8080".into(),
                    code_class: "2xx".into(),
                    count: 10 * sequence,
                }],
            };
            let (_, change) = ledger
                .apply_logged(&report, &arms, &|_| Some("ns/fs".into()), false, 1)
                .unwrap();
            let (record, _) = change.unwrap();
            store.append(&[record]).unwrap();
            store.compact_if_due(ledger);
        }
    }

    fn total(ledger: &Ledger) -> u64 {
        ledger.routed().map(|(_, n)| n).sum()
    }

    #[test]
    fn compaction_keeps_everything_and_removes_the_journals_it_holds() {
        let path = scratch("compact");
        let (restored, mut store) = Store::open(&path).unwrap();
        assert!(restored.is_none(), "a first start");
        store.set_compact_after(600);
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=30);
        store.finish_compaction();
        feed(&mut ledger, &mut store, "b", 1..=5);
        drop(store);
        let generations = journal_generations(&path).unwrap();
        assert!(
            generations.len() <= 2,
            "old journals removed: {generations:?}"
        );
        let snapshot: Ledger = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(snapshot.journal_generation >= 2, "compacted more than once");
        let (restored, _) = Store::open(&path).unwrap();
        assert_eq!(total(&restored.unwrap()), total(&ledger));
        assert_eq!(total(&ledger), 300 + 50);
    }

    #[test]
    fn a_tail_cut_by_a_crash_is_dropped_and_a_damaged_journal_stops_the_start() {
        let path = scratch("torn");
        let (_, mut store) = Store::open(&path).unwrap();
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=3);
        drop(store);
        let journal = journal_path(&path, 0);
        let intact = std::fs::read(&journal).unwrap();
        // A crash in the middle of an append: half a line.
        let mut torn = intact.clone();
        torn.extend_from_slice(&intact[..intact.len() / 3 / 2]);
        std::fs::write(&journal, &torn).unwrap();
        let (restored, mut store) = Store::open(&path).unwrap();
        assert_eq!(total(&restored.unwrap()), 30);
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            intact,
            "the cut tail is gone"
        );
        // Appending after the repair gives whole lines again.
        let mut ledger = load(&path).unwrap().ledger.unwrap();
        feed(&mut ledger, &mut store, "a", 4..=4);
        drop(store);
        assert_eq!(total(&load(&path).unwrap().ledger.unwrap()), 40);

        // A line that does not read with good lines after it is damage, not a crash.
        let mut damaged = std::fs::read(&journal).unwrap();
        damaged[5] = b'#';
        std::fs::write(&journal, &damaged).unwrap();
        let error = format!("{:#}", Store::open(&path).err().unwrap());
        assert!(
            error.contains("damaged") && error.contains("journal.0"),
            "{error}"
        );
    }

    #[test]
    fn a_snapshot_that_does_not_read_stops_the_start_instead_of_restarting_the_counters() {
        let path = scratch("corrupt");
        std::fs::write(&path, b"{\"reporters\": [").unwrap();
        let error = format!("{:#}", Store::open(&path).err().unwrap());
        assert!(
            error.contains("refusing to start rather than restart the counters"),
            "{error}"
        );
        assert!(path.exists(), "left where it is for the operator");
        std::os::unix::fs::symlink("/dev/zero", journal_path(&path, 0)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let error = format!("{:#}", Store::open(&path).err().unwrap());
        assert!(error.contains("not a regular file"), "{error}");
    }
}
