"""Runs the real `kvab serve` binary with a given TOML configuration."""

import json
import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from . import prom
from .net import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def kvab_binary() -> str:
    """`KVAB_BIN`, else target/debug/kvab (built by `make` before tests and demos run)."""
    return os.environ.get("KVAB_BIN") or str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "kvab")


def static_config(port: int, endpoints: list, arms=("nvlink", "fs"), extra: str = "") -> str:
    """A static-source configuration: `endpoints` are (arm, address, pod) triples."""
    lines = [f'listen = "127.0.0.1:{port}"', 'source = "static"', f"arms = {json.dumps(list(arms))}", extra]
    for arm, address, pod in endpoints:
        lines += ["[[static.endpoints]]", f'backend = "{arm}"', f'address = "{address}"', f'pod = "{pod}"']
    return "\n".join(lines) + "\n"


class Sidecar:
    """One `kvab serve` process with its own configuration file and log."""

    def __init__(self, config: str, port: int = 0, workdir=None, env=None):
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvab-serve-"))
        self.config_path = self.workdir / f"kvab-{self.port}.toml"
        self.config_path.write_text(config.replace("{port}", str(self.port)))
        self.log_path = self.workdir / f"kvab-{self.port}.log"
        self.env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), **(env or {})}
        self.env.pop("KVAB_CONFIG", None)
        self.process = None

    def start(self, wait: bool = True, timeout: float = 15.0) -> "Sidecar":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [kvab_binary(), "serve", "--config", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        if wait:
            wait_until(self._alive, timeout, what="kvab serve /healthz")
        return self

    def _alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"kvab serve exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        return self.get("/healthz")[0] == 200

    def get(self, path: str, headers=None):
        """(status, body bytes) of a GET."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> dict:
        status, body = self.get("/metrics")
        assert status == 200, body
        return prom.parse(body.decode())

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if getattr(self, "_log", None):
            self._log.close()
        return self.process.returncode if self.process else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
