use kvab_contract::report::RoutedCount;

use super::*;

fn arms() -> Vec<String> {
    vec!["nvlink".into(), "fs".into()]
}

fn report(reporter: &str, sequence: u64, rows: &[(&str, &str, &str, &str, u64)]) -> Report {
    Report {
        reporter: reporter.into(),
        sequence,
        started_at_ms: 0,
        totals: rows
            .iter()
            .map(
                |&(requested, served, endpoint, code_class, count)| RoutedCount {
                    requested: requested.into(),
                    served: served.into(),
                    endpoint: endpoint.into(),
                    code_class: code_class.into(),
                    count,
                },
            )
            .collect(),
    }
}

fn pods(address: &str) -> Option<String> {
    match address {
        "10.0.0.5:8080" => Some("llm-d-vllm/p2p".into()),
        "10.0.0.7:8080" => Some("llm-d-vllm/fs".into()),
        _ => None,
    }
}

fn key(requested: &str, served: &str, pod: &str, class: &str) -> RoutedKey {
    RoutedKey {
        requested: requested.into(),
        served: served.into(),
        pod: pod.into(),
        code_class: class.into(),
    }
}

fn total(ledger: &Ledger) -> u64 {
    ledger.routed().map(|(_, n)| n).sum()
}

#[test]
fn counters_saturate_instead_of_wrapping() {
    let mut ledger = Ledger::default();
    let max = u64::MAX;
    let r1 = report(
        "a",
        1,
        &[
            ("nvlink", "nvlink", "10.0.0.9:1", "2xx", max),
            ("nvlink", "nvlink", "10.0.0.9:2", "2xx", max),
        ],
    );
    ledger.apply(&r1, &arms(), &pods, false).unwrap();
    let r2 = report("b", 1, &[("nvlink", "nvlink", "10.0.0.9:3", "2xx", 1)]);
    ledger.apply(&r2, &arms(), &pods, false).unwrap();
    assert_eq!(
        ledger.routed().collect::<Vec<_>>(),
        [(&key("nvlink", "nvlink", "unknown", "2xx"), max)]
    );
}

