"""The closed loop: the filter routes with the sidecar's live endpoint maps and reports what it
served. Real Envoy + filter, real `kvab serve` watching the fake Kubernetes API, two local arms.

Proxy pods in the fake API all have IP 127.0.0.1 and a container port named `http` that is the
local arm's port, so the sidecar's endpoint addresses are exactly the upstream addresses Envoy
reports (`upstream.address`).
"""

import http.server
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from fakekube import FakeKube, make_pod
from kvablocal import prom
from kvablocal.envoy import Gateway
from kvablocal.net import free_port, request, wait_until
from kvablocal.sidecar import Sidecar, kubernetes_config, static_config

NS = "llm-d-vllm"
REFRESH_MS = 200

SIDECAR_CONFIG = kubernetes_config([NS])


def proxy_pod(name, arm, port, ready=True):
    labels = {"role": "proxy", "llm-d.ai/kv-backend": arm}
    return make_pod(name, NS, labels, "127.0.0.1", ready=ready, container_ports=[{"name": "http", "containerPort": port}])


@pytest.fixture
def kube(tmp_path):
    with FakeKube(workdir=tmp_path / "kube", bookmark_interval=0.5) as kube:
        yield kube


@pytest.fixture
def stack(arms, kube, tmp_path):
    """Proxy pods for both arms, kvab serve watching them, Envoy + filter fetching its maps."""
    kube.put_pod(proxy_pod("vllm-p2p-proxy", "nvlink", arms["nvlink"].port))
    kube.put_pod(proxy_pod("vllm-fs-proxy", "fs", arms["fs"].port))
    sidecar = Sidecar(SIDECAR_CONFIG, workdir=tmp_path, env=kube.env()).start()
    wait_until(lambda: sidecar.get("/readyz").status == 200, 10, what="sidecar synced")
    started = []

    def gateway(**kw):
        config = {"sidecar": {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS}, **kw.pop("filter", {})}
        g = Gateway(config, arms["nvlink"].port, arms["fs"].port, sidecar_port=sidecar.port, workdir=tmp_path / f"envoy{len(started)}", **kw).start()
        started.append(g)
        wait_until(lambda: prom.value(g.stats(), "kvab_endpoint_map_fetches_total", result="ok") >= 1, 5, what="first map")
        return g

    yield kube, sidecar, gateway
    for g in started:
        g.stop()
    sidecar.stop()
    for g in started:
        g.assert_healthy()


def send(g, arm=None):
    headers = [("x-kv-backend", arm)] if arm else []
    return request(g.port, "POST", "/v1/chat/completions", headers, b'{"model":"m","messages":[]}')


def within_a_refresh(predicate, what):
    """Map changes reach the filter within one refresh interval after the sidecar has them
    (watch event → sidecar map is the sidecar's own budget, below 1 s)."""
    return wait_until(predicate, 1.0 + 2 * REFRESH_MS / 1000, interval=0.02, what=what)


def test_untagged_traffic_is_attributed_to_the_arm_that_served_it(stack):
    kube, sidecar, gateway = stack
    g = gateway()
    served = [send(g).header("x-kv-backend") for _ in range(6)]
    assert set(served) == {"nvlink", "fs"}, served
    s = wait_until(lambda: sum(prom.select(g.stats(), "kvab_served_total", requested="none").values()) == 6 and g.stats(), 5)
    assert prom.value(s, "kvab_served_total", requested="none", served="nvlink") == served.count("nvlink")
    assert prom.value(s, "kvab_served_total", requested="none", served="fs") == served.count("fs")


