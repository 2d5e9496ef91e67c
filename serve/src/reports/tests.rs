//! Tests of `POST /v1/reports` and its writer: counts shown exactly when saved, failed saves, restarts from
//! the journal, retirement and the caps, a reporter id shared by two VMs, a damaged or locked state.

use std::future::Future;
use std::pin::pin;
use std::task::Context;
use std::time::Duration;

use super::*;
use crate::state::lock;

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

pub(crate) fn settings(state_file: Option<PathBuf>) -> Settings {
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
