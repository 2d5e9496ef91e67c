"""Records the answers of tests/data/analyze-answers/: the setup of tests/test_analyze.py (a real Prometheus
scraping the local stack: Envoy with the filter splitting untagged traffic 50/50, kvab serve, the P/D-model
arms and their vLLM-style histograms), 400 untagged requests, then three `kvab analyze --json --save-answers`
runs with different outcomes. Each writes NAME.json (the answers) and NAME.report.json (the run's report).

    KVAB_BIN=target/debug/kvab KVAB_ENVOY=.venv/bin/envoy KVAB_WASM=<wasm> \
        .venv/bin/python tests/data/analyze-answers/record.py
"""

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path[:0] = [str(REPO / "local"), str(REPO / "tests")]

from kvablocal.net import request, wait_until  # noqa: E402
from kvablocal.prometheus import Prometheus, Target, gateway_target, sidecar_target  # noqa: E402
from kvablocal.sidecar import kvab_binary  # noqa: E402
from kvablocal.stack import Stack  # noqa: E402

SPLIT = {"onMissing": "split", "split": {"weights": {"nvlink": 1, "fs": 1}}}
PROMPT = " ".join(["word"] * 8192)


def untagged(port: int) -> int:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}).encode()
    return request(port, "POST", "/v1/chat/completions", [("content-type", "application/json")], body).status


def record(prometheus, name: str, expected_code: int, *args: str) -> None:
    answers, report = HERE / f"{name}.json", HERE / f"{name}.report.json"
    done = subprocess.run([kvab_binary(), "analyze", "--prometheus", prometheus.url, "--json", "--save-answers",
                           str(answers), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == expected_code, (name, done.returncode, done.stderr, done.stdout)
    report.write_text(done.stdout)
    print(f"{name}: exit {done.returncode}, {json.loads(done.stdout)['verdict']}: kvab analyze {' '.join(args)}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="kvab-record-"))
    stack = Stack(workdir=work / "stack", nvlink_delay=0.0, fs_delay=0.0, filter_config=SPLIT)
    prometheus = Prometheus(scrape_interval="500ms", workdir=work / "prometheus")
    try:
        stack.start()
        arms = [Target(f"vllm-{arm}", f"127.0.0.1:{server.port}", "/metrics", {"kv_backend": arm})
                for arm, server in stack.arms.items()]
        prometheus.start([gateway_target(stack.gateway.admin_port), sidecar_target(stack.sidecar.port), *arms])
        prometheus.wait_scraped()
        time.sleep(1.5)
        started = time.time()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: untagged(stack.gateway.port), range(400)))
        assert statuses.count(200) == 400, statuses
        wait_until(lambda: prometheus.query("sum(kvab_requests_total{source=\"split\"})")[0][1] >= 400, 10,
                   what="Prometheus to scrape the split requests")
        time.sleep(1.0)
        window = ("--start", f"{started - 1.0:.3f}", "--end", f"{time.time():.3f}")
        record(prometheus, "decided", 0, *window, "--split", "nvlink=1,fs=1", "--min-requests", "100")
        record(prometheus, "srm-mismatch", 1, *window, "--split", "nvlink=9,fs=1")
        time.sleep(3)
        record(prometheus, "no-traffic", 2, "--window", "2s", "--split", "nvlink=1,fs=1")
    finally:
        prometheus.stop()
        stack.stop()


if __name__ == "__main__":
    main()