def test_an_emptied_arm_answers_503_and_recovers(stack):
    kube, sidecar, gateway = stack
    g = gateway()
    assert send(g, "nvlink").status == 200
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": False})
    r = within_a_refresh(lambda: (r := send(g, "nvlink")).status == 503 and r, "nvlink unavailable")
    assert r.json() == {
        "error": {
            "message": "KV backend nvlink has no ready endpoint; retry later or choose another x-kv-backend",
            "type": "service_unavailable_error",
            "code": "kv_backend_unavailable",
            "param": "x-kv-backend",
        }
    }
    assert send(g, "fs").status == 200, "the other arm keeps serving"
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": True})
    within_a_refresh(lambda: send(g, "nvlink").status == 200, "nvlink back")
    s = g.stats()
    assert prom.value(s, "kvab_rejected_total", reason="kv_backend_unavailable") >= 1
    assert prom.value(s, "kvab_unavailable_total", backend="nvlink") >= 1


def test_passthrough_lets_requests_to_an_empty_arm_through_and_counts_them(stack):
    kube, sidecar, gateway = stack
    g = gateway(filter={"onUnavailable": "passthrough"})
    kube.delete_pod(NS, "vllm-fs-proxy")

    def admitted_and_counted():
        assert send(g, "fs").status == 200
        return prom.value(g.stats(), "kvab_unavailable_total", backend="fs") >= 1

    within_a_refresh(admitted_and_counted, "fs counted unavailable")
    assert prom.value(g.stats(), "kvab_rejected_total", reason="kv_backend_unavailable") == 0


def test_a_moved_endpoint_changes_the_served_arm_within_a_refresh(stack):
    kube, sidecar, gateway = stack
    # Passthrough: once fs has no endpoint left its requests still go to the FS route.
    g = gateway(filter={"onUnavailable": "passthrough"})
    assert send(g, "fs").header("x-kv-backend") == "fs"
    # The FS proxy's pod is relabelled nvlink: its address now belongs to the other arm.
    kube.patch_pod(NS, "vllm-fs-proxy", {"labels": {"llm-d.ai/kv-backend": "nvlink"}})
    within_a_refresh(lambda: send(g, "fs").header("x-kv-backend") == "nvlink", "fs proxy counted as nvlink")


def test_a_misrouting_route_shows_up_as_misroutes(stack):
    kube, sidecar, gateway = stack
    g = gateway(swap_routes=True)
    r = send(g, "nvlink")
    assert r.status == 200
    assert r.header("x-served-by") == "fs"
    assert r.header("x-kv-backend") == "fs", "the response names the arm that served it"
    for _ in range(4):
        send(g, "nvlink")
    wait_until(lambda: prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="fs") == 5, 5, what="5 misroutes")
    assert prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="nvlink") == 0


def test_a_stale_map_counts_as_unknown_and_refuses_nothing(stack, arms, tmp_path):
    kube, sidecar, gateway = stack
    g = gateway(filter={"sidecar": {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS, "staleAfterMs": 3 * REFRESH_MS}})
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": False})
    within_a_refresh(lambda: send(g, "nvlink").status == 503, "nvlink unavailable")
    sidecar.stop(sig=signal.SIGKILL)
    # Once the map is older than staleAfterMs nothing is known: requests flow, served is unknown.
    # Each worker sees its own copy go stale (within a refresh of each other), so keep sending.
    r = wait_until(lambda: (r := send(g, "nvlink")).status == 200 and r, 3, what="stale map admits")
    assert r.header("x-kv-backend") == "nvlink"
    unknown = lambda: prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="unknown")
    wait_until(lambda: send(g, "nvlink").status == 200 and unknown() >= 1, 5, what="unknown served")
    # Stale on every worker now: ten requests in a row are all admitted, none attributed to an arm.
    before = unknown()
    assert [send(g, "nvlink").status for _ in range(10)] == [200] * 10
    assert unknown() == before + 10
    s = g.stats()
    assert prom.value(s, "kvab_endpoint_map_fetches_total", result="error") >= 1
    assert prom.value(s, "kvab_endpoint_map_age_seconds") >= 0


# ---- reports: exact per-proxy counts, whatever happens to the sidecar or the reports ----



