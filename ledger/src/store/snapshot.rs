//! Reading the state on start (snapshot, journals, the format before checksums) and writing a snapshot.

use super::*;

/// A snapshot file's bytes: header line, then the JSON ledger.
pub(super) fn snapshot_bytes(ledger: &Ledger) -> anyhow::Result<Vec<u8>> {
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
pub(super) fn read_snapshot(path: &Path, bytes: &[u8]) -> Result<Ledger, OpenError> {
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
pub(super) fn read_line(line: &[u8]) -> Option<Line> {
    let (sum, json) = (line.get(..16)?, line.get(17..)?);
    if line.get(16) != Some(&b' ') || line_sum(json).as_bytes() != sum {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// A line of the format before checksums.
pub(super) fn read_legacy_line(line: &[u8]) -> Option<Line> {
    serde_json::from_slice(line).ok()
}

/// Replays the lines of one journal; returns the length of the part that reads. Every line with its
/// newline must read; only the final piece without a newline, in the newest journal, is a crash's tail.
pub(super) fn replay(
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

pub(super) fn read_file(file: &Path) -> Result<Option<Vec<u8>>, OpenError> {
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
    pub(super) snapshot_len: u64,
    /// The newest journal: generation, length, and the length of its intact part.
    pub(super) newest: Option<(u64, u64, u64)>,
    /// Read from the format before checksums: to be written in this one.
    pub(super) legacy: bool,
    /// Files the snapshot already holds (older journals, imported ones), to remove.
    pub(super) leftovers: Vec<PathBuf>,
}

impl Loaded {
    /// No state: a first start, or one after `--repair-state` moved the damaged files aside.
    pub(super) fn empty() -> Self {
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
pub(super) fn replay_journals(
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
pub(super) fn load_legacy(
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

/// Writes the snapshot next to `path`, syncs it, renames it into place and syncs the directory. Returns
/// its size.
pub(super) fn write_snapshot(path: &Path, ledger: &Ledger) -> anyhow::Result<u64> {
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
