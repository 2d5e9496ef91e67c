"""The kvab filter inside the real, pinned Envoy: the runbook's Step 3 (header A/B) made exact.

Two local arms stand in for vllm-p2p-proxy and vllm-fs-proxy; the gateway routes by the
x-kv-backend header like the runbook's HTTPRoute, and untagged requests go to a pool of both.
"""

import copy
import json
import math

import pytest
import yaml

from kvablocal import prom
from kvablocal.envoy import GATEWAY_TEMPLATE, Gateway, filter_config_value, render, validate, wasm_path
from kvablocal.net import request, wait_until

BODY = json.dumps({"model": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "prompt": "Hello", "max_tokens": 5}).encode()


def send(gateway, headers=(), path="/v1/completions"):
    return request(gateway.port, "POST", path, [("content-type", "application/json"), *headers], BODY)


def forwarded(response, name):
    """Values of header `name` as the arm received it."""
    return [v for k, v in response.json()["headers"] if k == name]


# The response endpoint tag spelled out wherever a test reads it (the shipped WasmPlugin turns it off).
ENDPOINT_TAG = {"responseEndpointHeader": True}


@pytest.fixture(scope="module")
def gateway(gateways):
    return gateways(ENDPOINT_TAG)


def test_nvlink_header_reaches_the_p2p_arm(gateway, arms):
    r = send(gateway, [("x-kv-backend", "nvlink")])
    assert r.status == 200
    assert r.header("x-served-by") == "nvlink"
    assert r.header("x-kv-backend") == "nvlink"
    assert r.header("x-kv-backend-endpoint") == f"127.0.0.1:{arms['nvlink'].port}"
    assert forwarded(r, "x-kv-backend") == ["nvlink"]
    assert forwarded(r, "x-kv-backend-source") == ["header"]


def test_fs_header_reaches_the_fs_arm(gateway, arms):
    r = send(gateway, [("x-kv-backend", "fs")])
    assert r.status == 200
    assert r.header("x-served-by") == "fs"
    assert r.header("x-kv-backend") == "fs"
    assert r.header("x-kv-backend-endpoint") == f"127.0.0.1:{arms['fs'].port}"
    assert forwarded(r, "x-kv-backend-source") == ["header"]


@pytest.mark.parametrize(
    "value,arm,source",
    [
        ("NVLink", "nvlink", "header"),
        (" fs\t", "fs", "header"),
        ("p2p", "nvlink", "alias"),
        ("NCCL", "nvlink", "alias"),
        ("filesystem", "fs", "alias"),
        ("File", "fs", "alias"),
        ("nvlink, p2p", "nvlink", "alias"),
        ("fs,", "fs", "header"),
    ],
)
def test_aliases_and_case_are_normalized(gateway, value, arm, source):
    r = send(gateway, [("x-kv-backend", value)])
    assert r.status == 200
    assert r.header("x-served-by") == arm
    assert forwarded(r, "x-kv-backend") == [arm]
    assert forwarded(r, "x-kv-backend-source") == [source]


def test_a_repeated_header_naming_one_arm_is_forwarded_once(gateway):
    r = send(gateway, [("x-kv-backend", "fs"), ("x-kv-backend", "FILE")])
    assert r.status == 200
    assert r.header("x-served-by") == "fs"
    assert forwarded(r, "x-kv-backend") == ["fs"]
    assert forwarded(r, "x-kv-backend-source") == ["alias"]


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_value_counts_as_missing(gateway, value):
    r = send(gateway, [("x-kv-backend", value)])
    assert r.status == 200
    assert forwarded(r, "x-kv-backend") == []


def test_missing_header_passes_through_to_the_pool(gateway):
    served = set()
    for _ in range(10):
        r = send(gateway)
        assert r.status == 200
        assert forwarded(r, "x-kv-backend") == []
        assert forwarded(r, "x-kv-backend-source") == []
        assert r.header("x-kv-backend") is None
        assert r.header("x-kv-backend-endpoint") is not None
        served.add(r.header("x-served-by"))
    assert served == {"nvlink", "fs"}, "the pool stand-in should spread untagged traffic"


UNKNOWN = ["bogus", "nvlink2", "fs.", "none", "nv link", b"\xff\xfenvlink", b"caf\xc3\xa9", "a" * 8192]


