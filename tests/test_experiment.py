"""`kvab experiment` end to end on the local stack: the real Envoy with the filter linked to kvab serve,
and the local arms modelling a P/D request (prefill and KV transfer grow with the prompt; the FS arm moves
the KV cache at a far lower bandwidth). The experiment must find the long-prompt difference in the right
direction, never call the short-prompt class faster, and catch a gateway that misroutes; its HTML report
is opened in a real browser."""

import json
import math
import subprocess
from statistics import NormalDist

import pytest

from browser import open_page
from kvablocal.sidecar import REPO, kvab_binary
from kvablocal.stack import Stack

ARTIFACTS = REPO / "target" / "test-artifacts"


def experiment(s: Stack, *args, timeout=240):
    done = subprocess.run(
        [kvab_binary(), "experiment", "--gateway-url", s.urls()["gateway"], "--json", "--quiet", *args],
        capture_output=True, text=True, timeout=timeout)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def always_valid_level(alpha: float, t: float) -> float:
    """The normal-mixture sequence's two-sided level at fraction `t` of the plan, written again from its
    formula (docs/experiment.md): rho solves 1/rho = 2 ln(1/alpha) + ln(1 + 1/rho)."""
    two_l = 2 * math.log(1 / alpha)
    inverse = two_l
    for _ in range(50):
        inverse = two_l + math.log(1 + inverse)
    rho = 1 / inverse
    z = math.sqrt((1 + rho / t) * (math.log(1 + t / rho) + two_l))
    return 2 * NormalDist().cdf(-z)


def primary(report: dict) -> dict:
    return {c["class"]: c for c in report["comparisons"] if c["primary"]}


