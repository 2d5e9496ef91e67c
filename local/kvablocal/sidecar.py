"""Runs the real `kvab serve` binary with a given TOML configuration."""

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from . import prom
from .net import Response, free_port, request, wait_until

REPO = Path(__file__).resolve().parents[2]


def kvab_binary() -> str:
    """`KVAB_BIN`, else target/debug/kvab (built by `make` before tests and demos run)."""
    return os.environ.get("KVAB_BIN") or str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "kvab")


def static_config(endpoints: list, arms=("nvlink", "fs"), extra: str = "") -> str:
    """A static-source configuration: `endpoints` are (arm, address, pod) triples; `extra` goes
    before the endpoint tables (top-level keys or whole sections)."""
    lines = ['listen = "127.0.0.1:{port}"', 'source = "static"', f"arms = {json.dumps(list(arms))}", extra]
    for arm, address, pod in endpoints:
        lines += ["[[static.endpoints]]", f'backend = "{arm}"', f'address = "{address}"', f'pod = "{pod}"']
    return "\n".join(lines) + "\n"


def kubernetes_config(namespaces=("llm-d-vllm",), endpoint_port="http", extra: str = "") -> str:
    """A Kubernetes-source configuration with the runbook's selector and label; `extra` continues
    the `[kubernetes]` section (and may open others)."""
    return (
        'listen = "127.0.0.1:{port}"\nsource = "kubernetes"\narms = ["nvlink", "fs"]\n\n[kubernetes]\n'
        f"namespaces = {json.dumps(list(namespaces))}\n"
        'pod_selector = "role=proxy"\nbackend_label = "llm-d.ai/kv-backend"\n'
        f"endpoint_port = {json.dumps(endpoint_port)}\n{extra}"
    )


class Sidecar:
    """One `kvab serve` process with its own configuration file and log. `{port}` in the
    configuration text (as the configurations above write it) is replaced by the port it listens on."""

    def __init__(self, config: str, port: int = 0, workdir=None, env=None, binary=None):
        self.port = port or free_port()
        self.binary = binary or kvab_binary()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvab-serve-"))
        self.config_path = self.workdir / f"kvab-{self.port}.toml"
        self.config_path.write_text(config.replace("{port}", str(self.port)))
        self.log_path = self.workdir / f"kvab-{self.port}.log"
        self.env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), **(env or {})}
        self.env.pop("KVAB_CONFIG", None)
        self.proc = None

    def start(self, wait: bool = True, timeout: float = 15.0) -> "Sidecar":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--config", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        return self.wait_alive(timeout) if wait else self

    def wait_alive(self, timeout: float = 15.0) -> "Sidecar":
        def alive():
            if self.proc.poll() is not None:
                raise AssertionError(f"kvab serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.get("/healthz").status == 200

        wait_until(alive, timeout, "kvab serve /healthz")
        return self

    def request(self, method: str, path: str, headers=None, body: bytes = b"") -> Response:
        return request(self.port, method, path, headers or {}, body, timeout=5)

    def get(self, path: str, headers=None) -> Response:
        return self.request("GET", path, headers)

    def endpoints(self) -> dict:
        resp = self.get("/v1/endpoints")
        assert resp.status == 200, resp
        return resp.json()

    def metrics(self) -> str:
        """The `/metrics` text."""
        resp = self.get("/metrics")
        assert resp.status == 200, resp
        return resp.body.decode()

    def samples(self) -> dict:
        """`/metrics` parsed (see `prom.parse`)."""
        return prom.parse(self.metrics())

    def metric(self, name_and_labels: str):
        """Value of one sample as written, e.g. 'kvab_unlabeled_proxies{reason="missing_label"}', or None."""
        for line in self.metrics().splitlines():
            if line.startswith(name_and_labels + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signals the process and waits; a process that does not exit in time is killed and the
        call fails."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise AssertionError(f"kvab serve did not exit within {timeout}s of {sig!r}:\n{self.log()[-3000:]}")
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else 0
