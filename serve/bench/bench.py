#!/usr/bin/env python3
"""Benchmarks of `kvab serve` (release build): /v1/endpoints throughput and latency with wrk (200 and 304
answers), resident memory at 0, 1k and 10k endpoints, and watch-event-to-served-map latency against fakekube.

    cargo build --profile sidecar -p kvab
    python3 serve/bench/bench.py [--duration 10] [--connections 4,32] [--kvab target/sidecar/kvab]

Prints a Markdown section for BENCHMARKS.md. Needs wrk (Debian package `wrk`). Standard library only.
Nothing here asserts on timings: the numbers are reported, not judged.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def static_config(endpoints: int) -> str:
    lines = ['listen = "127.0.0.1:{port}"', 'source = "static"', 'arms = ["nvlink", "fs"]',
             "[probe]", "interval_seconds = 0", ""]
    for i in range(endpoints):
        arm = "nvlink" if i % 2 == 0 else "fs"
        lines += ["[[static.endpoints]]", f'backend = "{arm}"',
                  f'address = "10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080"',
                  f'pod = "bench/vllm-{arm}-proxy-{i:05d}"', ""]
    return "\n".join(lines)


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Kvab:
    def __init__(self, binary: str, config: str, workdir: Path, env: dict | None = None):
        self.port = free_port()
        path = workdir / f"kvab-{self.port}.toml"
        path.write_text(config.replace("{port}", str(self.port)))
        self.log = open(workdir / f"kvab-{self.port}.log", "wb")
        self.proc = subprocess.Popen([binary, "serve", "--config", str(path)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn", **(env or {})})

    def wait_ready(self, timeout: float = 60):
        wait_until(lambda: get(self.port, "/readyz")[0] == 200, timeout, "kvab /readyz")
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def wrk(port: int, duration: int, connections: int, headers: dict) -> dict:
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}/v1/endpoints")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    pct = {p: ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": pct["50"], "p90": pct["90"], "p99": pct["99"],
        "bad": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "none",
    }


def bench_static(binary: str, workdir: Path, sizes, duration: int, connection_counts):
    rows, rss_rows = [], []
    for n in sizes:
        kvab = Kvab(binary, static_config(n), workdir)
        kvab.wait_ready()
        status, headers, body = get(kvab.port, "/v1/endpoints")
        assert status == 200, status
        etag = headers["etag"]
        assert get(kvab.port, "/v1/endpoints", {"If-None-Match": etag})[0] == 304
        idle_rss = proc_status(kvab.proc.pid, "VmRSS")
        for connections in connection_counts:
            for label, hdrs in (("200 (full map)", {}), ("304 (If-None-Match)", {"If-None-Match": etag})):
                result = wrk(kvab.port, duration, connections, hdrs)
                rows.append((n, len(body), connections, label, result))
        rss_rows.append((n, len(body), idle_rss, proc_status(kvab.proc.pid, "VmRSS"),
                         proc_status(kvab.proc.pid, "VmHWM")))
        kvab.stop()
    return rows, rss_rows


def bench_watch_latency(binary: str, workdir: Path, pods: int, changes: int):
    """Time from sending a pod change to fakekube to kvab serving a map with a new ETag."""
    from fakekube import FakeKube, make_pod

    with FakeKube(bookmark_interval=5.0, history=max(1000, pods * 2)) as kube:
        for i in range(pods):
            arm = "nvlink" if i % 2 == 0 else "fs"
            kube.put_pod(make_pod(f"proxy-{i:05d}", "bench", {"role": "proxy", "llm-d.ai/kv-backend": arm},
                                  f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"))
        config = "\n".join([
            'listen = "127.0.0.1:{port}"', 'source = "kubernetes"',
            "[kubernetes]", 'namespaces = ["bench"]', "[probe]", "interval_seconds = 0"])
        kvab = Kvab(binary, config, workdir, env=kube.env()).wait_ready()
        samples = []
        conn = http.client.HTTPConnection("127.0.0.1", kvab.port, timeout=10)
        for i in range(changes):
            conn.request("GET", "/v1/endpoints")
            resp = conn.getresponse()
            resp.read()
            etag = resp.getheader("etag")
            ready = i % 2 == 1  # alternate: not ready, ready
            t0 = time.perf_counter()
            kube.patch_pod("bench", "proxy-00000", {"ready": ready})
            while True:
                conn.request("GET", "/v1/endpoints", headers={"If-None-Match": etag})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
            samples.append((time.perf_counter() - t0) * 1000)
        conn.close()
        kvab.stop()
    samples.sort()
    return {"pods": pods, "n": len(samples), "p50": statistics.median(samples),
            "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))], "max": samples[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kvab", default=str(REPO / "target" / "sidecar" / "kvab"))
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", default="4,32", help="comma-separated wrk connection counts")
    parser.add_argument("--changes", type=int, default=50, help="pod changes per watch-latency run")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if not Path(args.kvab).is_file():
        raise SystemExit(f"{args.kvab} missing: cargo build --profile sidecar -p kvab")

    with tempfile.TemporaryDirectory(prefix="kvab-bench-") as tmp:
        workdir = Path(tmp)
        connection_counts = [int(c) for c in args.connections.split(",")]
        rows, rss_rows = bench_static(args.kvab, workdir, (0, 1000, 10000), args.duration, connection_counts)
        watch_rows = [bench_watch_latency(args.kvab, workdir, n, args.changes) for n in (1000, 10000)]

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print("## Sidecar\n")
    print(f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} on {os.cpu_count()} cores "
          f"({cpu}), {platform.system()} {platform.release()}; kvab release build; wrk and kvab share the "
          "machine.\n")
    print(f"Command: `python3 serve/bench/bench.py --duration {args.duration} --connections "
          f"{args.connections} --changes {args.changes}` (static source, probes off; each row is "
          f"`wrk -t2 -c<connections> -d{args.duration}s --latency [-H 'If-None-Match: <etag>'] "
          "http://127.0.0.1:PORT/v1/endpoints`).\n")
    print("### GET /v1/endpoints\n")
    print("| endpoints | body bytes | wrk connections | answer | requests/s | p50 ms | p90 ms | p99 ms "
          "| non-2xx/3xx | socket errors |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for n, size, connections, label, r in rows:
        print(f"| {n} | {size} | {connections} | {label} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} "
              f"| {r['bad']} | {r['socket_errors']} |")
    print("\n### Resident memory (from /proc/PID/status)\n")
    print("| endpoints | body bytes | VmRSS idle MiB | VmRSS after wrk MiB | VmHWM (peak) MiB |")
    print("|---:|---:|---:|---:|---:|")
    for n, size, idle, after, peak in rss_rows:
        print(f"| {n} | {size} | {idle / 1024:.1f} | {after / 1024:.1f} | {peak / 1024:.1f} |")
    print("\n### Watch event to served map (fakekube on loopback)\n")
    print("From sending a pod PATCH to fakekube (ready flipped) to the first `/v1/endpoints` answer with a new "
          "ETag, polled back to back over one keep-alive connection.\n")
    print("| pods in the map | changes | p50 ms | p99 ms | max ms |")
    print("|---:|---:|---:|---:|---:|")
    for w in watch_rows:
        print(f"| {w['pods']} | {w['n']} | {w['p50']:.1f} | {w['p99']:.1f} | {w['max']:.1f} |")


if __name__ == "__main__":
    main()
