#!/usr/bin/env python3
"""The report path of `kvab serve` (release build) at scale: many filter VMs reporting once a second to one
sidecar with a state file, as a fleet of gateways does.

    cargo build --profile sidecar -p kvab
    python3 serve/bench/reports.py [--reporters 1000] [--endpoints 200] [--duration 60] [--kvab target/sidecar/kvab]

Each reporter first sends a total for every endpoint (so the ledger holds reporters x endpoints entries), then
once a second the entries of `--changed` random endpoints, cumulative, as the filter does. Latency is from
writing a request to reading its answer, over `--connections` keep-alive connections. Also printed: the
sidecar's peak resident memory, the state directory's size at the end, whether the counts shown equal
the counts sent, and the time a restart on that state takes to be ready (snapshot read, journals replayed). Prints a Markdown section for BENCHMARKS.md. Standard library only; nothing here asserts
on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, Kvab, free_port, get, proc_status  # noqa: E402


def config(endpoints: int, state_file: Path) -> str:
    rows = "".join(
        f'[[static.endpoints]]\nbackend = "{"nvlink" if i % 2 else "fs"}"\naddress = "10.1.{i // 250}.{i % 250}:8080"\n'
        f'pod = "llm-d-vllm/proxy-{i}"\n'
        for i in range(endpoints)
    )
    return (f'listen = "127.0.0.1:{{port}}"\nsource = "static"\n[probe]\ninterval_seconds = 0\n'
            f'[reports]\nstate_file = "{state_file}"\n{rows}')


class Reporter:
    def __init__(self, name: str, endpoints: int, started_at_ms: int, rng: random.Random):
        self.name, self.endpoints, self.started_at_ms, self.rng = name, endpoints, started_at_ms, rng
        self.sequence = 0
        self.totals = [0] * endpoints

    def next_body(self, changed: int) -> bytes:
        self.sequence += 1
        if self.sequence == 1:
            touched = range(self.endpoints)
        else:
            touched = self.rng.sample(range(self.endpoints), changed)
        for i in touched:
            self.totals[i] += self.rng.randint(1, 5)
        arm = lambda i: "nvlink" if i % 2 else "fs"  # noqa: E731
        return json.dumps({
            "reporter": self.name, "sequence": self.sequence, "started_at_ms": self.started_at_ms,
            "totals": [{"requested": "none", "served": arm(i), "endpoint": f"10.1.{i // 250}.{i % 250}:8080",
                        "code_class": "2xx", "count": self.totals[i]} for i in touched],
        }, separators=(",", ":")).encode()


async def post_on(reader, writer, body: bytes) -> int:
    writer.write(b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def run_load(port: int, args) -> dict:
    rng = random.Random(20261202)
    started_at_ms = int(time.time() * 1000) + 1
    reporters = [Reporter(f"vm-{i:05d}", args.endpoints, started_at_ms, random.Random(i)) for i in range(args.reporters)]
    # The first reports are large (every endpoint): written before the clock starts, so that building them
    # does not hold up the client's reading of answers.
    first = [reporter.next_body(args.changed) for reporter in reporters]
    queue: asyncio.Queue = asyncio.Queue()
    latencies, statuses, late = {"first": [], "later": []}, {}, [0]
    start = time.monotonic()

    async def schedule():
        # Reporter i sends at start + i/reporters + k seconds.
        for second in range(args.duration):
            for i, reporter in enumerate(reporters):
                due = start + second + i / len(reporters)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.5:
                    late[0] += 1
                body = first[i] if second == 0 else reporter.next_body(args.changed)
                await queue.put(("first" if second == 0 else "later", body))
        for _ in range(args.connections):
            await queue.put(None)

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (item := await queue.get()) is not None:
            kind, body = item
            sent = time.perf_counter()
            status = await post_on(reader, writer, body)
            latencies[kind].append(time.perf_counter() - sent)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(schedule(), *(worker() for _ in range(args.connections)))
    return {
        "reports": sum(map(len, latencies.values())), "elapsed": time.monotonic() - start, "statuses": statuses, "late": late[0],
        "latencies": latencies, "sent_total": sum(sum(r.totals) for r in reporters),
    }


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvab", default=str(REPO / "target" / "sidecar" / "kvab"))
    parser.add_argument("--reporters", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--changed", type=int, default=20, help="endpoints changed per report after the first")
    parser.add_argument("--duration", type=int, default=60, help="seconds of reports")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kvab-bench-reports-"))
    state_dir = workdir / "state"
    state_dir.mkdir()
    kvab = Kvab(args.kvab, config(args.endpoints, state_dir / "reports.json"), workdir)
    try:
        kvab.wait_ready()
        result = asyncio.run(run_load(kvab.port, args))
        peak_kib = proc_status(kvab.proc.pid, "VmHWM")
        _, _, metrics = get(kvab.port, "/metrics")
        shown = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                    if line.startswith("kvab_routed_requests_total{"))
        state_bytes = sum(p.stat().st_size for p in state_dir.iterdir())
        files = sorted(p.name for p in state_dir.iterdir())
    finally:
        kvab.stop()
    # Restart on the state left: the time until /readyz answers 200 is the snapshot read and the journals
    # replayed (the static map is ready at once), and the counts must come back whole.
    started = time.monotonic()
    kvab = Kvab(args.kvab, config(args.endpoints, state_dir / "reports.json"), workdir)
    try:
        kvab.wait_ready()
        restart_s = time.monotonic() - started
        _, _, metrics = get(kvab.port, "/metrics")
        restored = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.decode().splitlines()
                       if line.startswith("kvab_routed_requests_total{"))
    finally:
        kvab.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"### Report path ({datetime.date.today()}, commit {commit}, {platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"`python3 serve/bench/reports.py --reporters {args.reporters} --endpoints {args.endpoints} "
          f"--changed {args.changed} --duration {args.duration} --connections {args.connections}` (release build)\n")
    print("| reports | count | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for kind, label in (("first", f"first of each reporter ({args.endpoints} entries)"),
                        ("later", f"then once a second ({args.changed} entries)")):
        lat = [x * 1000 for x in result["latencies"][kind]]
        print(f"| {label} | {len(lat)} | {statistics.median(lat):.2f} | {percentile(lat, 99):.2f} | {max(lat):.1f} |")
    print(f"\n{result['reports']} reports in {result['elapsed']:.1f} s ({result['reports'] / result['elapsed']:.0f}/s), "
          f"statuses {result['statuses']}, {result['late']} sent late; peak RSS {peak_kib / 1024:.0f} MiB; state "
          f"{len(files)} files, {state_bytes / 2**20:.1f} MiB; counts shown = counts sent: {shown == result['sent_total']}; "
          f"restart on that state ready in {restart_s:.2f} s, counts restored: {restored == shown}.")

if __name__ == "__main__":
    main()
