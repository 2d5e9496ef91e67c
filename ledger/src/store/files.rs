//! The state's files: their names, the lock, moving damaged files aside, syncing and checksums.

use super::*;

pub(super) fn damaged(file: &Path, why: impl Into<String>) -> OpenError {
    OpenError::Damaged {
        file: file.to_path_buf(),
        why: why.into(),
    }
}

pub(super) fn unavailable(e: impl Into<anyhow::Error>, what: String) -> OpenError {
    OpenError::Unavailable(e.into().context(what))
}

/// `path` with `suffix` added to its file name.
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

pub(super) fn journal_path(path: &Path, generation: u64) -> PathBuf {
    with_suffix(path, &format!(".log.{generation}"))
}

/// A journal of the format before checksums.
pub(super) fn legacy_journal_path(path: &Path, generation: u64) -> PathBuf {
    with_suffix(path, &format!(".journal.{generation}"))
}

pub fn lock_path(path: &Path) -> PathBuf {
    with_suffix(path, ".lock")
}

pub(super) fn directory(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub(super) fn sync_directory(path: &Path) -> std::io::Result<()> {
    File::open(directory(path))?.sync_all()
}

/// The names in the state file's directory.
pub(super) fn names(path: &Path) -> anyhow::Result<Vec<String>> {
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
pub(super) fn numbered(path: &Path, infix: &str) -> anyhow::Result<Vec<u64>> {
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

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn sha256(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

/// A journal line's checksum: the first 8 bytes of the SHA-256 of its JSON, in hex.
pub(super) fn line_sum(json: &[u8]) -> String {
    hex(&sha256(json).as_ref()[..8])
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
pub(super) fn remove_temporary_files(path: &Path) -> u64 {
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

/// Removes the journals before `generation` (a snapshot holds them); returns how many could not be.
pub(super) fn remove_older_journals(path: &Path, generation: u64) -> u64 {
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
pub(super) fn open_journal_cut_to(path: &Path, generation: u64, len: u64) -> anyhow::Result<File> {
    let journal = open_journal(path, generation)?;
    journal
        .set_len(len)
        .and_then(|()| journal.sync_all())
        .with_context(|| format!("cannot cut {}", journal_path(path, generation).display()))?;
    Ok(journal)
}

pub(super) fn open_journal(path: &Path, generation: u64) -> anyhow::Result<File> {
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
pub(super) static SNAPSHOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
