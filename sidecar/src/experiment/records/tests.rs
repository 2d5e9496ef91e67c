//! The records file's tests: reading, refusing, writing and the round trip.

#![allow(clippy::unwrap_used)]
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::read::{parse, Records};
use super::*;

const HEADER: &str = r#"{"kvab_records":1,"arms":["nvlink","fs"],"classes":[{"label":"128","prompt_tokens":128},{"label":"file","prompt_tokens":null}],"stream":true,"endpoint":"/v1/chat/completions","load":"closed","concurrency":8,"rate":null,"seed":3,"warmup":8,"requests":10,"looks":5,"until":"decided","alpha":0.05,"min_effect":0.05,"srm_threshold":0.001,"run":{"sent":18,"skipped":0,"duration_s":1.5,"stopped_by":"requests"}}"#;
const RECORD: &str = r#"{"number":0,"class":"128","assigned":"nvlink","served":"fs","status":200,"error":null,"ttft_ms":12.5,"itl_ms":[1.25,2.0],"e2e_ms":20.0,"prompt_tokens":130,"output_tokens":3}"#;

fn parsed(lines: &[&str]) -> Result<Records, String> {
    parse(format!("{}\n", lines.join("\n")).as_bytes(), "f")
}

fn error(lines: &[&str]) -> String {
    parsed(lines).unwrap_err()
}

#[test]
fn a_good_file_reads_by_name() {
    let other = RECORD
        .replace("\"number\":0", "\"number\":7")
        .replace("\"128\"", "\"file\"")
        .replace("\"served\":\"fs\"", "\"served\":null")
        .replace("\"error\":null", "\"error\":\"timeout\"");
    // Blank lines and CRLF ends are read too.
    let text = format!("{HEADER}\r\n{RECORD}\n\n{other}");
    let records = parse(text.as_bytes(), "f").unwrap();
    let h = &records.header;
    assert_eq!(h.arms, ["nvlink", "fs"]);
    assert_eq!(h.classes[1].prompt_tokens, None);
    assert_eq!(h.load, LoadSpec::Closed { concurrency: 8 });
    assert_eq!((h.method.until, h.method.looks), (Until::Decided, 5));
    // A file from before the boundaries spent alpha by O'Brien-Fleming.
    assert_eq!(h.method.boundary, Boundary::ObrienFleming);
    assert_eq!(h.run.stopped_by, "requests");
    let (n, o) = &records.outcomes[0];
    assert_eq!(*n, 0);
    assert_eq!((o.class, o.assigned, o.served), (0, 0, Some(1)));
    assert_eq!(
        (o.ttft_ms, o.itl_ms.as_slice(), o.e2e_ms),
        (Some(12.5), &[1.25, 2.0][..], 20.0)
    );
    let (n, o) = &records.outcomes[1];
    assert_eq!((*n, o.class, o.served), (7, 1, None));
    assert_eq!(o.error.as_deref(), Some("timeout"));
}

