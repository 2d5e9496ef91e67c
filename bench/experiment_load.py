"""How many streamed requests per second `kvab experiment`'s load generator sustains, so that the client
is never what an experiment measures (`make bench-experiment`; BENCHMARKS.md "Experiment load generator").

The target is one Envoy worker answering a canned server-sent-event stream by itself
(bench/sse-upstream.yaml); the release `kvab experiment` runs closed-loop at several concurrencies and its
JSON report gives the achieved rate, every request parsed as a stream (time to first token, gaps, usage).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))

from kvablocal.envoy import envoy_binary, render  # noqa: E402
from kvablocal.net import free_port, request, wait_until  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60000)
    parser.add_argument("--concurrency", default="16,64,128")
    parser.add_argument("--kvab", default=str(REPO / "target" / "sidecar" / "kvab"))
    parser.add_argument("--min-rate", type=float, default=2000.0, help="fail below this rate at the best concurrency")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kvab-bench-experiment-"))
    port, admin = free_port(), free_port()
    config = workdir / "sse.yaml"
    config.write_text(render(REPO / "bench" / "sse-upstream.yaml", PORT=port, ADMIN_PORT=admin))
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "-l", "warning",
         "--base-id", str(os.getpid() % 60000)],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "envoy.log", "w"))
    try:
        wait_until(lambda: request(port, "GET", "/", [("x-kv-backend", "a")]).status == 200, 30, what="the SSE Envoy")
        rows = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            started = time.monotonic()
            done = subprocess.run(
                [args.kvab, "experiment", "--gateway-url", f"http://127.0.0.1:{port}", "--arms", "a,b",
                 "--prompt-tokens", "16", "--max-tokens", "16", "--requests", str(args.requests), "--warmup", "200",
                 "--concurrency", str(concurrency), "--seed", "1", "--json", "--quiet"],
                capture_output=True, text=True, timeout=600)
            report = json.loads(done.stdout)
            ttft = next(c for c in report["comparisons"] if c["metric"] == "ttft_ms")
            rows.append({
                "concurrency": concurrency,
                "requests": report["run"]["sent"],
                "seconds": round(report["run"]["duration_s"], 2),
                "rate": round(report["run"]["achieved_rate"]),
                "errors": sum(c["errors"] for e in report["errors"] for c in e["arms"].values()),
                "ttft_p50_ms": ttft["p50"],
                "wall_s": round(time.monotonic() - started, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
    best = max(rows, key=lambda r: r["rate"])
    print(f"\n{os.cpu_count()} cores; Envoy 1 worker; best: {best['rate']} streamed requests/s at concurrency "
          f"{best['concurrency']} ({best['errors']} errors)")
    if best["rate"] < args.min_rate or any(r["errors"] for r in rows):
        print(f"FAIL: below {args.min_rate} requests/s, or errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
