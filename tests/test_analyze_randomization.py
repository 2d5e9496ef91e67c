"""`kvab analyze` at the unit of randomization, against a real Prometheus (Debian's) scraping the local stack:
the real Envoy with the filter splitting untagged traffic 50/50 (`onMissing: split`, sticky by
`x-session-id` when a request carries one), kvab serve, and the P/D-model arms, whose nvlink arm is faster on
long prompts and whose fs arm fails a tenth of its completions with a quick 503.

- The filter's latency histograms hold answered requests only, labelled `split` or `other`: the 503s are in
  `kvab_responses_total` and never timed.
- A window where 5 % of the traffic chose its arm by header, with a different prompt mix, is judged on the
  split-assigned part alone: the same verdict as the split alone, the header-chosen requests counted in the
  design and left out of every comparison and error rate.
- A window of key-assigned (sticky) requests is refused with the reason, however clear the difference.
"""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvablocal.net import request, wait_until
from kvablocal.prometheus import Prometheus, gateway_target, sidecar_target
from kvablocal.sidecar import kvab_binary
from kvablocal.stack import Stack

KEY = "x-session-id"
SPLIT = {"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}, "keyHeader": KEY}}
LONG = " ".join(["word"] * 8192)
SHORT = " ".join(["word"] * 16)
FS_FAILS = 0.1


def completion(port: int, prompt: str, headers=()) -> int:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}).encode()
    return request(port, "POST", "/v1/chat/completions", [("content-type", "application/json"), *headers],
                   body).status


def total(prometheus, expr: str) -> float:
    answer = prometheus.query(expr)
    return answer[0][1] if answer else 0.0


def scraped(work, **stack_args):
    """A stack and a Prometheus scraping its gateway and kvab serve every 500 ms, stopped after use."""
    stack = Stack(workdir=work / "stack", **stack_args)
    prometheus = Prometheus(scrape_interval="500ms", workdir=work / "prometheus")
    try:
        stack.start()
        prometheus.start([gateway_target(stack.gateway.admin_port), sidecar_target(stack.sidecar.port)])
        prometheus.wait_scraped()
        yield stack, prometheus
    finally:
        prometheus.stop()
        stack.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    yield from scraped(tmp_path_factory.mktemp("analyze-unit"), nvlink_delay=0.0, fs_delay=0.0, filter_config=SPLIT,
                       fail_fraction={"fs": FS_FAILS}, seed=7)


def window(prometheus, send, counted: str, at_least: float):
    """Sends `send()`'s requests, then waits until Prometheus has scraped `counted` at `at_least`; the window
    from a second before the first request to a second after that scrape."""
    time.sleep(1.0)
    started = time.time()
    statuses = send()
    wait_until(lambda: total(prometheus, counted) >= at_least, 15, what=f"Prometheus to scrape {counted}")
    time.sleep(1.0)
    return statuses, ("--start", f"{started - 1.0:.3f}", "--end", f"{time.time():.3f}")


def analyze(prometheus, *args):
    done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--json", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def primary(report):
    return next(c for c in report["comparisons"] if c["primary"])


