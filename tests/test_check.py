"""`kvab check` end to end on the full local stack (real Envoy + filter, real kvab serve, two
OpenAI-compatible arms): the healthy stack passes, each of the runbook's failure signals makes it
fail with the matching diagnosis, and a stack whose counters see no traffic is inconclusive."""

import json
import subprocess

import pytest
import yaml

from fakekube import FakeKube, make_pod
from kvablocal.net import request
from kvablocal.sidecar import REPO, kubernetes_config, kvab_binary
from kvablocal.stack import EPP_CONFIG_FILE, Stack

NS = "llm-d-vllm"


def run_check(s, *extra):
    """Runs `kvab check --json`; returns (exit code, {check name: check}, report)."""
    done = s.check("--json", *extra)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode, report
    return done.returncode, {c["name"]: c for c in report["checks"]}, report


def failed(checks):
    return {name for name, c in checks.items() if c["result"] == "fail"}


def test_the_healthy_stack_passes_and_the_latency_row_is_only_an_observation(stack):
    s = stack(nvlink_delay=0.005, fs_delay=0.060)
    code, checks, report = run_check(s)
    assert code == 0, json.dumps(report, indent=1)
    assert report["verdict"] == "pass"
    assert checks["epp/health"]["result"] == "skip", "no EPP locally"
    observational = {"epp/health", "ab/latency"}
    assert all(c["result"] == "pass" for n, c in checks.items() if n not in observational), checks
    # The per-proxy counters add up to the burst, spread over both proxies.
    assert "local/vllm-fs-proxy" in checks["step4/not-pinned"]["measured"]
    assert "of 20 (sidecar counters, answers below 500)" in checks["step4/not-pinned"]["measured"]
    assert report["ab"]["burst_status"] == {"200": 20}
    # The scheduler chose the arms of the burst: the row shows their latencies and names no faster arm.
    latency = checks["ab/latency"]
    assert latency["result"] == "skip" and "faster" not in latency["measured"], latency
    assert "kvab experiment" in latency["diagnosis"]
    assert report["ab"]["observational"] is True and "mann_whitney" not in report["ab"]
    assert report["ab"]["arms"]["fs"]["latency_ms"]["p50"] > report["ab"]["arms"]["nvlink"]["latency_ms"]["p50"]

    # The human table: one row per check and the verdict line.
    table = s.check()
    assert table.returncode == 0
    assert "step3/header-fs" in table.stdout
    assert table.stdout.rstrip().endswith("verdict: PASS (13 pass, 0 fail, 0 inconclusive, 2 skip; exit 0)"), table.stdout


def test_a_proxy_whose_metrics_answer_404_fails_with_signal_2(stack):
    s = stack(metrics_status={"fs": 404})
    code, checks, _ = run_check(s)
    assert code == 1
    metrics = checks["prerequisites/proxy-metrics"]
    assert metrics["result"] == "fail"
    assert "local/vllm-fs-proxy (fs) 404" in metrics["measured"]
    assert "failure signal 2" in metrics["diagnosis"]
    assert failed(checks) == {"prerequisites/proxy-metrics"}


def test_requests_dropped_by_flow_control_fail_step4_with_the_reason(stack):
    s = stack(drop={"fs": (429, "rejected-saturated")})
    code, checks, report = run_check(s)
    assert code == 1, json.dumps(report, indent=1)
    status = checks["step4/status"]
    assert status["result"] == "fail"
    dropped = report["ab"]["burst_status"].get("429", 0)
    assert dropped > 0 and f"dropped by flow control: rejected-saturated×{dropped}" in status["measured"], status
    assert "flow control dropped requests (x-llm-d-request-dropped-reason)" in status["diagnosis"], status
    assert "rejected-saturated: 429, the saturation detector" in status["diagnosis"]
    assert "failure signal 1" not in status["diagnosis"]


