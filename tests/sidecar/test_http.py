"""`kvab serve` with the static source: the endpoint map contract, ETag/304, JSON errors, readiness,
metrics (checked by promtool), graceful shutdown and configuration errors."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import time

from kvabtest import promtool_check, wait_until

STATIC = """
listen = "127.0.0.1:{port}"
source = "static"
arms = ["nvlink", "fs", "lmcache"]

[[static.endpoints]]
backend = "nvlink"
address = "10.0.0.5:8080"
pod = "llm-d-vllm/vllm-p2p-proxy-abc"

[[static.endpoints]]
backend = "nvlink"
address = "10.0.0.6:8080"
pod = "llm-d-vllm/vllm-p2p-proxy-def"
ready = false

[[static.endpoints]]
backend = "fs"
address = "10.0.0.7:8080"
pod = "llm-d-vllm/vllm-fs-proxy-xyz"

[probe]
interval_seconds = 0
"""

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def test_endpoint_map_lists_every_configured_arm(sidecar):
    kvab = sidecar(STATIC)
    resp = kvab.get("/v1/endpoints")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"version", "generated_at", "backends"}
    assert RFC3339.match(body["generated_at"]), body["generated_at"]
    assert body["backends"] == {
        "nvlink": {"endpoints": [
            {"address": "10.0.0.5:8080", "pod": "llm-d-vllm/vllm-p2p-proxy-abc", "ready": True},
            {"address": "10.0.0.6:8080", "pod": "llm-d-vllm/vllm-p2p-proxy-def", "ready": False},
        ]},
        "fs": {"endpoints": [
            {"address": "10.0.0.7:8080", "pod": "llm-d-vllm/vllm-fs-proxy-xyz", "ready": True},
        ]},
        "lmcache": {"endpoints": []},
    }


def test_etag_is_strong_stable_and_answers_304(sidecar):
    kvab = sidecar(STATIC)
    first = kvab.get("/v1/endpoints")
    etag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{16}"', etag), etag  # strong: no W/ prefix
    assert etag == f'"{first.json()["version"]}"'
    again = kvab.get("/v1/endpoints")
    assert again.headers["etag"] == etag
    assert again.body == first.body, "the cached body is served, generated_at included"

    not_modified = kvab.get("/v1/endpoints", {"If-None-Match": etag})
    assert not_modified.status == 304
    assert not_modified.body == b""
    assert not_modified.headers["etag"] == etag

    assert kvab.get("/v1/endpoints", {"If-None-Match": '"0000000000000000"'}).status == 200
    assert kvab.get("/v1/endpoints", {"If-None-Match": f'W/{etag}'}).status == 304


def test_same_content_keeps_its_etag_across_restarts(sidecar):
    first = sidecar(STATIC)
    etag = first.get("/v1/endpoints").headers["etag"]
    assert first.stop() == 0
    second = sidecar(STATIC)
    assert second.get("/v1/endpoints", {"If-None-Match": etag}).status == 304
    third = sidecar(STATIC.replace("10.0.0.7:8080", "10.0.0.8:8080"))
    changed = third.get("/v1/endpoints", {"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["etag"] != etag


def test_errors_are_json_with_a_code(sidecar):
    kvab = sidecar(STATIC)
    missing = kvab.get("/v1/endpoint")
    assert missing.status == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["error"]["code"] == "not_found"

    post = kvab.request("POST", "/v1/endpoints")
    assert post.status == 405
    assert post.headers["allow"] == "GET"
    assert post.json()["error"]["code"] == "method_not_allowed"


def test_health_and_readiness(sidecar):
    kvab = sidecar(STATIC)
    assert kvab.get("/healthz").json() == {"status": "ok"}
    ready = kvab.get("/readyz")
    assert ready.status == 200 and ready.json() == {"status": "ready"}


def test_metrics_pass_promtool_and_count_what_is_served(sidecar, promtool):
    kvab = sidecar(STATIC)
    kvab.get("/v1/endpoints")
    kvab.get("/nope")
    text = kvab.metrics()
    promtool_check(promtool, text)
    assert re.search(r'^# TYPE kvab_backend_endpoints gauge$', text, re.M)
    assert kvab.metric('kvab_backend_endpoints{backend="nvlink",state="ready"}') == 1
    assert kvab.metric('kvab_backend_endpoints{backend="nvlink",state="not_ready"}') == 1
    assert kvab.metric('kvab_backend_endpoints{backend="lmcache",state="ready"}') == 0
    assert kvab.metric('kvab_unlabeled_proxies{reason="missing_label"}') == 0
    assert kvab.metric('kvab_ready') == 1
    assert kvab.metric('kvab_endpoint_map_generation') == 1
    assert kvab.metric('kvab_http_requests_total{code="200",route="endpoints"}') == 1
    assert kvab.metric('kvab_http_requests_total{code="404",route="other"}') == 1


def test_sigterm_turns_readiness_off_first_then_drains_and_exits_zero(sidecar):
    kvab = sidecar(STATIC + "\n[shutdown]\ndrain_delay_seconds = 2\n")
    # An idle keep-alive connection opened before the signal must not hold up the shutdown.
    idle = http.client.HTTPConnection("127.0.0.1", kvab.port, timeout=5)
    idle.request("GET", "/healthz")
    idle.getresponse().read()

    kvab.proc.send_signal(signal.SIGTERM)
    draining = wait_until(lambda: (r := kvab.get("/readyz")).status == 503 and r, 5, "/readyz 503")
    assert draining.json()["error"]["code"] == "shutting_down"
    # During the drain delay the map is still served.
    assert kvab.get("/v1/endpoints").status == 200
    assert kvab.proc.wait(15) == 0
    log = kvab.log()
    assert "SIGTERM: shutting down" in log and "shutdown complete" in log, log
    idle.close()


def test_in_flight_request_finishes_during_shutdown(sidecar):
    """A request whose headers are still arriving when SIGTERM lands gets its answer, then kvab exits."""
    kvab = sidecar(STATIC)
    with socket.create_connection(("127.0.0.1", kvab.port), timeout=10) as conn:
        conn.sendall(b"GET /v1/endpoints HTTP/1.1\r\nHost: kvab\r\n")
        wait_until(lambda: kvab.metric('kvab_http_requests_total{code="200",route="healthz"}'), 5,
                   "kvab to have accepted connections")
        kvab.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM: shutting down" in kvab.log(), 5, "the signal to be handled")
        time.sleep(0.3)  # let the server stop accepting before the request completes
        assert kvab.proc.poll() is None, "exited with a request in flight"
        conn.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert b'"backends"' in answer
    assert kvab.proc.wait(15) == 0


def run_config(kvab_bin, tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return subprocess.run([kvab_bin, "serve", "--config", str(path)], capture_output=True, text=True,
                          timeout=30)


def test_unknown_key_is_an_error_with_line_and_column(kvab_bin, tmp_path):
    result = run_config(kvab_bin, tmp_path, 'listen = "127.0.0.1:0"\n[kubernetes]\npod_selecter = "x"\n')
    assert result.returncode == 2
    assert "bad.toml: line 3, column 1: unknown field `pod_selecter`" in result.stderr, result.stderr


def test_invalid_value_names_its_key(kvab_bin, tmp_path):
    result = run_config(kvab_bin, tmp_path,
                        '[[static.endpoints]]\nbackend = "p2p"\naddress = "10.0.0.1:80"\n')
    assert result.returncode == 2
    assert "line 2, column 11: `static.endpoints.backend`: \"p2p\" is not one of the configured arms" \
        in result.stderr, result.stderr


def test_a_selector_the_api_server_would_refuse_is_an_error_at_start(kvab_bin, tmp_path):
    result = run_config(kvab_bin, tmp_path, '[kubernetes]\npod_selector = "role in (proxy, decode"\n')
    assert result.returncode == 2
    assert "line 2, column 16: `kubernetes.pod_selector` is not a label selector: unbalanced '('" \
        in result.stderr, result.stderr
    check = subprocess.run([kvab_bin, "check", "--proxy-selector", "role=pro xy"], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 3 and "'--proxy-selector <SEL>': \"role=pro xy\": value \"pro xy\"" in check.stderr, \
        check.stderr


def test_check_config_and_usage(kvab_bin, tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('source = "kubernetes"\n[kubernetes]\nnamespaces = ["llm-d-vllm"]\n')
    ok = subprocess.run([kvab_bin, "serve", "--config", str(path), "--check-config"],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "source kubernetes (namespaces llm-d-vllm" in ok.stdout
    usage = subprocess.run([kvab_bin, "frobnicate"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "Usage:" in usage.stderr
