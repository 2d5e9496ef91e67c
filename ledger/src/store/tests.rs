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
