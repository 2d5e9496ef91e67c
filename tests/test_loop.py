"""The closed loop: the filter routes with the sidecar's live endpoint maps and reports what it
served. Real Envoy + filter, real `kvab serve` watching the fake Kubernetes API, two local arms.

Proxy pods in the fake API all have IP 127.0.0.1 and a container port named `http` that is the
local arm's port, so the sidecar's endpoint addresses are exactly the upstream addresses Envoy
reports (`upstream.address`).
"""

import pytest

from fakekube import FakeKube, make_pod
from kvablocal import prom
from kvablocal.envoy import Gateway
from kvablocal.net import request, wait_until
from kvablocal.sidecar import Sidecar

NS = "llm-d-vllm"
REFRESH_MS = 200

SIDECAR_CONFIG = f"""
listen = "127.0.0.1:{{port}}"
source = "kubernetes"
arms = ["nvlink", "fs"]

[kubernetes]
namespaces = ["{NS}"]
pod_selector = "role=proxy"
backend_label = "llm-d.ai/kv-backend"
endpoint_port = "http"
"""


def proxy_pod(name, arm, port, ready=True):
    labels = {"role": "proxy", "llm-d.ai/kv-backend": arm}
    return make_pod(name, NS, labels, "127.0.0.1", ready=ready, container_ports=[{"name": "http", "containerPort": port}])


@pytest.fixture
def kube(tmp_path):
    with FakeKube(workdir=tmp_path / "kube", bookmark_interval=0.5) as kube:
        yield kube


@pytest.fixture
def stack(arms, kube, tmp_path):
    """Proxy pods for both arms, kvab serve watching them, Envoy + filter fetching its maps."""
    kube.put_pod(proxy_pod("vllm-p2p-proxy", "nvlink", arms["nvlink"].port))
    kube.put_pod(proxy_pod("vllm-fs-proxy", "fs", arms["fs"].port))
    sidecar = Sidecar(SIDECAR_CONFIG, workdir=tmp_path, env=kube.env()).start()
    wait_until(lambda: sidecar.get("/readyz").status == 200, 10, what="sidecar synced")
    started = []

    def gateway(**kw):
        config = {"sidecar": {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS}, **kw.pop("filter", {})}
        g = Gateway(config, arms["nvlink"].port, arms["fs"].port, sidecar_port=sidecar.port, workdir=tmp_path / f"envoy{len(started)}", **kw).start()
        started.append(g)
        wait_until(lambda: prom.value(g.stats(), "kvab_endpoint_map_fetches_total", result="ok") >= 1, 5, what="first map")
        return g

    yield kube, sidecar, gateway
    for g in started:
        g.stop()
    sidecar.stop()
    for g in started:
        g.assert_healthy()


def send(g, arm=None):
    headers = [("x-kv-backend", arm)] if arm else []
    return request(g.port, "POST", "/v1/chat/completions", headers, b'{"model":"m","messages":[]}')


def within_a_refresh(predicate, what):
    """Map changes reach the filter within one refresh interval after the sidecar has them
    (watch event → sidecar map is the sidecar's own budget, below 1 s)."""
    return wait_until(predicate, 1.0 + 2 * REFRESH_MS / 1000, interval=0.02, what=what)


def test_untagged_traffic_is_attributed_to_the_arm_that_served_it(stack):
    kube, sidecar, gateway = stack
    g = gateway()
    served = [send(g).header("x-kv-backend") for _ in range(6)]
    assert set(served) == {"nvlink", "fs"}, served
    s = wait_until(lambda: sum(prom.select(g.stats(), "kvab_served_total", requested="none").values()) == 6 and g.stats(), 5)
    assert prom.value(s, "kvab_served_total", requested="none", served="nvlink") == served.count("nvlink")
    assert prom.value(s, "kvab_served_total", requested="none", served="fs") == served.count("fs")