def test_both_epp_config_generations_pass_step2_and_the_old_one_is_noted(stack, tmp_path):
    """The runbook's configuration (GAIE's apiVersion, by-label-selector) and the shipped one
    (manifests/epp-config.yaml: llm-d-router's apiVersion, label-selector-filter) both pass Step 2."""
    s = stack()
    shipped = yaml.safe_load((REPO / "manifests" / "epp-config.yaml").read_text())
    current = tmp_path / "epp-config.yaml"
    current.write_text(shipped["data"]["epp-config.yaml"])
    args = s.check_args()
    notes = {}
    for generation, path in (("runbook", EPP_CONFIG_FILE), ("shipped", current)):
        args[args.index("--epp-config-file") + 1] = str(path)
        done = subprocess.run([kvab_binary(), "check", *args, "--json", "--burst-requests", "0",
                               "--header-requests", "0"], capture_output=True, text=True, timeout=60)
        step2 = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["step2/epp-config"]
        assert step2["result"] == "pass", (generation, step2)
        notes[generation] = step2.get("diagnosis")
    assert "by-label-selector on llm-d.ai/kv-backend" not in str(notes["shipped"])
    assert notes["shipped"] is None, notes
    assert "apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated" in notes["runbook"], notes
    assert "by-label-selector is deprecated since llm-d-router v0.9.0" in notes["runbook"], notes


def test_without_the_endpoint_tag_the_counters_still_judge_and_without_them_the_reason_is_named(stack):
    """The shipped configuration does not tag answers with their endpoint (responseEndpointHeader: false):
    with kvab serve's counters the check passes as before; without them Step 4 says why it cannot tell."""
    s = stack(filter_config={"responseEndpointHeader": False})
    code, checks, report = run_check(s)
    assert code == 0, json.dumps(report, indent=1)
    assert "of 20 (sidecar counters, answers below 500)" in checks["step4/not-pinned"]["measured"]
    assert all(c["result"] in ("pass", "skip") for c in checks.values()), checks

    args = s.check_args()
    del args[args.index("--sidecar-url"):args.index("--sidecar-url") + 2]
    done = subprocess.run([kvab_binary(), "check", *args, "--json"], capture_output=True, text=True, timeout=120)
    spread = {c["name"]: c for c in json.loads(done.stdout)["checks"]}["step4/not-pinned"]
    assert spread["result"] == "inconclusive", spread
    assert "answers below 500, none with an endpoint tag" in spread["measured"], spread
    assert "responseEndpointHeader: false" in spread["diagnosis"] and "--sidecar-url" in spread["diagnosis"]


def test_a_header_route_to_the_wrong_arm_fails_with_signal_4(stack):
    s = stack(swap_routes=True)
    code, checks, _ = run_check(s)
    assert code == 1
    for arm in ("nvlink", "fs"):
        header = checks[f"step3/header-{arm}"]
        assert header["result"] == "fail"
        assert "failure signal 4" in header["diagnosis"]
    other = "fs" if arm == "nvlink" else "nvlink"
    assert f"sidecar served {other} 3" in checks["step3/header-fs"]["measured"]
    misroutes = checks["step4/misroutes"]
    assert misroutes["result"] == "fail"
    assert misroutes["measured"].startswith("6 of 6 tagged requests misrouted"), misroutes
    # The direct Step 1 requests bypass the gateway: the proxies themselves are fine.
    assert checks["step1/direct-nvlink"]["result"] == "pass"


def test_an_arm_that_is_down_fails(stack):
    s = stack()
    s.arms["nvlink"].stop()
    code, checks, _ = run_check(s)
    assert code == 1
    assert "unreachable" in checks["prerequisites/proxy-metrics"]["measured"]
    direct = checks["step1/direct-nvlink"]
    assert direct["result"] == "fail" and "down or unreachable" in direct["diagnosis"]
    assert checks["step3/header-nvlink"]["result"] == "fail"
    assert checks["step4/status"]["result"] == "fail"
    assert checks["step1/direct-fs"]["result"] == "pass"


