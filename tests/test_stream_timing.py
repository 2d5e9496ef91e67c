"""The gateway's timings against what they are named for, on the servers vLLM deployments really run:
Starlette's StreamingResponse on uvicorn (vLLM's OpenAI server) and Quart on Hypercorn (the P/D proxy),
behind the real Envoy with the kvab filter. Each waits a known 310 ms before its first event (standing
for prefill and the KV transfer; off the histogram's bucket bounds, so that the filter's time and the
client's, a few milliseconds apart, fall in one bucket). Both send the response headers of a stream
at once, so the filter takes kvab_time_to_first_byte_milliseconds at the first body byte: it lands
where the client sees the first token, and kvab_request_duration_milliseconds includes it. An answer
in one piece, one without a body and a stream broken after its headers are each timed once too.
docs/analyze.md and BENCHMARKS.md ("Gateway timings on real streaming servers") give the numbers."""

import socket
import statistics
import subprocess
import sys
import time

import pytest

from kvablocal import prom
from kvablocal.envoy import Gateway
from kvablocal.net import free_port, wait_until
from kvablocal.sidecar import REPO

DELAY_MS = 310
REQUESTS = 12
SERVERS = {"nvlink": "starlette", "fs": "quart"}
TTFB = "kvab_time_to_first_byte_milliseconds"
DURATION = "kvab_request_duration_milliseconds"
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}'


def start_server(server: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvablocal.realarms", "--server", server, "--port", str(port),
                             "--delay-ms", str(DELAY_MS)], cwd=REPO / "local",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_until(listening, 20, what=f"{server} on {port}")
    return proc


