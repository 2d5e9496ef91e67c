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

use crate::ledger::{Ledger, Line};

/// The journal is compacted into a new snapshot once it is larger than this and than the snapshot.
pub const COMPACT_AFTER_BYTES: u64 = 4 << 20;

/// The first word of a snapshot's header line.
const SNAPSHOT_MAGIC: &[u8] = b"kvab-report-snapshot 2 ";

/// State files are the operator's counts and nobody else's.
const MODE: u32 = 0o600;

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

fn damaged(file: &Path, why: impl Into<String>) -> OpenError {
    OpenError::Damaged {
        file: file.to_path_buf(),
        why: why.into(),
    }
}

fn unavailable(e: impl Into<anyhow::Error>, what: String) -> OpenError {
    OpenError::Unavailable(e.into().context(what))
}

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

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn journal_path(path: &Path, generation: u64) -> PathBuf {
    with_suffix(path, &format!(".log.{generation}"))
}

/// A journal of the format before checksums.
fn legacy_journal_path(path: &Path, generation: u64) -> PathBuf {
    with_suffix(path, &format!(".journal.{generation}"))
}

pub fn lock_path(path: &Path) -> PathBuf {
    with_suffix(path, ".lock")
}

fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn sync_directory(path: &Path) -> std::io::Result<()> {
    File::open(directory(path))?.sync_all()
}

