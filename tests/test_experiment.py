"""`kvab experiment` end to end on the local stack: the real Envoy with the filter linked to kvab serve,
and the local arms modelling a P/D request (prefill and KV transfer grow with the prompt; the FS arm moves
the KV cache at a far lower bandwidth). The experiment must find the long-prompt difference in the right
direction, never call the short-prompt class faster, and catch a gateway that misroutes; its HTML report
is opened in a real browser."""

import json
import subprocess

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
    assert report["method"]["look_alpha"] == pytest.approx(0.01)
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
