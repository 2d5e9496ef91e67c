"""Every request counts, through the real gateway (issue #29): `kvab experiment --json` against the local
stack (the real Envoy with the filter, kvab serve, the local arms). Arms alike in their typical time to
first token, one of them answering 8 % of its completions 503, or stalling 10 % of them ×6, are never
`decided: equivalent`, and the troubled arm is named; a true 10 % effect at 8,192 prompt tokens is still
found, its ratio interval covering the truth.

The arms' faults are draws of their own seeded generators (`kvablocal.arm`), so for the stack seeds
below the counts of failed and stalled completions are fixed numbers, which each test checks first."""

import json
import subprocess

from kvablocal.arm import KV_BYTES_PER_TOKEN, PdModel
from kvablocal.sidecar import kvab_binary
from kvablocal.stack import Stack

EXIT = {"decided": 0, "invalid": 1, "inconclusive": 2}


def experiment(s: Stack, *args, timeout=240):
    done = subprocess.run(
        [kvab_binary(), "experiment", "--gateway-url", s.urls()["gateway"], "--json", "--quiet", *args],
        capture_output=True, text=True, timeout=timeout)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert done.returncode == EXIT[report["verdict"]], (done.returncode, report["verdict"])
    return report


def primary(report: dict, label: str) -> dict:
    (comparison,) = [c for c in report["comparisons"] if c["primary"] and c["class"] == label]
    return comparison


def errors_of(report: dict, label: str) -> dict:
    (entry,) = [e for e in report["errors"] if e["class"] == label]
    return entry


def names(texts, arm: str) -> bool:
    return any(arm in text.replace("-", " ").replace(":", " ").replace("'", " ").split() for text in texts)


def test_an_arm_failing_8_percent_of_requests_is_never_equivalent_and_is_named(stack):
    # The arms are alike (no extra delay, the same KV bandwidth) but fs answers 503 to 8 % of its
    # completions: with stack seed 8 its generator fails exactly 24 of its first 300.
    s = stack(nvlink_delay=0.0, fs_delay=0.0, fs_bandwidth=200e9, fail_fraction={"fs": 0.08}, seed=8)
    report = experiment(s, "--prompt-tokens", "128", "--requests", "600", "--warmup", "0", "--concurrency", "8",
                        "--max-tokens", "4", "--seed", "1")
    assert (s.arms["fs"].failed, s.arms["nvlink"].failed) == (24, 0)
    # The gateway tagged every 503 with the arm that answered it: the sample-ratio check sees both arms.
    assignment = report["assignment"]
    assert assignment["srm_ok"] and assignment["answered"] == {"fs": 300, "nvlink": 300}, assignment
    errors = errors_of(report, "128")
    assert errors["arms"]["fs"]["errors"] == 24 and errors["arms"]["nvlink"]["errors"] == 0, errors
    assert errors["codes"] == {"fs": {"status 503": 24}}, errors
    # Intention to treat: every assigned request of an arm is in the primary comparison, its failures too.
    ttft = primary(report, "128")
    assert ttft["n"] == {"fs": 300, "nvlink": 300} and ttft["failures"].get("fs") == 24, ttft
    assert not ttft["failures"].get("nvlink"), ttft
    # 24 of 300 against 0 of 300, fixed by the seeds: the difference's interval (Newcombe's, one-sided
    # 0.05 each side: +5.6 to +11.0 points) lies far above any error margin of a point or two. The
    # timings, the only thing left to chance, decide neither that nor the arm named, so this test fails
    # only if the judge does.
    guardrail = errors["guardrail"]
    assert abs(guardrail["difference"] - 0.08) < 1e-9 and guardrail["difference_ci"][0] > 0, errors
    assert ttft["decision"] != "equivalent", json.dumps(ttft)
    assert not (report["verdict"] == "decided" and ttft["decision"] == "equivalent"), report["reasons"]
    assert (guardrail["status"], guardrail["worse"]) == ("worse", "fs"), errors
    assert any(b.startswith("fs fails more") for b in ttft["blocked"]), ttft["blocked"]
    assert names([r for r in report["reasons"] if "128" in r], "fs"), report["reasons"]


