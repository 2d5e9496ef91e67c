"""Instructions per request of each gateway variant, counted by callgrind on a fixed request count.

Instruction counts do not depend on what else runs on the machine, so this is the steady CPU
figure where hardware counters are unavailable (`perf stat -e instructions` reports
"not supported" in this VM). Each gateway Envoy runs under `valgrind --tool=callgrind` (all its
threads counted), gets a warm-up, then for each workload: counters zeroed, N requests sent over
one keep-alive connection, counters dumped; an idle window of the same wall time is dumped too and
subtracted (timers, stats flushes). Slow: Envoy needs 1-4 minutes to start under valgrind.
"""

import http.client
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from filterbench import BODY, Stack, real_envoy  # noqa: F401  (real_envoy: same binary everywhere)

WORKLOADS = {
    "nvlink": [[("x-kv-backend", "nvlink")]],
    "mix": [
        [("x-kv-backend", "nvlink")], [("x-kv-backend", "nvlink")], [("x-kv-backend", "nvlink")],
        [("x-kv-backend", "fs")], [("x-kv-backend", "fs")], [("x-kv-backend", "NVLink")],
        [("x-kv-backend", "p2p")], [("x-kv-backend", " filesystem")],
        [("x-session-id", "session-1")], [("x-session-id", "session-2")],
    ],
}


def send(port: int, workload: str, count: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    sets = WORKLOADS[workload]
    try:
        for i in range(count):
            conn.request("POST", "/v1/completions", BODY,
                         {"content-type": "application/json", **dict(sets[i % len(sets)])})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
    finally:
        conn.close()


def dump_total(pid: int, outdir: Path, before: set) -> int:
    """Asks callgrind to dump, waits for the new file, returns its instruction total."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = [p for p in outdir.glob(f"cg.{pid}*") if p not in before]
        for p in new:
            for line in p.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):
                    before.add(p)
                    return int(line.split()[1])
        time.sleep(0.5)
    raise TimeoutError("no callgrind dump")


def measure(key: str, gateway, outdir: Path, count: int, warmup: int, results: dict):
    pid = gateway.process.pid
    seen = set(outdir.glob(f"cg.{pid}*"))
    send(gateway.port, "mix", warmup)
    row = {}
    for workload in WORKLOADS:
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        t0 = time.monotonic()
        send(gateway.port, workload, count)
        wall = time.monotonic() - t0
        busy = dump_total(pid, outdir, seen)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        time.sleep(wall)
        idle = dump_total(pid, outdir, seen)
        row[workload] = {"ir": busy, "idle_ir": idle, "wall_s": wall, "per_request": (busy - idle) / count}
    results[key] = row


def callgrind_main(args):
    keys = list(args.variants)
    workdir = Path(tempfile.mkdtemp(prefix="kvab-callgrind-"))
    wrapper = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
               f"--callgrind-out-file={workdir}/cg.%p"]
    results = {}
    with Stack(keys, workdir, wrapper) as stack:
        t0 = time.monotonic()
        stack.start(timeout=600)
        print(f"# all {len(keys)} gateways up under callgrind after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        stack.check()
        threads = [threading.Thread(target=measure, args=(k, g, workdir, args.requests, args.requests // 2, results))
                   for k, g in stack.gateways.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    missing = [k for k in keys if k not in results]
    if missing:
        raise SystemExit(f"no result for {missing}; logs in {workdir}")
    print(f"callgrind, {args.requests} requests per workload over one keep-alive connection, after "
          f"{args.requests // 2} warm-up requests; instructions (Ir) of the whole gateway process per request, "
          "idle window subtracted\n")
    print("| variant | " + " | ".join(f"{w}: Ir/request | {w}: − (a)" for w in WORKLOADS) + " |")
    print("|---|" + "---|---|" * len(WORKLOADS))
    labels = {k: v.label for k, v in stack.variants.items()}
    for key in keys:
        cells = []
        for w in WORKLOADS:
            mine, base = results[key][w]["per_request"], results[keys[0]][w]["per_request"]
            cells += [f"{mine:,.0f}", f"{mine - base:+,.0f}"]
        print(f"| ({key}) {labels[key]} | " + " | ".join(cells) + " |")
    idle = statistics.median(r[w]["idle_ir"] / r[w]["wall_s"] for r in results.values() for w in WORKLOADS)
    print(f"\nidle windows: median {idle:,.0f} Ir/s of wall time (subtracted)")
    return results