def raw_request(method: str, path: str, arm: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nhost: gw\r\nx-kv-backend: {arm}\r\n{extra}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def timed_stream(port: int, arm: str) -> tuple:
    """(ms to the end of the response headers, ms to the first content event) as the client sees them."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(raw_request("POST", "/v1/chat/completions", arm, CHAT))
        seen, headers_at, content_at = b"", None, None
        while content_at is None:
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk
            if headers_at is None and b"\r\n\r\n" in seen:
                headers_at = time.monotonic() - started
            if headers_at is not None and b'"content"' in seen.split(b"\r\n\r\n", 1)[1]:
                content_at = time.monotonic() - started
        while sock.recv(65536):
            pass
    return 1000 * headers_at, 1000 * content_at


def exchange(port: int, request: bytes) -> bytes:
    """Everything the gateway answers until it closes the connection (a reset ends it too)."""
    seen = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                seen += chunk
        except ConnectionResetError:
            pass
    return seen


def buckets(samples: dict, name: str, backend: str) -> list:
    """(upper bound, cumulative count) of the filter's histogram for an arm, in order: its sources' series
    (`split`, `other`) summed bound by bound."""
    summed = {}
    for k, v in prom.select(samples, name + "_bucket", backend=backend).items():
        le = float(dict(k)["le"])
        summed[le] = summed.get(le, 0.0) + v
    return sorted(summed.items())


def count(samples: dict, name: str, backend: str) -> float:
    """Samples in the filter's histogram for an arm, every source."""
    return sum(prom.select(samples, name + "_count", backend=backend).values())


def recorded(after: dict, before: dict, name: str, backend: str) -> list:
    """The (upper bound, cumulative count) of what was recorded between two snapshots."""
    old = dict(buckets(before, name, backend))
    return [(le, v - old.get(le, 0)) for le, v in buckets(after, name, backend)]


def bucket_of(histogram: list, ms: float) -> tuple:
    """(lower, upper] bounds of the bucket `ms` falls in."""
    lower = 0.0
    for le, _ in histogram:
        if ms <= le:
            return lower, le
        lower = le
    raise AssertionError((histogram, ms))


def median_bucket(histogram: list) -> tuple:
    """(lower, upper] bounds of the bucket holding the median."""
    total, lower = histogram[-1][1], 0.0
    for le, cumulative in histogram:
        if cumulative >= total / 2:
            return lower, le
        lower = le
    raise AssertionError(histogram)


def below(histogram: list, ms: float) -> float:
    """How many were recorded in the buckets wholly below `ms`."""
    return max((v for le, v in histogram if le < ms), default=0)


def settled(gateway: Gateway, before: dict, sent: int) -> dict:
    """Stats once every arm's histograms hold `sent` more samples than `before` (flushed each second)."""
    more = {}

    def flushed():
        s = gateway.stats()
        more.update({(n, arm): count(s, n, arm) - count(before, n, arm) for n in (TTFB, DURATION) for arm in SERVERS})
        return set(more.values()) == {sent} and s
    try:
        return wait_until(flushed, 10, what=f"{sent} more samples per arm")
    except AssertionError:  # kvablocal.net.Timeout
        raise AssertionError(f"samples recorded (histogram, arm): {more}, {sent} each expected") from None


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    ports = {arm: free_port() for arm in SERVERS}
    procs = [start_server(server, ports[arm]) for arm, server in SERVERS.items()]
    g = Gateway({}, ports["nvlink"], ports["fs"], workdir=tmp_path_factory.mktemp("timing"))
    try:
        yield g.start()
    finally:
        g.stop()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_the_gateway_times_the_first_token_not_the_early_headers(gateway):
    before, seen = gateway.stats(), {}
    for arm, server in SERVERS.items():
        timings = [timed_stream(gateway.port, arm) for _ in range(REQUESTS)]
        headers = statistics.median(t[0] for t in timings)
        first = statistics.median(t[1] for t in timings)
        seen[arm] = (headers, first)
        # Through the gateway too, the headers leave long before the first token.
        assert first >= DELAY_MS and headers < DELAY_MS / 2, (server, headers, first)
    after = settled(gateway, before, REQUESTS)
    for arm, server in SERVERS.items():
        ttfb, duration = recorded(after, before, TTFB, arm), recorded(after, before, DURATION, arm)
        (low, high), first = median_bucket(ttfb), bucket_of(ttfb, seen[arm][1])
        print(f"{server}: client headers {seen[arm][0]:.1f} ms, first token {seen[arm][1]:.1f} ms "
              f"(bucket ({first[0]:g}, {first[1]:g}]); filter time_to_first_byte median bucket ({low:g}, {high:g}] ms, "
              f"request_duration ≤{median_bucket(duration)[1]:g} ms")
        # Nothing at the headers' few milliseconds: every request waited for its first event.
        assert below(ttfb, DELAY_MS) == 0, (server, ttfb)
        # The median is where the first token is: after the server's wait, and a little before the
        # client sees it (the filter is on its way). While those two share a bucket (DELAY_MS is
        # off the bounds), that is the bucket of the client's first token.
        assert low < seen[arm][1] and high >= DELAY_MS, (server, (low, high), first, ttfb, seen[arm])
        assert median_bucket(duration)[1] >= DELAY_MS, (server, duration)


@pytest.mark.parametrize("kind", ["one piece", "no body", "broken after headers"])
def test_answers_without_a_streamed_body_are_timed_once(gateway, kind):
    """A JSON answer (headers and body after the server's wait), vLLM's empty /health (the headers
    end the stream: timed there) and a stream whose connection drops after the headers (no body
    byte ever: timed when the request ends). Each request records exactly one sample."""
    sent = 3
    request = {
        "one piece": lambda arm: raw_request("POST", "/v1/chat/completions", arm, CHAT.replace(b"true", b"false")),
        "no body": lambda arm: raw_request("GET", "/health", arm),
        "broken after headers": lambda arm: raw_request("POST", "/v1/chat/completions", arm, CHAT,
                                                        "x-realarm-break: after-headers\r\n"),
    }[kind]
    before, logged = gateway.stats(), len(gateway.access_log())
    for arm in SERVERS:
        for _ in range(sent):
            answer = exchange(gateway.port, request(arm))
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            if kind == "one piece":
                assert answer.rstrip().endswith(b"}") and b'"chat.completion"' in answer, answer[-200:]
            if kind == "broken after headers":
                assert b"data:" not in answer, answer
    after = settled(gateway, before, sent)
    for arm, server in SERVERS.items():
        ttfb = recorded(after, before, TTFB, arm)
        if kind == "no body":
            assert below(ttfb, DELAY_MS / 2) == sent, (server, ttfb)
        else:
            assert below(ttfb, DELAY_MS) == 0, (server, ttfb)
    if kind == "broken after headers":
        lines = wait_until(lambda: len(gateway.access_log()) >= logged + 2 * sent and gateway.access_log(), 5)
        resets = [line for line in lines[logged:] if "upstream_reset_after_response_started" in line]
        assert len(resets) == 2 * sent, lines[logged:]
