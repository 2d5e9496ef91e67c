"""`kvab check --cluster` end to end: the real local stack (Envoy + filter, `kvab serve` watching
Kubernetes, two OpenAI-compatible arms) behind fakekube, which stands in for the API server (a real
one cannot run here). fakekube holds what the runbook describes: prefill, decode and proxy pods,
the gateway Service and pods, the HTTPRoute, the EPP ConfigMap, Deployment and pods with logs;
its port-forwards lead to the local processes. kvab check reaches the gateway, `kvab serve` and
each arm's proxy only through its own port-forwards, as it does in a cluster."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from fakekube import FakeKube, make_pod, write_kubeconfig
from kvablocal import prom
from kvablocal.net import wait_until
from kvablocal.sidecar import kubernetes_config, kvab_binary
from kvablocal.stack import EPP_CONFIG_FILE, HTTPROUTE_FILE, Stack

REPO = Path(__file__).resolve().parents[1]
VLLM = "llm-d-vllm"
GW = "llm-d-inference-scheduler"
GATEWAY = "infra-inference-scheduling-inference-gateway"
GATEWAY_SERVICE = f"{GATEWAY}-istio"
GATEWAY_POD = f"{GATEWAY_SERVICE}-6f8d9c7b5-x2kqp"
# The pool's own EPP runs next to it in llm-d-vllm (manifests/epp.yaml).
EPP_NS = VLLM
EPP = "gaie-inference-scheduling-epp"
EPP_POD = f"{EPP}-7c9f6d5b8-4xk2m"
EPP_LABELS = {"inferencepool": "vllm-proxy-performance-epp"}
PROXIES = {"nvlink": "vllm-p2p-proxy-5d7b9c-h2x7v", "fs": "vllm-fs-proxy-68c4f9-k9w2d"}
SIDECAR_POD = "kvab-7b8c9d-qx4lz"
# The token kvab check presents (kvab serve has another), so the request log tells them apart.
CHECK_TOKEN = "kvab-check-token"
HEALTHY_EPP_LINE = '{"level":"info","ts":"%s","logger":"scheduler","msg":"Request handled","targetPod":"vllm-fs-proxy"}'
EXHAUSTED_LINE = ('{"level":"error","ts":"2026-01-01T00:00:00Z","msg":"Failed to schedule request","error":'
                  '"inference gateway: InferencePoolResourceExhausted - failed to find target pod: failed to run '
                  'scheduler profile default"}')
# The same failure as GAIE >= v1.5.0 (and llm-d-router, which embeds it) logs it: the code was renamed
# ResourceExhausted and the error reads "inference error: CODE - message" (GAIE v1.5.0
# pkg/common/error/error.go), with no "failed to run scheduler profile" in it.
EXHAUSTED_LINE_V15 = ('{"level":"error","ts":"2026-01-01T00:00:00Z","msg":"Failed to schedule request","error":'
                      '"inference error: ResourceExhausted - failed to find candidate endpoints"}')


def pod(name, ns, labels, ports, containers=("main",), ready=True, annotations=None):
    p = make_pod(name, ns, labels, "127.0.0.1", container_ports=ports, ready=ready, annotations=annotations)
    first = p["spec"]["containers"][0]
    first["name"] = containers[0]
    p["spec"]["containers"] += [{"name": c, "image": "registry.example/%s:1" % c} for c in containers[1:]]
    # container statuses for the containers above
    p["status"]["containerStatuses"] = [
        {**p["status"]["containerStatuses"][0], "name": c, "containerID": f"containerd://{name}-{c}"} for c in containers]
    return p


def load_cluster(kube, stack):
    """The runbook's objects, each pointing at the local process that stands in for it."""
    for role in ("prefill", "decode"):
        for arm, suffix in (("fs", "fs"), ("nvlink", "p2p")):
            kube.put_pod(pod(f"vllm-{role}-{suffix}-0", VLLM, {"role": role, "llm-d.ai/kv-backend": arm}, [8000]))
    for arm, name in PROXIES.items():
        # kvab serve reaches the proxy at podIP:http (127.0.0.1:<arm port>); Step 1's port-forward
        # goes to the runbook's port 8080, which the fake connects to the same arm.
        port = stack.arms[arm].port
        kube.put_pod(pod(name, VLLM, {"role": "proxy", "llm-d.ai/kv-backend": arm}, [("http", port)]))
        kube.set_port_forward(VLLM, name, {8080: port})
    kube.put_pod(pod(SIDECAR_POD, VLLM, {"app.kubernetes.io/name": "kvab"}, [("http", 18090)]))
    kube.set_port_forward(VLLM, SIDECAR_POD, {18090: stack.sidecar.port})
    kube.put_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kvab", "namespace": VLLM},
                     "spec": {"selector": {"app.kubernetes.io/name": "kvab"},
                              "ports": [{"name": "http", "port": 18090, "targetPort": "http"}]}})
    # Two gateway pods: one not ready (no forward behind it), so picking it would fail Step 3.
    gateway_labels = {"gateway.networking.k8s.io/gateway-name": GATEWAY}
    gateway_ports = [("status-port", 15021), ("http", 80)]
    kube.put_pod(pod(GATEWAY_POD, GW, gateway_labels, gateway_ports, containers=("istio-proxy",)))
    kube.put_pod(pod(f"{GATEWAY_SERVICE}-6f8d9c7b5-zzzzz", GW, gateway_labels, gateway_ports,
                     containers=("istio-proxy",), ready=False))
    kube.set_port_forward(GW, GATEWAY_POD, {80: stack.gateway.port})
    kube.put_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": GATEWAY_SERVICE, "namespace": GW},
                     "spec": {"selector": gateway_labels, "ports": [
                         {"name": "status-port", "port": 15021, "targetPort": 15021},
                         {"name": "default", "port": 80, "targetPort": 80}]}})
    kube.put_object(yaml.safe_load(HTTPROUTE_FILE.read_text()))
    kube.put_object({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "gaie-inference-scheduling-epp-config", "namespace": EPP_NS},
                     "data": {"epp-config.yaml": EPP_CONFIG_FILE.read_text()}})
    kube.put_object({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": EPP, "namespace": EPP_NS},
                     "spec": {"replicas": 1, "selector": {"matchLabels": EPP_LABELS},
                              "template": {"metadata": {"labels": EPP_LABELS},
                                           "spec": {"containers": [{"name": "epp", "image": "epp:1"}]}}}})
    # The EPP pod with Istio's sidecar: the API server refuses a log read naming no container.
    kube.put_pod(pod(EPP_POD, EPP_NS, EPP_LABELS, [("grpc", 9002)], containers=("istio-proxy", "epp"),
                     annotations={"kubectl.kubernetes.io/default-container": "epp"}))
    epp_logs(kube)


