"""The observability pack (observability/): the Grafana dashboard, the alert rules and their
Kubernetes packaging, proven against promtool and a real Prometheus (Debian package `prometheus`).

The live part runs the local stack with a real Prometheus scraping it and sends a known burst:

  gateway A  (pod inference-gateway-a)          normal routes, linked to kvab serve
  gateway B  (pod inference-gateway-b-swapped)  nvlink and fs routes swapped: misroutes
  gateway C  (pod inference-gateway-c-unlinked) its sidecar cluster points at a closed port:
                                                stale map, failing reports
  kvab serve (static map)  nvlink: vllm-p2p-proxy and vllm-p2p-proxy-metrics-404 (/metrics answers
                           404, runbook failure signal 2); fs: vllm-fs-proxy; a third arm lmcache whose
                           only endpoint is not ready

Every dashboard query is read from the dashboard JSON, its variables replaced by their defaults,
run through the HTTP API, and its series and values compared with what the burst must produce; the
same for every alert expression of the rules file, which Prometheus also loads (alert states).

Rates: every filter series exists at zero before Prometheus' first scrape and the rate window
(5m) reaches back before it, so `rate(x[5m]) * 300` is the number of requests up to Prometheus'
extrapolation to the evaluation time (at most one scrape interval over ~10 s of samples); values are
compared within 10 %. Series that kvab serve creates with their first count (routed requests per
pod, refused reports) are created by a warm-up round before the burst, so the expected value lies
between the burst and the total.
"""

import copy
import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kvablocal import prom
from kvablocal.envoy import Gateway
from kvablocal.net import request, wait_until
from kvablocal.prometheus import GATEWAY_NAMESPACE, KVAB_NAMESPACE, Prometheus, gateway_target, sidecar_target
from kvablocal.sidecar import Sidecar

REPO = Path(__file__).resolve().parents[1]
OBS = REPO / "observability"
DASHBOARD = OBS / "grafana" / "kvab-ab-dashboard.json"
CONFIGMAP = OBS / "grafana" / "kvab-ab-dashboard-configmap.yaml"
RULES = OBS / "prometheus" / "kvab-rules.yaml"
RULE_TESTS = OBS / "prometheus" / "kvab-rules.test.yaml"
PROMETHEUSRULE = OBS / "prometheus" / "kvab-prometheusrule.yaml"

