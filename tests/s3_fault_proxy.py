"""A flaky S3 for tests: an HTTP proxy on loopback in front of a real S3 API (moto's server) that
injects faults into a share of the requests, as S3 does under load or on a bad network.

::

    with FaultProxy(upstream="http://127.0.0.1:PORT", every=3, seed=0) as proxy:
        ...  # point the S3 client (--s3-endpoint) at proxy.url
    proxy.faults   # {(op, kind): count}, e.g. {("read", "reset_mid"): 4, ...}

Requests are sorted into operations: ``list`` (GET on a bucket), ``read`` (GET/HEAD of an object),
``write`` (PUT of an object), ``multipart`` (CreateMultipartUpload, UploadPart,
CompleteMultipartUpload, AbortMultipartUpload), ``delete`` (DELETE, POST ?delete) and ``other``.
Every ``every``-th request of an operation (counted per operation, from a seeded offset) gets a
fault; the kinds take turns (each operation cycles through those that apply to it):

- ``slowdown``: answered ``503 SlowDown`` with S3's XML error body; the request never reaches S3;
- ``reset_before``: the connection is reset (TCP RST) without an answer; the request never
  reaches S3;
- ``reset_mid``: (GET only: reads and listings) the request reaches S3, the answer's headers and
  half its body are sent, then the connection is reset;
- ``delay``: the request is held ``delay_s`` seconds, then forwarded normally.

A request that got a fault is let through on its next attempt (same method, path and query), so
a client that retries at all gets through; which attempt is faulted, and how often, is what the
client's retry logic must survive. Not a general proxy: HTTP/1.1, Content-Length or chunked
request bodies, one upstream.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KINDS = ("slowdown", "reset_before", "reset_mid", "delay")
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>faultproxy</HostId></Error>"
)


def operation(method: str, target: str) -> str:
    """The S3 operation class of a request: list, read, write, multipart, delete or other."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    has_key = "/" in parts.path.strip("/")
    if "uploads" in query or "uploadId" in query:
        return "multipart"
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "delete"
    if method in ("GET", "HEAD") and has_key:
        return "read"
    if method == "GET":
        return "list"
    if method == "PUT" and has_key:
        return "write"
    return "other"


class FaultProxy:
    """The proxy; a context manager that serves on ``127.0.0.1`` (``url``) in a thread."""

    def __init__(self, upstream: str, every: int = 3, seed: int = 0, delay_s: float = 0.5):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.every, self.delay_s = every, delay_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.seen: Counter = Counter()  # requests per operation
        self.offset: dict[str, int] = {}  # seeded phase of the faults per operation
        self.turn: Counter = Counter()  # faults per operation so far (whose kind is next)
        self.faulted: set[tuple[str, str]] = set()  # (method, target) whose last try had one
        self.faults: Counter = Counter()  # (op, kind) -> injected faults
        self.requests: Counter = Counter()  # op -> requests seen
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, target: str) -> tuple[str, str | None]:
        """``(operation, fault kind or None)`` for one request; thread-safe."""
        op = operation(method, target)
        with self.lock:
            self.requests[op] += 1
            if (method, target) in self.faulted:  # its retry goes through
                self.faulted.discard((method, target))
                return op, None
            if op not in self.offset:
                self.offset[op] = self.rng.randrange(self.every)
            n = self.seen[op]
            self.seen[op] += 1
            if op == "other" or n % self.every != self.offset[op]:
                return op, None
            kinds = KINDS if method == "GET" else ("slowdown", "reset_before", "delay")
            kind = kinds[self.turn[op] % len(kinds)]
            self.turn[op] += 1
            self.faults[op, kind] += 1
            if kind != "delay":
                self.faulted.add((method, target))
            return op, kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks."""
                self.wfile.flush()
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True

            def _serve(self) -> None:
                body = self._body()
                op, kind = proxy.decide(self.command, self.path)
                if kind == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN_BODY)
                    return
                if kind == "reset_before":
                    self._reset()
                    return
                if kind == "delay":
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection")}  # fmt: skip
                if self.command not in ("GET", "HEAD", "DELETE") or body:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, out_headers = resp.status, resp.reason, resp.getheaders()
                finally:
                    conn.close()
                self.send_response_only(status, reason)
                for k, v in out_headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = len(data) if self.command != "HEAD" else _length(out_headers)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if kind == "reset_mid":
                    self.wfile.write(data[: len(data) // 2])
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


def _length(headers) -> str:
    return next((v for k, v in headers if k.lower() == "content-length"), "0")