def epp_logs(kube):
    """The EPP pod's logs before any check ran."""
    kube.clear_logs(EPP_NS, EPP_POD)
    kube.append_log(EPP_NS, EPP_POD, [HEALTHY_EPP_LINE % "old"], container="epp", ago=3600)
    # Before the check started: the check must not count it.
    kube.append_log(EPP_NS, EPP_POD, [EXHAUSTED_LINE], container="epp", ago=600)
    kube.append_log(EPP_NS, EPP_POD, ["failed to run scheduler profile (an Envoy line, not the EPP's)"],
                    container="istio-proxy")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    kube = FakeKube(workdir=workdir / "kube")
    stack = Stack(workdir=workdir / "stack", sidecar_env=kube.env(),
                  sidecar_config=kubernetes_config([VLLM], extra="\n[probe]\ninterval_seconds = 1\n"))
    try:
        load_cluster(kube, stack)
        stack.start()
        # A sidecar that has run for a while has probed every proxy (else the check is inconclusive).
        probed = lambda: len(prom.select(stack.sidecar.samples(), "kvab_proxy_metrics_status_code")) == 2
        wait_until(probed, 15, what="kvab serve's first probes")
        kubeconfig = write_kubeconfig(workdir / "check-kubeconfig", kube.port, token=CHECK_TOKEN)
        yield kube, stack, kubeconfig
    finally:
        stack.stop()
        kube.cleanup()
    stack.gateway.assert_healthy()