def test_an_emptied_arm_answers_503_and_recovers(stack):
    kube, sidecar, gateway = stack
    g = gateway()
    assert send(g, "nvlink").status == 200
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": False})
    r = within_a_refresh(lambda: (r := send(g, "nvlink")).status == 503 and r, "nvlink unavailable")
    assert r.json() == {
        "error": {
            "message": "KV backend nvlink has no ready endpoint; retry later or choose another x-kv-backend",
            "type": "service_unavailable_error",
            "code": "kv_backend_unavailable",
            "param": "x-kv-backend",
        }
    }
    assert send(g, "fs").status == 200, "the other arm keeps serving"
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": True})
    within_a_refresh(lambda: send(g, "nvlink").status == 200, "nvlink back")
    s = g.stats()
    assert prom.value(s, "kvab_rejected_total", reason="kv_backend_unavailable") >= 1
    assert prom.value(s, "kvab_unavailable_total", backend="nvlink") >= 1


def test_passthrough_lets_requests_to_an_empty_arm_through_and_counts_them(stack):
    kube, sidecar, gateway = stack
    g = gateway(filter={"onUnavailable": "passthrough"})
    kube.delete_pod(NS, "vllm-fs-proxy")

    def admitted_and_counted():
        assert send(g, "fs").status == 200
        return prom.value(g.stats(), "kvab_unavailable_total", backend="fs") >= 1

    within_a_refresh(admitted_and_counted, "fs counted unavailable")
    assert prom.value(g.stats(), "kvab_rejected_total", reason="kv_backend_unavailable") == 0


def test_a_moved_endpoint_changes_the_served_arm_within_a_refresh(stack):
    kube, sidecar, gateway = stack
    # Passthrough: once fs has no endpoint left its requests still go to the FS route.
    g = gateway(filter={"onUnavailable": "passthrough"})
    assert send(g, "fs").header("x-kv-backend") == "fs"
    # The FS proxy's pod is relabelled nvlink: its address now belongs to the other arm.
    kube.patch_pod(NS, "vllm-fs-proxy", {"labels": {"llm-d.ai/kv-backend": "nvlink"}})
    within_a_refresh(lambda: send(g, "fs").header("x-kv-backend") == "nvlink", "fs proxy counted as nvlink")


def test_a_misrouting_route_shows_up_as_misroutes(stack):
    kube, sidecar, gateway = stack
    g = gateway(swap_routes=True)
    r = send(g, "nvlink")
    assert r.status == 200
    assert r.header("x-served-by") == "fs"
    assert r.header("x-kv-backend") == "fs", "the response names the arm that served it"
    for _ in range(4):
        send(g, "nvlink")
    wait_until(lambda: prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="fs") == 5, 5, what="5 misroutes")
    assert prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="nvlink") == 0


def test_a_stale_map_counts_as_unknown_and_refuses_nothing(stack, arms, tmp_path):
    kube, sidecar, gateway = stack
    g = gateway(filter={"sidecar": {"cluster": "kvab-sidecar", "refreshMs": REFRESH_MS, "staleAfterMs": 2 * REFRESH_MS}})
    kube.patch_pod(NS, "vllm-p2p-proxy", {"ready": False})
    within_a_refresh(lambda: send(g, "nvlink").status == 503, "nvlink unavailable")
    sidecar.stop()
    # Once the map is older than staleAfterMs nothing is known: requests flow, served is unknown.
    r = wait_until(lambda: (r := send(g, "nvlink")).status == 200 and r, 3, what="stale map admits")
    assert r.header("x-kv-backend") == "nvlink"
    wait_until(lambda: prom.value(g.stats(), "kvab_served_total", requested="nvlink", served="unknown") >= 1, 5, what="unknown served")
    s = g.stats()
    assert prom.value(s, "kvab_endpoint_map_fetches_total", result="error") >= 1
    assert prom.value(s, "kvab_endpoint_map_age_seconds") >= 0
