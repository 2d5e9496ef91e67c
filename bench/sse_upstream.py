"""The upstream of the streamed-response bench: server-sent events in lock step with the client.

A request carrying `x-bench-stream: ID` gets the response headers at once, then `events` events,
one HTTP/1.1 chunk each, then the last chunk; before each event (and the end) the server waits
until the client reading the gateway's answer under that ID has received everything sent so far
(`Lockstep`). So every event reaches the gateway alone, however slowly the gateway runs (under
valgrind it is 50 times slower): the gateway handles exactly one body chunk per event, which a
fixed gap between writes could not promise. Without the header it answers a small JSON body in one
piece. Runs as threads in the bench's own process, off the gateway's core; every socket has
TCP_NODELAY, or each small write would wait for the gateway's delayed ACK.
"""

import socket
import socketserver
import threading

STREAM_HEADER = "x-bench-stream"
ONE_PIECE = b'{"id":"bench","object":"chat.completion","choices":[{"message":{"content":"ok"}}]}'
EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
         b'"choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n')
DONE = b"data: [DONE]\n\n"
WAIT_S = 120


class Lockstep:
    """One semaphore per stream ID: the client releases it once per thing received, the server
    takes it before sending the next."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 0
        self._gates = {}

    def open(self) -> str:
        with self._lock:
            self._next += 1
            key = str(self._next)
            self._gates[key] = threading.Semaphore(0)
        return key

    def received(self, key: str):
        self._gates[key].release()

    def wait(self, key: str):
        if not self._gates[key].acquire(timeout=WAIT_S):
            raise TimeoutError(f"stream {key}: the client received nothing for {WAIT_S} s")

    def close(self, key: str):
        with self._lock:
            self._gates.pop(key, None)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Handler(socketserver.StreamRequestHandler):
    def setup(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def handle(self):
        while True:  # keep-alive: one request after another on the gateway's connection
            line = self.rfile.readline()
            if not line:
                return
            headers = {}
            while (h := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            self.rfile.read(int(headers.get("content-length", "0")))
            key = headers.get(STREAM_HEADER)
            if key is None:
                self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(ONE_PIECE), ONE_PIECE))
                continue
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
            for i in range(self.server.events):
                self.server.lockstep.wait(key)
                self.wfile.write(chunk(DONE if i == self.server.events - 1 else EVENT))
            self.server.lockstep.wait(key)
            self.wfile.write(b"0\r\n\r\n")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SseUpstream:
    """Same interface as filterbench.Envoy for the parts `Stack` uses (port, start, wait_ready, stop)."""

    name = "sse-upstream"

    def __init__(self, port: int, events: int):
        self.port, self.events = port, events
        self.lockstep = Lockstep()
        self._server = None

    def start(self):
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.events, self._server.lockstep = self.events, self.lockstep
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def wait_ready(self, timeout: float):
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()


class StreamClient:
    """One keep-alive connection to a gateway, reading each streamed answer in lock step with the
    upstream; counts the chunks the gateway forwarded (Envoy writes each body chunk it handled as
    one HTTP/1.1 chunk, so this is the number of chunks its filters saw)."""

    def __init__(self, port: int, upstream: SseUpstream, body: bytes, headers: dict):
        self.upstream, self.body, self.headers = upstream, body, headers
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def close(self):
        self.reader.close()
        self.sock.close()

    def stream(self) -> int:
        """One streamed request; returns the number of body chunks it arrived in."""
        key = self.upstream.lockstep.open()
        try:
            extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            self.sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{STREAM_HEADER}: {key}\r\n{extra}"
                              f"content-type: application/json\r\ncontent-length: {len(self.body)}\r\n\r\n".encode()
                              + self.body)
            status = self.reader.readline()
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"status {status!r}")
            while self.reader.readline() not in (b"\r\n", b""):
                pass
            self.upstream.lockstep.received(key)  # the headers
            chunks, events, data = 0, 0, b""
            while True:
                size = int(self.reader.readline().split(b";")[0], 16)
                if size == 0:
                    self.reader.readline()
                    break
                data += self.reader.read(size)
                self.reader.readline()
                chunks += 1
                while b"\n\n" in data:
                    _, data = data.split(b"\n\n", 1)
                    events += 1
                    self.upstream.lockstep.received(key)
            if events != self.upstream.events:
                raise RuntimeError(f"{events} events, {self.upstream.events} sent")
            return chunks
        finally:
            self.upstream.lockstep.close(key)