#[test]
fn only_increments_are_added_and_repeats_add_nothing() {
    let mut ledger = Ledger::default();
    let r1 = report("a", 1, &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 3)]);
    let out = ledger.apply(&r1, &arms(), &pods, false).unwrap();
    assert_eq!(
        out,
        Outcome::Applied(vec![(key("nvlink", "nvlink", "llm-d-vllm/p2p", "2xx"), 3)])
    );
    assert_eq!(
        ledger.apply(&r1, &arms(), &pods, false).unwrap(),
        Outcome::Duplicate
    );
    let r3 = report(
        "a",
        3,
        &[
            ("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 5),
            ("none", "fs", "10.0.0.7:8080", "2xx", 1),
        ],
    );
    ledger.apply(&r3, &arms(), &pods, false).unwrap();
    // Sequence 2 was lost and arrives late: it changes nothing.
    let r2 = report("a", 2, &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 4)]);
    assert_eq!(
        ledger.apply(&r2, &arms(), &pods, false).unwrap(),
        Outcome::Stale
    );
    assert_eq!(total(&ledger), 6);
    // A second reporter adds its own totals.
    ledger
        .apply(
            &report("b", 1, &[("fs", "fs", "10.0.0.7:8080", "5xx", 2)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    assert_eq!(total(&ledger), 8);
    assert_eq!(ledger.reporters(), 2);
}

#[test]
fn increments_go_to_the_pod_that_owns_the_endpoint_now() {
    let mut ledger = Ledger::default();
    ledger
        .apply(
            &report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 2)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    // The address moves to another pod: the old pod keeps its 2, the new one gets the rest.
    let moved = |a: &str| (a == "10.0.0.7:8080").then(|| "llm-d-vllm/fs-2".to_string());
    ledger
        .apply(
            &report("a", 2, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
            &arms(),
            &moved,
            false,
        )
        .unwrap();
    let rows: Vec<(RoutedKey, u64)> = ledger.routed().map(|(k, n)| (k.clone(), n)).collect();
    assert_eq!(
        rows,
        [
            (key("fs", "fs", "llm-d-vllm/fs", "2xx"), 2),
            (key("fs", "fs", "llm-d-vllm/fs-2", "2xx"), 3)
        ]
    );
    // No upstream and unknown addresses get their own pod labels.
    ledger
        .apply(
            &report(
                "a",
                3,
                &[
                    ("none", "none", "", "4xx", 1),
                    ("fs", "unknown", "10.9.9.9:1", "2xx", 1),
                ],
            ),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    assert!(ledger.routed().any(|(k, n)| k.pod == NO_POD && n == 1));
    assert!(ledger.routed().any(|(k, n)| k.pod == UNKNOWN_POD && n == 1));
}

#[test]
fn an_entry_left_out_keeps_its_total_and_counts_on_when_it_comes_back() {
    let mut ledger = Ledger::default();
    let a = ("fs", "fs", "10.0.0.7:8080", "2xx");
    let b = ("nvlink", "nvlink", "10.0.0.5:8080", "2xx");
    let row =
        |(r, s, e, c): (&'static str, &'static str, &'static str, &'static str), n| (r, s, e, c, n);
    ledger
        .apply(
            &report("vm", 1, &[row(a, 5), row(b, 3)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    // Only `a` changed: `b` is left out and keeps 3.
    ledger
        .apply(&report("vm", 2, &[row(a, 9)]), &arms(), &pods, false)
        .unwrap();
    assert_eq!(total(&ledger), 12);
    ledger
        .apply(&report("vm", 3, &[row(b, 4)]), &arms(), &pods, false)
        .unwrap();
    assert_eq!(total(&ledger), 13);
}

#[test]
fn a_baselined_reporter_s_new_entries_are_starting_points_too() {
    // Without saved state the first report of an older VM is a baseline; an entry that VM
    // reports for the first time later may hold requests the previous run counted.
    let mut ledger = Ledger::default();
    let a = ("fs", "fs", "10.0.0.7:8080", "2xx", 50);
    ledger
        .apply(&report("old", 8, &[a]), &arms(), &pods, true)
        .unwrap();
    ledger
        .apply(
            &report(
                "old",
                9,
                &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 40)],
            ),
            &arms(),
            &pods,
            true,
        )
        .unwrap();
    assert_eq!(total(&ledger), 0);
    ledger
        .apply(
            &report(
                "old",
                10,
                &[
                    ("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 42),
                    ("fs", "fs", "10.0.0.7:8080", "2xx", 51),
                ],
            ),
            &arms(),
            &pods,
            true,
        )
        .unwrap();
    assert_eq!(total(&ledger), 3);
    // A reporter first seen with nothing to baseline counts its new entries in full.
    ledger
        .apply(
            &report("new", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 7)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    ledger
        .apply(
            &report("new", 2, &[("fs", "fs", "", "5xx", 2)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    assert_eq!(total(&ledger), 12);
}

#[test]
fn a_first_report_can_be_a_baseline() {
    let mut ledger = Ledger::default();
    let r = report(
        "old",
        7,
        &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 100)],
    );
    assert_eq!(
        ledger.apply(&r, &arms(), &pods, true).unwrap(),
        Outcome::Baselined
    );
    assert_eq!(total(&ledger), 0);
    let next = report(
        "old",
        8,
        &[("nvlink", "nvlink", "10.0.0.5:8080", "2xx", 104)],
    );
    ledger.apply(&next, &arms(), &pods, true).unwrap();
    assert_eq!(total(&ledger), 4);
}

#[test]
fn two_vms_under_one_id_are_named_after_repeated_regressions() {
    // Two VMs' cumulative totals interleaved under one id: each one's report goes down
    // against the other's, so about half are refused, and the repeats say why.
    let mut ledger = Ledger::default();
    let row = |count| [("fs", "fs", "10.0.0.7:8080", "2xx", count)];
    ledger
        .apply(&report("dup", 1, &row(60)), &arms(), &pods, false)
        .unwrap();
    let first = ledger.apply(&report("dup", 2, &row(50)), &arms(), &pods, false);
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.contains("went down") && !e.contains("two filter VMs")),
        "{first:?}"
    );
    let second = ledger.apply(&report("dup", 3, &row(55)), &arms(), &pods, false);
    assert!(
        second
            .as_ref()
            .is_err_and(|e| e.contains("2 reports in a row: two filter VMs")),
        "{second:?}"
    );
    // An accepted report clears the streak.
    ledger
        .apply(&report("dup", 4, &row(70)), &arms(), &pods, false)
        .unwrap();
    let again = ledger.apply(&report("dup", 5, &row(65)), &arms(), &pods, false);
    assert!(
        again.as_ref().is_err_and(|e| !e.contains("two filter VMs")),
        "{again:?}"
    );
    assert_eq!(total(&ledger), 70);
}

#[test]
fn a_retired_reporter_keeps_its_counts_and_is_never_counted_from_zero_again() {
    let mut ledger = Ledger::default();
    let row = |n| [("fs", "fs", "10.0.0.7:8080", "2xx", n)];
    ledger
        .apply_logged(&report("a", 1, &row(10)), &arms(), &pods, false, 1_000)
        .unwrap();
    ledger
        .apply_logged(&report("b", 1, &row(3)), &arms(), &pods, false, 5_000)
        .unwrap();
    assert_eq!(ledger.idle_reporters(2_000, 0), vec!["a".to_string()]);
    ledger.retire(&["a".to_string()], 6_000);
    assert_eq!((ledger.reporters(), ledger.retired()), (1, 1));
    let total = |l: &Ledger| l.routed().map(|(_, n)| n).sum::<u64>();
    assert_eq!(total(&ledger), 13, "its counts stay");
    // Back with cumulative totals: a starting point, not 15 more.
    let (outcome, _) = ledger
        .apply_logged(&report("a", 2, &row(15)), &arms(), &pods, false, 7_000)
        .unwrap();
    assert_eq!(outcome, Outcome::Baselined);
    assert_eq!((total(&ledger), ledger.retired()), (13, 0));
    ledger
        .apply_logged(&report("a", 3, &row(20)), &arms(), &pods, false, 8_000)
        .unwrap();
    assert_eq!(total(&ledger), 18);
    // A reporter saved before report times were kept counts as seen when the ledger was loaded.
    ledger.reporters.get_mut("b").unwrap().last_seen_ms = 0;
    assert_eq!(ledger.idle_reporters(9_000, 10_000), vec!["a".to_string()]);
}

#[test]
fn retired_ids_are_bounded_and_unused_keys_dropped() {
    let mut ledger = Ledger::default();
    for i in 0..3 {
        let endpoint = format!("10.0.0.{i}:8080");
        let rows = [("fs", "fs", endpoint.as_str(), "2xx", 1)];
        ledger
            .apply_logged(
                &report(&format!("vm{i}"), 1, &rows),
                &arms(),
                &pods,
                false,
                1,
            )
            .unwrap();
    }
    assert_eq!(ledger.keys.len(), 3);
    ledger.retire(&["vm0".to_string(), "vm1".to_string()], 2);
    assert_eq!(ledger.keys.len(), 1, "only vm2's key is still held");
    let ids: Vec<String> = (0..MAX_RETIRED + 10).map(|i| format!("x{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        ledger.retired.insert(id.clone(), i as u64 + 10);
    }
    ledger.retire(&[], 99);
    assert_eq!(ledger.retired(), MAX_RETIRED);
    assert!(
        !ledger.retired.contains_key("vm0"),
        "the oldest are forgotten first"
    );
    assert!(ledger.retired.contains_key(&ids[ids.len() - 1]));
}

#[test]
fn an_undone_report_leaves_the_ledger_as_it_was_and_a_replayed_one_as_applied() {
    let mut ledger = Ledger::default();
    let first = report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]);
    ledger.apply(&first, &arms(), &pods, false).unwrap();
    let before = serde_json::to_string(&ledger).unwrap();
    let next = report(
        "a",
        2,
        &[
            ("fs", "fs", "10.0.0.7:8080", "2xx", 9),
            ("fs", "fs", "10.0.0.7:8080", "5xx", 1),
        ],
    );
    let (_, change) = ledger
        .apply_logged(&next, &arms(), &pods, false, 9)
        .unwrap();
    let (record, undo) = change.unwrap();
    let applied = serde_json::to_string(&ledger).unwrap();
    ledger.undo(undo);
    assert_eq!(serde_json::to_string(&ledger).unwrap(), before);
    let (_, change) = ledger
        .apply_logged(
            &report("b", 1, &[("fs", "fs", "", "2xx", 2)]),
            &arms(),
            &pods,
            false,
            9,
        )
        .unwrap();
    ledger.undo(change.unwrap().1);
    assert_eq!(
        serde_json::to_string(&ledger).unwrap(),
        before,
        "a new reporter is removed"
    );
    // The journal's record, replayed on the old state, gives what applying gave.
    let record: Record = serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
    ledger.replay(&record);
    assert_eq!(serde_json::to_string(&ledger).unwrap(), applied);
}

#[test]
fn entries_are_counted_through_apply_undo_retire_and_load_and_room_is_made_from_the_idle() {
    let mut ledger = Ledger::default();
    let recount = |l: &Ledger| l.reporters.values().map(|r| r.totals.len()).sum::<usize>();
    let rows = |n: usize| -> Vec<(String, u64)> {
        (0..n).map(|i| (format!("10.0.1.{i}:8080"), 1)).collect()
    };
    let wide = |id: &str, sequence, n| {
        let rows = rows(n);
        let rows: Vec<_> = rows
            .iter()
            .map(|(e, c)| ("fs", "fs", e.as_str(), "2xx", *c))
            .collect();
        report(id, sequence, &rows)
    };
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        ledger
            .apply_logged(&wide(id, 1, 4), &arms(), &pods, false, 10 * i as u64)
            .unwrap();
    }
    assert_eq!((ledger.entries(), recount(&ledger)), (12, 12));
    let (_, change) = ledger
        .apply_logged(&wide("a", 2, 6), &arms(), &pods, false, 50)
        .unwrap();
    assert_eq!(ledger.entries(), 14);
    ledger.undo(change.unwrap().1);
    assert_eq!((ledger.entries(), recount(&ledger)), (12, 12));
    let limits = Limits {
        max_reporters: 3,
        max_entries: 14,
    };
    let growth = ledger.growth(&wide("d", 1, 3));
    assert_eq!(
        growth,
        Growth {
            reporters: 1,
            entries: 3
        }
    );
    assert!(!ledger.fits(growth, &limits));
    assert_eq!(
        ledger.growth(&wide("a", 1, 9)),
        Growth::default(),
        "a repeat adds nothing"
    );
    // Idle since before 15 ms: a (0) and b (10); a is the longest idle, and one is enough.
    assert_eq!(
        ledger.make_room(growth, &limits, 15, 0, "d"),
        Some(vec!["a".to_string()])
    );
    // Before 5 ms only a: not enough for 9 more entries.
    let big = ledger.growth(&wide("d", 1, 9));
    assert_eq!(ledger.make_room(big, &limits, 5, 0, "d"), None);
    ledger.retire(&["a".to_string()], 60);
    assert_eq!((ledger.entries(), recount(&ledger)), (8, 8));
    let json = serde_json::to_vec(&ledger).unwrap();
    let mut back: Ledger = serde_json::from_slice(&json).unwrap();
    back.share_keys();
    assert_eq!(back.entries(), 8);
}

#[test]
fn stale_and_duplicate_reports_name_a_shared_id_once() {
    let mut ledger = Ledger::default();
    let row = |n| [("fs", "fs", "10.0.0.7:8080", "2xx", n)];
    ledger
        .apply(&report("dup", 10, &row(5)), &arms(), &pods, false)
        .unwrap();
    for sequence in [3, 10, 4, 5, 6] {
        ledger
            .apply(&report("dup", sequence, &row(9)), &arms(), &pods, false)
            .unwrap();
    }
    assert_eq!(ledger.take_shared(), ["dup".to_string()]);
    assert!(ledger.take_shared().is_empty());
    // Regressions name it too, once.
    let mut ledger = Ledger::default();
    ledger
        .apply(&report("x", 1, &row(9)), &arms(), &pods, false)
        .unwrap();
    for sequence in 2..6 {
        let _ = ledger.apply(&report("x", sequence, &row(1)), &arms(), &pods, false);
    }
    assert_eq!(ledger.take_shared(), ["x".to_string()]);
}

#[test]
fn invalid_reports_change_nothing() {
    let mut ledger = Ledger::default();
    ledger
        .apply(
            &report("a", 1, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    for (bad, why) in [
        (
            report("a", 2, &[("fs", "fs", "10.0.0.7:8080", "2xx", 4)]),
            "went down",
        ),
        (report("", 2, &[]), "reporter"),
        (report("a b", 2, &[]), "reporter"),
        (report("a", 0, &[]), "sequence"),
        (report("a", 2, &[("gpu", "fs", "", "2xx", 1)]), "requested"),
        (report("a", 2, &[("fs", "gpu", "", "2xx", 1)]), "served"),
        // Configured arms are ArmNames: a name no part may change is no configured arm.
        (
            report("a", 2, &[("NVLink", "nvlink", "", "2xx", 1)]),
            "requested: \"NVLink\" is not an arm",
        ),
        (
            report("a", 2, &[("fs", "FS", "", "2xx", 1)]),
            "served: \"FS\" is not an arm",
        ),
        (report("a", 2, &[("fs", "fs", "", "2XX", 1)]), "code_class"),
        (
            report("a", 2, &[("fs", "fs", "<script>", "2xx", 1)]),
            "endpoint",
        ),
        (
            report(
                "a",
                2,
                &[("fs", "fs", "", "2xx", 1), ("fs", "fs", "", "2xx", 2)],
            ),
            "repeats",
        ),
    ] {
        let e = ledger.apply(&bad, &arms(), &pods, false).unwrap_err();
        assert!(e.contains(why), "{e}");
    }
    assert_eq!(total(&ledger), 5);
}

#[test]
fn the_ledger_survives_a_round_trip_through_json() {
    let mut ledger = Ledger::default();
    ledger
        .apply(
            &report("a", 4, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
            &arms(),
            &pods,
            false,
        )
        .unwrap();
    let json = serde_json::to_vec(&ledger).unwrap();
    let mut back: Ledger = serde_json::from_slice(&json).unwrap();
    assert_eq!(total(&back), 5);
    assert_eq!(
        back.apply(
            &report("a", 4, &[("fs", "fs", "10.0.0.7:8080", "2xx", 5)]),
            &arms(),
            &pods,
            false
        )
        .unwrap(),
        Outcome::Duplicate
    );
    back.apply(
        &report("a", 5, &[("fs", "fs", "10.0.0.7:8080", "2xx", 6)]),
        &arms(),
        &pods,
        false,
    )
    .unwrap();
    assert_eq!(total(&back), 6);
}
