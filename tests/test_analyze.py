"""`kvab analyze` against a real Prometheus (Debian's) scraping the local stack: the real Envoy with the
filter splitting untagged traffic 50/50 (onMissing: split), kvab serve, and the P/D-model arms. Its
decision must agree in direction with `kvab experiment` on the same stack, its sample-ratio check must
pass against the true weights and fail against wrong ones, a window with no traffic must be
inconclusive, and a failing query must be one line naming it. Bad input (NaN, decreasing or missing
buckets, absurd counters, hostile error text, huge answers) comes from a fake Prometheus: exit 3, one
line naming the series or query."""

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from browser import open_page
from kvablocal.net import request, wait_until
from kvablocal.prometheus import Prometheus, Target, gateway_target, sidecar_target
from kvablocal.sidecar import REPO, kvab_binary
from kvablocal.stack import Stack

SPLIT = {"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}}}
PROMPT = " ".join(["word"] * 8192)


def untagged(port: int) -> int:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}).encode()
    return request(port, "POST", "/v1/chat/completions", [("content-type", "application/json")], body).status


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("analyze")
    # The one prompt sent 400 times would be served from the arms' prefix caches; without them every request
    # prefills and moves its whole KV cache, as the experiment's unique prompts do. Each transfer has its
    # arm's whole link (`shared_link=False`): with the links shared, the FS arm's median first token at 8 in
    # flight (~245 ms) sits on vLLM's 250 ms bucket bound, and which side of it the median falls is chance.
    stack = Stack(workdir=work / "stack", nvlink_delay=0.0, fs_delay=0.0, filter_config=SPLIT,
                  nvlink_cache_tokens=0, fs_cache_tokens=0, shared_link=False)
    prometheus = Prometheus(scrape_interval="500ms", workdir=work / "prometheus")
    try:
        stack.start()
        # The arms' vLLM-style histograms, with the arm as the label a PodMonitor would give them.
        arms = [Target(f"vllm-{arm}", f"127.0.0.1:{server.port}", "/metrics", {"kv_backend": arm})
                for arm, server in stack.arms.items()]
        prometheus.start([gateway_target(stack.gateway.admin_port), sidecar_target(stack.sidecar.port), *arms])
        prometheus.wait_scraped()
        time.sleep(1.5)
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: untagged(stack.gateway.port), range(400)))
        assert statuses.count(200) == 400
        finished = time.time()
        # Two scrapes after the last request: the window's end sees every count.
        wait_until(lambda: prometheus.query("sum(kvab_requests_total{source=\"split\"})")[0][1] >= 400, 10,
                   what="Prometheus to scrape the split requests")
        time.sleep(1.0)
        yield stack, prometheus, started - 1.0, time.time()
    finally:
        prometheus.stop()
        stack.stop()


def analyze(prometheus, *args):
    done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--json", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_a_randomized_split_is_judged_and_agrees_with_the_experiment(live, tmp_path):
    stack, prometheus, start, end = live
    code, report = analyze(prometheus, "--start", f"{start:.3f}", "--end", f"{end:.3f}", "--split", "nvlink=1,fs=1",
                           "--min-requests", "100")
    assert report["design"]["kind"] == "randomized" and report["design"]["split_share"] > 0.99, report["design"]
    assert report["assignment"]["srm_ok"] is True, report["assignment"]
    primary = next(c for c in report["comparisons"] if c["primary"])
    assert primary["metric"] == "request_duration_ms"
    assert 380 <= sum(primary["n"].values()) <= 420, primary["n"]
    assert primary["decision"] == "faster" and primary["faster"] == "nvlink", primary
    assert primary["ci_ms"][0] > 0 and primary["shift_ms"] > 20, primary
    assert report["verdict"] == "decided" and code == 0, report["reasons"]
    assert all("increase(" in q for q in report["queries"])
    # vLLM's own histograms, mapped to arms by label: counted, and on vLLM's coarse TTFT buckets both arms'
    # medians (~120 and ~160 ms) lie in (100, 250] ms, so the binned comparison cannot call either faster.
    vllm = {c["metric"]: c for c in report["comparisons"] if c["metric"].startswith("vllm_")}
    assert set(vllm) == {"vllm_ttft_ms", "vllm_itl_ms", "vllm_e2e_ms"}, set(vllm)
    ttft = vllm["vllm_ttft_ms"]
    # increase() extrapolates each series to the window's edges: a few percent over the 400 sent.
    assert 380 <= sum(ttft["n"].values()) <= 430 and ttft["p50_bucket"]["fs"] == [100.0, 250.0], ttft
    assert ttft["faster"] != "fs" and not ttft["primary"]
    by_selector = analyze(prometheus, "--start", f"{start:.3f}", "--end", f"{end:.3f}", "--min-requests", "100",
                          "--vllm-selector", 'nvlink=job="vllm-nvlink"', "--vllm-selector", 'fs=job="vllm-fs"')[1]
    assert next(c for c in by_selector["comparisons"] if c["metric"] == "vllm_ttft_ms")["n"] == ttft["n"]

    # The whole histograms behind each comparison, and the HTML report drawing them, in a real browser.
    cdf = primary["cdf"]
    assert set(cdf) == {"nvlink", "fs"} and all(len(points) == primary["buckets"] - 1 for points in cdf.values())
    fractions = [f for _, f in cdf["nvlink"]]
    assert fractions == sorted(fractions) and 0.99 <= fractions[-1] <= 1.0, cdf["nvlink"]
    html = tmp_path / "analyze.html"
    subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--start", f"{start:.3f}", "--end",
                    f"{end:.3f}", "--split", "nvlink=1,fs=1", "--min-requests", "100", "--html", str(html)],
                   capture_output=True, text=True, timeout=60)
    page = open_page(html, tmp_path / "analyze.png")
    assert page["console_errors"] == [] and page["requests"] == [html.as_uri()], page["console_errors"]
    for metric in ("request_duration_ms", "time_to_first_byte_ms", "vllm_ttft_ms"):
        assert f'data-plot="{metric}"' in page["dom"], metric
    assert page["dom"].count("<svg") >= 5 and "nvlink faster" in page["dom"]

    # The experiment on the same stack (header-assigned) finds the same direction.
    done = subprocess.run([kvab_binary(), "experiment", "--gateway-url", stack.urls()["gateway"], "--json", "--quiet",
                           "--prompt-tokens", "8192", "--requests", "60", "--warmup", "2", "--no-stream", "--max-tokens",
                           "2", "--seed", "4"], capture_output=True, text=True, timeout=120)
    experiment = json.loads(done.stdout)
    assert next(c for c in experiment["comparisons"] if c["primary"])["faster"] == "nvlink", experiment["reasons"]


