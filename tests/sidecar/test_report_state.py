"""The report state across crashes: `kvab serve` killed with SIGKILL while reports stream in restarts on
a consistent ledger every time, and the filters' next reports make the counts exact."""

from __future__ import annotations

import http.client
import json
import random
import signal
import threading
import time

from kvabtest import wait_until

CONFIG = """
listen = "127.0.0.1:{port}"
source = "static"
arms = ["nvlink", "fs"]

[[static.endpoints]]
backend = "fs"
address = "10.0.0.7:8080"
pod = "llm-d-vllm/fs-proxy"

[probe]
interval_seconds = 0

[reports]
state_file = "STATE"
"""

REPORTERS = 4
TRIALS = 50


def report(reporter: str, sequence: int, started_at_ms: int) -> bytes:
    # Cumulative: every report adds one request.
    return json.dumps({
        "reporter": reporter, "sequence": sequence, "started_at_ms": started_at_ms,
        "totals": [{"requested": "fs", "served": "fs", "endpoint": "10.0.0.7:8080", "code_class": "2xx",
                    "count": sequence}],
    }).encode()


def post(port: int, body: bytes, timeout: float = 5) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/reports", body, {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def shown(sidecar) -> float:
    return sum(v for (name, labels), v in sidecar.samples().items() if name == "kvab_routed_requests_total")


def test_sigkill_during_a_stream_of_saves_always_restarts_on_a_consistent_ledger(sidecar, tmp_path):
    state = tmp_path / "state" / "reports.json"
    state.parent.mkdir()
    kvab = sidecar(CONFIG.replace("STATE", str(state)))
    started_at_ms = int(time.time() * 1000) + 1  # younger than the sidecar: counted, not a baseline
    sent = [0] * REPORTERS  # highest sequence sent (maybe applied) per reporter
    acked = [0] * REPORTERS  # highest sequence answered 200 per reporter
    rng = random.Random(20261202)

    def stream(i: int, stop: threading.Event):
        while not stop.is_set():
            sequence = sent[i] + 1
            sent[i] = sequence
            try:
                status, answer = post(kvab.port, report(f"vm-{i}", sequence, started_at_ms), timeout=2)
            except OSError:
                return
            if status != 200:
                return
            assert answer["result"] == "applied", answer
            acked[i] = sequence

    for trial in range(TRIALS):
        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(i, stop)) for i in range(REPORTERS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.25))
        kvab.proc.send_signal(signal.SIGKILL)
        kvab.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
        kvab.start()
        count = shown(kvab)
        # Nothing acknowledged is lost, nothing unsent is made up.
        assert sum(acked) <= count <= sum(sent), (trial, acked, count, sent, kvab.log()[-2000:])
        # Each reporter's next report brings the difference: the counts are exact again.
        for i in range(REPORTERS):
            sent[i] += 1
            status, answer = post(kvab.port, report(f"vm-{i}", sent[i], started_at_ms))
            assert status == 200 and answer["result"] == "applied", (trial, status, answer)
            acked[i] = sent[i]
        wait_until(lambda: shown(kvab) == sum(sent), 5, f"exact counts after trial {trial}")
    assert "refusing to start" not in kvab.log()
    # Every trial wrote (several hundred reports in all), and the state stayed small.
    assert sum(sent) > TRIALS * REPORTERS * 2
    assert sum(p.stat().st_size for p in state.parent.iterdir()) < 8 << 20