def static_sidecar_config(arms, state_file=None, token_file=None):
    endpoints = [
        ("nvlink", f"127.0.0.1:{arms['nvlink'].port}", f"{NS}/vllm-p2p-proxy"),
        ("fs", f"127.0.0.1:{arms['fs'].port}", f"{NS}/vllm-fs-proxy"),
    ]
    extra = "[reports]\n"
    extra += f'state_file = "{state_file}"\n' if state_file else ""
    extra += f'token_file = "{token_file}"\n' if token_file else ""
    # Probing is not under test here.
    return static_config(endpoints) + "[probe]\ninterval_seconds = 0\n" + extra


def routed_total(sidecar):
    return sum(v for (name, _), v in sidecar.samples().items() if name == "kvab_routed_requests_total")


def burst(gateway, n, concurrency=8, during=None):
    """Sends n requests (a third each nvlink, fs, untagged); returns how many got an answer.
    `during(i)` is called from the sender of request i (to inject a fault mid-burst)."""
    headers = [[("x-kv-backend", "nvlink")], [("x-kv-backend", "fs")], []]

    def one(i):
        if during:
            during(i)
        try:
            return request(gateway.port, "POST", "/v1/chat/completions", headers[i % 3], b"{}").status
        except OSError:
            return None

    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(one, range(n)))
    assert all(s == 200 for s in statuses if s is not None), set(statuses)
    return sum(s is not None for s in statuses)


@pytest.fixture
def static_stack(arms, tmp_path):
    started, sidecars = [], []

    def start(sidecar_port=None, state_file=None, sidecar_listen_port=None, token_file=None, report_token=None, **kw):
        config = static_sidecar_config(arms, state_file, token_file)
        sidecar = Sidecar(config, port=sidecar_listen_port or 0, workdir=tmp_path)
        sidecars.append(sidecar)  # stopped even if the gateway below fails to start
        sidecar.start()
        link = {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS}
        if report_token:
            link["reportToken"] = report_token
        g = Gateway(
            {"sidecar": link},
            arms["nvlink"].port,
            arms["fs"].port,
            sidecar_port=sidecar_port or sidecar.port,
            workdir=tmp_path / "envoy",
            **kw,
        ).start()
        started.append((g, sidecar))
        return g, sidecar

    yield start
    for g, _ in started:
        g.stop()
    for sidecar in sidecars:
        sidecar.stop()
    for g, _ in started:
        g.assert_healthy()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_routed_counts_equal_the_answers_across_a_sidecar_stop_mid_burst(static_stack, tmp_path, sig):
    """SIGKILL: nothing is saved on the way out, the state file holds what was shown. SIGTERM (a
    rollout): the sidecar drains and exits; either way the restarted sidecar continues exactly."""
    state_file = tmp_path / "reports.json"
    g, sidecar = static_stack(state_file=state_file)
    restarted = threading.Event()
    exit_codes = []

    def stop_and_restart(i):
        if i == 1000 and not restarted.is_set():
            restarted.set()
            exit_codes.append(sidecar.stop(sig=sig))
            threading.Timer(0.5, lambda: sidecar.start()).start()

    answered = burst(g, 3000, during=stop_and_restart)
    assert exit_codes == [-signal.SIGKILL if sig == signal.SIGKILL else 0]
    wait_until(lambda: sidecar.proc.poll() is None and routed_total(sidecar) == answered, 15, what=f"{answered} routed")
    samples = sidecar.samples()
    # Every request is attributed to the proxy pod that served it.
    pods = {dict(labels)["pod"] for (name, labels), v in samples.items() if name == "kvab_routed_requests_total" and v}
    assert pods == {f"{NS}/vllm-p2p-proxy", f"{NS}/vllm-fs-proxy"}
    assert prom.value(samples, "kvab_reports_received_total", result="invalid") == 0
    # The filter's own counters agree.
    filter_total = sum(prom.select(g.stats(), "kvab_responses_total").values())
    assert filter_total == answered