def start_check(kubeconfig, *extra):
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RUST_LOG": "warn"}
    return subprocess.Popen([kvab_binary(), "check", "--cluster", "--json", "--require-label-selector", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, timeout=120):
    """(exit code, {check name: check}, report, stderr) of a started check."""
    out, err = proc.communicate(timeout=timeout)
    assert out, err
    report = json.loads(out)
    assert report["exit_code"] == proc.returncode and report["mode"] == "cluster", report
    return proc.returncode, {c["name"]: c for c in report["checks"]}, report, err


def run_check(kubeconfig, *extra):
    return finish(start_check(kubeconfig, *extra))


def results(checks):
    return {name: c["result"] for name, c in checks.items()}


def check_requests(kube):
    return [r for r in kube.requests() if r["user"] == CHECK_TOKEN]


def test_the_healthy_cluster_passes_through_kvabs_own_port_forwards(cluster):
    kube, stack, kubeconfig = cluster
    kube.reset_log()
    code, checks, report, err = run_check(kubeconfig)
    assert code == 0, json.dumps(report, indent=1) + err
    assert report["verdict"] == "pass"
    # Every check passes; the burst's latency row is an observation (skip), never a verdict.
    assert {name: r for name, r in results(checks).items() if r != "pass"} == {"ab/latency": "skip"}, results(checks)
    assert set(checks) == {
        "prerequisites/pods", "prerequisites/proxy-labels", "prerequisites/proxy-metrics",
        "step1/direct-nvlink", "step1/direct-fs", "step2/httproute", "step2/epp-config",
        "step3/header-nvlink", "step3/header-fs", "step3/unknown-value", "step4/status", "step4/not-pinned",
        "step4/misroutes", "epp/health", "ab/latency"}
    # Prerequisites and Step 2 come from the API objects.
    assert checks["prerequisites/pods"]["measured"] == (
        "nvlink prefill 1/1; nvlink decode 1/1; nvlink proxy 1/1; fs prefill 1/1; fs decode 1/1; fs proxy 1/1")
    assert f"httproute {GW}/llm-d-inference-scheduling" in checks["step2/httproute"]["measured"] + checks["step2/httproute"]["expected"]
    assert f"configmap {EPP_NS}/gaie-inference-scheduling-epp-config" in json.dumps(checks["step2/epp-config"])
    # Step 1 reached each arm through a port-forward to its proxy pod (the id path names the arm).
    assert "vllm-prefill-fs" in checks["step1/direct-fs"]["measured"]
    # Step 4's counters come from kvab serve, itself reached through a port-forward.
    assert "(sidecar counters, answers below 500)" in checks["step4/not-pinned"]["measured"]
    assert report["ab"]["burst_status"] == {"200": 20}
    # EPP health read only the EPP container's log, and only since the check started: the old
    # InferencePoolResourceExhausted line and the Envoy container's line are not counted.
    assert "from 1 pod(s), no match" in checks["epp/health"]["measured"], checks["epp/health"]

    requests = check_requests(kube)
    logs = [r for r in requests if r.get("resource") == "pods/log"]
    assert [(r["name"], r["status"]) for r in logs] == [(EPP_POD, 200)]
    assert "container=epp" in logs[0]["path"] and "sinceSeconds=" in logs[0]["path"]
    # Every port-forward went to a ready pod, over the kubelet's protocol, and carried traffic.
    sessions = [s for s in kube.port_forward_sessions() if s["started"] >= requests[0]["time"]]
    assert {(s["namespace"], s["pod"], tuple(s["ports"])) for s in sessions} == {
        (GW, GATEWAY_POD, (80,)), (VLLM, SIDECAR_POD, (18090,)),
        (VLLM, PROXIES["nvlink"], (8080,)), (VLLM, PROXIES["fs"], (8080,))}
    assert all(s["protocol"] == "v4.channel.k8s.io" and not s["errors"] for s in sessions), sessions
    to_gateway = sum(s["bytesOut"] for s in sessions if s["pod"] == GATEWAY_POD)
    assert to_gateway > 2000, sessions
    # No failed API request, no write.
    assert all(r["status"] in (200, 101) for r in requests), [(r["path"], r["status"]) for r in requests]
    assert {r["verb"] for r in requests} == {"get", "list"}


def test_the_rbac_manifest_grants_exactly_what_the_check_uses(cluster):
    """Every (namespace, group, resource, verb) the API server authorizes for kvab check's requests
    is granted by manifests/optional/check-rbac.yaml, and the Roles grant nothing else."""
    kube, stack, kubeconfig = cluster
    kube.reset_log()
    code, _, report, err = run_check(kubeconfig, "--burst-requests", "4", "--header-requests", "1")
    assert code in (0, 2), json.dumps(report, indent=1) + err
    used = {(r["namespace"], r["apiGroup"], r["resource"], verb)
            for r in check_requests(kube) for verb in r["verbs"]}
    docs = [d for d in yaml.safe_load_all((REPO / "manifests/optional/check-rbac.yaml").read_text()) if d]
    granted = {(d["metadata"]["namespace"], group, resource, verb)
               for d in docs if d["kind"] == "Role" for rule in d["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert used == granted, {"used, not granted": used - granted, "granted, not used": granted - used}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == {VLLM, GW}
    assert all(b["roleRef"]["name"] == "kvab-check" for b in bindings)


@pytest.mark.parametrize("line,name", [(EXHAUSTED_LINE, "InferencePoolResourceExhausted"),
                                       (EXHAUSTED_LINE_V15, "inference error: ResourceExhausted")],
                         ids=["gaie-v1.4", "gaie-v1.5"])
def test_an_exhausted_inference_pool_in_the_epp_log_fails_epp_health(cluster, line, name):
    kube, stack, kubeconfig = cluster
    kube.reset_log()
    proc = start_check(kubeconfig, "--burst-requests", "6", "--header-requests", "1")
    try:
        # Logged while the check runs (after it opened its first port-forward).
        kube.wait_for_request("/portforward", timeout=30)
        kube.append_log(EPP_NS, EPP_POD, [line], container="epp")
    finally:
        code, checks, report, err = finish(proc)
        # The check reads whole seconds back from its start: keep the line out of the next check.
        epp_logs(kube)
    assert code == 1, json.dumps(report, indent=1) + err
    health = checks["epp/health"]
    assert health["result"] == "fail"
    assert health["measured"].startswith(f"1 matching line(s), first from {EPP_POD}: "), health
    assert name in health["measured"], health
    assert "failure signal 1" in health["diagnosis"] and "label" in health["diagnosis"], health
    assert {n for n, r in results(checks).items() if r == "fail"} == {"epp/health"}


def test_a_route_off_the_pool_and_an_unlabelled_proxy_fail_step2_and_the_prerequisites(cluster):
    kube, stack, kubeconfig = cluster
    route = yaml.safe_load(HTTPROUTE_FILE.read_text())
    original = json.loads(json.dumps(route))
    route["spec"]["rules"][0]["backendRefs"] = [{"kind": "Service", "name": "vllm-fs-proxy", "port": 8080}]
    stray = "vllm-fs-proxy-68c4f9-stray"
    kube.put_object(route)
    kube.put_pod(pod(stray, VLLM, {"role": "proxy"}, [("http", stack.arms["fs"].port)]))
    try:
        code, checks, report, err = run_check(kubeconfig, "--burst-requests", "6", "--header-requests", "1")
    finally:
        kube.put_object(original)
        kube.delete_pod(VLLM, stray)
    assert code == 1, json.dumps(report, indent=1) + err
    failed = {n for n, r in results(checks).items() if r == "fail"}
    assert failed == {"step2/httproute", "prerequisites/proxy-labels"}, results(checks)
    route_check = checks["step2/httproute"]
    assert route_check["expected"] == "a rule's backendRef is kind InferencePool, name vllm-proxy-performance"
    assert route_check["measured"] == f"httproute {GW}/llm-d-inference-scheduling: backendRefs Service/vllm-fs-proxy"
    labels = checks["prerequisites/proxy-labels"]
    assert f"{stray} has no llm-d.ai/kv-backend" in labels["measured"] + labels.get("diagnosis", ""), labels


def test_api_errors_make_checks_inconclusive_or_stop_with_a_clear_message(cluster):
    kube, stack, kubeconfig = cluster
    # A 500 on the reads of Step 2 and EPP health: nothing learned, so inconclusive, not a failure.
    kube.fail(500, count=1, paths="/configmaps/", message="etcdserver: request timed out")
    kube.fail(500, count=1, paths=f"/deployments/{EPP}", message="etcdserver: request timed out")
    try:
        code, checks, report, err = run_check(kubeconfig, "--burst-requests", "6", "--header-requests", "1")
    finally:
        kube.clear_failures()
    assert code == 2, json.dumps(report, indent=1) + err
    assert report["verdict"] == "inconclusive"
    epp_config = checks["step2/epp-config"]
    assert epp_config["result"] == "inconclusive"
    assert epp_config["measured"] == (f"reading ConfigMap {EPP_NS}/gaie-inference-scheduling-epp-config: "
                                      "500 InternalError: etcdserver: request timed out"), epp_config
    assert "did not answer" in epp_config["diagnosis"]
    health = checks["epp/health"]
    assert health["result"] == "inconclusive" and "500 InternalError" in health["measured"], health
    assert not [n for n, r in results(checks).items() if r == "fail"], results(checks)

    # A missing object is a finding: Step 2 fails with the API server's NotFound.
    kube.delete_object("configmaps", EPP_NS, "gaie-inference-scheduling-epp-config")
    try:
        code, checks, report, err = run_check(kubeconfig, "--burst-requests", "4", "--header-requests", "1")
    finally:
        kube.put_object({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "gaie-inference-scheduling-epp-config", "namespace": EPP_NS},
                         "data": {"epp-config.yaml": EPP_CONFIG_FILE.read_text()}})
    assert code == 1 and checks["step2/epp-config"]["result"] == "fail"
    assert checks["step2/epp-config"]["measured"].endswith(
        '404 NotFound: configmaps "gaie-inference-scheduling-epp-config" not found')

    # The gateway cannot be reached at all: the check cannot run (exit 3) and says why.
    kube.fail(500, count=1, paths=f"/services/{GATEWAY_SERVICE}")
    try:
        proc = start_check(kubeconfig)
        out, err = proc.communicate(timeout=60)
    finally:
        kube.clear_failures()
    assert proc.returncode == 3 and not out
    assert err.strip().splitlines()[-1] == (f"kvab check: reading Service {GW}/{GATEWAY_SERVICE}: 500 InternalError: "
                           "fakekube injected failure (500)"), err
    assert "panicked" not in err


def test_kvab_experiment_reaches_the_gateway_through_its_own_port_forward(cluster):
    kube, stack, kubeconfig = cluster
    env = {**os.environ, "KUBECONFIG": kubeconfig, "RUST_LOG": "warn"}
    done = subprocess.run([kvab_binary(), "experiment", "--cluster", "--json", "--quiet", "--prompt-tokens", "128",
                           "--requests", "40", "--warmup", "2", "--concurrency", "4", "--max-tokens", "2", "--seed", "2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assignment = report["assignment"]
    assert assignment["answered"] == {"fs": 20, "nvlink": 20} and assignment["misrouted"] == 0, assignment
    assert report["verdict"] != "invalid", report["reasons"]
    # The gateway was reached through a port-forward to the ready gateway pod the Service selects.
    forwards = [r for r in check_requests(kube) if "portforward" in r["path"]]
    assert any(f"/namespaces/{GW}/pods/{GATEWAY_POD}/portforward" in r["path"] for r in forwards), forwards
