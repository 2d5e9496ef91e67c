"""Loopback ports and a small HTTP client that can send repeated and raw header values."""

import http.client
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status: int, headers: list, body: bytes):
        self.status = status
        self.header_list = [(k.lower(), v) for k, v in headers]
        self.body = body

    def header(self, name: str):
        """First value of a response header, or None."""
        for k, v in self.header_list:
            if k == name:
                return v
        return None

    def json(self):
        import json

        return json.loads(self.body)


def request(port: int, method: str = "GET", path: str = "/", headers=(), body: bytes = b"", timeout: float = 10.0) -> Response:
    """Sends one request to 127.0.0.1:port. `headers` is a sequence of (name, value) pairs, values
    str or bytes, sent exactly as given (repeats allowed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls `predicate` until it returns a truthy value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the thing polled may not be up yet
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last_error})")