#[test]
fn bad_lines_are_named_with_their_field() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "f: empty (no header line)"),
        (
            &["{\"arms\":[]}"],
            "f line 1: not a kvab experiment records header",
        ),
        (&["[1]"], "f line 1: not a JSON object"),
        (
            &[&HEADER.replace("\"kvab_records\":1", "\"kvab_records\":2")],
            "f line 1: field `kvab_records`: version 2",
        ),
        (
            &[&HEADER.replace("\"alpha\":0.05", "\"alpha\":1.5")],
            "f line 1: field `alpha`: must be more than 0",
        ),
        (
            &[&HEADER.replace("\"seed\":3,", "")],
            "f line 1: field `seed` is missing",
        ),
        (
            &[&HEADER.replace("\"seed\":3", "\"seed\":3,\"colour\":1")],
            "f line 1: field `colour` is not known",
        ),
        (
            &[&HEADER.replace("\"looks\":5", "\"looks\":5,\"boundary\":\"bonferroni\"")],
            "f line 1: field `boundary`: must be one of obrien-fleming, pocock, always-valid",
        ),
        (
            &[&HEADER.replace("\"nvlink\",\"fs\"", "\"fs\",\"fs\"")],
            "f line 1: field `arms`: names one arm twice",
        ),
        (
            &[&HEADER.replace("\"rate\":null", "\"rate\":3.0")],
            "f line 1: field `load`",
        ),
        (
            &[
                HEADER,
                &RECORD.replace("\"assigned\":\"nvlink\"", "\"assigned\":\"gpu\""),
            ],
            "f line 2: field `assigned`: arm \"gpu\" is not one of the header's arms",
        ),
        (
            &[
                HEADER,
                &RECORD.replace("\"served\":\"fs\"", "\"served\":\"gpu\""),
            ],
            "f line 2: field `served`: arm \"gpu\"",
        ),
        (
            &[
                HEADER,
                &RECORD.replace("\"class\":\"128\"", "\"class\":\"64\""),
            ],
            "f line 2: field `class`: \"64\" is not one of the header's classes",
        ),
        (
            &[HEADER, RECORD, RECORD],
            "f line 3: field `number`: measured request 0 is recorded twice",
        ),
        (
            &[HEADER, &RECORD.replace("\"number\":0", "\"number\":10")],
            "f line 2: field `number`: measured request 10 is beyond the header's 10 requests",
        ),
        (
            &[
                HEADER,
                &RECORD.replace("\"ttft_ms\":12.5", "\"ttft_ms\":-1.0"),
            ],
            "f line 2: field `ttft_ms`: must be milliseconds",
        ),
        (
            &[
                HEADER,
                &RECORD.replace("\"e2e_ms\":20.0", "\"e2e_ms\":\"fast\""),
            ],
            "f line 2: field `e2e_ms`: invalid type",
        ),
        (
            &[HEADER, &RECORD.replace(",\"output_tokens\":3", "")],
            "f line 2: field `output_tokens` is missing",
        ),
        (&[HEADER, "{\"number\":1"], "f line 2: not a JSON object"),
    ];
    for (lines, expected) in cases {
        let message = error(lines);
        assert!(message.starts_with(expected), "{message:?} for {lines:?}");
    }
}