@pytest.mark.parametrize("value", UNKNOWN, ids=lambda v: repr(v)[:20])
def test_an_unknown_value_is_rejected_with_json_400(gateway, arms, value):
    before = {name: arm.requests for name, arm in arms.items()}
    r = send(gateway, [("x-kv-backend", value)])
    assert r.status == 400
    assert r.header("content-type") == "application/json"
    assert r.json() == {
        "error": {
            "message": "x-kv-backend must name one KV backend: nvlink (aliases: p2p, nccl); fs (aliases: filesystem, file)",
            "type": "invalid_request_error",
            "code": "unknown_kv_backend",
            "param": "x-kv-backend",
        }
    }
    assert r.header("x-served-by") is None
    assert {name: arm.requests for name, arm in arms.items()} == before, "a rejected request reached an arm"


@pytest.mark.parametrize(
    "headers",
    [
        [("x-kv-backend", "nvlink"), ("x-kv-backend", "fs")],
        [("x-kv-backend", "nvlink,fs")],
        [("x-kv-backend", "p2p, file")],
        [("x-kv-backend", "fs"), ("x-kv-backend", "bogus")],
    ],
    ids=["repeated", "comma-list", "aliases", "with-unknown"],
)
def test_several_different_values_are_ambiguous(gateway, headers):
    r = send(gateway, headers)
    assert r.status == 400
    body = r.json()["error"]
    assert body["code"] == "ambiguous_kv_backend"
    assert body["message"] == "x-kv-backend names more than one KV backend; send exactly one of: nvlink, fs"


def test_forged_tags_are_stripped(gateway):
    forged = [("x-kv-backend-source", "split"), ("x-kv-backend-endpoint", "6.6.6.6:1")]
    r = send(gateway, [("x-kv-backend", "fs"), *forged])
    assert forwarded(r, "x-kv-backend-source") == ["header"]
    assert forwarded(r, "x-kv-backend-endpoint") == []
    r = send(gateway, forged)
    assert forwarded(r, "x-kv-backend-source") == []
    assert forwarded(r, "x-kv-backend-endpoint") == []


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_the_response_endpoint_tag_follows_its_setting_and_forged_tags_are_stripped_either_way(gateways, arms, on):
    """responseEndpointHeader: off, no response shows the upstream's ip:port; on, every proxied one does. The
    client's own -source and -endpoint never reach the upstream in both cases, tagged or not."""
    g = gateways({"responseEndpointHeader": on})
    forged = [("x-kv-backend-source", "split"), ("x-kv-backend-endpoint", "6.6.6.6:1")]
    cases = [([("x-kv-backend", "fs"), *forged], "fs", ["header"]), ([("x-kv-backend", "p2p"), *forged], "nvlink", ["alias"]), (forged, None, [])]
    for headers, arm, source in cases:
        r = send(g, headers)
        assert r.status == 200
        served = r.header("x-served-by")
        assert r.header("x-kv-backend-endpoint") == (f"127.0.0.1:{arms[served].port}" if on else None)
        assert forwarded(r, "x-kv-backend-endpoint") == []
        assert forwarded(r, "x-kv-backend-source") == source
        assert r.header("x-kv-backend") == arm and (arm is None or served == arm)
    # The filter's own answers carry no endpoint either way.
    r = send(g, [("x-kv-backend", "bogus"), *forged])
    assert r.status == 400 and r.header("x-kv-backend-endpoint") is None


def kvab_counters(gateway):
    return {k: v for k, v in gateway.stats().items() if k[0].startswith("kvab_") and not k[0].endswith(("_bucket", "_sum", "_count"))}


