"""`kvab analyze` on recorded Prometheus answers (tests/data/analyze-answers/, recorded by its record.py from the
setup of tests/test_analyze.py: a real Prometheus scraping the local stack). Each recording, served by a fake
Prometheus that answers `/api/v1/query` by its query and time parameters as Prometheus would, and read back
with `--answers` (no network), gives the report of the live run it was recorded from: the same verdict,
reasons, decisions and numbers, every field of the JSON. `--save-answers` writes what it was answered, and a
file of answers that cannot be judged is one line naming the field or the query."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest


from kvablocal.sidecar import REPO, kvab_binary

DATA = REPO / "tests" / "data" / "analyze-answers"
RECORDED = ["decided", "srm-mismatch", "no-traffic"]
EXIT = {"decided": 0, "invalid": 1, "inconclusive": 2}


class RecordedPrometheus:
    """Serves a file of answers as Prometheus's HTTP API: `GET /api/v1/query?query=Q&time=T` answers the
    recorded body for (Q, T), and any other query Prometheus's error answer (status 400, `bad_data`)."""

    def __init__(self, recording: dict):
        answers = {(a["query"], a["time"]): a["answer"] for a in recording["answers"]}
        self.asked: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                key = (params.get("query", ""), params.get("time", ""))
                fake.asked.append(key)
                if url.path == "/api/v1/query" and key in answers:
                    status, body = 200, answers[key]
                else:
                    status, body = 400, {"status": "error", "errorType": "bad_data", "error": f"not recorded: {key}"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def analysis_flags(report: dict) -> list[str]:
    """The analysis flags of the recorded run, from its report (its method, arms and weights)."""
    method = report["method"]
    flags = ["--arms", ",".join(report["arms"]), "--alpha", repr(method["alpha"]), "--min-effect",
             repr(method["min_effect"]), "--min-requests", str(method["min_requests"]), "--srm-threshold",
             repr(method["srm_threshold"])]
    for margin in ("tail_margin", "error_margin"):
        if margin in method:
            flags += [f"--{margin.replace('_', '-')}", repr(method[margin])]
    weights = report["assignment"]["weights"]
    if weights:
        flags += ["--split", ",".join(f"{arm}={w!r}" for arm, w in weights.items())]
    return flags


def analyze(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVAB_ANALYZE_")}
    return subprocess.run([kvab_binary(), "analyze", *args], capture_output=True, text=True, timeout=60, env=env)


def judged(done: subprocess.CompletedProcess) -> dict:
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert done.returncode == EXIT[report["verdict"]], (done.returncode, report["verdict"])
    return report


def recorded(name: str) -> tuple[Path, dict, dict]:
    """The answers file, its document and its saved report (this judge's, tests/data/rejudge.py writes it)."""
    path = DATA / f"{name}.json"
    saved = json.loads((DATA / f"{name}.report.json").read_text())
    return path, json.loads(path.read_text()), saved


def test_the_recordings_have_different_outcomes():
    verdicts = {name: recorded(name)[2]["verdict"] for name in RECORDED}
    assert verdicts == {"decided": "decided", "srm-mismatch": "invalid", "no-traffic": "inconclusive"}, verdicts
    primary = next(c for c in recorded("decided")[2]["comparisons"] if c["primary"])
    assert primary["decision"] == "faster" and primary["faster"] == "nvlink", primary


@pytest.mark.parametrize("name", RECORDED)
def test_a_fake_prometheus_serving_the_recorded_answers_gives_the_saved_report(name, tmp_path):
    _, recording, saved = recorded(name)
    prometheus = RecordedPrometheus(recording)
    window = saved["window"]
    saved_again = tmp_path / "answers.json"
    try:
        done = analyze("--prometheus", prometheus.url, "--json", "--start", repr(window["start"]), "--end",
                       repr(window["end"]), *analysis_flags(saved), "--save-answers", str(saved_again))
    finally:
        prometheus.stop()
    # Every field, numbers included: nothing in the report depends on when or from where it was judged.
    assert judged(done) == saved
    # Every query asked was recorded, each once, in the report's order; and --save-answers wrote them again.
    assert [query for query, _ in prometheus.asked] == saved["queries"]
    assert json.loads(saved_again.read_text()) == recording


@pytest.mark.parametrize("name", RECORDED)
def test_the_answers_file_gives_the_saved_report_without_prometheus(name):
    path, _, saved = recorded(name)
    report = judged(analyze("--answers", str(path), "--json", *analysis_flags(saved)))
    assert report == saved
    # The table too is the same whichever source answered.
    prometheus = RecordedPrometheus(recorded(name)[1])
    try:
        live = analyze("--prometheus", prometheus.url, "--start", repr(saved["window"]["start"]), "--end",
                       repr(saved["window"]["end"]), *analysis_flags(saved))
    finally:
        prometheus.stop()
    table = analyze("--answers", str(path), *analysis_flags(saved))
    assert table.stdout == live.stdout and "verdict: " + saved["verdict"] in table.stdout, table.stdout


def test_the_answers_are_judged_again_with_other_flags():
    path, _, saved = recorded("decided")
    # The same window read with a margin of 90 %: the medians' 28 % difference is inside it, but the tails hold
    # the equivalence back: fs's p90 is shown worse, and 200 requests per arm cannot bound a p99.
    report = judged(analyze("--answers", str(path), "--json", "--split", "nvlink=1,fs=1", "--min-requests", "100",
                            "--min-effect", "0.9"))
    primary = next(c for c in report["comparisons"] if c["primary"])
    low, high = primary["equivalence_ci"]
    assert 1 / 1.9 < low and high < 1.9, primary["equivalence_ci"]
    assert primary["decision"] == "inconclusive" and report["verdict"] == "inconclusive", report["reasons"]
    tails = {t["quantile"]: t for t in primary["tails"]}
    assert (tails["p90"]["status"], tails["p90"]["worse"], tails["p99"]["status"]) == ("worse", "fs", "unknown")
    assert "fs's p90 is worse" in report["reasons"][1] and "p99 not shown within" in report["reasons"][1]
    # And with more requests wanted than the window holds: inconclusive.
    report = judged(analyze("--answers", str(path), "--json", "--min-requests", "1000"))
    assert report["verdict"] == "inconclusive" and any("too little traffic" in r for r in report["reasons"])
    assert primary["shift_ms"] == next(c for c in saved["comparisons"] if c["primary"])["shift_ms"]


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 3 and done.stdout == "", done
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_a_query_not_in_the_file_is_one_line_naming_it():
    path, _, _ = recorded("decided")
    window = json.loads(path.read_text())["window"]
    seconds = max(1, round(window["end"] - window["start"]))  # the window's whole seconds, as the queries say
    line = one_line_error(analyze("--answers", str(path), "--selector", 'namespace="other"'))
    assert line.startswith('kvab analyze: query sum by (backend, source, le) (increase(kvab_request_duration_milliseconds_bucket'
                           f'{{namespace="other"}}[{seconds}s])): not in --answers '), line


def test_a_file_that_is_no_file_of_answers_is_one_line_naming_the_field(tmp_path):
    _, recording, _ = recorded("decided")
    broken = tmp_path / "broken.json"
    for mutate, field in [
        (lambda r: r.update(format="prometheus"), "format: wants \"kvab-analyze-answers\""),
        (lambda r: r.update(version=2), "version: this kvab reads version 1, found 2"),
        (lambda r: r["window"].pop("end"), "window.end: wants a time"),
        (lambda r: r["answers"][3].update(query=7), "answers[3].query: wants a string"),
        (lambda r: r["answers"].append(r["answers"][0]), "answers[9]: a second answer to query sum by (backend, source, le)"),
    ]:
        document = json.loads(json.dumps(recording))
        mutate(document)
        broken.write_text(json.dumps(document))
        line = one_line_error(analyze("--answers", str(broken)))
        assert line.startswith(f"kvab analyze: --answers {broken}: {field}"), line
    broken.write_text("{\"format\": ")
    assert "not JSON" in one_line_error(analyze("--answers", str(broken)))
    # Over the 64 MiB cap: refused before it is parsed (a sparse file, no disk used).
    with broken.open("wb") as f:
        f.truncate((64 << 20) + 1)
    assert "longer than 67108864 bytes" in one_line_error(analyze("--answers", str(broken)))


def test_answers_and_prometheus_are_one_or_the_other():
    path = DATA / "decided.json"
    both = analyze("--answers", str(path), "--prometheus", "http://127.0.0.1:9")
    assert both.returncode == 3 and "cannot be used with" in both.stderr, both.stderr
    neither = analyze()
    assert neither.returncode == 3 and "--prometheus <URL>|--answers <FILE>" in neither.stderr, neither.stderr
    window = analyze("--answers", str(path), "--window", "1h")
    assert window.returncode == 3 and "cannot be used with" in window.stderr, window.stderr
