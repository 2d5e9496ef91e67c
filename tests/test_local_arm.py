"""The local arms' P/D model, without Envoy: prompt tokens counted into usage, time to first token
growing with the prompt at the arm's KV bandwidth, vLLM's usage chunk last before [DONE]."""

import http.client
import json
import statistics
import time

import pytest

from kvablocal.arm import KV_BYTES_PER_TOKEN, ArmServer, PdModel


@pytest.fixture(scope="module")
def arms():
    servers = {name: ArmServer(name).start() for name in ("nvlink", "fs")}
    yield servers
    for server in servers.values():
        server.stop()


def post(port, path, body):
    """(seconds to the first body byte, status, parsed body or the list of SSE data lines)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = connection.getresponse()
    first = response.read(1)
    ttfb = time.monotonic() - started
    raw = (first + response.read()).decode()
    connection.close()
    if body.get("stream"):
        return ttfb, response.status, [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    return ttfb, response.status, json.loads(raw)


def chat(words, stream=True, max_tokens=2):
    body = {"model": "m", "messages": [{"role": "user", "content": " ".join(["word"] * words)}], "max_tokens": max_tokens,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def test_prompt_tokens_are_counted_into_usage_and_the_usage_chunk_comes_last(arms):
    port = arms["fs"].port
    _, status, events = post(port, "/v1/chat/completions", chat(300, max_tokens=3))
    assert status == 200 and events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303}
    assert all(json.loads(e)["choices"] for e in events[:-2])
    # Without include_usage there is no usage chunk (as vLLM).
    body = chat(10)
    del body["stream_options"]
    _, _, events = post(port, "/v1/chat/completions", body)
    assert all(json.loads(e)["choices"] for e in events[:-1])
    _, _, answer = post(port, "/v1/completions", {"model": "m", "prompt": ["a b", "c"], "max_tokens": 2})
    assert answer["usage"]["prompt_tokens"] == 3


def test_time_to_first_token_follows_the_kv_bandwidth(arms):
    def median_ttft(arm, words):
        return statistics.median(post(arms[arm].port, "/v1/chat/completions", chat(words))[0] for _ in range(7))

    long = {arm: median_ttft(arm, 8192) for arm in arms}
    short = {arm: median_ttft(arm, 128) for arm in arms}
    assert long["fs"] > 1.25 * long["nvlink"], long
    assert abs(short["fs"] - short["nvlink"]) < 0.004, short
    assert long["nvlink"] > short["nvlink"], (long, short)
    # The model's own arithmetic: 8192 tokens × 98,304 bytes at 20 GB/s is 40 ms of transfer.
    fs = PdModel(20e9)
    assert KV_BYTES_PER_TOKEN == 98_304
    assert fs.first_token(8192) - fs.first_token(0) == pytest.approx(0.01 * 8.192 + 8192 * 98_304 / 20e9)