def test_every_worker_reports_under_an_id_of_its_own(static_stack):
    """Many workers configure in the same instant: each VM still reports under an id of its own
    (from the host's random source, not the clock), so no report is refused and the counts are
    exact. With ids from the clock two workers of one tick shared an id and about half the counts
    were refused as going down."""
    workers = 8
    g, sidecar = static_stack(concurrency=workers)
    answered = burst(g, 4000, concurrency=32)
    wait_until(lambda: routed_total(sidecar) == answered, 15, what=f"{answered} routed")
    samples = sidecar.samples()
    assert prom.value(samples, "kvab_reports_received_total", result="invalid") == 0
    # Each request opens a connection of its own, so every worker serves some: one reporter each.
    assert prom.value(samples, "kvab_reporters") == workers
    assert "went down" not in sidecar.log()


class LinkProxy:
    """An HTTP proxy between the filter and the sidecar that misbehaves on purpose.

    `fault(kind, n)` decides, for the n-th request of a kind (`map` or `report`), what happens:
    `forward`, `twice` (forwarded two times, the second answer returned), `drop` (503, not
    forwarded), `garbage` (200 with a body that is not JSON), `huge` (200 with a 17 MiB body),
    `slow` (answered after 2 s), `5xx` (500) or `413` (a report refused as too large). While `down` is set, connections are refused."""

    def __init__(self, upstream_port, fault=lambda kind, n: "forward"):
        proxy = self
        self.fault = fault
        self.seen = {"map": 0, "report": 0}
        self.actions = []
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self, body=None):
                req = urllib.request.Request(
                    f"http://127.0.0.1:{upstream_port}{self.path}",
                    data=body,
                    method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() in ("content-type", "if-none-match", "authorization")},
                )
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        return r.status, r.read(), r.headers
                except urllib.error.HTTPError as e:
                    return e.code, e.read(), e.headers

            def answer(self, status, body, headers=None):
                self.send_response(status)
                for k in ("content-type", "etag"):
                    if headers and headers.get(k):
                        self.send_header(k, headers[k])
                self.send_header("content-length", str(len(body)))
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the filter gave up first (the `slow` fault): what is being tested

            def handle_one(self, kind, body=None):
                with lock:
                    proxy.seen[kind] += 1
                    action = proxy.fault(kind, proxy.seen[kind])
                    proxy.actions.append((kind, action))
                if action == "drop":
                    return self.answer(503, b'{"error":{"code":"dropped","message":"by the test"}}')
                if action == "5xx":
                    return self.answer(500, b"internal")
                if action == "413":
                    return self.answer(413, b'{"error":{"code":"too_large","message":"by the test"}}')
                if action == "garbage":
                    return self.answer(200, b"<html>not a map</html>", {"content-type": "text/html"})
                if action == "huge":
                    return self.answer(200, b"{" + b" " * (17 << 20) + b"}", {"content-type": "application/json"})
                if action == "slow":
                    time.sleep(2)
                status, reply, headers = self.forward(body)
                if action == "twice":
                    status, reply, headers = self.forward(body)
                self.answer(status, reply, headers)

            def do_GET(self):
                self.handle_one("map")

            def do_POST(self):
                self.handle_one("report", self.rfile.read(int(self.headers.get("content-length") or 0)))

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, kind, action):
        return sum(1 for k, a in self.actions if (k, a) == (kind, action))

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_dropped_and_duplicated_reports_leave_the_counts_exact(static_stack, arms, tmp_path):
    sidecar_port = free_port()
    # Of every 4 reports, the 2nd is lost and the 3rd arrives twice.
    tap = LinkProxy(sidecar_port, lambda kind, n: {2: "drop", 3: "twice"}.get(n % 4, "forward") if kind == "report" else "forward")
    try:
        g, sidecar = static_stack(sidecar_port=tap.port, sidecar_listen_port=sidecar_port)
        answered = 0
        for _ in range(6):  # several report intervals, so reports are dropped and repeated
            answered += burst(g, 60, concurrency=4)
            time.sleep(REFRESH_MS / 1000)
        wait_until(lambda: routed_total(sidecar) == answered, 10, what=f"{answered} routed")
        assert tap.count("report", "drop") >= 1 and tap.count("report", "twice") >= 1, tap.seen
        samples = sidecar.samples()
        assert prom.value(samples, "kvab_reports_received_total", result="duplicate") >= 1
        # A dropped report is answered 503: "not now", counted as deferred and sent again after a backoff.
        assert prom.value(g.stats(), "kvab_reports_total", result="deferred") >= 1
    finally:
        tap.stop()