FILTER_METRICS = {
    "kvab_requests_total", "kvab_responses_total", "kvab_rejected_total", "kvab_invalid_values_total",
    "kvab_request_duration_milliseconds_bucket", "kvab_time_to_first_byte_milliseconds_bucket",
    "kvab_served_total", "kvab_unavailable_total", "kvab_endpoint_map_fetches_total",
    "kvab_endpoint_map_age_seconds", "kvab_reports_total",
}
SIDECAR_METRICS = {
    "kvab_backend_endpoints", "kvab_unlabeled_proxies", "kvab_proxy_metrics_up", "kvab_proxy_metrics_status_code",
    "kvab_routed_requests_total", "kvab_reports_received_total", "kvab_reporters", "kvab_ready",
    "kvab_watch_errors_total", "kvab_http_requests_total",
}
ALERTS = {
    "KvabMisroutes", "KvabArmNoReadyEndpoints", "KvabProxyMetricsDown", "KvabEndpointMapStale",
    "KvabReportsFailing", "KvabReportsRefused", "KvabArmErrorRatioHigh", "KvabSidecarNotReady",
    "KvabHandlerPanicked", "KvabReportStateDamaged", "KvabReportStateErrors",
    "KvabReportLedgerNearCap", "KvabReportsRefusedLedgerFull", "KvabSharedReporterId",
}
# Recording rules: vLLM's histograms per arm (group kvab-vllm-per-arm).
RECORDS = {
    f"kv_backend:vllm_{m}_seconds_bucket:rate5m" for m in ("time_to_first_token", "inter_token_latency", "e2e_request_latency")
} | {"kv_backend:vllm_time_to_first_token_seconds:p50_5m", "kv_backend:vllm_time_to_first_token_seconds:p99_5m"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    return path


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def dashboard_queries(board: dict) -> dict:
    """(panel title, refId) -> expr, for every target of every panel."""
    out = {}
    for panel in all_panels(board["panels"]):
        for t in panel.get("targets", []):
            key = (panel["title"], t["refId"])
            assert key not in out, f"duplicate query {key}"
            out[key] = t["expr"]
    return out


def metrics_in(expr: str) -> set:
    return set(re.findall(r"\b(kvab_[a-z_]+)\s*\{", expr))


# ---- static checks: files, shapes, promtool ----


def test_generated_files_are_what_build_py_writes():
    r = subprocess.run(["python3", str(OBS / "build.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_promtool_checks_the_rules_file_and_the_rules_inside_the_prometheusrule(tmp_path):
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in r.stdout, r.stdout
    extracted = tmp_path / "from-prometheusrule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": load_yaml(PROMETHEUSRULE)["spec"]["groups"]}))
    r = subprocess.run([promtool(), "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheusrule_object_carries_exactly_the_tested_rules():
    # The PrometheusRule CRD is not vendored here (no monitoring.coreos.com CRD among the project's
    # CRDs), so its schema cannot be applied: the fields it defines are checked by hand instead.
    obj = load_yaml(PROMETHEUSRULE)
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["kind"] == "PrometheusRule"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    assert all(isinstance(v, str) for v in obj["metadata"].get("labels", {}).values())
    assert set(obj["spec"]) == {"groups"}
    assert obj["spec"]["groups"] == load_yaml(RULES)["groups"], "PrometheusRule and the promtool-tested file differ"
    names = [g["name"] for g in obj["spec"]["groups"]]
    assert len(names) == len(set(names))
    alerts, records = set(), set()
    for group in obj["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "record" in rule:
                # level:metric:operations, and the arm stays a label.
                assert rule["record"].startswith("kv_backend:") and "kv_backend" in rule["record"], rule
                records.add(rule["record"])
                continue
            assert rule["labels"]["severity"] in {"warning", "critical"}
            a = rule["annotations"]
            assert set(a) == {"summary", "description", "runbook_signal", "check"}, rule["alert"]
            assert a["runbook_signal"].startswith("Runbook "), a["runbook_signal"]
            assert re.search(r"failure signal|Step \d|prerequisite", a["runbook_signal"]), a["runbook_signal"]
            alerts.add(rule["alert"])
    assert alerts == ALERTS
    assert records == RECORDS


def test_promtool_unit_tests_pass_and_cover_every_alert_firing_and_quiet(tmp_path):
    r = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    tests = load_yaml(RULE_TESTS)
    fires, quiet = set(), set()
    recorded = set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
        for case in t.get("promql_expr_test", []):
            recorded.add(case["expr"].split("{")[0])
    assert fires == ALERTS, ALERTS - fires
    assert quiet == ALERTS, ALERTS - quiet
    assert {"kv_backend:vllm_time_to_first_token_seconds_bucket:rate5m",
            "kv_backend:vllm_time_to_first_token_seconds:p50_5m"} <= recorded, recorded
    # A firing expectation must be load-bearing: with it removed the test must fail.
    shutil.copy(RULES, tmp_path / RULES.name)
    for i, t in enumerate(tests["tests"]):
        for j, case in enumerate(t.get("alert_rule_test", [])):
            if not case["exp_alerts"]:
                continue
            mutated = copy.deepcopy(tests)
            mutated["tests"] = [mutated["tests"][i]]
            mutated["tests"][0]["alert_rule_test"][j]["exp_alerts"] = []
            path = tmp_path / "mutated.yaml"
            path.write_text(yaml.safe_dump(mutated))
            r = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
            assert r.returncode != 0, f"{t['name']}: passes without its expected alert"


def test_dashboard_configmap_and_variables():
    board = dashboard()
    cm = load_yaml(CONFIGMAP)
    assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key, text), = cm["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == board
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["current"]["value"] == GATEWAY_NAMESPACE
    assert variables["kvab_namespace"]["current"]["value"] == KVAB_NAMESPACE
    assert variables["gateway"]["includeAll"] and variables["gateway"]["allValue"] == ".*"
    ids = [p["id"] for p in all_panels(board["panels"])]
    assert len(ids) == len(set(ids))
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    # Every selector is filtered by the variables of its source.
    for (title, ref), expr in dashboard_queries(board).items():
        selectors = re.findall(r"\b(kvab_[a-z_]+)\s*\{([^}]*)\}", expr)
        assert selectors, (title, ref)
        for metric, matchers in selectors:
            if metric in FILTER_METRICS:
                assert 'namespace=~"$namespace"' in matchers and 'pod=~"$gateway"' in matchers, (title, metric)
            else:
                assert metric in SIDECAR_METRICS, (title, metric)
                assert 'namespace=~"$kvab_namespace"' in matchers, (title, metric)


# ---- the live stack ----

# Far from the bucket bounds, so a loaded machine does not move a request to another bucket.
NVLINK_DELAY_MS = 120  # request duration bucket (99, 249]
FS_DELAY_MS = 600  # bucket (499, 999]
WINDOW = "5m"
WINDOW_S = 300.0
POD_NV = f"{KVAB_NAMESPACE}/vllm-p2p-proxy"
POD_FS = f"{KVAB_NAMESPACE}/vllm-fs-proxy"
POD_404 = f"{KVAB_NAMESPACE}/vllm-p2p-proxy-metrics-404"
POD_LMCACHE = f"{KVAB_NAMESPACE}/vllm-lmcache-proxy"
GW_A, GW_B, GW_C = "inference-gateway-a", "inference-gateway-b-swapped", "inference-gateway-c-unlinked"


class TestArm(ThreadingHTTPServer):
    """A proxy arm whose answers the test controls: `x-test-delay-ms` (sleep before answering),
    `x-test-status`; GET /metrics answers `metrics_status`."""

    daemon_threads = True
    __test__ = False
    # Envoy opens a connection per concurrent request; the default backlog (5) would overflow and
    # the SYN retry (1 s) would land requests in the wrong latency bucket.
    request_queue_size = 128

    def __init__(self, name: str, metrics_status: int = 200):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def answer(self):
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/metrics":
                    status, body = metrics_status, b"# local arm\n"
                else:
                    time.sleep(int(self.headers.get("x-test-delay-ms") or 0) / 1000)
                    status, body = int(self.headers.get("x-test-status") or 200), json.dumps({"arm": name}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-served-by", name)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        pass

    def stop(self):
        self.shutdown()
        self.server_close()


def sidecar_config(nv, fs, m404, lmcache) -> str:
    endpoints = [
        ("nvlink", nv.port, POD_NV, True),
        ("fs", fs.port, POD_FS, True),
        ("nvlink", m404.port, POD_404, True),
        ("lmcache", lmcache.port, POD_LMCACHE, False),
    ]
    lines = ['listen = "127.0.0.1:{port}"', 'source = "static"', 'arms = ["nvlink", "fs", "lmcache"]', "[probe]", "interval_seconds = 0.5"]
    for arm, port, pod, ready in endpoints:
        lines += ["[[static.endpoints]]", f'backend = "{arm}"', f'address = "127.0.0.1:{port}"', f'pod = "{pod}"', f"ready = {str(ready).lower()}"]
    return "\n".join(lines) + "\n"


# One request kind: (gateway, x-kv-backend value or None, fail with 503?)
KINDS = {
    "a-nvlink": (GW_A, "nvlink", False),
    "a-fs": (GW_A, "fs", False),
    "a-fs-fail": (GW_A, "fs", True),
    "a-untagged": (GW_A, None, False),
    "a-unknown": (GW_A, "nvlink2", False),
    "b-nvlink": (GW_B, "nvlink", False),
    "c-fs": (GW_C, "fs", False),
}
WARMUP = {"a-nvlink": 1, "a-fs": 1, "a-fs-fail": 1, "a-untagged": 4, "a-unknown": 1, "b-nvlink": 1, "c-fs": 1}
BURST = {"a-nvlink": 20, "a-fs": 16, "a-fs-fail": 10, "a-untagged": 10, "a-unknown": 4, "b-nvlink": 8, "c-fs": 6}
INVALID_REPORT = b'{"reporter":"r","sequence":1,"started_at_ms":0,"totals":[{"requested":"gpu","served":"fs","endpoint":"","code_class":"2xx","count":1}]}'


class Outcome:
    """What one request did, in the labels the metrics use."""

    def __init__(self, gateway, requested, status, served_by):
        self.gateway = gateway
        self.status = status
        admitted = status != 400 or served_by is not None
        self.backend = requested if requested in ("nvlink", "fs") else "none"  # tagged arm
        self.admitted = admitted
        self.code_class = f"{status // 100}xx"
        self.served_by = served_by  # the arm server that answered, None for the filter's own answer
        # kvab_served_total{served}: C has no map, so it cannot name the serving arm.
        self.served = "none" if served_by is None else ("unknown" if gateway == GW_C else served_by)
        self.pod = {"nvlink": POD_NV, "fs": POD_FS, None: "none"}[served_by]


def send(gateways, kind):
    gw, value, fail = KINDS[kind]
    headers = [("content-type", "application/json")]
    if value:
        headers.append(("x-kv-backend", value))
    headers.append(("x-test-delay-ms", str({"nvlink": NVLINK_DELAY_MS, "fs": FS_DELAY_MS}.get(value, 0))))
    if fail:
        headers.append(("x-test-status", "503"))
    r = request(gateways[gw].port, "POST", "/v1/chat/completions", headers, b'{"model":"m","messages":[]}', timeout=10)
    return Outcome(gw, value, r.status, r.header("x-served-by"))


def run_round(gateways, mix):
    kinds = [k for k, n in mix.items() for _ in range(n)]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda k: send(gateways, k), kinds))


def count(outcomes, *keys, where=lambda o: True):
    out = {}
    for o in outcomes:
        if where(o):
            k = tuple(getattr(o, key) for key in keys)
            out[k] = out.get(k, 0) + 1
    return out


class Live:
    """The scenario's results, for the checks."""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("observability")
    nv, fs, m404, lmcache = TestArm("nvlink"), TestArm("fs"), TestArm("nvlink-404", 404), TestArm("lmcache")
    stopped = []
    sidecar = Sidecar(sidecar_config(nv, fs, m404, lmcache), workdir=work)
    linked = {"sidecar": {"cluster": "kvab-sidecar", "refreshMs": 200}}
    gateways = {}
    prometheus = Prometheus(scrape_interval="500ms", evaluation_interval="1s", rule_files=[RULES], workdir=work / "prometheus")
    try:
        sidecar.start()
        stopped.append(sidecar.stop)
        # C first: its map age (since its VM started) must pass 10 s before the end.
        for name, kw in ((GW_C, {}), (GW_A, {"sidecar_port": sidecar.port}), (GW_B, {"sidecar_port": sidecar.port, "swap_routes": True})):
            gateways[name] = Gateway(linked, nv.port, fs.port, concurrency=1, workdir=work / name, **kw).start()
            stopped.append(gateways[name].stop)
        c_started = time.time()
        prometheus.start([gateway_target(g.admin_port, pod=name, job=f"kvab-gateway-{name}") for name, g in gateways.items()] + [sidecar_target(sidecar.port)])
        stopped.append(prometheus.stop)
        prometheus.wait_scraped()
        # Every gateway's filter series scraped at zero before any traffic.
        wait_until(lambda: len(prometheus.query('kvab_requests_total{backend="nvlink",source="header"} == 0')) == 3, 10, what="zero baselines")
        wait_until(lambda: len(prometheus.query('kvab_proxy_metrics_up')) == 4, 10, what="four probed endpoints")

        warmup = run_round(gateways, WARMUP)
        sidecar.request("POST", "/v1/reports", {"content-type": "application/json"}, INVALID_REPORT)
        warm_reported = sum(1 for o in warmup if o.gateway != GW_C)
        wait_until(lambda: prometheus.query("sum(kvab_routed_requests_total)") == [({}, float(warm_reported))], 15, what="warm-up scraped")
        wait_until(lambda: prometheus.query('sum(kvab_reports_received_total{result="invalid"})') == [({}, 1.0)], 10, what="invalid report scraped")

        burst = run_round(gateways, BURST)
        sidecar.request("POST", "/v1/reports", {"content-type": "application/json"}, INVALID_REPORT)
        outcomes = warmup + burst
        reported = sum(1 for o in outcomes if o.gateway != GW_C)
        # Histograms reach /stats/prometheus at Envoy's 1 s stats flush; wait until Prometheus has it all. They
        # time answered requests only: the 503s are in kvab_responses_total, never in the latency.
        answered = sum(o.admitted and o.status < 500 for o in outcomes)
        wait_until(lambda: prometheus.query("sum(kvab_request_duration_milliseconds_count)") == [({}, float(answered))], 15, what="histograms scraped")
        wait_until(lambda: prometheus.query("sum(kvab_responses_total)") == [({}, float(len(outcomes)))], 10, what="responses scraped")
        wait_until(lambda: prometheus.query("sum(kvab_routed_requests_total)") == [({}, float(reported))], 15, what="reports scraped")
        wait_until(lambda: prometheus.query('sum(kvab_reports_received_total{result="invalid"})') == [({}, 2.0)], 10, what="invalid reports scraped")
        wait_until(lambda: prometheus.query(f'kvab_endpoint_map_age_seconds{{pod="{GW_C}"}} > 10'), 20, what="C's map older than 10 s")

        # Evaluate at the newest scrape: Prometheus extrapolates at most one interval.
        t = max(v for _, v in prometheus.query("timestamp(up)"))
        result = Live()
        result.__dict__.update(prometheus=prometheus, sidecar=sidecar, gateways=gateways, warmup=warmup, burst=burst, outcomes=outcomes, time=t, c_started=c_started)
        yield result
    finally:
        for stop in reversed(stopped):
            stop()
        for server in (nv, fs, m404, lmcache):
            server.stop()
    for g in gateways.values():
        g.assert_healthy()


def test_the_burst_did_what_the_scenario_says(live):
    by = count(live.outcomes, "gateway", "backend", "served_by", "status")
    n = {k: WARMUP[k] + BURST[k] for k in KINDS}
    assert by[(GW_A, "nvlink", "nvlink", 200)] == n["a-nvlink"]
    assert by[(GW_A, "fs", "fs", 200)] == n["a-fs"]
    assert by[(GW_A, "fs", "fs", 503)] == n["a-fs-fail"]
    assert by[(GW_A, "none", None, 400)] == n["a-unknown"]
    assert by[(GW_A, "none", "nvlink", 200)] + by[(GW_A, "none", "fs", 200)] == n["a-untagged"]
    assert by[(GW_A, "none", "nvlink", 200)] >= 1 and by[(GW_A, "none", "fs", 200)] >= 1
    assert by[(GW_B, "nvlink", "fs", 200)] == n["b-nvlink"], "B's swapped route sends nvlink to the FS proxy"
    assert by[(GW_C, "fs", "fs", 200)] == n["c-fs"]
    assert sum(by.values()) == len(live.outcomes)


# -- expectations: each returns {labels tuple: expected}, where expected is a number, a (lo, hi)
#    range, or a predicate. Rates are compared as rate * window (the number of requests).


def key(**labels):
    return tuple(sorted(labels.items()))


def arms_and_none(values: dict, labels=("nvlink", "fs", "none"), name="backend"):
    return {key(**{name: b}): values.get(b, 0) for b in labels}


def expect_request_rate(L):
    c = count(L.outcomes, "backend", where=lambda o: o.admitted)
    return "rate", arms_and_none({b: n for (b,), n in c.items()})


def expect_error_ratio(L):
    total = count(L.outcomes, "backend", where=lambda o: o.admitted)
    errors = count(L.outcomes, "backend", where=lambda o: o.admitted and o.status >= 500)
    ratio = {b: errors.get((b,), 0) / total[(b,)] for b in ("nvlink", "fs")}
    assert ratio["nvlink"] == 0 and ratio["fs"] > 0.2
    # fs traffic comes from gateways A and C, whose rates Prometheus extrapolates a little
    # differently (scrape offsets): within 10 %.
    return "gauge", {key(backend="nvlink"): 0, key(backend="fs"): lambda v: abs(v - ratio["fs"]) <= 0.1 * ratio["fs"]}


def expect_responses(L):
    c = count(L.outcomes, "backend", "code_class")
    return "rate", {key(backend=b, code_class=k): c.get((b, k), 0) for b in ("nvlink", "fs", "none") for k in ("1xx", "2xx", "3xx", "4xx", "5xx", "none")}


def expect_rejected(L):
    n = sum(o.status == 400 for o in L.outcomes)
    return "rate", {key(reason="unknown_kv_backend"): n, key(reason="ambiguous_kv_backend"): 0, key(reason="kv_backend_unavailable"): 0}


def expect_invalid(L):
    n = sum(o.status == 400 for o in L.outcomes)
    return "rate", {key(reason="unknown"): n, key(reason="ambiguous"): 0, key(reason="not_allowed"): 0}


def histogram_quantile(q, buckets):
    """Prometheus' histogram_quantile over {le: cumulative count} (linear inside the bucket)."""
    les = sorted(buckets)
    total = buckets[float("inf")]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in les:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / (buckets[le] - below)
        lower, below = le, buckets[le]
    raise AssertionError("unreachable")


def envoy_buckets(L, histogram):
    """{backend: {le: count}} summed over the gateways' own /stats/prometheus."""
    out = {}
    for g in L.gateways.values():
        for (name, labels), v in g.stats().items():
            d = dict(labels)
            if name == f"{histogram}_bucket" and d["backend"] in ("nvlink", "fs"):
                per = out.setdefault(d["backend"], {})
                per[float(d["le"])] = per.get(float(d["le"]), 0) + v
    return out


def expect_quantile(q, histogram):
    # nvlink requests sleep 120 ms at the arm, fs ones 600 ms. Prometheus' answer is compared with
    # histogram_quantile computed here from the gateways' own buckets (within 10 %: the gateways'
    # rates are extrapolated a little differently), and must sit in or above the staged bucket.
    def expect(L):
        buckets = envoy_buckets(L, histogram)
        want = {b: histogram_quantile(q, buckets[b]) for b in ("nvlink", "fs")}
        assert 100 < want["nvlink"] < want["fs"] and want["fs"] > 500, want
        return "gauge", {key(backend=b): (lambda w: lambda v: abs(v - w) <= 0.1 * w)(w) for b, w in want.items()}

    return expect


def expect_misroutes(L):
    n = sum(o.backend in ("nvlink", "fs") and o.served in ("nvlink", "fs") and o.backend != o.served for o in L.outcomes)
    assert n == WARMUP["b-nvlink"] + BURST["b-nvlink"]
    # Every pair of different arms is shown, at zero when nothing was misrouted that way.
    return "rate", {key(requested="nvlink", served="fs"): n, key(requested="fs", served="nvlink"): 0}


def expect_served(L):
    c = count(L.outcomes, "backend", "served")
    return "rate", {key(requested=r, served=s): c.get((r, s), 0) for r in ("nvlink", "fs", "none") for s in ("nvlink", "fs", "unknown", "none")}


def expect_routed_per_pod(L):
    # C's reports never arrive. Series are created by the warm-up: expect between burst and total.
    reported = lambda o: o.gateway != GW_C
    total = count(L.outcomes, "pod", "served", where=reported)
    burst = count(L.burst, "pod", "served", where=reported)
    assert set(total) == {(POD_NV, "nvlink"), (POD_FS, "fs"), ("none", "none")}
    return "rate", {key(pod=p, served=s): (burst.get((p, s), 0), n) for (p, s), n in total.items()}


def expect_unavailable(L):
    return "rate", {key(backend="nvlink"): 0, key(backend="fs"): 0}


def expect_endpoints(state, values):
    return lambda L: ("gauge", {key(backend=b): v for b, v in values.items()})


def expect_probe(values):
    return lambda L: ("gauge", {key(backend=b, pod=p): v for (b, p), v in values.items()})


def expect_reports_sent(L):
    # A and B deliver theirs; C's are all deferred: its sidecar port is closed, and Envoy answers a call
    # that cannot connect with 503, which the filter keeps its counts for and backs off from.
    return "rate", {key(result="ok"): lambda v: v >= 2, key(result="error"): lambda v: v >= 0,
                    key(result="deferred"): lambda v: v > 0}


def expect_reports_received(L):
    def applied(v):
        return v >= 2

    # "invalid": one before the burst (creates the series), one during it.
    return "rate_subset", {key(result="applied"): applied, key(result="invalid"): (1, 2)}


def expect_map_age(L):
    age_c = L.time - L.c_started
    return "gauge", {key(pod=GW_A): lambda v: v <= 2, key(pod=GW_B): lambda v: v <= 2, key(pod=GW_C): lambda v: 10 < v <= age_c + 3}


def expect_map_fetches(L):
    # A and B fetched their map (ok) before Prometheus started and it never changed since: every
    # refresh (200 ms) is a 304. C's every fetch fails.
    return "rate", {key(result="ok"): 0, key(result="not_modified"): lambda v: v >= 10, key(result="error"): lambda v: v >= 10, key(result="timeout"): 0}


def expect_http(L):
    positive = lambda v: v > 0
    return "rate_subset", {
        # The map's 200s were all answered before Prometheus started (see expect_map_fetches).
        key(route="endpoints", code="200"): 0,
        key(route="endpoints", code="304"): positive,
        key(route="reports", code="200"): positive,
        key(route="reports", code="400"): (1, 2),
        key(route="metrics", code="200"): positive,
    }


EXPECT = {
    ("Request rate per arm", "A"): expect_request_rate,
    ("5xx error ratio per arm", "A"): expect_error_ratio,
    ("Responses by status class", "A"): expect_responses,
    ("Rejected and invalid x-kv-backend values", "A"): expect_rejected,
    ("Rejected and invalid x-kv-backend values", "B"): expect_invalid,
    ("Request duration p50 / p95 / p99", "A"): expect_quantile(0.5, "kvab_request_duration_milliseconds"),
    ("Request duration p50 / p95 / p99", "B"): expect_quantile(0.95, "kvab_request_duration_milliseconds"),
    ("Request duration p50 / p95 / p99", "C"): expect_quantile(0.99, "kvab_request_duration_milliseconds"),
    ("Time to first byte p50 / p95 / p99", "A"): expect_quantile(0.5, "kvab_time_to_first_byte_milliseconds"),
    ("Time to first byte p50 / p95 / p99", "B"): expect_quantile(0.95, "kvab_time_to_first_byte_milliseconds"),
    ("Time to first byte p50 / p95 / p99", "C"): expect_quantile(0.99, "kvab_time_to_first_byte_milliseconds"),
    ("Misroutes (requested arm served by the other)", "A"): expect_misroutes,
    ("Requested vs served arm", "A"): expect_served,
    ("Routed requests per proxy pod (kvab serve)", "A"): expect_routed_per_pod,
    ("Requests for an arm without ready endpoints", "A"): expect_unavailable,
    ("Proxy endpoints per arm", "A"): expect_endpoints("ready", {"nvlink": 2, "fs": 1, "lmcache": 0}),
    ("Proxy endpoints per arm", "B"): expect_endpoints("not_ready", {"nvlink": 0, "fs": 0, "lmcache": 1}),
    ("Proxy /metrics probes", "A"): expect_probe({("nvlink", POD_NV): 1, ("fs", POD_FS): 1, ("nvlink", POD_404): 0, ("lmcache", POD_LMCACHE): 1}),
    ("Proxy /metrics probes", "B"): expect_probe({("nvlink", POD_NV): 200, ("fs", POD_FS): 200, ("nvlink", POD_404): 404, ("lmcache", POD_LMCACHE): 200}),
    ("Unlabeled proxy pods", "A"): lambda L: ("gauge", {key(reason="missing_label"): 0, key(reason="unknown_backend"): 0}),
    ("kvab serve ready, filter reporters", "A"): lambda L: ("gauge", {(): 1}),
    # One filter VM (concurrency 1) per linked gateway, A and B.
    ("kvab serve ready, filter reporters", "B"): lambda L: ("gauge", {(): 2}),
    ("Reports: sent by the filter, received by kvab serve", "A"): expect_reports_sent,
    ("Reports: sent by the filter, received by kvab serve", "B"): expect_reports_received,
    ("Endpoint map age in the filter", "A"): expect_map_age,
    ("Endpoint map fetches", "A"): expect_map_fetches,
    ("kvab serve HTTP requests and watch errors", "A"): expect_http,
    ("kvab serve HTTP requests and watch errors", "B"): lambda L: ("rate", {(): 0}),
}


def substitute(expr: str, board: dict) -> str:
    """The query as Grafana sends it with the dashboard's default variables."""
    values = {"__rate_interval": WINDOW, "__range": WINDOW}
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            value = v["current"]["value"]
            if value == ["$__all"] or value == "$__all":
                value = v["allValue"]
            values[v["name"]] = value
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr.replace('"$1"', ""), expr
    return expr


def check(where: str, result: list, kind: str, expected: dict):
    got = {}
    for labels, value in result:
        labels = {k: v for k, v in labels.items() if k != "__name__"}
        got[tuple(sorted(labels.items()))] = value
    if kind == "rate_subset":
        assert set(expected) <= set(got), f"{where}: missing {set(expected) - set(got)}; got {got}"
        kind = "rate"
    else:
        assert set(got) == set(expected), f"{where}: series {sorted(got)} != expected {sorted(expected)}"
    for labels, want in expected.items():
        value = got[labels] * (WINDOW_S if kind == "rate" else 1)
        if callable(want):
            ok = want(value)
        elif isinstance(want, tuple):
            lo, hi = want
            ok = lo * 0.9 - 0.01 <= value <= hi * 1.1 + 0.01
        elif kind == "rate":
            ok = abs(value - want) <= 0.1 * want + 0.01
        else:
            ok = abs(value - want) <= 1e-6 * max(1.0, abs(want))
        assert ok, f"{where} {dict(labels)}: got {value!r} ({kind}), expected {want!r}"


def test_every_dashboard_query_returns_the_expected_series_and_values(live):
    board = dashboard()
    queries = dashboard_queries(board)
    assert set(queries) == set(EXPECT), f"queries without expectations: {set(queries) - set(EXPECT)}; stale expectations: {set(EXPECT) - set(queries)}"
    for where, expr in queries.items():
        promql = substitute(expr, board)
        kind, expected = EXPECT[where](live)
        check(f"{where}: {promql}", live.prometheus.query(promql, time=live.time), kind, expected)


def test_latency_was_staged_as_intended(live):
    """Most requests of each arm landed in the bucket of their arm's delay (a loaded machine may
    push a few further), so the quantile panels compare two clearly different arms."""
    for histogram in ("kvab_request_duration_milliseconds", "kvab_time_to_first_byte_milliseconds"):
        buckets = envoy_buckets(live, histogram)
        for backend, (lo, hi) in (("nvlink", (99, 249)), ("fs", (499, 999))):
            counts = buckets[backend]
            assert counts[float(lo)] == 0, (histogram, backend, counts)
            assert counts[float(hi)] >= 0.5 * counts[float("inf")], (histogram, backend, counts)


def test_every_alert_expression_returns_the_expected_series(live):
    rules = {r["alert"]: r["expr"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    fs = count(live.outcomes, "backend", where=lambda o: o.admitted)[("fs",)]
    fs_errors = sum(o.backend == "fs" and o.status >= 500 for o in live.outcomes)
    misroutes = WARMUP["b-nvlink"] + BURST["b-nvlink"]
    gw, kv = GATEWAY_NAMESPACE, KVAB_NAMESPACE
    expected = {
        "KvabMisroutes": ("count", {key(namespace=gw, requested="nvlink", served="fs"): misroutes}),
        "KvabArmNoReadyEndpoints": ("gauge", {key(namespace=kv, backend="lmcache"): 0}),
        "KvabProxyMetricsDown": ("gauge", {key(namespace=kv, backend="nvlink", pod=POD_404): 404}),
        "KvabEndpointMapStale": ("gauge", {key(namespace=gw, pod=GW_C): lambda v: v > 10}),
        "KvabReportsFailing": ("gauge", {key(namespace=gw, pod=GW_C): 1.0}),
        # One refused report before the burst, one during it: the increase is 1, and Prometheus's
        # extrapolation can take it toward the counter's zero point (2) and past the last sample (a
        # fraction of a 500 ms scrape interval's worth): seen up to 2.2.
        "KvabReportsRefused": ("gauge", {key(namespace=kv, result="invalid"): lambda v: 0.9 <= v <= 2.5}),
        "KvabArmErrorRatioHigh": ("gauge", {key(namespace=gw, backend="fs"): lambda v: abs(v - fs_errors / fs) <= 0.1 * fs_errors / fs}),
        "KvabSidecarNotReady": ("gauge", {}),
        # No request panics kvab serve: the alert's expression has no sample.
        "KvabHandlerPanicked": ("gauge", {}),
        # The live sidecar's state is sound and writable: neither expression has a sample.
        "KvabReportStateDamaged": ("gauge", {}),
        "KvabReportStateErrors": ("gauge", {}),
        # The live stack is far from the ledger's caps, refuses nothing as full and shares no id.
        "KvabReportLedgerNearCap": ("gauge", {}),
        "KvabReportsRefusedLedgerFull": ("gauge", {}),
        "KvabSharedReporterId": ("gauge", {}),
    }
    assert set(rules) == set(expected)
    for alert, expr in rules.items():
        kind, want = expected[alert]
        if kind == "count":  # increase() values are counts already
            want = {k: (lambda n: lambda v: abs(v - n) <= 0.1 * n)(n) for k, n in want.items()}
        check(alert, live.prometheus.query(expr, time=live.time), "gauge", want)


def test_prometheus_loads_the_rules_and_the_expected_alerts_go_pending_or_fire(live):
    groups = live.prometheus.rules()
    every = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in every} == ALERTS | RECORDS
    assert all(r["health"] == "ok" for r in every), [(r["name"], r.get("lastError")) for r in every]
    rules = [r for r in every if r["type"] == "alerting"]
    # Alerts with a `for` stay pending for longer than this test runs; those without fire at once.
    want = {
        ("KvabMisroutes", "firing"), ("KvabReportsRefused", "firing"),
        ("KvabArmNoReadyEndpoints", "pending"), ("KvabProxyMetricsDown", "pending"), ("KvabEndpointMapStale", "pending"),
        ("KvabReportsFailing", "pending"), ("KvabArmErrorRatioHigh", "pending"),
    }
    states = lambda: {(a["labels"]["alertname"], a["state"]) for a in live.prometheus.alerts()}
    wait_until(lambda: states() == want, 10, what="alert states", interval=0.5)
    alerts = {a["labels"]["alertname"]: a for a in live.prometheus.alerts()}
    assert alerts["KvabProxyMetricsDown"]["labels"]["pod"] == POD_404
    assert "HTTP 404" in alerts["KvabProxyMetricsDown"]["annotations"]["description"]
    assert alerts["KvabMisroutes"]["annotations"]["summary"] == "Requests for nvlink were served by fs"
    assert alerts["KvabEndpointMapStale"]["labels"]["pod"] == GW_C


def test_the_gateway_variable_narrows_the_dashboard_to_one_gateway(live):
    board = dashboard()
    expr = dashboard_queries(board)[("Request rate per arm", "A")]
    promql = substitute(expr.replace("$gateway", GW_B), board)
    check(promql, live.prometheus.query(promql, time=live.time), "rate", arms_and_none({"nvlink": WARMUP["b-nvlink"] + BURST["b-nvlink"]}))


def test_prometheus_storage_is_temporary_and_removed_at_stop(tmp_path):
    p = Prometheus(workdir=tmp_path).start([])
    data = p.data_dir
    assert data.is_dir() and str(data).startswith(str(tmp_path))
    assert p.query("vector(1)") == [({}, 1.0)]
    p.stop()
    assert p.process.returncode == 0
    assert not data.exists()
