"""`kvab serve` as shipped (the `sidecar` profile: release, LTO, unwinding at the request fence; in `make test`
its `sidecar-ci` twin) against what a hostile or broken client sends: every request-line form, generated
malformed requests, and clients that hold every connection. After each batch the server must still answer /healthz, and the process must
still be the one that started."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvablocal.net import free_port
from kvablocal.sidecar import REPO
from test_http import STATIC

# manifests/sidecar.yaml: the liveness and readiness probes' timeoutSeconds.
PROBE_TIMEOUT_S = 2
# serve/src/server.rs: API.max_connections.
MAX_CONNECTIONS = 1024


@pytest.fixture(scope="session")
def shipped_kvab_bin() -> str:
    """kvab from the Cargo profile KVAB_SHIPPED_PROFILE: `sidecar` (the default here) is the binary the image
    ships; `make test` sets `sidecar-ci`, the same panic, assertion and overflow settings without the
    optimizer (Cargo.toml says why). KVAB_SHIPPED_BIN: use that binary instead."""
    explicit = os.environ.get("KVAB_SHIPPED_BIN")
    if explicit:
        assert Path(explicit).is_file(), f"KVAB_SHIPPED_BIN={explicit} does not exist"
        return explicit
    profile = os.environ.get("KVAB_SHIPPED_PROFILE", "sidecar")
    subprocess.run(["cargo", "build", "--quiet", "--profile", profile, "-p", "kvab", "--bin", "kvab"],
                   cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / profile / "kvab")


@pytest.fixture
def shipped(shipped_kvab_bin, tmp_path):
    from kvablocal.sidecar import Sidecar

    started = []

    def start(config: str = STATIC) -> Sidecar:
        s = Sidecar(config, workdir=tmp_path, binary=shipped_kvab_bin)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Sends raw bytes on a new connection and returns the first answer: its head and, by its
    content-length, its body (b"" when the server closes without answering, or sends nothing within
    `timeout` seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        answer = b""
        try:
            conn.sendall(data)
            while True:
                head, sep, body = answer.partition(b"\r\n\r\n")
                if sep:
                    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                    if len(body) >= (int(length.group(1)) if length else 0):
                        return answer
                chunk = conn.recv(65536)
                if not chunk:
                    return answer
                answer += chunk
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            return answer


def healthz(port: int, timeout: float = PROBE_TIMEOUT_S) -> bytes:
    return exchange(port, b"GET /healthz HTTP/1.1\r\nhost: kvab\r\nconnection: close\r\n\r\n", timeout)


def assert_alive(kvab, what: str) -> None:
    assert kvab.proc.poll() is None, f"kvab serve exited ({kvab.proc.returncode}) after {what}:\n{kvab.log()}"
    answer = healthz(kvab.port)
    assert answer.startswith(b"HTTP/1.1 200"), f"/healthz after {what}: {answer[:200]!r}"


def metric(kvab, name: str) -> float:
    text = kvab.get("/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# Each request line form (RFC 9112 §3.2) and things that are not HTTP/1.1 at all, with the status each
# must get (None: the server may answer any 4xx or close the connection, but must go on).
FORMS = [
    ("origin", b"GET /healthz HTTP/1.1\r\nhost: kvab\r\n\r\n", b"HTTP/1.1 200"),
    ("absolute", b"GET http://kvab:18090/healthz HTTP/1.1\r\nhost: kvab\r\n\r\n", b"HTTP/1.1 200"),
    ("absolute, no path", b"GET http://kvab:18090 HTTP/1.1\r\nhost: kvab\r\n\r\n", b"HTTP/1.1 404"),
    ("authority", b"GET a:1 HTTP/1.1\r\nhost: a\r\n\r\n", b"HTTP/1.1 400"),
    ("authority, CONNECT", b"CONNECT kvab:18090 HTTP/1.1\r\nhost: kvab:18090\r\n\r\n", b"HTTP/1.1 400"),
    ("asterisk", b"GET * HTTP/1.1\r\nhost: kvab\r\n\r\n", b"HTTP/1.1 400"),
    ("asterisk, OPTIONS", b"OPTIONS * HTTP/1.1\r\nhost: kvab\r\n\r\n", b"HTTP/1.1 204"),
    ("empty target", b"GET  HTTP/1.1\r\nhost: kvab\r\n\r\n", None),
    ("empty line", b"\r\n\r\n", None),
    ("no version", b"GET /healthz\r\n\r\n", None),
    ("over-long target", b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nhost: kvab\r\n\r\n", None),
    ("non-ASCII target", "GET /h\u00e9alth\u2603 HTTP/1.1\r\nhost: kvab\r\n\r\n".encode(), None),
    ("raw high bytes", b"GET /\xff\xfe\x00\x80 HTTP/1.1\r\nhost: kvab\r\n\r\n", None),
    ("lower-case method", b"get /healthz HTTP/1.1\r\nhost: kvab\r\n\r\n", None),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"), None),
    ("TLS ClientHello", bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\x00\x00\x02\x13\x01\x01\x00", None),
    ("HTTP/0.9", b"GET /healthz\r\n", None),
    ("unknown version", b"GET /healthz HTTP/9.9\r\nhost: kvab\r\n\r\n", None),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nhost kvab\r\n\r\n", None),
    ("control bytes in a header", b"GET /healthz HTTP/1.1\r\nhost: k\x01\x7fvab\r\n\r\n", None),
]


def test_every_request_line_form_is_answered_and_the_server_goes_on(shipped):
    kvab = shipped()
    assert "panic = \"abort\"" not in kvab.log(), "the shipped profile must unwind"
    for name, data, status in FORMS:
        answer = exchange(kvab.port, data)
        if status is not None:
            assert answer.startswith(status), f"{name}: {answer[:300]!r}"
        else:
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), f"{name}: {answer[:300]!r}"
        if answer.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in answer:
            assert b'"code":' in answer, f"{name}: a 400 from kvab names its code: {answer[:300]!r}"
        assert_alive(kvab, name)
    assert metric(kvab, "kvab_http_panics_total") == 0


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random damage to a valid request: bytes flipped, inserted, deleted, cut, or sliced in."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(data) + 1) if data else 0
        if kind == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 2:
            del data[at:at + rng.randint(1, 16)]
        elif kind == 3:
            data = data[:at]
        elif kind == 4:
            data[at:at] = rng.choice([b"\r\n", b" ", b":", b"*", b"a:1", b"\x00", b"%", b"?", b"#", b"//", b"\r\n\r\n",
                                      b"transfer-encoding: chunked\r\n", b"content-length: -1\r\n", b"http://"])
        else:
            data[at:at] = rng.choice(BASES)
    return bytes(data)


BASES = [
    b"GET /healthz HTTP/1.1\r\nhost: kvab\r\n\r\n",
    b"GET /v1/endpoints HTTP/1.1\r\nhost: kvab\r\nif-none-match: \"x\"\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nhost: kvab\r\n\r\n",
    b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"GET http://kvab/readyz?x=1 HTTP/1.1\r\nhost: kvab\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nhost: kvab\r\n\r\n",
]


def test_thousands_of_generated_malformed_requests_never_stop_the_server(shipped):
    kvab = shipped()
    rng = random.Random(26)
    batches, per_batch = 12, 250
    answered = 0

    def send(data: bytes) -> None:
        nonlocal answered
        try:
            if exchange(kvab.port, data, timeout=1):
                answered += 1
        except OSError:
            pass

    for batch in range(batches):
        requests = [mutate(rng, rng.choice(BASES)) for _ in range(per_batch)]
        threads = [threading.Thread(target=send, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert_alive(kvab, f"batch {batch} of generated requests")
    assert answered > batches * per_batch // 2, f"only {answered} of {batches * per_batch} got an answer"
    assert metric(kvab, "kvab_http_panics_total") == 0


def test_probes_are_answered_while_chatty_clients_hold_every_connection(shipped):
    """1,024 keep-alive clients that each send a request every 5 s (never idle past the 10 s header timeout)
    and reconnect when closed: the probes are answered within their timeout on the probe port and on the
    API port (the longest-idle connection makes room) for 12 s."""
    health_port = free_port()
    kvab = shipped(f'health_listen = "127.0.0.1:{health_port}"\n' + STATIC)
    request = b"GET /healthz HTTP/1.1\r\nhost: kvab\r\n\r\n"
    stop = threading.Event()
    held = [0]

    def chatter(count: int) -> None:
        conns: list[socket.socket | None] = [None] * count
        while not stop.is_set():
            for i in range(count):
                try:
                    if conns[i] is None:
                        conns[i] = socket.create_connection(("127.0.0.1", kvab.port), timeout=5)
                    conns[i].sendall(request)
                    conns[i].recv(65536)
                except OSError:
                    if conns[i] is not None:
                        conns[i].close()
                    conns[i] = None
            held[0] = sum(c is not None for c in conns)
            stop.wait(5)
        for c in conns:
            if c is not None:
                c.close()

    chatters = [threading.Thread(target=chatter, args=(MAX_CONNECTIONS // 8,)) for _ in range(8)]
    for t in chatters:
        t.start()
    try:
        # Wait until the clients hold the cap, then probe as kubelet does, on both ports, for 12 s.
        deadline = time.monotonic() + 30
        while held[0] * 8 < MAX_CONNECTIONS * 0.9 and time.monotonic() < deadline:
            stop.wait(0.2)
        started = time.monotonic()
        probes = 0
        while time.monotonic() - started < 12:
            for port, name in ((health_port, "probe port"), (kvab.port, "API port")):
                began = time.monotonic()
                answer = healthz(port)
                took = time.monotonic() - began
                assert answer.startswith(b"HTTP/1.1 200"), f"{name}: {answer[:200]!r} after {took:.1f} s"
                assert took < PROBE_TIMEOUT_S, f"{name}: {took:.1f} s"
                probes += 1
            readyz = exchange(health_port, b"GET /readyz HTTP/1.1\r\nhost: kvab\r\n\r\n", PROBE_TIMEOUT_S)
            assert readyz.startswith(b"HTTP/1.1 200"), readyz[:200]
            stop.wait(1)
        assert probes >= 12
    finally:
        stop.set()
        for t in chatters:
            t.join()
    assert kvab.proc.poll() is None
    # The API port made room by closing idle connections; the probe port only serves probes.
    assert metric(kvab, 'kvab_http_connections_evicted_total{listener="api"}') >= 1
    other = exchange(health_port, b"GET /v1/endpoints HTTP/1.1\r\nhost: kvab\r\n\r\n")
    assert other.startswith(b"HTTP/1.1 404") and b"probe port" in other, other[:300]
