"""Requests to a decision of `kvab experiment --until decided` through the gateway on the local stack, against
the fixed-horizon test of the same claim (docs/experiment.md, "Requests to a decision, and what to plan").

The local arms (kvablocal.arm) answer one class of 128-token prompts; fs waits `--fs-delay` more than nvlink
before the first token (about ×1.10 at the median: twice the 5 % margin). A pilot run of `--pilot` requests
gives the standard error of the log ratio and from it `n_fixed` by the docs' formula for the effect to find
(`--ratio`, not the pilot's estimate: the distance to the margin is too small to be taken from a pilot); then,
for each seed,
one run of `--until budget` at `n_fixed` (is nvlink found faster?) and one run of `--until decided` for each
of `--designs` (BOUNDARY:LOOKS:FACTOR, planned at FACTOR × `n_fixed`): the requests it had analysed when it
stopped, and its decision.

    .venv/bin/python bench/requests_to_decision.py --seeds 60
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))

from kvablocal.sidecar import kvab_binary  # noqa: E402
from kvablocal.stack import Stack  # noqa: E402

MARGIN = 0.05


def experiment(stack: Stack, *args: str) -> dict:
    done = subprocess.run(
        [kvab_binary(), "experiment", "--gateway-url", stack.urls()["gateway"], "--json", "--quiet",
         "--prompt-tokens", "128", "--max-tokens", "2", "--concurrency", "8", "--warmup", "8", *args],
        capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout)


def primary(report: dict) -> dict:
    return next(c for c in report["comparisons"] if c["primary"])


def nvlink_faster(report: dict) -> bool:
    c = primary(report)
    return c["decision"] == "faster" and c["faster"] == "nvlink"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--pilot", type=int, default=1000)
    parser.add_argument("--fs-delay", type=float, default=0.0253, help="nvlink's is 0.020 s; jitter ±0.020 s")
    parser.add_argument("--ratio", type=float, default=1.10, help="the effect to find, for n_fixed")
    parser.add_argument("--designs", default="obrien-fleming:10:1.05,pocock:2:1.3",
                        help="--until decided designs, BOUNDARY:LOOKS:FACTOR (planned at FACTOR × n_fixed), comma-separated")
    args = parser.parse_args()
    designs = [(b, int(k), float(f)) for b, k, f in (d.split(":") for d in args.designs.split(","))]
    stack = Stack(workdir=Path(tempfile.mkdtemp(prefix="kvab-decision-")), nvlink_delay=0.020,
                  fs_delay=args.fs_delay, jitter=0.020).start()
    try:
        started = time.time()
        pilot = primary(experiment(stack, "--requests", str(args.pilot), "--seed", "100"))
        lo, hi = pilot["ratio_ci"]
        se = (math.log(hi) - math.log(lo)) / (2 * NormalDist().inv_cdf(1 - pilot["ci_level_alpha"] / 2))
        n_fixed = args.pilot * ((1.96 + 0.84) * se / (math.log(args.ratio) - math.log(1 + MARGIN))) ** 2
        n_fixed = int(math.ceil(n_fixed / 20) * 20)
        print(f"pilot of {args.pilot}: ratio {pilot['ratio']:.4f} [{lo:.4f}, {hi:.4f}], standard error {se:.4f}: "
              f"n_fixed {n_fixed}", flush=True)
        fixed = 0
        stops: dict[int, list[int]] = {i: [] for i in range(len(designs))}
        found = dict.fromkeys(range(len(designs)), 0)
        for seed in range(1, args.seeds + 1):
            fixed += nvlink_faster(experiment(stack, "--requests", str(n_fixed), "--seed", str(seed)))
            # The same seed for every design: the same assignment order (common random numbers).
            for i, (boundary, looks, factor) in enumerate(designs):
                planned = int(math.ceil(factor * n_fixed / 2) * 2)
                report = experiment(stack, "--requests", str(planned), "--until", "decided", "--looks", str(looks),
                                    "--boundary", boundary, "--seed", str(1000 + seed))
                stops[i].append(sum(c["requests"] for c in report["classes"]))
                found[i] += nvlink_faster(report)
        print(f"--until budget at n_fixed {n_fixed}: nvlink faster in {fixed} of {args.seeds}")
        for i, (boundary, looks, factor) in enumerate(designs):
            planned = int(math.ceil(factor * n_fixed / 2) * 2)
            median, mean = statistics.median(stops[i]), statistics.mean(stops[i])
            print(f"--until decided --boundary {boundary} --looks {looks} at {planned} ({factor} n_fixed): nvlink "
                  f"faster in {found[i]} of {args.seeds}; requests to a decision: median {median:.0f} "
                  f"({median / n_fixed:.3f} n_fixed), mean {mean:.0f} ({mean / n_fixed:.3f} n_fixed)")
        print(f"{time.time() - started:.0f} s")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
