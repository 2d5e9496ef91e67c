"""The report state across crashes: `kvab serve` killed with SIGKILL while reports stream in restarts on
a consistent ledger every time, and the filters' next reports make the counts exact."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kvablocal.sidecar import Sidecar

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


ENDPOINT_REPORT = {"requested": "fs", "served": "fs", "code_class": "2xx"}


def started(sidecar, tmp_path, name: str = "reports.json"):
    state = tmp_path / "state" / name
    state.parent.mkdir(exist_ok=True)
    return state, sidecar(CONFIG.replace("STATE", str(state)))


def fed(kvab, reports: int = 3) -> int:
    """Reports of one filter VM younger than the sidecar: counted. Returns the count."""
    started_at_ms = int(time.time() * 1000) + 1
    for sequence in range(1, reports + 1):
        status, answer = post(kvab.port, report("vm-a", sequence, started_at_ms))
        assert status == 200, answer
    wait_until(lambda: shown(kvab) == reports, 5, "counts shown")
    return started_at_ms


def test_a_second_kvab_serve_on_the_same_state_file_is_refused_naming_the_holder(sidecar, tmp_path):
    state, first = started(sidecar, tmp_path)
    fed(first)
    second = sidecar(CONFIG.replace("STATE", str(state)), wait=False)
    assert second.proc.wait(15) != 0
    log = second.log()
    assert f"PID {first.proc.pid}" in log and "reports.json.lock" in log, log[-2000:]
    # The first one goes on counting.
    status, _ = post(first.port, report("vm-a", 4, int(time.time() * 1000) + 1))
    assert status == 200


def damaged_sidecar_serves_maps_and_refuses_reports(kvab, what: str):
    assert kvab.endpoints()  # the maps are served (answered 200)
    status, answer = post(kvab.port, report("vm-a", 9, int(time.time() * 1000) + 1))
    assert status == 503 and "state_damaged" in json.dumps(answer), (status, answer)
    assert kvab.metric("kvab_state_damaged") == 1
    assert kvab.get("/healthz").status == 200
    log = kvab.log()
    assert "--repair-state" in log and what in log, log[-2000:]


def restart_with_repair(kvab, tmp_path):
    kvab.stop()
    wrapper = tmp_path / "kvab-repair"
    wrapper.write_text(f'#!/bin/sh\nexec {kvab.binary} "$@" --repair-state\n')
    wrapper.chmod(0o755)
    kvab.binary = str(wrapper)
    kvab.start()


def test_a_deleted_snapshot_is_refused_while_the_maps_are_served_and_repair_counts_again(sidecar, tmp_path):
    state, kvab = started(sidecar, tmp_path)
    started_at_ms = fed(kvab)
    kvab.stop()
    state.unlink()  # the snapshot deleted, the journal kept
    kvab.start()
    assert shown(kvab) == 0
    damaged_sidecar_serves_maps_and_refuses_reports(kvab, str(state))
    restart_with_repair(kvab, tmp_path)
    assert (state.parent / "reports.json.log.0.damaged.1").exists()
    assert kvab.metric("kvab_state_damaged") == 0
    # Counting starts again: the VM's next report (older than the repaired sidecar) is a baseline,
    # what follows counts.
    status, answer = post(kvab.port, report("vm-a", 4, started_at_ms))
    assert status == 200 and answer["result"] == "baselined", answer
    status, answer = post(kvab.port, report("vm-a", 6, started_at_ms))
    assert status == 200 and answer["result"] == "applied", answer
    assert shown(kvab) == 2


def test_a_flipped_byte_that_keeps_the_json_valid_is_refused(sidecar, tmp_path):
    state, kvab = started(sidecar, tmp_path)
    fed(kvab)
    kvab.stop()
    journal = state.parent / "reports.json.log.0"
    text = journal.read_text()
    flipped = text.replace('"sequence":3', '"sequence":5', 1)
    assert flipped != text
    journal.write_text(flipped)
    kvab.start()
    damaged_sidecar_serves_maps_and_refuses_reports(kvab, str(journal))


def fill_past_compaction(kvab, journal: Path, started_at_ms: int) -> int:
    """Reports of 200 entries from vm-a (long journal lines), each answered 200, until `journal` is past
    the 4 MiB at which a compaction is due (store.rs COMPACT_AFTER_BYTES); returns the last sequence."""
    sequence = 0
    while journal.stat().st_size < (4 << 20) + (256 << 10):
        sequence += 1
        body = json.dumps({
            "reporter": "vm-a", "sequence": sequence, "started_at_ms": started_at_ms,
            "totals": [{**ENDPOINT_REPORT, "endpoint": f"10.9.{i // 250}.{i % 250}:8080", "count": sequence}
                       for i in range(200)],
        }).encode()
        status, answer = post(kvab.port, body)
        assert status == 200, answer
    return sequence


def test_a_journal_that_cannot_be_compacted_is_counted(sidecar, tmp_path):
    """As in a read-only directory (root ignores permissions, so the next journal's name is taken by a
    directory): compaction fails, is counted on kvab_state_write_errors_total and
    kvab_state_errors_total{op="compact"}, and reports go on being saved in the journal."""
    state = tmp_path / "state" / "reports.json"
    state.parent.mkdir()
    kvab = sidecar(CONFIG.replace("STATE", str(state)))
    (state.parent / "reports.json.log.1").mkdir()
    fill_past_compaction(kvab, state.parent / "reports.json.log.0", int(time.time() * 1000) + 1)
    wait_until(lambda: (kvab.metric('kvab_state_errors_total{op="compact"}') or 0) >= 1, 5, "compaction failure counted")
    assert kvab.metric("kvab_state_write_errors_total") >= 1
    assert "compaction put off" in kvab.log()


# manifests/sidecar.yaml: runAsUser and runAsGroup.
POD_UID = 65532


@pytest.fixture
def as_pod_user(kvab_bin):
    """A folder the pod's user can read, with a copy of kvab and a wrapper that runs it as that user
    (setpriv, util-linux): the tests run as root, and root ignores a directory's permissions."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run kvab as the pod's user")
    folder = Path(tempfile.mkdtemp(prefix="kvab-pod-user-"))
    folder.chmod(0o755)
    binary = folder / "kvab"
    shutil.copy(kvab_bin, binary)
    wrapper = folder / "kvab-as-pod-user"
    wrapper.write_text(f'#!/bin/sh\nexec setpriv --reuid {POD_UID} --regid {POD_UID} --clear-groups "{binary}" "$@"\n')
    wrapper.chmod(0o755)
    yield folder, str(wrapper)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_read_only_state_directory_is_counted_and_reports_keep_being_saved(as_pod_user):
    """kvab as the pod's user; its state directory turns read-only after it started: compactions fail,
    are counted and put off, and reports are still saved in the open journal (the issue: one ERROR per
    batch, kvab_state_write_errors_total 0, no compaction ever)."""
    folder, wrapper = as_pod_user
    state_dir = folder / "state"
    state_dir.mkdir()
    os.chown(state_dir, POD_UID, POD_UID)
    state = state_dir / "reports.json"
    kvab = Sidecar(CONFIG.replace("STATE", str(state)), workdir=folder, binary=wrapper).start()
    try:
        state_dir.chmod(0o500)
        started_at_ms = int(time.time() * 1000) + 1
        sequence = fill_past_compaction(kvab, state_dir / "reports.json.log.0", started_at_ms)
        wait_until(lambda: (kvab.metric('kvab_state_errors_total{op="compact"}') or 0) >= 1, 10,
                   "the failed compaction counted")
        assert kvab.metric("kvab_state_write_errors_total") >= 1
        # Put off, not retried on every batch: a few more reports add no error line each.
        errors = kvab.log().count("compaction put off")
        for extra in range(1, 6):
            status, _ = post(kvab.port, report("vm-b", extra, started_at_ms))
            assert status == 200
        assert kvab.log().count("compaction put off") == errors
        assert shown(kvab) == 200 * sequence + 5
    finally:
        state_dir.chmod(0o700)
        kvab.stop()


def test_a_state_directory_the_pod_user_cannot_write_keeps_the_maps_served(as_pod_user):
    """A volume whose root is owned by root without fsGroup (the issue: 'Permission denied' and no
    kvab serve at all): the maps are served, reports answer 503 state_unavailable, the gauge says why."""
    folder, wrapper = as_pod_user
    state_dir = folder / "root-owned"
    state_dir.mkdir(mode=0o755)
    kvab = Sidecar(CONFIG.replace("STATE", str(state_dir / "reports.json")), workdir=folder, binary=wrapper).start()
    try:
        assert kvab.get("/v1/endpoints").status == 200
        status, answer = post(kvab.port, report("vm-a", 1, int(time.time() * 1000) + 1))
        assert status == 503 and answer["error"]["code"] == "state_unavailable", answer
        assert kvab.metric("kvab_state_unavailable") == 1
        assert "Permission denied" in kvab.log()
    finally:
        kvab.stop()
