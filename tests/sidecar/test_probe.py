"""Proxy /metrics probes: the runbook's prerequisite 3 and failure signal 2 (a proxy whose /metrics answers 404)."""

from __future__ import annotations

import http.server
import threading

import pytest

from kvabtest import free_port, promtool_check, wait_until


class _Proxy(http.server.BaseHTTPRequestHandler):
    metrics_status = 200

    def do_GET(self):  # noqa: N802 (http.server naming)
        status = self.metrics_status if self.path == "/metrics" else 404
        body = b"vllm:num_requests_running 0\n" if status == 200 else b"not found\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _start_proxy(metrics_status: int) -> http.server.ThreadingHTTPServer:
    handler = type(f"Proxy{metrics_status}", (_Proxy,), {"metrics_status": metrics_status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxies():
    good, broken = _start_proxy(200), _start_proxy(404)
    yield good.server_address[1], broken.server_address[1]
    for server in (good, broken):
        server.shutdown()
        server.server_close()


def test_metrics_404_shows_as_down_with_its_status_code(sidecar, proxies, promtool):
    good_port, broken_port = proxies
    kvab = sidecar(f"""
listen = "127.0.0.1:{{port}}"
[[static.endpoints]]
backend = "nvlink"
address = "127.0.0.1:{good_port}"
pod = "llm-d-vllm/vllm-p2p-proxy"
[[static.endpoints]]
backend = "fs"
address = "127.0.0.1:{broken_port}"
pod = "llm-d-vllm/vllm-fs-proxy"
[probe]
interval_seconds = 0.2
timeout_seconds = 1
""")
    p2p_up = 'kvab_proxy_metrics_up{backend="nvlink",pod="llm-d-vllm/vllm-p2p-proxy"}'
    fs_up = 'kvab_proxy_metrics_up{backend="fs",pod="llm-d-vllm/vllm-fs-proxy"}'
    wait_until(lambda: kvab.metric(p2p_up) is not None and kvab.metric(fs_up) is not None, 10,
               "probe results")
    assert kvab.metric(p2p_up) == 1
    assert kvab.metric(fs_up) == 0
    assert kvab.metric('kvab_proxy_metrics_status_code{backend="fs",pod="llm-d-vllm/vllm-fs-proxy"}') == 404
    assert kvab.metric('kvab_proxy_metrics_status_code{backend="nvlink",pod="llm-d-vllm/vllm-p2p-proxy"}') == 200
    promtool_check(promtool, kvab.metrics())
    log = kvab.log()
    assert f"GET http://127.0.0.1:{broken_port}/metrics -> 404" in log, log
    assert "runbook failure signal 2" in log


def test_unreachable_proxy_is_down_with_code_zero(sidecar):
    dead = free_port()  # nothing listens here
    kvab = sidecar(f"""
listen = "127.0.0.1:{{port}}"
[[static.endpoints]]
backend = "fs"
address = "127.0.0.1:{dead}"
pod = "gone"
[probe]
interval_seconds = 0.2
""")
    wait_until(lambda: kvab.metric('kvab_proxy_metrics_up{backend="fs",pod="gone"}') is not None, 10,
               "probe result")
    assert kvab.metric('kvab_proxy_metrics_up{backend="fs",pod="gone"}') == 0
    assert kvab.metric('kvab_proxy_metrics_status_code{backend="fs",pod="gone"}') == 0
    assert "tcp connect error: Connection refused" in kvab.log()
