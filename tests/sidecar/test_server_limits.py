"""`kvab serve` as a server on a shared network: idle and slow clients are closed on time, memory
stays bounded while they wait, HTTP/2 is not spoken, and malformed headers get a 4xx."""

from __future__ import annotations

import socket
import threading
import time

from test_http import STATIC

# serve/src/server.rs: HEADER_READ_TIMEOUT and BODY_READ_TIMEOUT.
HEADER_TIMEOUT_S = 10
BODY_TIMEOUT_S = 10


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `within` seconds."""
    conn.settimeout(within)
    try:
        while conn.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_thousand_idle_and_half_sent_connections_are_closed_within_the_header_timeout(sidecar):
    kvab = sidecar(STATIC)
    before = rss_kib(kvab.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", kvab.port)) for _ in range(800)]
    # Half-sent headers, 1.3 KB each, never finished.
    partial = []
    for _ in range(200):
        conn = socket.create_connection(("127.0.0.1", kvab.port))
        conn.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\nx-padding: " + b"a" * 1300)
        partial.append(conn)
    opened = time.monotonic()
    time.sleep(1)
    # Still serving while they wait.
    assert kvab.get("/healthz").status == 200
    during = rss_kib(kvab.proc.pid)
    results = []

    def watch(conn):
        results.append(closed_by_server(conn, HEADER_TIMEOUT_S + 5 - (time.monotonic() - opened)))

    threads = [threading.Thread(target=watch, args=(c,)) for c in idle + partial]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - opened
    for conn in idle + partial:
        conn.close()
    assert results.count(True) == 1000, f"{results.count(False)} connections still open after {elapsed:.1f} s"
    assert elapsed < HEADER_TIMEOUT_S + 5
    # 1,000 waiting connections cost little: under 32 MiB more than before they came.
    assert during - before < 32 * 1024, (before, during)


def test_a_keep_alive_connection_idle_past_the_timeout_is_closed(sidecar):
    kvab = sidecar(STATIC)
    conn = socket.create_connection(("127.0.0.1", kvab.port))
    conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: kvab\r\n\r\n")
    conn.settimeout(5)
    assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert closed_by_server(conn, HEADER_TIMEOUT_S + 5)
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
    conn.close()


def test_a_report_body_trickling_in_is_answered_408_within_the_body_timeout(sidecar):
    kvab = sidecar(STATIC)
    conn = socket.create_connection(("127.0.0.1", kvab.port))
    conn.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
    started = time.monotonic()
    conn.settimeout(0.5)
    answer = b""
    while time.monotonic() - started < BODY_TIMEOUT_S + 5 and not answer:
        try:
            conn.sendall(b" ")
            answer = conn.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    conn.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"body_timeout"' in answer
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5


def test_http2_is_not_spoken(sidecar):
    kvab = sidecar(STATIC)
    with socket.create_connection(("127.0.0.1", kvab.port), timeout=5) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        answer = conn.recv(65536)
    # An HTTP/2 server would answer with a SETTINGS frame (type 4); HTTP/1.1 refuses the preface.
    assert not (len(answer) >= 9 and answer[3] == 4), answer[:40]
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:80]


def test_a_report_with_a_non_ascii_header_gets_400_naming_it(sidecar):
    kvab = sidecar(STATIC)
    for header in (b"authorization: Bearer \xff\xfe", b"content-type: application/json\xff"):
        with socket.create_connection(("127.0.0.1", kvab.port), timeout=5) as conn:
            conn.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: kvab\r\n" + header + b"\r\ncontent-length: 2\r\n\r\n{}")
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"code":"invalid_header"' in answer
        name = header.split(b":")[0]
        assert b"the " + name + b" header" in answer
