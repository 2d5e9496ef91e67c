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

    @property
    def headers(self) -> dict:
        """Lowercase name → first value."""
        out = {}
        for k, v in self.header_list:
            out.setdefault(k, v)
        return out

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"

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
    """Sends one request to 127.0.0.1:port. `headers` is a dict or a sequence of (name, value)
    pairs, values str or bytes, sent exactly as given (repeats allowed)."""
    if isinstance(headers, dict):
        headers = list(headers.items())
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


class Timeout(AssertionError):
    pass


def wait_until(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    """Polls `predicate` until it returns a truthy value or `timeout` seconds pass; returns the value.
    Connection errors count as "not yet" (the thing polled may be starting or restarting)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, http.client.HTTPException) as e:
            last = e
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)