def test_the_experiment_finds_the_long_prompt_difference_and_reports_it_in_html(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    html = tmp_path / "report.html"
    code, report = experiment(s, "--prompt-tokens", "128,8192", "--requests", "240", "--warmup", "8",
                              "--concurrency", "8", "--max-tokens", "8", "--seed", "3", "--html", str(html))
    assignment = report["assignment"]
    assert assignment["srm_ok"] and assignment["misrouted"] == 0 and assignment["untagged"] == 0, assignment
    assert assignment["planned"] == {"fs": 120, "nvlink": 120}
    ttft = primary(report)
    assert set(ttft) == {"128", "8192"} and all(c["metric"] == "ttft_ms" for c in ttft.values())
    long = ttft["8192"]
    assert long["decision"] == "faster" and long["faster"] == "nvlink", long
    assert long["shift_ms"] > 0 and long["ci_ms"][0] > 0 and long["relative"] >= 0.05, long
    assert ttft["128"]["decision"] in ("equivalent", "inconclusive"), ttft["128"]
    # The server's own count of the synthetic prompts' tokens is close to the size asked for.
    sizes = {c["label"]: c["measured_prompt_tokens"] for c in report["classes"]}
    assert abs(sizes["8192"] - 8192) / 8192 < 0.05 and abs(sizes["128"] - 128) / 128 < 0.1, sizes
    assert report["verdict"] in ("decided", "inconclusive")
    assert code == {"decided": 0, "inconclusive": 2}[report["verdict"]]
    # Secondary metrics are reported too, and all comparisons are in Holm's family.
    metrics = {c["metric"] for c in report["comparisons"]}
    assert metrics == {"ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"}
    assert all(c["p_adjusted"] >= c["p"] for c in report["comparisons"] if c["p"] is not None)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = open_page(html, ARTIFACTS / "experiment-report.png")
    assert page["console_errors"] == [], page["console_errors"]
    assert page["requests"] == [html.as_uri()], "the report fetches nothing"
    for plot in ("ttft-ecdf", "ttft-vs-prompt", "itl"):
        assert f'data-plot="{plot}"' in page["dom"], plot
    assert page["dom"].count("<svg") >= 3
    assert "nvlink faster" in page["dom"]
    assert (ARTIFACTS / "experiment-report.png").stat().st_size > 10_000


def test_a_misrouting_gateway_shows_misroutes_and_fails_the_sample_ratio_check(stack):
    # The nvlink header route goes to the FS proxy: every request for nvlink is served by fs.
    s = stack(routes={"nvlink": "fs"})
    code, report = experiment(s, "--prompt-tokens", "128", "--requests", "60", "--warmup", "0",
                              "--concurrency", "4", "--max-tokens", "4", "--seed", "5")
    assignment = report["assignment"]
    assert assignment["misrouted"] == 30 and assignment["answered"] == {"fs": 60, "nvlink": 0}, assignment
    assert not assignment["srm_ok"] and assignment["srm_p"] < 0.001
    assert report["verdict"] == "invalid" and code == 1
    assert "sample-ratio mismatch" in report["reasons"][0]
    assert primary(report)["128"]["n"]["nvlink"] == 0


def test_until_decided_stops_early_and_bad_input_is_one_line(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    code, report = experiment(s, "--prompt-tokens", "8192", "--requests", "400", "--warmup", "4",
                              "--concurrency", "8", "--max-tokens", "4", "--seed", "9", "--until", "decided",
                              "--looks", "5")
    assert report["verdict"] == "decided" and code == 0, report["reasons"]
    assert report["run"]["stopped_by"] == "decided" and report["method"]["looks_made"] < 5
    # The deciding look's share of α (O'Brien-Fleming-type spending): below α, more than nothing.
    assert 0 < report["method"]["look_alpha"] < 0.05, report["method"]
    assert primary(report)["8192"]["faster"] == "nvlink"

    # The always-valid sequence: the deciding look is made at the sequence's level at its fraction of the
    # plan (judge/src/sequential.rs), whatever the number of looks.
    code, report = experiment(s, "--prompt-tokens", "8192", "--requests", "400", "--warmup", "4",
                              "--concurrency", "8", "--max-tokens", "4", "--seed", "9", "--until", "decided",
                              "--looks", "40", "--boundary", "always-valid")
    assert report["verdict"] == "decided" and code == 0, report["reasons"]
    assert report["method"]["boundary"] == "always-valid" and report["run"]["stopped_by"] == "decided"
    analysed = sum(c["requests"] for c in report["classes"])
    assert analysed % 10 == 0 and analysed < 400, analysed  # a look point of 40 over 400 requests
    assert math.isclose(report["method"]["look_alpha"], always_valid_level(0.05, analysed / 400), rel_tol=1e-6)
    assert primary(report)["8192"]["faster"] == "nvlink"

    # A time budget stops the run (those in flight finish), and what was answered is analysed.
    code, report = experiment(s, "--prompt-tokens", "128", "--requests", "100000", "--duration", "1.5",
                              "--warmup", "0", "--concurrency", "4", "--max-tokens", "2", "--seed", "1")
    assert report["run"]["stopped_by"] == "duration" and 10 < report["run"]["sent"] < 1000, report["run"]
    assert sum(report["assignment"]["planned"].values()) == report["run"]["sent"]

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"prompt": 3}\n')
    done = subprocess.run([kvab_binary(), "experiment", "--gateway-url", s.urls()["gateway"], "--prompts", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3 and done.stdout == ""
    assert f"--prompts {bad} line 2" in done.stderr, done.stderr
    usage = subprocess.run([kvab_binary(), "experiment", "--arms", "a,b,c"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 3 and "exactly two arms" in usage.stderr


RECORDS_FIXTURES = REPO / "tests" / "data" / "experiment-records"
# The report fields a judgement of records may legitimately give otherwise than the live run's report:
# the file it was judged from (null for the live run).
JUDGED_FIELDS = [("run", "judged_from")]


def judge(path, *args, timeout=60):
    done = subprocess.run([kvab_binary(), "experiment", "--judge-records", str(path), "--json", *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def without_judged_fields(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for section, field in JUDGED_FIELDS:
        report[section].pop(field, None)
    return report


def test_records_of_a_live_run_judge_to_the_same_report_and_rejudge_with_another_margin(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    records = tmp_path / "run.jsonl"
    code, live = experiment(s, "--prompt-tokens", "128,8192", "--requests", "200", "--warmup", "4",
                            "--concurrency", "8", "--max-tokens", "4", "--seed", "9", "--until", "decided",
                            "--looks", "5", "--records", str(records))
    assert live["run"]["judged_from"] is None
    lines = records.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["kvab_records"] == 1 and header["arms"] == ["nvlink", "fs"], header
    assert header["run"]["stopped_by"] == live["run"]["stopped_by"] and header["run"]["sent"] == live["run"]["sent"]
    numbers = [json.loads(line)["number"] for line in lines[1:]]
    assert numbers == sorted(set(numbers)) and all(0 <= n < 200 for n in numbers)
    assert not list(tmp_path.glob("run.jsonl.*")), "no temporary file is left"

    judged_code, judged = judge(records)
    assert judged["run"]["judged_from"] == str(records)
    assert without_judged_fields(judged) == without_judged_fields(live)
    assert judged_code == code

    # Another margin: the method says so, the recorded run facts stay.
    _, wider = judge(records, "--min-effect", "0.5", "--alpha", "0.01")
    assert wider["method"]["min_effect"] == 0.5 and wider["method"]["alpha"] == 0.01, wider["method"]
    assert wider["method"]["looks"] == live["method"]["looks"] and wider["method"]["until"] == "decided"
    assert wider["run"]["sent"] == live["run"]["sent"] and wider["run"]["seed"] == 9
    # One analysis of every record instead of the looks.
    _, budget = judge(records, "--until", "budget")
    assert budget["method"]["looks"] == 1 and budget["method"]["looks_made"] == 1
    assert sum(budget["assignment"]["planned"].values()) == len(lines) - 1

    # Traffic flags are refused, by name; a bad record names its line and field.
    refused = subprocess.run([kvab_binary(), "experiment", "--judge-records", str(records), "--gateway-url",
                              "http://127.0.0.1:1", "--seed", "3"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 3 and refused.stdout == ""
    assert "--gateway-url, --seed" in refused.stderr, refused.stderr
    bad = tmp_path / "bad.jsonl"
    record = json.loads(lines[1])
    record["assigned"] = "gpu"
    bad.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    done = subprocess.run([kvab_binary(), "experiment", "--judge-records", str(bad)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 3 and done.stdout == ""
    assert f"--judge-records {bad} line 2: field `assigned`" in done.stderr, done.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in RECORDS_FIXTURES.glob("*.jsonl")))
def test_recorded_fixtures_judge_to_their_saved_reports(name):
    code, judged = judge(RECORDS_FIXTURES / f"{name}.jsonl")
    saved = json.loads((RECORDS_FIXTURES / f"{name}.report.json").read_text())
    assert judged["run"]["judged_from"] == str(RECORDS_FIXTURES / f"{name}.jsonl")
    # The saved report: this judge's report of the records (tests/data/rejudge.py writes it).
    judged, saved = without_judged_fields(judged), without_judged_fields(saved)
    # The parts named first, for a readable failure; then everything else.
    assert judged["verdict"] == saved["verdict"] and code == {"decided": 0, "invalid": 1, "inconclusive": 2}[
        saved["verdict"]]
    assert judged["assignment"] == saved["assignment"]
    assert judged["errors"] == saved["errors"]
    for ours, theirs in zip(judged["comparisons"], saved["comparisons"], strict=True):
        assert ours == theirs, (ours["metric"], ours["class"])
    assert judged == saved


def test_the_recorded_fixtures_are_there():
    names = sorted(p.stem for p in RECORDS_FIXTURES.glob("*.jsonl"))
    assert len(names) >= 3, names
    verdicts = {json.loads((RECORDS_FIXTURES / f"{n}.report.json").read_text())["verdict"] for n in names}
    assert len(verdicts) >= 2, verdicts