def test_every_counter_is_exact(gateways):
    g = gateways({})
    traffic = (
        [[("x-kv-backend", "nvlink")]] * 5
        + [[("x-kv-backend", "p2p")]] * 2
        + [[("x-kv-backend", "fs")]] * 4
        + [[("x-kv-backend", "filesystem")]] * 1
        + [[]] * 3
        + [[("x-kv-backend", "bogus")]] * 2
        + [[("x-kv-backend", "nvlink,fs")]] * 1
    )
    for headers in traffic:
        send(g, headers)

    def labels(**kw):
        return tuple(sorted(kw.items()))

    expected = {
        ("kvab_requests_total", labels(backend="nvlink", source="header")): 5,
        ("kvab_requests_total", labels(backend="nvlink", source="alias")): 2,
        ("kvab_requests_total", labels(backend="fs", source="header")): 4,
        ("kvab_requests_total", labels(backend="fs", source="alias")): 1,
        ("kvab_requests_total", labels(backend="none", source="none")): 3,
        ("kvab_responses_total", labels(backend="nvlink", source="header", code_class="2xx")): 5,
        ("kvab_responses_total", labels(backend="nvlink", source="alias", code_class="2xx")): 2,
        ("kvab_responses_total", labels(backend="fs", source="header", code_class="2xx")): 4,
        ("kvab_responses_total", labels(backend="fs", source="alias", code_class="2xx")): 1,
        ("kvab_responses_total", labels(backend="none", source="none", code_class="2xx")): 3,
        ("kvab_responses_total", labels(backend="none", source="none", code_class="4xx")): 3,
        ("kvab_rejected_total", labels(reason="unknown_kv_backend")): 2,
        ("kvab_rejected_total", labels(reason="ambiguous_kv_backend")): 1,
        ("kvab_invalid_values_total", labels(reason="unknown")): 2,
        ("kvab_invalid_values_total", labels(reason="ambiguous")): 1,
        # No sidecar, so no endpoint map: what served is unknown; rejections had no upstream.
        ("kvab_served_total", labels(requested="nvlink", served="unknown")): 7,
        ("kvab_served_total", labels(requested="fs", served="unknown")): 5,
        ("kvab_served_total", labels(requested="none", served="unknown")): 3,
        ("kvab_served_total", labels(requested="none", served="none")): 3,
    }

    def matches():
        counters = kvab_counters(g)
        return {k: v for k, v in counters.items() if v} == expected and counters

    counters = wait_until(matches, 5, what=f"exact counters {expected}")
    # Every series exists from the start (zero until used), so rate() has a baseline.
    names = {(n, dict(ls).get("backend"), dict(ls).get("source"), dict(ls).get("code_class")) for n, ls in counters}
    assert ("kvab_requests_total", "fs", "split", None) in names
    assert ("kvab_requests_total", "nvlink", "default", None) in names
    assert ("kvab_requests_total", "fs", "key", None) in names
    assert ("kvab_responses_total", "fs", "split", "5xx") in names
    # Per gateway pod: 5 sources per arm plus the untagged; the responses by status class of each.
    assert len([k for k in counters if k[0] == "kvab_requests_total"]) == 2 * 5 + 1
    assert len([k for k in counters if k[0] == "kvab_responses_total"]) == (2 * 5 + 1) * 6

    # Latency histograms: one sample per answered admitted request, per backend and split|other (flushed every
    # second). Header and alias requests are `other`; the filter's own 400s are never timed.
    def histograms_flushed():
        s = g.stats()
        tags = (("nvlink", "other"), ("fs", "other"), ("none", "none"), ("nvlink", "split"), ("fs", "split"))
        counts = {t: prom.value(s, "kvab_request_duration_milliseconds_count", backend=t[0], source=t[1]) for t in tags}
        ttfb = {t: prom.value(s, "kvab_time_to_first_byte_milliseconds_count", backend=t[0], source=t[1]) for t in tags}
        expected = {("nvlink", "other"): 7, ("fs", "other"): 5, ("none", "none"): 3, ("nvlink", "split"): 0,
                    ("fs", "split"): 0}
        return counts == expected and ttfb == counts and s

    s = wait_until(histograms_flushed, 10, what="histogram counts 7/5/3")
    buckets = prom.select(s, "kvab_request_duration_milliseconds_bucket", backend="nvlink", source="other")
    assert any(dict(ls).get("le") == "+Inf" and v == 7 for ls, v in buckets.items())
    # 2 arms × (split, other) + the untagged: 5 histograms per metric, every one there from the start.
    histograms = {dict(ls).get("backend") + "/" + dict(ls).get("source")
                  for (n, ls) in s if n == "kvab_request_duration_milliseconds_count"}
    assert histograms == {"nvlink/split", "nvlink/other", "fs/split", "fs/other", "none/none"}, histograms