def test_an_arm_stalling_10_percent_of_requests_6_times_is_never_equivalent_and_is_named(stack):
    # Alike arms, 50 ms more before each first token (so a stall stands far above the busy machine's
    # hiccups); fs stalls 10 % of its completions ×6: with stack seed 4 exactly 70 of its first 700.
    s = stack(nvlink_delay=0.05, fs_delay=0.05, fs_bandwidth=200e9, stall_fraction={"fs": 0.10},
              stall_factor={"fs": 6.0}, seed=4)
    report = experiment(s, "--prompt-tokens", "128", "--requests", "1400", "--warmup", "0", "--concurrency", "16",
                        "--max-tokens", "4", "--seed", "2")
    assert (s.arms["fs"].stalled, s.arms["nvlink"].stalled) == (70, 0)
    assert s.arms["fs"].failed == s.arms["nvlink"].failed == 0
    assert report["assignment"]["srm_ok"], report["assignment"]
    ttft = primary(report, "128")
    assert ttft["n"] == {"fs": 700, "nvlink": 700}, ttft
    # Sleeps only overrun: a stalled first token takes at least 6 × (the model's 128-token time + 50 ms
    # − the 3 ms jitter), and 70 of 700 stalled put fs's p99 among them.
    stalled_ms = 6 * (PdModel(200e9).first_token(128) + 0.05 - 0.003) * 1000
    p99 = next(t for t in ttft["tails"] if t["quantile"] == "p99")
    assert p99["values"]["fs"] >= stalled_ms, p99
    # fs's p99 interval lies among its stalls (an order-statistic interval of p99 in 700 ends a few
    # ranks from 693; the stalls are ranks 631-700), ≥ 478 ms; nvlink's ends at one of its few slowest
    # first tokens, 100-112 ms in three runs here at a load of 3-4 on 2 cores (×5.21 [4.72, 5.44] for
    # the p99 ratio). For the interval to reach the 25 % margin the busy machine would have to hold 2-3
    # of nvlink's 700 first tokens past 380 ms, ×3.5 its slowest seen: a chance well below 1 in 1000
    # on that evidence. The median barely moves (~0.5 %): it is the p99 guardrail that keeps `equivalent` away.
    assert ttft["decision"] != "equivalent", json.dumps(ttft)
    assert not (report["verdict"] == "decided" and ttft["decision"] == "equivalent"), report["reasons"]
    assert (p99["status"], p99["worse"]) == ("worse", "fs"), p99
    assert any(b.startswith("fs's p99 is worse") for b in ttft["blocked"]), ttft["blocked"]
    assert all(t["worse"] in ("fs", None) for t in ttft["tails"]), ttft["tails"]
    assert names([r for r in report["reasons"] if "128" in r], "fs"), report["reasons"]


def test_a_true_10_percent_effect_at_8192_tokens_is_found_and_its_ratio_interval_covers_the_truth(stack):
    # fs moves the KV cache at the bandwidth that makes its modelled first token exactly ×1.10 of
    # nvlink's at 8192 tokens (nvlink: 30 ms + 81.92 ms prefill, 2 ms + 4.03 ms transfer = 117.95 ms).
    nvlink = PdModel(200e9).first_token(8192)
    kv_bytes = KV_BYTES_PER_TOKEN * 8192
    fs_bandwidth = kv_bytes / (kv_bytes / 200e9 + 0.10 * nvlink)
    assert abs(PdModel(fs_bandwidth).first_token(8192) / nvlink - 1.10) < 1e-12
    # Each transfer has its arm's whole link (`shared_link=False`): the truth is the unloaded ratio at any
    # load (with the links shared, the FS link is 46 % busy at 8 in flight and the ratio grows to ~1.18).
    s = stack(nvlink_delay=0.0, fs_delay=0.0, fs_bandwidth=fs_bandwidth, shared_link=False)
    # --alpha 0.002 makes a miss of the truth rare: the ratio's interval is at the Holm level (here
    # 0.002 / 4 comparisons), so it misses the true ratio in about 0.05 % of runs. Its half-width is
    # ~0.8 % at 200 requests per arm, so its lower end (~1.09) clears 1.05 by far. In 22 runs of 100
    # requests per arm the Hodges-Lehmann ratio of log times was 1.092-1.104 around a truth of
    # 1.095-1.098 (a spread of ~0.3 %, as the interval's width predicts, and no bias to see); in 10 runs
    # of this test (seeds 1-10) it was 1.093-1.101 and every interval covered the truth, lower ends ≥ 1.085.
    report = experiment(s, "--prompt-tokens", "8192", "--requests", "400", "--warmup", "4", "--concurrency", "8",
                        "--max-tokens", "4", "--seed", "1", "--alpha", "0.002")
    assert report["verdict"] == "decided", report["reasons"]
    ttft = primary(report, "8192")
    assert ttft["decision"] == "faster" and ttft["faster"] == "nvlink", json.dumps(ttft)
    # The gateway, the client and the arm's own work add a small time to both arms' first tokens alike
    # (~2-6 ms here), so the true ratio of the measured times is (1.1·T + ε) / (T + ε): ε is nvlink's
    # median less its modelled time (the 3 ms jitter is symmetric). Its own error (< 0.5 ms) moves the
    # truth by < 0.05 %, a twentieth of the interval's half-width.
    overhead = ttft["p50"]["nvlink"] - nvlink * 1000
    assert -1.0 < overhead < 20.0, overhead
    truth = (1.1 * nvlink * 1000 + overhead) / (nvlink * 1000 + overhead)
    low, high = ttft["ratio_ci"]
    assert 1.05 < low <= truth <= high, (low, truth, high)
    assert low <= ttft["ratio"] <= high and abs(ttft["ratio"] - truth) < 0.02, (ttft["ratio"], truth)
    assert abs(ttft["relative"] - (ttft["ratio"] - 1)) < 1e-9, ttft