/// The names in the state file's directory.
fn names(path: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(directory(path)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot list {}", directory(path).display()))
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", directory(path).display()))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The generations `n` of the files `<state file><infix><n>` present, sorted.
fn numbered(path: &Path, infix: &str) -> anyhow::Result<Vec<u64>> {
    let prefix = format!(
        "{}{infix}",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut generations: Vec<u64> = names(path)?
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix))
        .filter_map(|g| g.parse::<u64>().ok())
        .collect();
    generations.sort_unstable();
    Ok(generations)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

/// A journal line's checksum: the first 8 bytes of the SHA-256 of its JSON, in hex.
fn line_sum(json: &[u8]) -> String {
    hex(&sha256(json).as_ref()[..8])
}

/// A snapshot file's bytes: header line, then the JSON ledger.
fn snapshot_bytes(ledger: &Ledger) -> anyhow::Result<Vec<u8>> {
    let json = serde_json::to_vec(ledger)?;
    let mut bytes = Vec::with_capacity(json.len() + 120);
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.extend_from_slice(
        format!(
            "sha256={} bytes={}\n",
            hex(sha256(&json).as_ref()),
            json.len()
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Reads a snapshot of this format, checking its checksum.
fn read_snapshot(path: &Path, bytes: &[u8]) -> Result<Ledger, OpenError> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| damaged(path, "the snapshot's header line has no end"))?;
    let header = String::from_utf8_lossy(&bytes[SNAPSHOT_MAGIC.len()..newline]).into_owned();
    let body = &bytes[newline + 1..];
    let field = |name: &str| {
        header
            .split(' ')
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_owned)
    };
    let (Some(sum), Some(len)) = (field("sha256="), field("bytes=")) else {
        return Err(damaged(
            path,
            format!("the snapshot's header {header:?} does not read"),
        ));
    };
    if len.parse::<usize>().ok() != Some(body.len()) {
        return Err(damaged(
            path,
            format!(
                "the snapshot holds {} bytes, its header says {len}",
                body.len()
            ),
        ));
    }
    if hex(sha256(body).as_ref()) != sum {
        return Err(damaged(
            path,
            "the snapshot's checksum does not match: it was changed after it was written",
        ));
    }
    let mut ledger: Ledger = serde_json::from_slice(body)
        .map_err(|e| damaged(path, format!("the snapshot does not read: {e}")))?;
    ledger.share_keys();
    Ok(ledger)
}

/// One journal line of this format (newline removed), checked.
fn read_line(line: &[u8]) -> Option<Line> {
    let (sum, json) = (line.get(..16)?, line.get(17..)?);
    if line.get(16) != Some(&b' ') || line_sum(json).as_bytes() != sum {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// A line of the format before checksums.
fn read_legacy_line(line: &[u8]) -> Option<Line> {
    serde_json::from_slice(line).ok()
}

/// Replays the lines of one journal; returns the length of the part that reads. Every line with its
/// newline must read; only the final piece without a newline, in the newest journal, is a crash's tail.
fn replay(
    ledger: &mut Ledger,
    file: &Path,
    bytes: &[u8],
    newest: bool,
    read: fn(&[u8]) -> Option<Line>,
) -> Result<usize, OpenError> {
    let mut offset = 0;
    for piece in bytes.split_inclusive(|b| *b == b'\n') {
        let Some(line) = piece.strip_suffix(b"\n") else {
            if newest {
                return Ok(offset);
            }
            return Err(damaged(
                file,
                format!(
                    "its last line (byte {offset}) has no end, and it is not the newest journal"
                ),
            ));
        };
        let Some(line) = read(line) else {
            return Err(damaged(
                file,
                format!("the complete line at byte {offset} fails its checksum or does not read (a crash only cuts the final line short)"),
            ));
        };
        ledger.replay_line(&line);
        offset += piece.len();
    }
    Ok(bytes.len())
}

fn read_file(file: &Path) -> Result<Option<Vec<u8>>, OpenError> {
    match std::fs::metadata(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable(e, format!("cannot read {}", file.display()))),
        // A device or a pipe in a state file's place would be read without end.
        Ok(m) if !m.is_file() => return Err(damaged(file, "it is not a regular file")),
        Ok(_) => {}
    }
    std::fs::read(file)
        .map(Some)
        .map_err(|e| unavailable(e, format!("cannot read {}", file.display())))
}

/// What `load` found.
pub struct Loaded {
    /// `None`: no state yet, a first start.
    pub ledger: Option<Ledger>,
    snapshot_len: u64,
    /// The newest journal: generation, length, and the length of its intact part.
    newest: Option<(u64, u64, u64)>,
    /// Read from the format before checksums: to be written in this one.
    legacy: bool,
    /// Files the snapshot already holds (older journals, imported ones), to remove.
    leftovers: Vec<PathBuf>,
}

impl Loaded {
    /// No state: a first start, or one after `--repair-state` moved the damaged files aside.
    fn empty() -> Self {
        Loaded {
            ledger: None,
            snapshot_len: 0,
            newest: None,
            legacy: false,
            leftovers: Vec::new(),
        }
    }
}

/// Checks that `generations` (sorted) run from `from` without a gap, then replays each journal
/// (`file_of`) into `ledger` with `read`; returns the newest's generation, length and intact length.
fn replay_journals(
    ledger: &mut Ledger,
    from: u64,
    generations: &[u64],
    file_of: impl Fn(u64) -> PathBuf,
    read: fn(&[u8]) -> Option<Line>,
) -> Result<Option<(u64, u64, u64)>, OpenError> {
    for (i, &generation) in generations.iter().enumerate() {
        let expected = from + i as u64;
        if generation != expected {
            return Err(damaged(
                &file_of(expected),
                format!("this journal is missing (the snapshot holds up to generation {from}, the journals {generations:?} are there)"),
            ));
        }
    }
    let mut newest = None;
    for (i, &generation) in generations.iter().enumerate() {
        let file = file_of(generation);
        let bytes = read_file(&file)?.unwrap_or_default();
        let is_newest = i + 1 == generations.len();
        let intact = replay(ledger, &file, &bytes, is_newest, read)?;
        if is_newest {
            newest = Some((generation, bytes.len() as u64, intact as u64));
        }
    }
    Ok(newest)
}

/// Reads the snapshot and replays the journals, changing nothing on disk.
pub fn load(path: &Path) -> Result<Loaded, OpenError> {
    let list = |infix| {
        numbered(path, infix)
            .map_err(|e| OpenError::Unavailable(e.context("cannot list the report state files")))
    };
    let logs = list(".log.")?;
    let legacy_journals = list(".journal.")?;
    let snapshot = read_file(path)?;
    let mut empty_logs = true;
    for &generation in &logs {
        let file = journal_path(path, generation);
        if std::fs::metadata(&file).map_or(true, |m| m.len() > 0) {
            empty_logs = false;
        }
    }
    let legacy = match &snapshot {
        Some(bytes) => !bytes.starts_with(SNAPSHOT_MAGIC),
        None => !legacy_journals.is_empty(),
    };
    if legacy {
        if !empty_logs {
            return Err(damaged(
                path,
                "it is in the format before checksums, yet journals of the new format (.log.*) hold records",
            ));
        }
        let mut loaded = load_legacy(path, snapshot.as_deref(), &legacy_journals)?;
        // Empty journals of this format: a conversion cut short (journal 0 is opened anew).
        loaded.leftovers.extend(
            logs.iter()
                .filter(|g| **g > 0)
                .map(|g| journal_path(path, *g)),
        );
        return Ok(loaded);
    }
    let Some(bytes) = snapshot else {
        // The first start creates journal 0 and then the snapshot: an empty journal 0 alone is a first
        // start cut short.
        if logs.is_empty() || (logs == [0] && empty_logs) {
            return Ok(Loaded::empty());
        }
        return Err(damaged(
            path,
            format!(
                "it is missing while the journals {} are there, which hold only what followed it (the counts of every reporter would restart from zero)",
                logs.iter()
                    .map(|g| journal_path(path, *g).display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let mut ledger = read_snapshot(path, &bytes)?;
    let from = ledger.journal_generation;
    let mut leftovers: Vec<PathBuf> = logs
        .iter()
        .filter(|g| **g < from)
        .map(|g| journal_path(path, *g))
        .collect();
    // Journals of the old format next to a snapshot of this one were imported by a start cut short.
    leftovers.extend(
        legacy_journals
            .iter()
            .map(|g| legacy_journal_path(path, *g)),
    );
    let live: Vec<u64> = logs.into_iter().filter(|g| *g >= from).collect();
    if live.is_empty() {
        return Err(damaged(
            &journal_path(path, from),
            "this journal is missing: the snapshot names it as the one that follows it",
        ));
    }
    let newest = replay_journals(
        &mut ledger,
        from,
        &live,
        |g| journal_path(path, g),
        read_line,
    )?;
    Ok(Loaded {
        ledger: Some(ledger),
        snapshot_len: bytes.len() as u64,
        newest,
        legacy: false,
        leftovers,
    })
}

/// Reads the files of the format before checksums, with the same rules on gaps and tails.
fn load_legacy(
    path: &Path,
    snapshot: Option<&[u8]>,
    journals: &[u64],
) -> Result<Loaded, OpenError> {
    let mut ledger = match snapshot {
        Some(bytes) => {
            let mut ledger: Ledger = serde_json::from_slice(bytes)
                .map_err(|e| damaged(path, format!("it is not a kvab report state: {e}")))?;
            ledger.share_keys();
            Some(ledger)
        }
        None => None,
    };
    let from = ledger.as_ref().map_or(0, |l| l.journal_generation);
    let live: Vec<u64> = journals.iter().copied().filter(|g| *g >= from).collect();
    if !live.is_empty() {
        replay_journals(
            ledger.get_or_insert_with(Ledger::default),
            from,
            &live,
            |g| legacy_journal_path(path, g),
            read_legacy_line,
        )?;
    }
    let leftovers = journals
        .iter()
        .map(|g| legacy_journal_path(path, *g))
        .collect();
    Ok(Loaded {
        ledger,
        snapshot_len: 0,
        newest: None,
        legacy: true,
        leftovers,
    })
}

/// The exclusive lock on a state file, held while the process uses it.
pub struct StateLock {
    _file: File,
}

/// Takes the state's lock (`<state file>.lock`, with `flock`), writing this process's PID in it. Held by
/// another process: `Locked`, naming its PID.
pub fn lock(path: &Path) -> Result<StateLock, OpenError> {
    let file = lock_path(path);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(MODE)
        .open(&file)
        .map_err(|e| unavailable(e, format!("cannot open the lock file {}", file.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "a process that wrote no PID".to_owned()
            } else {
                format!("PID {holder}")
            };
            return Err(OpenError::Locked(format!(
                "the report state {} (key reports.state_file) is in use by another kvab serve ({holder}, holding {}); two processes on one state file would lose counts: stop that one, or give this one a reports.state_file of its own",
                path.display(),
                file.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(unavailable(e, format!("cannot lock {}", file.display())))
        }
    }
    lock.set_len(0)
        .and_then(|()| lock.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| unavailable(e, format!("cannot write {}", file.display())))?;
    Ok(StateLock { _file: lock })
}

/// Moves every state file (snapshot, journals) aside with the suffix `.damaged.<n>`, `n` one more than
/// any used before; returns the new names.
pub fn move_aside(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let all = names(path)?;
    let n = all
        .iter()
        .filter(|f| f.starts_with(name.as_ref()))
        .filter_map(|f| {
            f.rsplit_once(".damaged.")
                .and_then(|(_, n)| n.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
        + 1;
    let mut files = Vec::new();
    if std::fs::symlink_metadata(path).is_ok() {
        files.push(path.to_path_buf());
    }
    files.extend(
        numbered(path, ".log.")?
            .into_iter()
            .map(|g| journal_path(path, g)),
    );
    files.extend(
        numbered(path, ".journal.")?
            .into_iter()
            .map(|g| legacy_journal_path(path, g)),
    );
    let mut moved = Vec::new();
    for file in files {
        let to = with_suffix(&file, &format!(".damaged.{n}"));
        std::fs::rename(&file, &to)
            .with_context(|| format!("cannot move {} to {}", file.display(), to.display()))?;
        moved.push(to);
    }
    sync_directory(path).with_context(|| format!("cannot sync {}", directory(path).display()))?;
    Ok(moved)
}

/// Removes the temporary snapshots a crash left (`<state file>.tmp.<n>`, and `<stem>.tmp.<pid>.<n>` of
/// earlier versions); returns how many could not be removed.
fn remove_temporary_files(path: &Path) -> u64 {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let numeric = |s: &str, parts: usize| {
        let pieces: Vec<&str> = s.split('.').collect();
        pieces.len() == parts && pieces.iter().all(|p| p.parse::<u64>().is_ok())
    };
    let Ok(all) = names(path) else {
        return 1;
    };
    let mut failed = 0;
    for file in all {
        let ours = file
            .strip_prefix(&format!("{name}.tmp."))
            .is_some_and(|n| numeric(n, 1))
            || file
                .strip_prefix(&format!("{stem}.tmp."))
                .is_some_and(|n| numeric(n, 2));
        if ours {
            let file = directory(path).join(file);
            match std::fs::remove_file(&file) {
                Ok(()) => log::info!("removed {}, a snapshot cut off by a crash", file.display()),
                Err(e) => {
                    failed += 1;
                    log::error!("cannot remove {}: {e}", file.display());
                }
            }
        }
    }
    failed
}

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

    #[cfg(test)]
    pub fn set_compact_after(&mut self, bytes: u64) {
        self.compact_after = bytes;
    }
}

/// Removes the journals before `generation` (a snapshot holds them); returns how many could not be.
fn remove_older_journals(path: &Path, generation: u64) -> u64 {
    let Ok(generations) = numbered(path, ".log.") else {
        return 1;
    };
    let mut failed = 0;
    for older in generations.into_iter().filter(|g| *g < generation) {
        let file = journal_path(path, older);
        if let Err(e) = std::fs::remove_file(&file) {
            failed += 1;
            log::error!("cannot remove {}: {e}", file.display());
        }
    }
    failed
}

/// Opens the journal `generation` and cuts it to its first `len` bytes (what reads), synced.
fn open_journal_cut_to(path: &Path, generation: u64, len: u64) -> anyhow::Result<File> {
    let journal = open_journal(path, generation)?;
    journal
        .set_len(len)
        .and_then(|()| journal.sync_all())
        .with_context(|| format!("cannot cut {}", journal_path(path, generation).display()))?;
    Ok(journal)
}

fn open_journal(path: &Path, generation: u64) -> anyhow::Result<File> {
    let file = journal_path(path, generation);
    let journal = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(MODE)
        .open(&file)
        .with_context(|| format!("cannot open the report journal {}", file.display()))?;
    // The new name must be durable before anything in it counts.
    sync_directory(path).with_context(|| format!("cannot sync {}", directory(path).display()))?;
    Ok(journal)
}

/// Distinguishes temporary files: a write cut off by a crash never shares a name with the next one (and
/// the lock keeps other processes out; leftovers are removed on start).
static SNAPSHOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes the snapshot next to `path`, syncs it, renames it into place and syncs the directory. Returns
/// its size.
fn write_snapshot(path: &Path, ledger: &Ledger) -> anyhow::Result<u64> {
    let bytes = snapshot_bytes(ledger)?;
    let tmp = with_suffix(
        path,
        &format!(
            ".tmp.{}",
            SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
    );
    let written = (|| -> anyhow::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(MODE)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_directory(path)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {}", path.display()))?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use kvab_contract::report::{Report, RoutedCount};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvab-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("reports.json")
    }

    /// Applies reports of one VM (cumulative `10 * sequence`) and appends each.
    /// Report `sequence` of `reporter`: one fs entry at 10 per sequence, cumulative.
    fn fs_report(reporter: &str, sequence: u64) -> Report {
        Report {
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
        }
    }

    fn feed(
        ledger: &mut Ledger,
        store: &mut Store,
        reporter: &str,
        sequences: std::ops::RangeInclusive<u64>,
    ) {
        let arms = vec!["fs".to_string()];
        for sequence in sequences {
            let report = fs_report(reporter, sequence);
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

    /// A state of reporter "a" at `10 * last`, written and closed.
    fn written(path: &Path, last: u64) -> Ledger {
        let (_, mut store) = Store::open(path, false).unwrap();
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=last);
        store.finish_compaction();
        ledger
    }

    fn damage(path: &Path) -> (PathBuf, String) {
        match Store::open(path, false).err().unwrap() {
            OpenError::Damaged { file, why } => {
                let message = format!(
                    "{}",
                    OpenError::Damaged {
                        file: file.clone(),
                        why,
                    }
                );
                assert!(message.contains("--repair-state"), "{message}");
                (file, message)
            }
            other => panic!("not damage: {other}"),
        }
    }

    #[test]
    fn compaction_keeps_everything_and_removes_the_journals_it_holds() {
        let path = scratch("compact");
        let (restored, mut store) = Store::open(&path, false).unwrap();
        assert!(restored.is_none(), "a first start");
        store.set_compact_after(600);
        let mut ledger = Ledger::default();
        // Each feed waits for the snapshot it started: nothing here races the snapshot thread.
        for (reporter, last) in [("a", 30), ("b", 5)] {
            let mut next = 1;
            while next <= last {
                feed(&mut ledger, &mut store, reporter, next..=next);
                store.finish_compaction();
                next += 1;
            }
        }
        assert!(store.take_errors().is_empty());
        drop(store);
        let generations = numbered(&path, ".log.").unwrap();
        assert_eq!(
            generations.len(),
            1,
            "old journals removed: {generations:?}"
        );
        let snapshot = read_snapshot(&path, &std::fs::read(&path).unwrap()).unwrap();
        assert!(snapshot.journal_generation >= 2, "compacted more than once");
        assert_eq!(snapshot.journal_generation, generations[0]);
        let (restored, _) = Store::open(&path, false).unwrap();
        assert_eq!(total(&restored.unwrap()), total(&ledger));
        assert_eq!(total(&ledger), 300 + 50);
    }

    #[test]
    fn only_a_final_line_without_its_newline_is_a_crash_tail() {
        let path = scratch("torn");
        written(&path, 3);
        let journal = journal_path(&path, 0);
        let intact = std::fs::read(&journal).unwrap();
        // A crash in the middle of an append: part of a line, no newline.
        let mut torn = intact.clone();
        torn.extend_from_slice(&intact[..intact.len() / 3 / 2]);
        std::fs::write(&journal, &torn).unwrap();
        let (restored, mut store) = Store::open(&path, false).unwrap();
        let mut ledger = restored.unwrap();
        assert_eq!(total(&ledger), 30);
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            intact,
            "the cut tail is gone"
        );
        feed(&mut ledger, &mut store, "a", 4..=4);
        drop(store);
        assert_eq!(total(&load(&path).unwrap().ledger.unwrap()), 40);

        // The last complete line damaged: not a crash (its sync returned, it was acknowledged).
        let mut damaged = std::fs::read(&journal).unwrap();
        let at = damaged.len() - 5;
        damaged[at] = b'#';
        std::fs::write(&journal, &damaged).unwrap();
        let (file, message) = damage(&path);
        assert_eq!(file, journal);
        assert!(message.contains("fails its checksum"), "{message}");
        assert_eq!(std::fs::read(&journal).unwrap(), damaged, "left as it is");
    }

    #[test]
    fn a_flipped_byte_that_keeps_the_json_valid_is_refused() {
        let path = scratch("flip");
        written(&path, 3);
        let journal = journal_path(&path, 0);
        let text = String::from_utf8(std::fs::read(&journal).unwrap()).unwrap();
        // "count" 30 -> 32 in the last total: still JSON, 2 requests more.
        let flipped = text.replacen("\"sequence\":3", "\"sequence\":5", 1);
        assert_ne!(flipped, text);
        std::fs::write(&journal, flipped).unwrap();
        assert_eq!(damage(&path).0, journal);

        // The same in the snapshot.
        let path = scratch("flip-snapshot");
        let (_, mut store) = Store::open(&path, false).unwrap();
        store.set_compact_after(1);
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=2);
        store.finish_compaction();
        drop(store);
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        let (header, body) = text.split_once('\n').unwrap();
        let flipped = format!("{header}\n{}", body.replacen("10]", "12]", 1));
        assert_ne!(flipped, text);
        std::fs::write(&path, flipped).unwrap();
        let (file, message) = damage(&path);
        assert_eq!(file, path);
        assert!(message.contains("checksum"), "{message}");
    }

    #[test]
    fn a_deleted_snapshot_or_a_missing_journal_is_refused() {
        let path = scratch("deleted");
        written(&path, 3);
        std::fs::remove_file(&path).unwrap();
        let (file, message) = damage(&path);
        assert_eq!(file, path);
        assert!(message.contains("missing"), "{message}");

        // A gap between generations.
        let path = scratch("gap");
        let (_, mut store) = Store::open(&path, false).unwrap();
        store.set_compact_after(1);
        let mut ledger = Ledger::default();
        for sequence in 1..=3 {
            feed(&mut ledger, &mut store, "a", sequence..=sequence);
            // Keep the journals: no snapshot finishes (the snapshot stays at generation 0).
        }
        store.finish_compaction();
        drop(store);
        let generations = numbered(&path, ".log.").unwrap();
        let snapshot = read_snapshot(&path, &std::fs::read(&path).unwrap()).unwrap();
        let first = snapshot.journal_generation;
        assert_eq!(*generations.first().unwrap(), first);
        // Remove the journal the snapshot names.
        std::fs::remove_file(journal_path(&path, first)).unwrap();
        assert_eq!(damage(&path).0, journal_path(&path, first));
    }

    #[test]
    fn a_gap_in_the_journal_generations_is_refused() {
        let path = scratch("hole");
        written(&path, 2);
        // A later generation while the one between is missing.
        std::fs::write(journal_path(&path, 2), b"").unwrap();
        assert_eq!(damage(&path).0, journal_path(&path, 1));
    }

    #[test]
    fn a_second_holder_of_the_lock_is_refused_with_the_pid() {
        let path = scratch("lock");
        let held = lock(&path).unwrap();
        let error = lock(&path).err().unwrap();
        assert!(matches!(error, OpenError::Locked(_)));
        let message = error.to_string();
        assert!(
            message.contains(&format!("PID {}", std::process::id()))
                && message.contains("reports.json.lock"),
            "{message}"
        );
        drop(held);
        lock(&path).unwrap();
    }

    #[test]
    fn the_format_before_checksums_is_read_once_and_rewritten() {
        let path = scratch("legacy");
        // A snapshot at generation 1 and journal 1, as the previous version wrote them.
        let mut ledger = Ledger::default();
        let (_, mut store) = Store::open(&scratch("legacy-source"), false).unwrap();
        feed(&mut ledger, &mut store, "a", 1..=2);
        drop(store);
        ledger.journal_generation = 1;
        std::fs::write(&path, serde_json::to_vec(&ledger).unwrap()).unwrap();
        // One plain JSON line: reporter b at 10.
        let mut b = Ledger::default();
        let arms = vec!["fs".to_string()];
        let (_, change) = b
            .apply_logged(
                &fs_report("b", 1),
                &arms,
                &|_| Some("ns/fs".into()),
                false,
                1,
            )
            .unwrap();
        let mut line = serde_json::to_vec(&change.unwrap().0).unwrap();
        line.push(b'\n');
        std::fs::write(legacy_journal_path(&path, 1), &line).unwrap();
        std::fs::write(with_suffix(&path, ".journal.0"), b"left by a crash\n").unwrap();
        std::fs::write(path.with_file_name("reports.tmp.77.0"), b"{").unwrap();

        let (restored, store) = Store::open(&path, false).unwrap();
        assert_eq!(total(&restored.unwrap()), 20 + 10, "not taken for damage");
        drop(store);
        assert!(std::fs::read(&path).unwrap().starts_with(SNAPSHOT_MAGIC));
        assert!(
            numbered(&path, ".journal.").unwrap().is_empty(),
            "old journals removed"
        );
        assert!(
            !path.with_file_name("reports.tmp.77.0").exists(),
            "temp file removed"
        );
        let (restored, _) = Store::open(&path, false).unwrap();
        assert_eq!(total(&restored.unwrap()), 30);
    }

    #[test]
    fn repair_moves_the_damaged_files_aside_and_starts_empty() {
        let path = scratch("repair");
        written(&path, 3);
        std::fs::remove_file(&path).unwrap();
        damage(&path);
        let (restored, store) = Store::open(&path, true).unwrap();
        assert!(restored.is_none(), "counting starts again");
        drop(store);
        assert!(with_suffix(&journal_path(&path, 0), ".damaged.1").exists());
        // Damaged again: the next suffix, nothing overwritten.
        std::fs::write(&path, b"not a snapshot").unwrap();
        damage(&path);
        Store::open(&path, true).unwrap();
        assert!(with_suffix(&path, ".damaged.2").exists());
        assert!(with_suffix(&journal_path(&path, 0), ".damaged.1").exists());
        assert_eq!(total(&Store::open(&path, false).unwrap().0.unwrap()), 0);
    }

    #[test]
    fn state_files_are_private_and_leftover_temp_files_go() {
        let path = scratch("private");
        std::fs::write(with_suffix(&path, ".tmp.3"), b"half").unwrap();
        let _lock = lock(&path).unwrap();
        let (_, mut store) = Store::open(&path, false).unwrap();
        assert!(!with_suffix(&path, ".tmp.3").exists());
        store.set_compact_after(1);
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=2);
        store.finish_compaction();
        let newest = *numbered(&path, ".log.").unwrap().last().unwrap();
        for file in [path.clone(), journal_path(&path, newest), lock_path(&path)] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    #[test]
    fn a_failed_compaction_is_counted_and_put_off() {
        let path = scratch("unwritable");
        let (_, mut store) = Store::open(&path, false).unwrap();
        store.set_compact_after(1000);
        // The next journal cannot be created (as in a read-only directory).
        std::fs::create_dir(journal_path(&path, 1)).unwrap();
        let mut ledger = Ledger::default();
        feed(&mut ledger, &mut store, "a", 1..=30);
        let errors = store.take_errors();
        assert!(
            errors.len() >= 2 && errors.iter().all(|e| *e == "compact"),
            "{errors:?}"
        );
        assert!(
            errors.len() < 15,
            "put off, not tried on every batch: {errors:?}"
        );
        drop(store);
        std::fs::remove_dir(journal_path(&path, 1)).unwrap();
        let (restored, _) = Store::open(&path, false).unwrap();
        assert_eq!(total(&restored.unwrap()), 300, "nothing lost");
    }
}
