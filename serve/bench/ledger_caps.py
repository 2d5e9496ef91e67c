#!/usr/bin/env python3
"""The report ledger of `kvab serve` (release build) at its caps: memory, state size and restart, worst case.

    cargo build --profile sidecar -p kvab
    python3 serve/bench/ledger_caps.py [--max-reporters 4096] [--max-entries 200000] [--kvab target/sidecar/kvab]

Worst case for memory: no two entries share a key (every reporter has endpoints of its own), so nothing is
shared across reporters. Phase 1 fills the ledger to `--max-reporters - 1` reporters holding about
`--max-entries` entries together. Phase 2 is the issue's flood: reports of about 1 MiB (9,000 new entries
each) from new reporters, sent 8 at a time; each must be answered 507 `ledger_full`. Phase 3: 100 of the
reporters already held report again (known entries, higher counts) and must be answered 200. Then the sidecar
is stopped and started again on its state: time to /readyz and its peak resident memory (the replay). Prints a
Markdown section for BENCHMARKS.md. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, Kvab, get, proc_status  # noqa: E402
from reports import post_on  # noqa: E402

STARTED_AT_MS = 4_000_000_000_000


def config(state_file: Path, max_reporters: int, max_entries: int) -> str:
    return (f'listen = "127.0.0.1:{{port}}"\nsource = "static"\n[probe]\ninterval_seconds = 0\n'
            f'[reports]\nstate_file = "{state_file}"\nmax_reporters = {max_reporters}\nmax_entries = {max_entries}\n')


def endpoint(n: int) -> str:
    """A distinct ip:port for every n."""
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:{8000 + (n >> 24)}"


def body(reporter: str, sequence: int, first: int, count: int, value: int) -> bytes:
    return json.dumps({
        "reporter": reporter, "sequence": sequence, "started_at_ms": STARTED_AT_MS,
        "totals": [{"requested": "fs", "served": "fs", "endpoint": endpoint(n), "code_class": "2xx", "count": value}
                   for n in range(first, first + count)],
    }, separators=(",", ":")).encode()


async def send_all(port: int, bodies, connections: int) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    statuses: dict = {}

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not queue.empty():
            status = await post_on(reader, writer, queue.get_nowait())
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def scrape(port: int) -> dict:
    _, _, text = get(port, "/metrics")
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvab", default=str(REPO / "target" / "sidecar" / "kvab"))
    parser.add_argument("--max-reporters", type=int, default=4096)
    parser.add_argument("--max-entries", type=int, default=200_000)
    parser.add_argument("--flood", type=int, default=70, help="1 MiB reports from new reporters at the cap")
    parser.add_argument("--flood-connections", type=int, default=8)
    parser.add_argument("--fill-reporters", type=int, default=0,
                        help="reporters that fill the ledger (default: --max-reporters - 1)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kvab-bench-caps-"))
    state_dir = workdir / "state"
    state_dir.mkdir()
    text = config(state_dir / "reports.json", args.max_reporters, args.max_entries)
    reporters = args.fill_reporters or args.max_reporters - 1
    per = args.max_entries // reporters
    kvab = Kvab(args.kvab, text, workdir)
    try:
        kvab.wait_ready()
        t = time.monotonic()
        fill = asyncio.run(send_all(kvab.port, (body(f"vm-{i:05d}", 1, i * per, per, 1) for i in range(reporters)),
                                min(16, reporters)))
        fill_s = time.monotonic() - t
        fill_peak_kib = proc_status(kvab.proc.pid, "VmHWM")
        flood_first = reporters * per
        flood = asyncio.run(send_all(
            kvab.port, (body(f"flood-{i:03d}", 1, flood_first + i * 9000, 9000, 1) for i in range(args.flood)), args.flood_connections))
        known = asyncio.run(send_all(kvab.port, (body(f"vm-{i:05d}", 2, i * per, per, 2) for i in range(min(100, reporters))), 8))
        metrics = scrape(kvab.port)
        peak_kib = proc_status(kvab.proc.pid, "VmHWM")
        rss_kib = proc_status(kvab.proc.pid, "VmRSS")
    finally:
        kvab.stop()
    state_bytes = sum(p.stat().st_size for p in state_dir.iterdir())
    files = sorted(p.name for p in state_dir.iterdir())
    t = time.monotonic()
    again = Kvab(args.kvab, text, workdir)
    try:
        again.wait_ready(300)
        restart_s = time.monotonic() - t
        restart_peak_kib = proc_status(again.proc.pid, "VmHWM")
        restart_rss_kib = proc_status(again.proc.pid, "VmRSS")
        after = scrape(again.port)
    finally:
        again.stop()
    full = metrics.get('kvab_reports_received_total{result="full"}', 0)
    shown = lambda m: sum(v for k, v in m.items() if k.startswith("kvab_routed_requests_total{"))  # noqa: E731
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"### Report ledger at its caps ({datetime.date.today()}, commit {commit}, {platform.machine()}, {os.cpu_count()} cores)\n")
    print(f"`python3 serve/bench/ledger_caps.py --max-reporters {args.max_reporters} --max-entries {args.max_entries} "
          f"--flood {args.flood} --flood-connections {args.flood_connections} --fill-reporters {reporters}` (release build)\n")
    print(f"- fill: {reporters} reporters x {per} entries, no key shared ({reporters * per} entries), {fill_s:.1f} s, statuses {fill}")
    size = len(body("flood-000", 1, flood_first, 9000, 1))
    print(f"  peak RSS after the fill {fill_peak_kib / 1024:.0f} MiB")
    print(f"- flood: {args.flood} reports of 9,000 new entries ({size / 2**20:.2f} MiB each) from new reporters: statuses {flood}")
    print(f"- 100 known reporters again: statuses {known}")
    print(f"- gauges: kvab_reporters {metrics['kvab_reporters']:.0f} / {metrics['kvab_reporters_limit']:.0f}, "
          f"kvab_ledger_entries {metrics['kvab_ledger_entries']:.0f} / {metrics['kvab_ledger_entries_limit']:.0f}, "
          f"result=full {full:.0f}")
    print(f"- peak RSS {peak_kib / 1024:.0f} MiB (resident at the end {rss_kib / 1024:.0f} MiB); state {len(files)} files "
          f"({', '.join(files)}), {state_bytes / 2**20:.1f} MiB")
    print(f"- restart on that state: /readyz after {restart_s:.2f} s, peak RSS {restart_peak_kib / 1024:.0f} MiB "
          f"(resident {restart_rss_kib / 1024:.0f} MiB); counts shown before = after: {shown(metrics) == shown(after)} "
          f"({shown(after):.0f})")
    print(f"- sidecar RUST_LOG=warn; log: {workdir}")


if __name__ == "__main__":
    main()
