"""Test-side handle for fakekube: start the fake API server as a subprocess, drive its
/_fake/ control API, stop it.

    from fakekube.client import FakeKube, make_pod      # with tests/ on sys.path
    with FakeKube() as kube:
        kube.put_pod(make_pod("p1", "default", {"role": "proxy"}, "10.0.0.1"))
        env = {**os.environ, **kube.env()}                # KUBECONFIG for the process under test

Standard library only.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER = HERE / "fakekube.py"

_spec = importlib.util.spec_from_file_location("_fakekube_server", SERVER)
_server = importlib.util.module_from_spec(_spec)
assert _spec.loader is not None
_spec.loader.exec_module(_server)

DEFAULT_TOKEN = "fakekube-token"

__all__ = ["FakeKube", "FakeKubeError", "make_pod", "free_port", "write_kubeconfig", "DEFAULT_TOKEN"]


class FakeKubeError(RuntimeError):
    pass


def make_pod(name: str, ns: str = "default", labels: dict | None = None, ip: str | None = None,
             phase: str = "Running", ready: bool = True, terminating: bool = False,
             container_ports=None, annotations: dict | None = None, node: str = "fake-node-1") -> dict:
    """A realistic v1 Pod: status.podIP/podIPs, status.phase, Ready/ContainersReady
    conditions, containerStatuses, spec.containers[0].ports with names.

    container_ports: list of dicts ({"name", "containerPort", ...}), (name, port) tuples or
    bare ints; default [{"name": "http", "containerPort": 8000}].
    terminating=True sets metadata.deletionTimestamp (like a pod in its grace period)."""
    return _server.build_pod(name, ns, labels=labels, ip=ip, phase=phase, ready=ready,
                             terminating=terminating, container_ports=container_ports,
                             annotations=annotations, node=node)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for starting a client before the fake)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_kubeconfig(path, port: int, token: str = DEFAULT_TOKEN, namespace: str = "default") -> str:
    """Write the same kubeconfig the server writes with --kubeconfig-out (usable before it runs)."""
    path = str(path)
    Path(path).write_text(_server.kubeconfig_text(port, token, namespace))
    return path


class FakeKube:
    """A fakekube subprocess. All control methods talk to the control port, which stays
    reachable while the API port is down (see down()/up())."""

    def __init__(self, port: int = 0, *, history: int = 1000, bookmark_interval: float = 1.0,
                 token: str = DEFAULT_TOKEN, require_token: bool = False, start_rv: int = 1,
                 too_large_wait: float = 3.0, namespace: str = "default", workdir=None,
                 kubeconfig=None, extra_args=(), start: bool = True, startup_timeout: float = 10.0):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fakekube-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.requested_port = int(port)
        self.kubeconfig = str(kubeconfig or self.workdir / "kubeconfig")
        self.log_path = self.workdir / "fakekube.log"
        self.token = token
        self._args = [
            "--history", str(history), "--bookmark-interval", str(bookmark_interval),
            "--token", token, "--start-rv", str(start_rv), "--too-large-wait", str(too_large_wait),
            "--namespace", namespace, *map(str, extra_args),
        ]
        if require_token:
            self._args.append("--require-token")
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.control_port: int | None = None
        self._startup_timeout = startup_timeout
        if start:
            self.start()

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def env(self) -> dict:
        """Environment additions for a process under test (kube-rs Config::infer, kubectl)."""
        return {"KUBECONFIG": self.kubeconfig}

    def start(self, timeout: float | None = None) -> "FakeKube":
        if self.proc is not None and self.proc.poll() is None:
            return self
        timeout = self._startup_timeout if timeout is None else timeout
        port_file = self.workdir / "port"
        ctl_file = self.workdir / "control-port"
        for f in (port_file, ctl_file):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, str(SERVER), "--port", str(self.requested_port),
               "--port-file", str(port_file), "--control-port-file", str(ctl_file),
               "--kubeconfig-out", self.kubeconfig, *self._args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FakeKubeError(f"fakekube exited with {self.proc.returncode}: {self.log_tail()}")
            if port_file.exists() and ctl_file.exists():
                try:
                    self.port = int(port_file.read_text().strip())
                    self.control_port = int(ctl_file.read_text().strip())
                except ValueError:
                    time.sleep(0.02)
                    continue
                if _can_connect(self.port) and _can_connect(self.control_port):
                    # a fixed port stays the same across restarts of this handle
                    self.requested_port = self.port
                    return self
            time.sleep(0.02)
        self.stop()
        raise FakeKubeError(f"fakekube did not start within {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, SIGKILL as a last resort. Returns the exit code."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
            rc = proc.returncode
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None
        return rc

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---------------------------------------------------------- raw HTTP
    def _call(self, method: str, path: str, body=None, port: int | None = None, timeout: float = 10.0):
        port = port or self.control_port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                out = json.loads(raw) if raw.strip() else None
            except ValueError:
                out = raw.decode(errors="replace")
            return resp.status, out
        finally:
            conn.close()

    def _ctl(self, method: str, path: str, body=None, ok=(200, 201)):
        status, out = self._call(method, path, body)
        if status not in ok:
            raise FakeKubeError(f"{method} {path} -> {status}: {out}")
        return out

    def api_get(self, path: str, params: dict | None = None, headers: dict | None = None,
                timeout: float = 10.0) -> tuple[int, object]:
        """GET an API path on the API port; returns (status, parsed JSON or text)."""
        if params:
            path = path + "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    # ------------------------------------------------------------- pods
    def put_pod(self, pod: dict | str, ns: str | None = None, **compact) -> dict:
        """Create or replace a pod. Either a full Pod dict (e.g. from make_pod), or
        put_pod(name, ns, labels=..., ip=..., phase=..., ready=..., terminating=..., ports=...)
        using the compact form. Returns the stored Pod (with its new resourceVersion)."""
        if isinstance(pod, dict):
            md = pod.get("metadata", {})
            name, ns = md["name"], ns or md.get("namespace", "default")
            body = pod
        else:
            name, ns, body = pod, ns or "default", compact
        return self._ctl("PUT", f"/_fake/pods/{_q(ns)}/{_q(name)}", body)

    def patch_pod(self, ns: str, name: str, patch: dict) -> dict:
        """JSON merge patch; also shorthand keys labels, annotations, phase, ip, ready,
        terminating, deletionTimestamp (see README)."""
        return self._ctl("PATCH", f"/_fake/pods/{_q(ns)}/{_q(name)}", patch)

    def delete_pod(self, ns: str, name: str) -> dict:
        return self._ctl("DELETE", f"/_fake/pods/{_q(ns)}/{_q(name)}")

    def get_pod(self, ns: str, name: str) -> dict | None:
        status, out = self._call("GET", f"/_fake/pods/{_q(ns)}/{_q(name)}")
        return out if status == 200 else None

    def pods(self) -> list[dict]:
        return self._ctl("GET", "/_fake/pods")["items"]

    # ------------------------------------------------------- other kinds
    def put_object(self, obj: dict, ns: str | None = None) -> dict:
        """Create or replace a ConfigMap, Service, apps/v1 Deployment, HTTPRoute or InferencePool
        (resource from its apiVersion and kind; namespace from metadata unless `ns`). Returns
        the stored object."""
        resource = _server.resource_for(obj.get("apiVersion", ""), obj.get("kind", ""))
        if resource is None:
            raise FakeKubeError(f"fakekube does not serve {obj.get('apiVersion')} {obj.get('kind')}")
        md = obj.get("metadata", {})
        ns = ns or md.get("namespace", "default")
        return self._ctl("PUT", f"/_fake/objects/{resource}/{_q(ns)}/{_q(md['name'])}", obj)

    def get_object(self, resource: str, ns: str, name: str) -> dict | None:
        status, out = self._call("GET", f"/_fake/objects/{resource}/{_q(ns)}/{_q(name)}")
        return out if status == 200 else None

    def delete_object(self, resource: str, ns: str, name: str) -> dict:
        return self._ctl("DELETE", f"/_fake/objects/{resource}/{_q(ns)}/{_q(name)}")

    def objects(self) -> list[dict]:
        return self._ctl("GET", "/_fake/objects")["items"]

    # ---------------------------------------------------------- pod logs
    def append_log(self, ns: str, pod: str, lines, container: str | None = None, ago: float | None = None,
                   time: str | float | None = None) -> int:
        """Append lines to a pod container's log (container optional for a one-container pod).
        Lines are strings or {"text", "time"?, "ago"?}; stamped now unless `time` (RFC 3339 or
        epoch seconds) or `ago` (seconds before now). Returns the container's line count."""
        body: dict = {"lines": [lines] if isinstance(lines, str) else list(lines)}
        for k, v in (("container", container), ("ago", ago), ("time", time)):
            if v is not None:
                body[k] = v
        return self._ctl("POST", f"/_fake/logs/{_q(ns)}/{_q(pod)}", body)["lines"]

    def clear_logs(self, ns: str, pod: str) -> None:
        """Forget every container's log of the pod."""
        self._ctl("DELETE", f"/_fake/logs/{_q(ns)}/{_q(pod)}")

    def pod_logs(self, ns: str, pod: str) -> dict:
        return self._ctl("GET", f"/_fake/logs/{_q(ns)}/{_q(pod)}")["containers"]

    # ------------------------------------------------------ port-forward
    def set_port_forward(self, ns: str, pod: str, ports: dict) -> dict:
        """Where a port-forward to the pod's ports goes: {pod port: local port or "host:port"}."""
        return self._ctl("PUT", f"/_fake/portforward/{_q(ns)}/{_q(pod)}",
                         {"ports": {str(k): v for k, v in ports.items()}})

    def port_forward_sessions(self) -> list[dict]:
        """Every port-forward connection so far: namespace, pod, ports, protocol, started, ended,
        bytesIn, bytesOut, errors."""
        return self._ctl("GET", "/_fake/portforward")["sessions"]

    # ---------------------------------------------------------- control
    def state(self) -> dict:
        return self._ctl("GET", "/_fake/state")

    def resource_version(self) -> int:
        return int(self.state()["resourceVersion"])

    def compact(self) -> dict:
        return self._ctl("POST", "/_fake/compact")

    def expire_watches(self) -> int:
        return self._ctl("POST", "/_fake/expire-watches")["expired"]

    def drop_watches(self) -> int:
        return self._ctl("POST", "/_fake/drop-watches")["dropped"]

    def fail(self, status: int = 500, count: int = 1, paths: str | None = None,
             message: str | None = None, retry_after: int | None = None) -> list:
        body: dict = {"status": status, "count": count}
        if paths is not None:
            body["paths"] = paths
        if message is not None:
            body["message"] = message
        if retry_after is not None:
            body["retryAfter"] = retry_after
        return self._ctl("POST", "/_fake/fail", body)["failures"]

    def clear_failures(self) -> None:
        self._ctl("DELETE", "/_fake/fail")

    def down(self) -> None:
        self._ctl("POST", "/_fake/down")

    def up(self) -> None:
        self._ctl("POST", "/_fake/up")

    def configure(self, *, bookmark_interval: float | None = None, history: int | None = None,
                  too_large_wait: float | None = None) -> dict:
        body = {k: v for k, v in (("bookmark_interval", bookmark_interval), ("history", history),
                                  ("too_large_wait", too_large_wait)) if v is not None}
        return self._ctl("POST", "/_fake/config", body)

    def requests(self, path_contains: str | None = None, watch: bool | None = None) -> list[dict]:
        """Recent API requests: [{"method", "path" (path+query), "status", "watch", "time",
        "userAgent", "auth", "user" (the bearer token), and what RBAC authorizes: "verb", "apiGroup", "resource" (with
        "/subresource"), "namespace", "name" (or "nonResourceURL")}], oldest first, optionally filtered."""
        reqs = self._ctl("GET", "/_fake/requests")["requests"]
        if path_contains is not None:
            reqs = [r for r in reqs if path_contains in r["path"]]
        if watch is not None:
            reqs = [r for r in reqs if r["watch"] == watch]
        return reqs

    def reset_log(self) -> None:
        self._ctl("POST", "/_fake/reset-log")

    def watches(self) -> int:
        return self._ctl("GET", "/_fake/watches")["count"]

    # ---------------------------------------------------------- waiting
    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise FakeKubeError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def wait_for_watches(self, n: int = 1, timeout: float = 10.0, exact: bool = False) -> int:
        """Wait until at least n (or, with exact=True, exactly n) watches are open."""
        def check():
            c = self.watches()
            return (c == n if exact else c >= n), c
        deadline = time.monotonic() + timeout
        while True:
            ok, c = check()
            if ok:
                return c
            if time.monotonic() >= deadline:
                raise FakeKubeError(f"timed out after {timeout}s waiting for {n} open watches (have {c})")
            time.sleep(0.05)

    def wait_for_request(self, path_contains: str, *, watch: bool | None = None, count: int = 1,
                         timeout: float = 10.0) -> list[dict]:
        return self.wait_for(
            lambda: (lambda r: r if len(r) >= count else None)(self.requests(path_contains, watch)),
            timeout, what=f"{count} request(s) containing {path_contains!r}")


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