def test_wrong_weights_fail_the_sample_ratio_check(live):
    _, prometheus, start, end = live
    code, report = analyze(prometheus, "--start", f"{start:.3f}", "--end", f"{end:.3f}", "--split", "nvlink=9,fs=1")
    assert report["assignment"]["srm_ok"] is False and report["assignment"]["srm_p"] < 0.001
    assert report["verdict"] == "invalid" and code == 1
    assert "sample-ratio mismatch" in report["reasons"][0]


def test_the_split_weights_can_come_from_the_filters_own_configuration(live, tmp_path):
    _, prometheus, start, end = live
    window = ("--start", f"{start:.3f}", "--end", f"{end:.3f}", "--min-requests", "100")
    # The WasmPlugin the stack's filter was configured from, as `kubectl get wasmplugin -o yaml` gives it.
    plugin = yaml.safe_load((REPO / "manifests" / "wasmplugin.yaml").read_text())
    plugin["spec"]["pluginConfig"].update(SPLIT)
    shipped = tmp_path / "wasmplugin.yaml"
    shipped.write_text(yaml.safe_dump(plugin))
    code, report = analyze(prometheus, *window, "--filter-config", str(shipped))
    assert report["assignment"]["srm_ok"] is True and code == 0, report["assignment"]
    # A TrafficExtension carries it under spec.wasm; misconfigured weights there fail the check.
    extension = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "TrafficExtension",
                 "spec": {"wasm": {"pluginConfig": {"onMissing": "split", "split": {"weights": {"nvlink": 9, "fs": 1}}}}}}
    wrong = tmp_path / "trafficextension.json"
    wrong.write_text(json.dumps(extension))
    code, report = analyze(prometheus, *window, "--filter-config", str(wrong))
    assert report["assignment"]["srm_ok"] is False and report["verdict"] == "invalid" and code == 1
    # A filter that does not split has no weights to check: one line naming the flag, exit 3.
    done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--filter-config",
                           str(REPO / "manifests" / "wasmplugin.yaml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stdout == "", done
    first = done.stderr.splitlines()[0]
    assert "--filter-config" in first and 'onMissing is "passthrough", not "split"' in first, done.stderr


def test_a_window_without_traffic_is_inconclusive_never_a_pass(live):
    _, prometheus, start, end = live
    time.sleep(3)
    code, report = analyze(prometheus, "--window", "2s", "--split", "nvlink=1,fs=1")
    assert report["verdict"] == "inconclusive" and code == 2, report["reasons"]
    assert any("no tagged request" in r or "too little traffic" in r for r in report["reasons"]), report["reasons"]


def test_prometheus_failures_are_one_line_naming_the_query(live):
    _, prometheus, _, _ = live
    bad = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--selector", 'job=~"("'],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and bad.stdout == ""
    line = bad.stderr.strip()
    assert "\n" not in line and "query sum by (backend, source, le) (increase(kvab_request_duration_milliseconds_bucket" in line, line
    absent = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--selector", 'job="nope"'],
                            capture_output=True, text=True, timeout=60)
    assert absent.returncode == 3 and "no series in the window" in absent.stderr, absent.stderr
    unreachable = subprocess.run([kvab_binary(), "analyze", "--prometheus", "http://127.0.0.1:9"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 3 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert "query sum by" in unreachable.stderr and "refused" in unreachable.stderr


# Bad input, which a real Prometheus seldom or never returns: a fake answering each query of the run.
NVLINK = [("50", "900"), ("100", "990"), ("200", "1000"), ("+Inf", "1000")]
FS = [("50", "0"), ("100", "100"), ("200", "900"), ("+Inf", "1000")]


class FakePrometheus:
    """Answers kvab analyze's instant queries: nvlink's duration buckets and each arm's split count as given,
    every other series sound; or one error answer, or a body of `size` bytes, for every query."""

    def __init__(self, nvlink=NVLINK, split="1000", raw: bytes | None = None, size: int | None = None):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                query = parse_qs(urlparse(self.path).query)["query"][0]
                if size is not None:
                    self.send_response(200)
                    self.send_header("content-length", str(size))
                    self.end_headers()
                    with suppress(OSError):
                        for _ in range(size >> 20):
                            self.wfile.write(b" " * (1 << 20))
                    return
                body = raw if raw is not None else json.dumps(fake.answer(query)).encode()
                self.send_response(400 if raw is not None else 200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.nvlink, self.split = nvlink, split
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, query: str) -> dict:
        def per_arm(label, value, count):
            return [({"backend": arm, "source": "split", label: value}, count) for arm in ("nvlink", "fs")]

        if query.startswith("sum by (backend, source, le) (increase(kvab_"):
            series = [({"backend": arm, "source": "split", "le": le}, v)
                      for arm, bs in (("nvlink", self.nvlink), ("fs", FS)) for le, v in bs]
        elif "kvab_requests_total" in query:
            series = per_arm("source", "split", self.split)
        elif "kvab_responses_total" in query:
            series = per_arm("code_class", "2xx", "1000")
        elif "kvab_served_total" in query:
            series = [({"requested": arm, "served": arm}, "1000") for arm in ("nvlink", "fs")]
        else:
            series = []
        result = [{"metric": labels, "value": [1.0, value]} for labels, value in series]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


DURATION = 'kvab_request_duration_milliseconds_bucket{backend="nvlink", source="split"}'


@pytest.mark.parametrize("fake, line", [
    # Was "decided: nvlink faster" on a NaN read as 0.
    (dict(nvlink=[("50", "NaN"), *NVLINK[1:]]), f'invalid input: {DURATION}: bucket le="50": the value is NaN, not a count'),
    # Was clamped silently into a verdict.
    (dict(nvlink=[("50", "900"), ("100", "300"), *NVLINK[2:]]),
     f'invalid input: {DURATION}: bucket le="100" counts 300 requests, fewer than the 900 of the bucket below it'),
    # Was "too little traffic".
    (dict(nvlink=NVLINK[:3]), f'invalid input: {DURATION}: no le="+Inf" bucket, so no total'),
    (dict(nvlink=[("50", "900"), ("50.0", "990"), *NVLINK[2:]]), f'invalid input: {DURATION}: two buckets le="50.0"'),
    # Was a hang: u64::MAX steps of the sample-ratio test.
    (dict(split="+Inf"), 'invalid input: kvab_requests_total{backend="nvlink", source="split"}: the value is inf'),
    (dict(split="1e18"), 'invalid input: kvab_requests_total{backend="nvlink", source="split"}: the count 1e18 is above 2^53'),
    # Was Prometheus's ESC and BEL on the terminal.
    (dict(raw=b'{"status":"error","errorType":"bad_data","error":"boom \\u001b]0;pwned\\u0007"}'),
     r"bad_data: boom \u{1b}]0;pwned\u{7}"),
    # Was 2.4 GB of memory for a 300 MiB answer.
    (dict(size=300 << 20), "the answer is longer than 16777216 bytes"),
])
def test_bad_input_is_refused_in_one_line_naming_the_series(fake, line):
    prometheus = FakePrometheus(**fake)
    try:
        done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--split", "nvlink=1,fs=1"],
                              capture_output=True, text=True, timeout=30)
    finally:
        prometheus.stop()
    assert done.returncode == 3 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and line in done.stderr, done.stderr
    assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in done.stderr.rstrip("\n")), repr(done.stderr)


def test_the_fake_prometheus_answers_a_sound_window_with_a_verdict():
    prometheus = FakePrometheus(split="100000000")  # 1e8 split requests an arm: took 7 s, now a closed form.
    try:
        done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--split", "nvlink=1,fs=1",
                               "--json"], capture_output=True, text=True, timeout=30)
    finally:
        prometheus.stop()
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["verdict"] == "decided", done
    assert report["assignment"]["srm_ok"] is True and report["comparisons"][0]["faster"] == "nvlink", report
