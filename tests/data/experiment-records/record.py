"""Records the fixtures of this folder: each a live `kvab experiment` run with `--records` and `--json` through
the local stack the end-to-end tests use (local/kvablocal: the two local arms, kvab serve, Envoy with the filter).

    KVAB_BIN=target/debug/kvab KVAB_ENVOY=.venv/bin/envoy KVAB_WASM=<kvab_filter.wasm> \
        .venv/bin/python tests/data/experiment-records/record.py [NAME ...]

writes NAME.jsonl (the records) and NAME.report.json (the live run's --json report) for each fixture named
(all by default). The timings are measured, so a new recording gives other numbers; the outcomes (verdict,
decisions) are what each fixture is for (README.md)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "local"))

from kvablocal.sidecar import kvab_binary  # noqa: E402
from kvablocal.stack import Stack  # noqa: E402

# name: (the stack's knobs, the experiment's flags, the verdict the run is for)
FIXTURES = {
    # Longer prompts: the FS arm moves the KV cache at a tenth of the bandwidth; the looks stop the run early
    # (the short-prompt class needs a few looks to be equivalent).
    "decided-nvlink-faster": (
        {"nvlink_delay": 0.0, "fs_delay": 0.0},
        ["--prompt-tokens", "128,2048", "--requests", "400", "--warmup", "4", "--concurrency", "8", "--max-tokens",
         "4", "--seed", "9", "--until", "decided", "--looks", "10"],
        "decided"),
    # Two identical arms (same delay, same bandwidth), short prompts: equivalent within 5 %.
    "equivalent": (
        {"nvlink_delay": 0.0, "fs_delay": 0.0, "fs_bandwidth": 200e9},
        ["--prompt-tokens", "128", "--requests", "240", "--warmup", "4", "--concurrency", "4", "--max-tokens", "4",
         "--seed", "11"],
        "decided"),
    # The FS arm's flow control drops every request (429): its error rate, and no FS timings to compare.
    "inconclusive-fs-errors": (
        {"drop": {"fs": (429, "rejected-saturated")}},
        ["--prompt-tokens", "128,2048", "--requests", "80", "--warmup", "0", "--concurrency", "4", "--max-tokens", "4",
         "--seed", "5"],
        "inconclusive"),
    # A gateway whose nvlink route goes to the FS proxy, not streamed (end-to-end time is the primary metric).
    "invalid-misrouted": (
        {"routes": {"nvlink": "fs"}},
        ["--prompt-tokens", "128", "--requests", "60", "--warmup", "0", "--concurrency", "4", "--max-tokens", "4",
         "--seed", "5", "--no-stream"],
        "invalid"),
}


def record(name: str) -> None:
    knobs, flags, expected = FIXTURES[name]
    with tempfile.TemporaryDirectory() as work:
        stack = Stack(workdir=Path(work) / "stack", **knobs).start()
        try:
            records = Path(work) / f"{name}.jsonl"
            done = subprocess.run(
                [kvab_binary(), "experiment", "--gateway-url", stack.urls()["gateway"], "--json", "--quiet",
                 "--records", str(records), *flags],
                capture_output=True, text=True, timeout=300)
        finally:
            stack.stop()
        report = json.loads(done.stdout)
        if report["verdict"] != expected:
            sys.exit(f"{name}: verdict {report['verdict']}, not {expected}: {report['reasons']}")
        # Both files of the fixture, or neither.
        (HERE / f"{name}.jsonl").write_bytes(records.read_bytes())
        (HERE / f"{name}.report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{name}: {report['verdict']}; {'; '.join(report['reasons'])}")


if __name__ == "__main__":
    for name in sys.argv[1:] or FIXTURES:
        record(name)
