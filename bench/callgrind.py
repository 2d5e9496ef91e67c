"""Instructions per request of each gateway variant, counted by callgrind on a fixed request count.

Instruction counts do not depend on what else runs on the machine, so this is the steady CPU
figure where hardware counters are unavailable (`perf stat -e instructions` reports
"not supported" in this VM). Each gateway Envoy runs under `valgrind --tool=callgrind` (all its
threads counted), gets a warm-up, then for each workload: counters zeroed, N requests sent over
one keep-alive connection, counters dumped; an idle window of the same wall time is dumped too and
subtracted (timers, stats flushes). Slow: Envoy needs 1-4 minutes to start under valgrind.

Workload `stream` (with `plain` beside it) runs on gateways of its own, in front of
bench/sse_upstream.py: a streamed answer of `--events` server-sent events, each reaching the gateway
as its own body chunk, against the same upstream's answer in one piece; the difference per event is
what every body chunk costs a variant.
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
from kvablocal.net import free_port
from sse_upstream import SseUpstream, StreamClient

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":200,"stream":true}'

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
    """`count` requests of a header workload; the answers are whole bodies."""
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


def streams(port: int, upstream: SseUpstream, count: int) -> dict:
    """`count` streamed answers in lock step with the upstream, over one keep-alive connection."""
    client = StreamClient(port, upstream, CHAT, {"x-kv-backend": "nvlink"})
    try:
        chunks = [client.stream() for _ in range(count)]
    finally:
        client.close()
    return {"chunks_min": min(chunks), "chunks_max": max(chunks)}


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


def measure(key: str, gateway, outdir: Path, warmup, workloads: dict, results: dict):
    """`warmup(port)`, then for each workload {name: (count, run)}: counters zeroed, `run(port, count)`
    (which may return figures to keep), counters dumped, an idle window of the same length dumped."""
    pid = gateway.process.pid
    seen = set(outdir.glob(f"cg.{pid}*"))
    warmup(gateway.port)
    row = {}
    for workload, (count, run) in workloads.items():
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        t0 = time.monotonic()
        extra = run(gateway.port, count) or {}
        wall = time.monotonic() - t0
        busy = dump_total(pid, outdir, seen)
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        time.sleep(wall)
        idle = dump_total(pid, outdir, seen)
        row[workload] = {"ir": busy, "idle_ir": idle, "wall_s": wall, "per_request": (busy - idle) / count, **extra}
    results[key] = row


def measure_stack(keys, workdir: Path, wrapper, warmup, workloads: dict, upstream=None) -> tuple:
    """Every variant's gateway under callgrind, measured at once (one thread each); callgrind's
    dumps go to `workdir` (see `wrapper`), each stack's files to a folder of its own."""
    results = {}
    stack_dir = workdir / ("stream" if upstream else "headers")
    stack_dir.mkdir()
    with Stack(keys, stack_dir, wrapper, upstream=upstream) as stack:
        t0 = time.monotonic()
        stack.start(timeout=600)
        print(f"# all {len(keys)} gateways up under callgrind after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        stack.check()
        threads = [threading.Thread(target=measure, args=(k, g, workdir, warmup, workloads, results))
                   for k, g in stack.gateways.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    missing = [k for k in keys if k not in results]
    if missing:
        raise SystemExit(f"no result for {missing}; logs in {workdir}")
    return results, {k: v.label for k, v in stack.variants.items()}


def table(keys, labels: dict, results: dict, workloads) -> str:
    lines = ["| variant | " + " | ".join(f"{w}: Ir/request | {w}: − (a)" for w in workloads) + " |",
             "|---|" + "---|---|" * len(workloads)]
    for key in keys:
        cells = []
        for w in workloads:
            mine, base = results[key][w]["per_request"], results[keys[0]][w]["per_request"]
            cells += [f"{mine:,.0f}", f"{mine - base:+,.0f}"]
        lines.append(f"| ({key}) {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stream_table(keys, labels: dict, results: dict, events: int) -> str:
    """Per event: (stream − plain) / events, each variant's and its difference from (a)'s."""
    lines = ["| variant | stream: Ir/request | stream: − (a) | plain: Ir/request | plain: − (a) "
             "| (stream − plain) / event | per event − (a) | chunks per answer |",
             "|---|---|---|---|---|---|---|---|"]
    base = results[keys[0]]

    def per_event(r):
        return (r["stream"]["per_request"] - r["plain"]["per_request"]) / events
    for key in keys:
        r = results[key]
        chunks = f"{r['stream']['chunks_min']}" + (f"–{r['stream']['chunks_max']}"
                                                   if r["stream"]["chunks_max"] != r["stream"]["chunks_min"] else "")
        lines.append(f"| ({key}) {labels[key]} | {r['stream']['per_request']:,.0f} "
                     f"| {r['stream']['per_request'] - base['stream']['per_request']:+,.0f} "
                     f"| {r['plain']['per_request']:,.0f} | {r['plain']['per_request'] - base['plain']['per_request']:+,.0f} "
                     f"| {per_event(r):,.0f} | {per_event(r) - per_event(base):+,.0f} | {chunks} |")
    return "\n".join(lines)


def idle_rate(results: dict) -> float:
    return statistics.median(w["idle_ir"] / w["wall_s"] for r in results.values() for w in r.values())


def callgrind_main(args):
    keys = list(args.variants)
    workdir = Path(tempfile.mkdtemp(prefix="kvab-callgrind-"))
    wrapper = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
               f"--callgrind-out-file={workdir}/cg.%p"]
    chosen = args.workloads.split(",")
    unknown = set(chosen) - set(WORKLOADS) - {"stream"}
    if unknown:
        raise SystemExit(f"--workloads: unknown {sorted(unknown)} (nvlink, mix, stream)")
    header = [w for w in WORKLOADS if w in chosen]
    if header:
        results, labels = measure_stack(
            keys, workdir, wrapper, lambda port: send(port, "mix", args.requests // 2),
            {w: (args.requests, lambda port, count, w=w: send(port, w, count)) for w in header})
        print(f"callgrind, {args.requests} requests per workload over one keep-alive connection, after "
              f"{args.requests // 2} warm-up requests; instructions (Ir) of the whole gateway process per request, "
              "idle window subtracted\n")
        print(table(keys, labels, results, header))
        print(f"\nidle windows: median {idle_rate(results):,.0f} Ir/s of wall time (subtracted)")
    if "stream" in chosen:
        upstream = SseUpstream(free_port(), args.events)
        results, labels = measure_stack(
            keys, workdir, wrapper, lambda port: streams(port, upstream, args.stream_requests // 2),
            {"stream": (args.stream_requests, lambda port, count: streams(port, upstream, count)),
             "plain": (args.requests, lambda port, count: send(port, "nvlink", count))},
            upstream=upstream)
        print(f"\ncallgrind, streamed answers of {args.events} server-sent events (bench/sse_upstream.py, in lock "
              f"step: one body chunk per event): {args.stream_requests} streams after {args.stream_requests // 2} "
              f"warm-up streams, and {args.requests} answers in one piece from the same upstream (plain), each "
              "over one keep-alive connection, x-kv-backend: nvlink; Ir of the whole gateway process per request, "
              "idle window subtracted\n")
        print(stream_table(keys, labels, results, args.events))
        print(f"\nidle windows: median {idle_rate(results):,.0f} Ir/s of wall time (subtracted)")