def test_bodies_pass_through_whole_and_unbuffered(gateways, arms):
    """The module exports no request body or trailer callback (`make filter` removes them), and its
    response body callback only notes the first byte: a large request body and a streamed answer (one
    chunk per token) reach their ends unchanged, and the request is still tagged and counted once."""
    g = gateways(ENDPOINT_TAG)
    prompt = "kv " * 100_000  # 300 KB: several body chunks through Envoy
    big = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 3}).encode()
    r = request(g.port, "POST", "/v1/completions", [("content-type", "application/json"), ("x-kv-backend", "fs")], big)
    assert r.status == 200, r.body[:200]  # the arm parsed the whole JSON body
    assert r.header("x-served-by") == "fs" and r.header("x-kv-backend") == "fs"

    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": True})
    r = request(g.port, "POST", "/v1/chat/completions", [("content-type", "application/json"), ("x-kv-backend", "p2p")],
                chat.encode())
    assert r.status == 200
    assert r.header("content-type") == "text/event-stream"
    assert r.header("x-kv-backend") == "nvlink" and r.header("x-kv-backend-endpoint") == f"127.0.0.1:{arms['nvlink'].port}"
    events = [e for e in r.body.decode().split("\n\n") if e]
    assert len(events) == 13 and events[-1] == "data: [DONE]", events
    assert all(json.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk" for e in events[:-1])

    def counted():
        c = {k: v for k, v in kvab_counters(g).items() if v and k[0] in ("kvab_requests_total", "kvab_responses_total")}
        return c == {
            ("kvab_requests_total", (("backend", "fs"), ("source", "header"))): 1,
            ("kvab_requests_total", (("backend", "nvlink"), ("source", "alias"))): 1,
            ("kvab_responses_total", (("backend", "fs"), ("code_class", "2xx"), ("source", "header"))): 1,
            ("kvab_responses_total", (("backend", "nvlink"), ("code_class", "2xx"), ("source", "alias"))): 1,
        } and c

    wait_until(counted, 5, what="one request and one 2xx response per arm")


def test_missing_header_default_policy(gateways):
    g = gateways({"onMissing": "default", "defaultArm": "fs"})
    for _ in range(5):
        r = send(g)
        assert r.header("x-served-by") == "fs"
        assert forwarded(r, "x-kv-backend") == ["fs"]
        assert forwarded(r, "x-kv-backend-source") == ["default"]
    wait_until(lambda: prom.value(g.stats(), "kvab_requests_total", backend="fs", source="default") == 5, 5, what="5 default")


def test_unknown_passthrough_policy_strips_the_value(gateways):
    g = gateways({"onUnknown": "passthrough"})
    r = send(g, [("x-kv-backend", "bogus")])
    assert r.status == 200
    assert forwarded(r, "x-kv-backend") == []
    s = wait_until(lambda: prom.value(g.stats(), "kvab_invalid_values_total", reason="unknown") == 1 and g.stats(), 5)
    assert prom.value(s, "kvab_requests_total", backend="none", source="none") == 1
    assert prom.value(s, "kvab_rejected_total", reason="unknown_kv_backend") == 0


def test_unknown_default_policy_uses_the_default_arm(gateways):
    g = gateways({"onUnknown": "default", "defaultArm": "nvlink"})
    r = send(g, [("x-kv-backend", "nvlink,fs")])
    assert r.status == 200
    assert r.header("x-served-by") == "nvlink"
    assert forwarded(r, "x-kv-backend-source") == ["default"]


def documented_key_arm(key: bytes, weights: dict) -> str:
    """The split contract, computed independently: FNV-1a 64 + SplitMix64 finalizer, then a
    multiply-shift onto the cumulative weights in arm-name order."""
    m = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in key.strip(b" \t"):
        h = ((h ^ b) * 0x100000001B3) & m
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
    h ^= h >> 31
    point = (h * sum(weights.values())) >> 64
    upper = 0
    for arm in sorted(weights):
        upper += weights[arm]
        if point < upper:
            return arm
    raise AssertionError("point beyond the weights")


SPLIT = {"onMissing": "split", "split": {"weights": {"nvlink": 3, "fs": 1}, "keyHeader": "x-session-id"}}


@pytest.fixture(scope="module")
def split_gateway(gateways):
    return gateways(SPLIT)


def test_split_lands_within_binomial_tolerance(split_gateway):
    n = 1200
    nvlink = sum(send(split_gateway).header("x-served-by") == "nvlink" for _ in range(n))
    # nvlink ~ Binomial(n, 0.75): allow 5 standard deviations.
    sd = math.sqrt(n * 0.75 * 0.25)
    assert abs(nvlink - 0.75 * n) <= 5 * sd, f"nvlink got {nvlink} of {n}"
    s = wait_until(lambda: prom.value(split_gateway.stats(), "kvab_requests_total", backend="nvlink", source="split") == nvlink and split_gateway.stats(), 5)
    assert prom.value(s, "kvab_requests_total", backend="fs", source="split") == n - nvlink


def test_split_is_sticky_per_key_and_follows_the_documented_hash(split_gateway):
    weights = SPLIT["split"]["weights"]
    for i in range(60):
        key = f"session-{i}"
        arms = {send(split_gateway, [("x-session-id", key)]).header("x-served-by") for _ in range(3)}
        assert arms == {documented_key_arm(key.encode(), weights)}, key


def test_an_explicit_header_wins_over_split(split_gateway):
    r = send(split_gateway, [("x-kv-backend", "fs"), ("x-session-id", "session-0")])
    assert r.header("x-served-by") == "fs"
    assert forwarded(r, "x-kv-backend-source") == ["header"]


def test_shipped_envoy_configs_validate(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        render(
            GATEWAY_TEMPLATE,
            ADMIN_PORT=18001,
            GATEWAY_PORT=18080,
            ACCESS_LOG=tmp_path / "access.log",
            KVAB_WASM=wasm_path(),
            KVAB_FILTER_CONFIG=json.dumps("{}"),
            NVLINK_PORT=18101,
            FS_PORT=18102,
            SIDECAR_PORT=18090,
            NVLINK_ROUTE="vllm-p2p-proxy",
            FS_ROUTE="vllm-fs-proxy",
        )
    )
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def _http_filters(node):
    """The `http_filters` list of the first HTTP connection manager in an Envoy config."""
    if isinstance(node, dict):
        if "http_filters" in node:
            return node["http_filters"]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _http_filters(child)
        if found is not None:
            return found
    return None


def test_two_plugins_sharing_one_vm_each_decide_with_their_own_configuration(arms, tmp_path):
    """Envoy runs plugins with the same module and VM settings in one VM, one root context each:
    every request must reach the root it was created under."""
    gateway = Gateway(ENDPOINT_TAG, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path)
    config = yaml.safe_load(gateway.config_path.read_text())
    filters = _http_filters(config)
    kvab = next(f for f in filters if f["name"] == "envoy.filters.http.wasm")
    second = copy.deepcopy(kvab)
    second["typed_config"]["config"]["name"] = "kvab-tier"
    second["typed_config"]["config"]["root_id"] = "kvab-tier"
    assert second["typed_config"]["config"]["vm_config"] == kvab["typed_config"]["config"]["vm_config"]
    second["typed_config"]["config"]["configuration"]["value"] = json.loads(filter_config_value(
        {"header": "x-kv-tier", "onMissing": "default", "onUnknown": "default", "defaultArm": "fs"}))
    filters.insert(filters.index(kvab) + 1, second)
    gateway.config_path.write_text(yaml.safe_dump(config))
    gateway.start()
    try:
        # As many VMs as one plugin has (the base VM, the main thread's, one per worker): shared.
        assert prom.value(gateway.stats(), "envoy_wasm_envoy_wasm_runtime_v8_active") == gateway.concurrency + 2
        for _ in range(20):
            r = send(gateway, [("x-kv-backend", "nvlink")])
            assert r.status == 200
            assert forwarded(r, "x-kv-backend") == ["nvlink"]
            assert forwarded(r, "x-kv-backend-source") == ["header"]
            assert forwarded(r, "x-kv-tier") == ["fs"]
            assert forwarded(r, "x-kv-tier-source") == ["default"]
            assert r.header("x-kv-backend") == "nvlink"
            assert r.header("x-kv-tier") == "fs"
        r = send(gateway, [("x-kv-backend", "bogus"), ("x-kv-tier", "nvlink")])
        assert r.status == 400 and r.json()["error"]["code"] == "unknown_kv_backend"
        r = send(gateway, [("x-kv-tier", "bogus")])
        assert r.status == 200 and forwarded(r, "x-kv-tier") == ["fs"]
    finally:
        gateway.stop()
    gateway.assert_healthy()
