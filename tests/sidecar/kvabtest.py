"""Helpers for the `kvab serve` end-to-end tests: a handle on the running binary, bounded polling, promtool."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Polls `predicate` until it returns a truthy value or `timeout` seconds pass; returns the value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except (OSError, http.client.HTTPException) as e:  # server not up yet, or restarting
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


class Sidecar:
    """One `kvab serve` process with its own config file and log."""

    def __init__(self, binary: str, workdir: Path, config: str, env: dict | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.config_path = workdir / f"kvab-{self.port}.toml"
        self.config_path.write_text(config.replace("{port}", str(self.port)))
        self.log_path = workdir / f"kvab-{self.port}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "RUST_LOG": "info", **(env or {})}
        full_env.pop("KVAB_CONFIG", None)
        self.proc = subprocess.Popen([binary, "serve", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_alive(self, timeout: float = 15.0) -> "Sidecar":
        def alive():
            if self.proc.poll() is not None:
                raise AssertionError(f"kvab exited with {self.proc.returncode}:\n{self.log()}")
            return self.get("/healthz").status == 200
        wait_until(alive, timeout, "kvab /healthz")
        return self

    def request(self, method: str, path: str, headers: dict | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None) -> Response:
        return self.request("GET", path, headers)

    def endpoints(self) -> dict:
        resp = self.get("/v1/endpoints")
        assert resp.status == 200, resp
        return resp.json()

    def metrics(self) -> str:
        resp = self.get("/metrics")
        assert resp.status == 200, resp
        return resp.body.decode()

    def metric(self, name_and_labels: str) -> float | None:
        """Value of one sample, e.g. 'kvab_unlabeled_proxies{reason="missing_label"}', or None if absent."""
        for line in self.metrics().splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise AssertionError(f"kvab did not exit within {timeout}s of {sig!r}:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def promtool_check(promtool: str, text: str) -> None:
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                            timeout=30)
    assert result.returncode == 0, (
        f"promtool check metrics failed ({result.returncode}):\n{result.stdout.decode()}"
        f"{result.stderr.decode()}\n--- input ---\n{text}")