#[test]
fn a_load_sweep_reads_by_cell_round_trips_and_refuses_bad_levels() {
    let sweep = HEADER
        .replace(
            r#"{"label":"file","prompt_tokens":null}"#,
            r#"{"label":"128","prompt_tokens":128,"level":1}"#,
        )
        .replace(
            r#"{"label":"128","prompt_tokens":128},"#,
            r#"{"label":"128","prompt_tokens":128,"level":0},"#,
        )
        .replace(r#""until":"decided""#, r#""until":"budget""#)
        .replace(
            r#""run":"#,
            r#""levels":[{"concurrency":1,"rate":null,"sent":18,"skipped":0,"measured_s":2.5},{"concurrency":8,"rate":null,"sent":18,"skipped":0,"measured_s":0.5}],"slo":{"ttft_ms":500.0},"run":"#,
        );
    let record = RECORD
        .replace("\"number\":0", "\"number\":15")
        .replace("\"class\":\"128\"", "\"class\":\"128 @ c=8\"");
    let records = parsed(&[&sweep, &record]).unwrap();
    let header = &records.header;
    assert_eq!(header.cell_labels(), ["128 @ c=1", "128 @ c=8"]);
    assert_eq!((header.planned(), header.levels[1].measured_s), (20, 0.5));
    assert_eq!(header.slo.and_then(|s| s.ttft_ms), Some(500.0));
    assert_eq!(
        (records.outcomes[0].0, records.outcomes[0].1.class),
        (15, 1)
    );
    let mut out = Vec::new();
    write_to(&mut out, header, &[]).unwrap();
    assert_eq!(&parse(out.as_slice(), "f").unwrap().header, header);
    let cases = [
        (
            sweep.replace(r#""level":1"#, r#""level":2"#),
            "field `classes`: at most 256",
        ),
        (
            sweep.replace(r#""level":1"#, r#""level":0"#),
            "field `classes`: the class \"128 @ c=1\" is there twice",
        ),
        (
            sweep.replace(
                r#"{"concurrency":8,"rate":null,"sent""#,
                r#"{"concurrency":8,"rate":2.0,"sent""#,
            ),
            "field `levels`: each level",
        ),
        (
            sweep.replace(r#""ttft_ms":500.0"#, r#""ttft_ms":-1.0"#),
            "field `slo`: wants one or more",
        ),
        (
            sweep.replace(r#","level":0"#, ""),
            "field `classes`: at most 256",
        ),
    ];
    for (header, expected) in cases {
        let message = error(&[&header]);
        assert!(
            message.starts_with(&format!("f line 1: {expected}")),
            "{message}"
        );
    }
    let beyond = record.replace("\"number\":15", "\"number\":20");
    assert!(error(&[&sweep, &beyond]).contains("beyond the header's 20 requests"));
}

#[test]
fn a_shared_prefix_workload_records_its_shape_and_each_requests_group() {
    let shared = HEADER
        .replace(r#"{"label":"file","prompt_tokens":null}"#, r#"{"label":"64","prompt_tokens":64}"#)
        .replace(
            r#""run":"#,
            r#""workload":{"kind":"shared-prefix","groups":4,"suffix_tokens":16,"zipf":1.0},"run":"#,
        );
    let record = RECORD.replace(r#""output_tokens":3"#, r#""output_tokens":3,"group":3"#);
    let records = parsed(&[&shared, &record]).unwrap();
    let shape = Shape::SharedPrefix {
        groups: 4,
        suffix_tokens: 16,
        zipf: 1.0,
    };
    assert_eq!(records.header.shapes, [shape]);
    assert_eq!(records.outcomes[0].1.group, Some(3));
    let mut out = Vec::new();
    let slots = [Some(records.outcomes[0].1.clone())];
    write_to(&mut out, &records.header, &slots).unwrap();
    let again = parse(out.as_slice(), "f").unwrap();
    assert_eq!(
        (again.header, again.outcomes),
        (records.header, records.outcomes)
    );
    let beyond = record.replace(r#""group":3"#, r#""group":4"#);
    assert!(error(&[&shared, &beyond]).starts_with("f line 2: field `group`"));
    let long_suffix = shared.replace(r#""suffix_tokens":16"#, r#""suffix_tokens":64"#);
    assert!(error(&[&long_suffix]).starts_with("f line 1: field `workload`"));
    // Without a workload, unique prompts and no groups.
    assert!(error(&[HEADER, &record]).starts_with("f line 2: field `group`"));
}

#[test]
fn a_line_over_the_cap_is_refused_by_its_number() {
    let long = format!("{HEADER}\n{}\n", " ".repeat(MAX_LINE_BYTES + 1));
    assert_eq!(
        parse(long.as_bytes(), "f").unwrap_err(),
        format!("f line 2: longer than {MAX_LINE_BYTES} bytes")
    );
    // At the cap exactly, the line is read (a blank one here).
    let at_cap = format!("{HEADER}\n{}\n", " ".repeat(MAX_LINE_BYTES));
    assert!(parse(at_cap.as_bytes(), "f").is_ok());
}

#[test]
fn the_file_appears_whole_at_the_end_and_no_temporary_file_stays() {
    let dir = std::env::temp_dir().join(format!("kvab-records-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.jsonl");
    let header = parse(format!("{HEADER}\n").as_bytes(), "f").unwrap().header;
    let pending = Pending::create(&path).unwrap();
    assert!(!path.exists(), "nothing at the path while the run goes on");
    let slots = vec![None, Some(Outcome::default())];
    pending.finish(&header, &slots).unwrap();
    let records = read(&path).unwrap();
    assert_eq!(records.header, header);
    assert_eq!(records.outcomes, vec![(1, Outcome::default())]);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["run.jsonl"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_f64_reads_back_exactly() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let header = parse(format!("{HEADER}\n").as_bytes(), "f").unwrap().header;
    let mut slots = Vec::new();
    for i in 0..2000 {
        // Uniform bits (every finite non-negative f64) and timings as the clock gives them.
        let bits = f64::from_bits(rng.random::<u64>() >> 2);
        let clock = f64::from(rng.random_range(0..10_000_000u32)) / 1e6 * 1000.0;
        slots.push(Some(Outcome {
            class: i % 2,
            assigned: i % 2,
            served: Some(i % 2),
            ttft_ms: Some(bits),
            itl_ms: vec![clock, bits / 3.0],
            e2e_ms: clock * 1.000_000_1,
            ..Outcome::default()
        }));
    }
    let mut header = header;
    header.requests = 2000;
    header.run.duration_s = 1.0 / 3.0;
    let mut out = Vec::new();
    write_to(&mut out, &header, &slots).unwrap();
    let records = parse(out.as_slice(), "f").unwrap();
    assert_eq!(records.header, header);
    for (n, outcome) in &records.outcomes {
        let expected = slots[*n as usize].as_ref().unwrap();
        assert_eq!(outcome, expected, "record {n}");
        assert_eq!(
            outcome.ttft_ms.map(f64::to_bits),
            expected.ttft_ms.map(f64::to_bits)
        );
    }
}