def test_garbage_reports_are_refused_with_json_errors(static_stack):
    g, sidecar = static_stack()
    cases = [
        ("POST", {"content-type": "application/json"}, b"{", 400, "invalid_report"),
        ("POST", {"content-type": "application/json"}, b'{"reporter":"r","sequence":1,"started_at_ms":0,"totals":[],"x":1}', 400, "invalid_report"),
        ("POST", {"content-type": "application/json"}, b'{"reporter":"r","sequence":1,"started_at_ms":0,"totals":[{"requested":"gpu","served":"fs","endpoint":"","code_class":"2xx","count":1}]}', 400, "invalid_report"),
        ("POST", {"content-type": "text/plain"}, b"{}", 415, "unsupported_media_type"),
        ("POST", {"content-type": "application/json"}, b" " * (1024 * 1024 + 1), 413, "too_large"),
        ("GET", {}, b"", 405, "method_not_allowed"),
    ]
    for method, headers, body, status, code in cases:
        r = sidecar.request(method, "/v1/reports", headers, body)
        assert r.status == status, (code, r)
        assert r.json()["error"]["code"] == code
    assert routed_total(sidecar) == 0
    json_type = {"content-type": "application/json"}
    totals = '[{"requested":"fs","served":"fs","endpoint":"","code_class":"2xx","count":2}]'
    # A filter VM older than this sidecar (which has no saved state): its first report is a baseline.
    old = f'{{"reporter":"old","sequence":9,"started_at_ms":0,"totals":{totals}}}'.encode()
    assert sidecar.request("POST", "/v1/reports", json_type, old).json() == {"result": "baselined"}
    assert routed_total(sidecar) == 0
    now_ms = int(time.time() * 1000) + 1000
    good = f'{{"reporter":"r","sequence":1,"started_at_ms":{now_ms},"totals":{totals}}}'.encode()
    r = sidecar.request("POST", "/v1/reports", json_type, good)
    assert (r.status, r.json()) == (200, {"result": "applied"})
    r = sidecar.request("POST", "/v1/reports", {"content-type": "application/json"}, good)
    assert (r.status, r.json()) == (200, {"result": "duplicate"})
    assert prom.value(sidecar.samples(), "kvab_routed_requests_total", requested="fs", served="fs", pod="none", code_class="2xx") == 2


