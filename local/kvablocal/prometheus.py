"""Runs a real Prometheus (Debian package `prometheus`, /usr/bin/prometheus) on loopback, scraping
the local stack: the gateway Envoy's admin `/stats/prometheus` (the filter's kvab_* stats) and
`kvab serve`'s `/metrics`. Storage is a temporary directory removed at stop.

    prom = Prometheus().start([gateway_target(gateway.admin_port), sidecar_target(sidecar.port)])
    print(prom.url)               # open it in a browser, graph kvab_requests_total
    prom.query('sum by (backend) (kvab_requests_total)')
    prom.stop()

Target labels mimic what a Kubernetes scrape adds (`namespace`, `pod`), so the dashboard and the
alert rules in observability/ work unchanged against the local stack. The sidecar is scraped with
`honor_labels: true`, as it must be in a cluster: its own `pod` label (the proxy pod) wins over the
scrape's.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .net import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "observability" / "prometheus" / "kvab-rules.yaml"
# `make demo-up` port (the UI); tests use a free port.
DEMO_PORT = 19090
# Namespaces of the runbook: the gateway's and the proxies' (where kvab serve runs).
GATEWAY_NAMESPACE = "llm-d-inference-scheduler"
KVAB_NAMESPACE = "llm-d-vllm"
GATEWAY_POD = "infra-inference-scheduling-inference-gateway-istio-local"
SIDECAR_POD = "kvab-local"


def prometheus_binary() -> str:
    return os.environ.get("KVAB_PROMETHEUS") or shutil.which("prometheus") or "/usr/bin/prometheus"


@dataclass
class Target:
    """One scrape job with one target."""

    job: str
    address: str  # host:port
    path: str = "/metrics"
    labels: dict = field(default_factory=dict)
    honor_labels: bool = False


def gateway_target(admin_port: int, pod: str = GATEWAY_POD, namespace: str = GATEWAY_NAMESPACE, job: str = "kvab-gateway") -> Target:
    """The gateway Envoy's admin stats, where the filter's kvab_* metrics are."""
    return Target(job, f"127.0.0.1:{admin_port}", "/stats/prometheus", {"namespace": namespace, "pod": pod})


def sidecar_target(port: int, pod: str = SIDECAR_POD, namespace: str = KVAB_NAMESPACE, job: str = "kvab") -> Target:
    """kvab serve's /metrics. honor_labels keeps its `pod` label (the proxy pod) as exported."""
    return Target(job, f"127.0.0.1:{port}", "/metrics", {"namespace": namespace, "pod": pod}, honor_labels=True)


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """One Prometheus process. `start(targets)` writes its configuration, starts it and waits until
    it is ready; `stop()` ends it and removes its storage. `url` is its base URL."""

    def __init__(self, port: int = 0, scrape_interval: str = "1s", evaluation_interval: str = "1s", rule_files=(), workdir=None, binary=None):
        self.port = port or free_port()
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.binary = binary or prometheus_binary()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvab-prometheus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self.data_dir = None
        self.process = None
        self.targets = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self, targets) -> dict:
        jobs = []
        for t in targets:
            jobs.append(
                {
                    "job_name": t.job,
                    "metrics_path": t.path,
                    "honor_labels": t.honor_labels,
                    "static_configs": [{"targets": [t.address], "labels": dict(t.labels)}],
                }
            )
        return {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
            "rule_files": self.rule_files,
            "scrape_configs": jobs,
        }

    def start(self, targets, timeout: float = 30.0) -> "Prometheus":
        self.targets = list(targets)
        if len({t.job for t in self.targets}) != len(self.targets):
            raise ValueError("one target per job name")
        # JSON is YAML: no YAML library needed.
        self.config_path.write_text(json.dumps(self.config(self.targets), indent=2))
        self.data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=self.workdir))
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def ready():
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200

        try:
            wait_until(ready, timeout, what="prometheus ready", interval=0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- HTTP API ----

    def api(self, path: str, **params):
        """GET /api/v1/<path>; returns `data`, raises PrometheusError on an error answer."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float = None) -> list:
        """Instant query; returns the vector as [(labels dict, float value)]. Scalars come back as
        one sample with no labels."""
        data = self.api("query", query=expr, time=None if time is None else f"{time:.3f}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: expected a vector, got {data['resultType']}")
        return [(sample["metric"], float(sample["value"][1])) for sample in data["result"]]

    def active_targets(self) -> list:
        return self.api("targets", state="active")["activeTargets"]

    def wait_scraped(self, timeout: float = 20.0):
        """Waits until every target has been scraped successfully at least once."""

        def all_up():
            targets = self.active_targets()
            return len(targets) == len(self.targets) and all(t["health"] == "up" for t in targets) and targets

        return wait_until(all_up, timeout, what="every target scraped", interval=0.2)

    def rules(self) -> list:
        return self.api("rules")["groups"]

    def alerts(self) -> list:
        return self.api("alerts")["alerts"]


def main():
    """Runs Prometheus against an already running local stack until interrupted:
    python -m kvablocal.prometheus [--port 19090] [--envoy-admin 18001] [--sidecar 18090]"""
    import argparse

    ap = argparse.ArgumentParser(description="Prometheus scraping the local kvab stack")
    ap.add_argument("--port", type=int, default=int(os.environ.get("KVAB_PROMETHEUS_PORT", DEMO_PORT)))
    ap.add_argument("--envoy-admin", type=int, default=int(os.environ.get("KVAB_ENVOY_ADMIN_PORT", 18001)))
    ap.add_argument("--sidecar", type=int, default=int(os.environ.get("KVAB_SIDECAR_PORT", 18090)))
    args = ap.parse_args()
    prom = Prometheus(port=args.port, rule_files=[RULES]).start([gateway_target(args.envoy_admin), sidecar_target(args.sidecar)])
    print(f"Prometheus on {prom.url} (storage {prom.data_dir}); Ctrl-C stops it")
    try:
        while prom.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        prom.stop()


if __name__ == "__main__":
    main()