def test_header_chosen_traffic_is_left_out_and_failures_are_never_timed(live):
    stack, prometheus = live
    port = stack.gateway.port
    before = total(prometheus, 'sum(kvab_requests_total{source=~"split|header"})')

    def send():
        # 400 untagged requests on long prompts (the split's), and 20 (5 %) that chose nvlink by header, on
        # short prompts: far quicker than the split's, so mixed in they would make nvlink look faster still
        # and, in the error rates, fs look no worse.
        jobs = [lambda: completion(port, LONG)] * 400 + [lambda: completion(port, SHORT, [("x-kv-backend", "nvlink")])] * 20
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda job: job(), jobs))

    statuses, span = window(prometheus, send, 'sum(kvab_requests_total{source=~"split|header"})', before + 420)
    failed = statuses.count(503)
    assert statuses.count(200) + failed == 420 and failed > 0, statuses
    code, report = analyze(prometheus, *span, "--split", "nvlink=1,fs=1", "--min-requests", "100")
    design = report["design"]
    assert (design["kind"], design["compared"]) == ("randomized", "split"), design
    assert 19 <= design["requests"]["nvlink"]["header"] <= 22, design
    assert report["assignment"]["srm_ok"] is True, report["assignment"]
    # Compared: the split's answered requests alone. Its errors: the split's 503s, all on fs.
    split = report["assignment"]["split"]
    errors = report["errors"]
    assert abs(errors["fs"]["of"] - split["fs"]) < 1 and abs(errors["nvlink"]["of"] - split["nvlink"]) < 1, errors
    assert errors["nvlink"]["count"] < 0.5 and 0.5 < errors["fs"]["count"] <= failed + 0.5, errors
    c = primary(report)
    answered = {arm: split[arm] - errors[arm]["count"] for arm in split}
    assert all(abs(c["n"][arm] - answered[arm]) <= 1 for arm in split), (c["n"], answered)
    assert c["decision"] == "faster" and c["faster"] == "nvlink", c
    assert report["verdict"] == "decided" and code == 0, report["reasons"]
    assert "the other 5 % (header-chosen, default) are left out" in report["reasons"][0], report["reasons"]

    # The filter's own series: the 503s are counted by class and never timed; the header-chosen requests are
    # timed apart from the split's (source="other").
    start, end = float(span[1]), float(span[3])
    seconds = f"{end - start:.0f}s"
    fs_5xx = total(prometheus, f'sum(increase(kvab_responses_total{{backend="fs",code_class="5xx"}}[{seconds}]))')
    fs_timed = total(prometheus, f'sum(increase(kvab_request_duration_milliseconds_count{{backend="fs"}}[{seconds}]))')
    fs_all = total(prometheus, f'sum(increase(kvab_responses_total{{backend="fs"}}[{seconds}]))')
    assert fs_5xx > 0.5 and abs(fs_timed - (fs_all - fs_5xx)) < 1, (fs_5xx, fs_timed, fs_all)
    other = total(prometheus, f'sum(increase(kvab_request_duration_milliseconds_count{{source="other"}}[{seconds}]))')
    assert 19 <= other <= 22, other


def test_a_sticky_window_is_refused_with_the_reason(live):
    stack, prometheus = live
    port = stack.gateway.port
    before = total(prometheus, 'sum(kvab_requests_total{source="key"})')

    def send():
        # 40 sessions of 10 requests each: every request of a session on the arm of its key.
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda i: completion(port, LONG, [(KEY, f"session-{i % 40}")]), range(400)))

    statuses, span = window(prometheus, send, 'sum(kvab_requests_total{source="key"})', before + 400)
    assert statuses.count(200) + statuses.count(503) == 400
    code, report = analyze(prometheus, *span, "--split", "nvlink=1,fs=1", "--min-requests", "100")
    design = report["design"]
    assert (design["kind"], design["compared"]) == ("sticky", "all"), design
    assert design["key_share"] > 0.99, design
    assert report["verdict"] == "inconclusive" and code == 2, report["reasons"]
    assert report["reasons"][0].startswith("sticky: 100 % of tagged requests were assigned by their key"), report
    assert "Prometheus holds no per-key data" in report["reasons"][0]
    # The sample-ratio check counts the split's draws only: none here, so no false alarm from heavy keys.
    assert report["assignment"]["srm_p"] is None, report["assignment"]


@pytest.fixture(scope="module")
def ten_percent(tmp_path_factory):
    """A stack whose fs arm takes 10 % longer: about 306 against 336 ms a short completion."""
    yield from scraped(tmp_path_factory.mktemp("analyze-ten"), nvlink_delay=0.270, fs_delay=0.300, jitter=0.003,
                       filter_config={"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}}})


def test_a_split_window_with_a_ten_percent_effect_is_decided(ten_percent):
    stack, prometheus = ten_percent
    port = stack.gateway.port

    def send():
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: completion(port, SHORT), range(400)))

    statuses, span = window(prometheus, send, 'sum(kvab_requests_total{source="split"})', 400)
    assert statuses.count(200) == 400, statuses
    code, report = analyze(prometheus, *span, "--split", "nvlink=1,fs=1", "--min-requests", "100")
    c = primary(report)
    assert (report["design"]["kind"], report["design"]["compared"]) == ("randomized", "split"), report["design"]
    assert c["decision"] == "faster" and c["faster"] == "nvlink", (c["decision"], c["ratio"], c["ratio_ci"],
                                                                   c["p50_bucket"], report["reasons"])
    # The ratio of the medians near the arms' 1.10, its interval beyond the 5 % margin.
    assert 1.05 < c["ratio_ci"][0] and 1.05 < c["ratio"] < 1.2, (c["ratio"], c["ratio_ci"])
    assert report["verdict"] == "decided" and code == 0, report["reasons"]
