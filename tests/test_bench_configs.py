"""The bench's Envoy configurations (bench/) are valid, and its Lua variant does kvab's work.

The throughput figures themselves are not tested (see BENCHMARKS.md); what is tested is that the
bench compares like with like: every shipped config passes `envoy --mode validate`, and the Lua
filter standing in for kvab answers the bench's requests the way kvab's default config does.
"""

import sys
from pathlib import Path

import pytest

from kvablocal.envoy import validate
from kvablocal.net import free_port, request

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import filterbench  # noqa: E402

BODY = filterbench.BODY


# (l) is (d)'s file with a filter config linked to kvab serve, which `--mode validate` cannot load: the
# filter checks its sidecar cluster exists, and a validating Envoy has no clusters running.
@pytest.mark.parametrize("key", ["a", "b", "c", "d", "e"])
def test_bench_gateway_configs_validate(tmp_path, key):
    config = filterbench.render_variant(filterbench.variants()[key], tmp_path / "gateway.yaml", 18001, 18080, 18101)
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_bench_upstream_config_validates(tmp_path):
    result = validate(filterbench.render_upstream(tmp_path / "upstream.yaml", 18001, 18101))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def kvab_and_lua(arms, tmp_path_factory):
    """kvab (default config) and the Lua equivalent, both in front of the echoing nvlink arm."""
    workdir = tmp_path_factory.mktemp("bench")
    started = {}
    try:
        for key in ["c", "e"]:
            admin, port = free_port(), free_port()
            config = filterbench.render_variant(filterbench.variants()[key], workdir / f"{key}.yaml", admin, port,
                                                arms["nvlink"].port)
            started[key] = filterbench.Envoy(key, config, admin, port, workdir).start()
        for envoy in started.values():
            envoy.wait_ready(60)
        yield started
    finally:
        for envoy in started.values():
            envoy.stop()


CASES = [
    [("x-kv-backend", "nvlink")],
    [("x-kv-backend", "fs")],
    [("x-kv-backend", "NVLink")],
    [("x-kv-backend", " p2p\t")],
    [("x-kv-backend", "nccl")],
    [("x-kv-backend", " filesystem")],
    [("x-kv-backend", "File")],
    [("x-kv-backend", "nvlink, p2p")],
    [("x-kv-backend", "fs,")],
    [("x-kv-backend", "fs"), ("x-kv-backend", "FILE")],
    [],
    [("x-kv-backend", "")],
    [("x-kv-backend", " , ")],
    [("x-session-id", "session-1")],
    [("x-kv-backend", "nvlink"), ("x-kv-backend-source", "forged"), ("x-kv-backend-endpoint", "1.2.3.4:5")],
    [("x-kv-backend-source", "forged")],
    [("x-kv-backend", "nvlink2")],
    [("x-kv-backend", "nvlink,fs")],
    [("x-kv-backend", "fs"), ("x-kv-backend", "nvlink")],
    [("x-kv-backend", "bogus, nvlink")],
    [("x-kv-backend", "nvlink, bogus")],
    [("x-kv-backend", "bogus"), ("x-kv-backend", "other")],
]


def outcome(port, headers):
    r = request(port, "POST", "/v1/completions", [("content-type", "application/json"), *headers], BODY)
    seen = {}
    if r.status == 200:
        forwarded = r.json()["headers"]
        for name in ["x-kv-backend", "x-kv-backend-source", "x-kv-backend-endpoint"]:
            seen[name] = [v for k, v in forwarded if k == name]
    else:
        seen["body"] = r.body
    return r.status, r.header("x-kv-backend"), r.header("x-kv-backend-endpoint") is not None, seen


@pytest.mark.parametrize("headers", CASES, ids=[repr(c) for c in CASES])
def test_lua_variant_does_what_kvab_default_does(kvab_and_lua, headers):
    kvab = outcome(kvab_and_lua["c"].port, headers)
    lua = outcome(kvab_and_lua["e"].port, headers)
    assert lua == kvab
