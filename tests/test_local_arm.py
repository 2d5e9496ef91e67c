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



def ttft_and_status(port, words=8):
    """(seconds to the first body byte, status, x-served-by, body) of a streamed chat completion."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", json.dumps(chat(words, max_tokens=1)),
                       {"content-type": "application/json"})
    response = connection.getresponse()
    first = response.read(1)
    ttfb = time.monotonic() - started
    raw = first + response.read()
    connection.close()
    return ttfb, response.status, response.getheader("x-served-by"), raw


def faults(seed, count, **knobs):
    """The (fail, stall) draws of an arm's first `count` completions, without serving them."""
    arm = ArmServer("fs", seed=seed, **knobs)
    try:
        return [arm.draw_faults() for _ in range(count)]
    finally:
        arm.server_close()


def test_an_arm_fails_and_stalls_its_stated_fractions_the_same_way_for_the_same_seed():
    knobs = {"fail_fraction": 0.08, "stall_fraction": 0.10, "stall_factor": 6.0}
    # A 5 ms first token, so that 400 completions take a few seconds.
    model = {"prefill_base": 0.005, "prefill_per_token": 0.0, "transfer_overhead": 0.0}
    base = PdModel(200e9, **model).first_token(8)
    server = ArmServer("fs", seed=7, pd_model=model, bandwidth=200e9, **knobs).start()
    try:
        answers = [ttft_and_status(server.port) for _ in range(400)]
    finally:
        server.stop()
    # The arm draws what a fresh arm of the same seed draws, in the order the completions came.
    drawn = faults(7, 400, **knobs)
    assert [status == 503 for _, status, _, _ in answers] == [fail for fail, _ in drawn]
    assert server.failed == sum(fail for fail, _ in drawn) and server.stalled == sum(stall for _, stall in drawn)
    assert server.succeeded == 400 - server.failed
    # For a seed the counts are fixed numbers; these bounds are the binomials' 99.99 % ranges
    # (400 × 0.08: 32 ± 21; 368 × 0.1: 37 ± 23), which a wrong fraction would leave.
    assert 11 <= server.failed <= 53 and 14 <= server.stalled <= 60, (server.failed, server.stalled)
    # A failure is a 503 with vLLM's error JSON, named by the arm as every answer of it.
    assert all(status in (200, 503) and served_by == "fs" for _, status, served_by, _ in answers)
    answer = json.loads(next(raw for _, status, _, raw in answers if status == 503))
    assert answer["code"] == 503 and answer["type"] == "ServiceUnavailableError" and answer["arm"] == "fs", answer
    # A stall is the whole modelled time to first token ×6. Sleeps only ever overrun, so every stalled
    # completion takes at least 6 × 5 ms; the others' median stays near 5 ms.
    stalled = [ttfb for (ttfb, _, _, _), (_, stall) in zip(answers, drawn) if stall]
    others = [ttfb for (ttfb, status, _, _), (_, stall) in zip(answers, drawn) if status == 200 and not stall]
    assert min(stalled) >= 6 * base and min(others) >= base, (min(stalled), min(others))
    assert statistics.median(others) < 3 * base, statistics.median(others)
    # Another seed draws other completions; the same seed the same ones.
    assert faults(8, 400, **knobs) != drawn and faults(7, 400, **knobs) == drawn
    # Out of range is refused.
    for bad in ({"fail_fraction": 1.5}, {"stall_fraction": -0.1}, {"stall_factor": -1}):
        with pytest.raises(ValueError):
            ArmServer("fs", **bad)