def test_a_proxy_missing_its_label_fails_with_signal_1(stack, tmp_path):
    """kvab serve watching (fake) Kubernetes: the FS proxy pod lacks llm-d.ai/kv-backend."""
    with FakeKube(workdir=tmp_path / "kube") as kube:
        config = kubernetes_config([NS], extra="\n[probe]\ninterval_seconds = 1\n")
        s = Stack(workdir=tmp_path / "stack", sidecar_config=config, sidecar_env=kube.env())
        for name, arm, labels in [
            ("vllm-p2p-proxy", "nvlink", {"role": "proxy", "llm-d.ai/kv-backend": "nvlink"}),
            ("vllm-fs-proxy", "fs", {"role": "proxy"}),
        ]:
            ports = [{"name": "http", "containerPort": s.arms[arm].port}]
            kube.put_pod(make_pod(name, NS, labels, "127.0.0.1", container_ports=ports))
        try:
            s.start()
            code, checks, _ = run_check(s)
        finally:
            s.stop()
    assert code == 1
    labels = checks["prerequisites/proxy-labels"]
    assert labels["result"] == "fail"
    assert "1 proxy pod(s) without llm-d.ai/kv-backend (kvab_unlabeled_proxies)" in labels["measured"], labels
    assert "no proxy labelled llm-d.ai/kv-backend=fs" in labels["measured"]
    assert "InferencePoolResourceExhausted" in labels["diagnosis"]
    fs = checks["step3/header-fs"]
    assert fs["result"] == "fail" and "status 503×3" in fs["measured"], fs


def test_no_traffic_observed_is_inconclusive_never_a_pass(stack):
    # The filter is not linked to kvab serve: requests flow, but no counter the check trusts moves.
    s = stack(link_sidecar=False)
    # The counters never settle here; a short --settle keeps the test quick.
    code, checks, report = run_check(s, "--settle", "1")
    assert code == 2, json.dumps(report, indent=1)
    assert report["verdict"] == "inconclusive"
    assert not failed(checks), checks
    spread = checks["step4/not-pinned"]
    assert spread["result"] == "inconclusive" and "no traffic observed" in spread["diagnosis"]
    assert checks["step3/header-nvlink"]["result"] == "inconclusive"

    # Nothing sent at all is inconclusive too.
    code, checks, _ = run_check(s, "--settle", "1", "--header-requests", "0", "--burst-requests", "0")
    assert code == 2
    assert checks["step4/status"]["result"] == "inconclusive"
    assert checks["ab/latency"]["result"] == "skip"


def test_streaming_arms_speak_server_sent_events(stack):
    s = stack()
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}).encode()
    r = request(s.gateway.port, "POST", "/v1/chat/completions", [("content-type", "application/json"), ("x-kv-backend", "fs")], body)
    assert r.status == 200 and r.header("content-type") == "text/event-stream"
    events = [line[len("data: "):] for line in r.body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 4
    first = json.loads(events[0])
    assert first["id"].startswith("chatcmpl-___prefill_addr_vllm-prefill-fs___decode_addr_vllm-decode-fs_")
    # The burst in streaming mode measures time to first byte apart from the total.
    code, checks, report = run_check(s, "--stream", "--header-requests", "1")
    assert code == 0, json.dumps(report, indent=1)
    ab = report["ab"]["arms"]["fs"]
    assert ab["ttfb_ms"]["p50"] < ab["latency_ms"]["p50"]


def test_dry_run_sends_nothing_and_usage_errors_exit_3(stack):
    from kvablocal.sidecar import kvab_binary
    import subprocess

    done = subprocess.run([kvab_binary(), "check", "--dry-run", "--gateway-url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "nothing is sent" in done.stdout
    assert "curl -sS -X POST http://127.0.0.1:9/v1/chat/completions" in done.stdout
    assert "20 requests, 5 at a time" in done.stdout
    bad = subprocess.run([kvab_binary(), "check", "--burst-requests", "many"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 3 and "--burst-requests" in bad.stderr
