"""A local proxy arm: a small HTTP/1.1 server standing in for vllm-p2p-proxy / vllm-fs-proxy.

It answers every request with JSON naming the arm and echoing the request headers, so tests can
see what the gateway forwarded, and marks its responses with `x-served-by`.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvab-local-arm"

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        arm = self.server.arm_name
        self.server.count_request(self.command, self.path)
        body = json.dumps(
            {
                "arm": arm,
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", arm)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class ArmServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.arm_name = name
        self._lock = threading.Lock()
        self.requests = 0

    def handle_error(self, request, client_address):
        # A client (Envoy) closing a kept-alive connection is routine, not an error to print.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def count_request(self, method, path):
        with self._lock:
            self.requests += 1

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> "ArmServer":
        threading.Thread(target=self.serve_forever, name=f"arm-{self.arm_name}", daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


def main():
    ap = argparse.ArgumentParser(description="local proxy arm")
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    server = ArmServer(args.name, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