def test_with_a_report_token_only_the_filter_can_report(static_stack, tmp_path):
    token = "s3cr3t-report-token-0123456789"
    token_file = tmp_path / "report-token"
    token_file.write_text(token + "\n")
    g, sidecar = static_stack(token_file=token_file, report_token=token)
    answered = burst(g, 30, concurrency=3)
    wait_until(lambda: routed_total(sidecar) == answered, 10, what=f"{answered} routed")
    now_ms = int(time.time() * 1000) + 1000
    forged = f'{{"reporter":"x","sequence":1,"started_at_ms":{now_ms},"totals":[{{"requested":"fs","served":"fs","endpoint":"","code_class":"2xx","count":1000}}]}}'.encode()
    for headers in [{}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": token}]:
        r = sidecar.request("POST", "/v1/reports", {"content-type": "application/json", **headers}, forged)
        assert (r.status, r.json()["error"]["code"]) == (401, "unauthorized"), headers
    assert routed_total(sidecar) == answered
    assert prom.value(sidecar.samples(), "kvab_reports_received_total", result="unauthorized") == 3


def test_a_misbehaving_sidecar_never_stops_traffic_and_the_filter_recovers(static_stack, tmp_path):
    """Down at start, then garbage, an oversized map, a slow answer and 5xx for maps and reports:
    requests keep flowing (a stale map refuses nothing), each fault is counted or logged, and once
    the sidecar behaves the map is back and the routed counts are exact."""
    mode = {"now": "down"}
    sidecar_port = free_port()
    link = LinkProxy(sidecar_port, lambda kind, n: mode["now"])
    link_port = link.port
    link.stop()  # the sidecar is unreachable when Envoy starts
    g, sidecar = static_stack(sidecar_port=link_port, sidecar_listen_port=sidecar_port)
    answered = burst(g, 30, concurrency=3)
    fetches = lambda result: prom.value(g.stats(), "kvab_endpoint_map_fetches_total", result=result)
    wait_until(lambda: fetches("error") >= 1, 5, what="failed fetches counted")

    # The sidecar comes back on the same port, behind the faulty link.
    mode["now"] = "forward"
    link = LinkProxy(sidecar_port, lambda kind, n: mode["now"])
    link.server.server_close()
    link.server = http.server.ThreadingHTTPServer(("127.0.0.1", link_port), link.server.RequestHandlerClass)
    link.server.daemon_threads = True
    threading.Thread(target=link.server.serve_forever, daemon=True).start()
    try:
        wait_until(lambda: fetches("ok") >= 1, 5, what="map fetched once the sidecar is back")
        assert send(g, "nvlink").header("x-kv-backend") == "nvlink"
        for fault, result, log_line in [
            ("garbage", "error", "endpoint map from kvab-sidecar refused"),
            ("huge", "error", "over 16777216"),
            ("slow", "timeout", None),
            ("5xx", "error", None),
        ]:
            before = fetches(result)
            mode["now"] = fault
            wait_until(lambda: fetches(result) > before, 8, what=f"{fault} counted as {result}")
            answered += burst(g, 30, concurrency=3)
            if log_line:
                assert log_line in g.log(), fault
            mode["now"] = "forward"
            wait_until(lambda: fetches("ok") + fetches("not_modified") > 0 and send(g, "fs").header("x-kv-backend") == "fs", 5, what=f"recovered after {fault}")
            answered += 1
        answered += burst(g, 30, concurrency=3)
        reports_failed = sum(prom.value(g.stats(), "kvab_reports_total", result=r) for r in ("error", "deferred"))
        assert reports_failed >= 1, "reports answered with faults are counted as errors (or deferred, for a 503)"
        # Every request that got an answer is counted once the reports get through.
        wait_until(lambda: routed_total(sidecar) == answered + 1, 10, what=f"{answered + 1} routed")
        assert link.count("map", "huge") >= 1 and link.count("map", "slow") >= 1
    finally:
        link.stop()


def test_a_report_refused_as_too_large_is_logged_counted_and_the_filter_recovers(static_stack, tmp_path):
    """A sidecar that takes smaller reports than the filter writes (413): the filter logs it, counts
    it, halves its report size and, as the sidecar keeps what a report leaves out, still gets every
    count through exactly."""
    sidecar_port = free_port()
    link = LinkProxy(sidecar_port, lambda kind, n: "413" if kind == "report" and n <= 3 else "forward")
    try:
        g, sidecar = static_stack(sidecar_port=link.port, sidecar_listen_port=sidecar_port)
        answered = burst(g, 300)
        wait_until(lambda: routed_total(sidecar) == answered, 15, what=f"{answered} routed")
        assert link.count("report", "413") == 3
        assert prom.value(g.stats(), "kvab_reports_total", result="error") >= 3
        assert "refused a report as too large (413); reports now stop at" in g.log()
        assert prom.value(sidecar.samples(), "kvab_reports_received_total", result="invalid") == 0
    finally:
        link.stop()
