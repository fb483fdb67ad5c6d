"""A fault-injecting HTTP proxy between s3fs and the moto S3 server (tests/s3_fixture.py).

At a set rate, seeded, a request gets one of: 503 SlowDown, 500 InternalError, a reset connection (RST, no
response), or a slow response (forwarded after a delay). Failures are injected before the request reaches the
server, so the server's state only ever changes as a clean run would change it; a slow response is a real one.
`stats` counts requests and each fault kind, so tests can report the figures.
"""
from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("slowdown", "internal", "reset", "slow")
_BODIES = {"slowdown": (503, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                             b"<Message>Please reduce your request rate.</Message></Error>"),
           "internal": (500, b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                             b"<Message>We encountered an internal error. Please try again.</Message></Error>")}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    """`FaultProxy(upstream, rate, seed)`; `.endpoint` is what AWS_ENDPOINT_URL should name; `.stop()`."""

    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 0, slow_s: float = 0.3,
                 kinds: tuple[str, ...] = FAULTS):
        self.upstream = urlparse(upstream)
        self.rate, self.slow_s, self.kinds = rate, slow_s, kinds
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self.stats = {"requests": 0, **{k: 0 for k in FAULTS}}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as s3fs's connection pool expects

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)
            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def injected(self) -> int:
        return sum(self.stats[k] for k in FAULTS)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.stats[kind] += 1
            return kind

    def _body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._body(h)  # read whole first: a fault never leaves half a request on the connection
        kind = self._draw()
        if kind == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()  # RST: the client sees a reset connection
            return
        if kind in _BODIES:
            status, payload = _BODIES[kind]
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        if kind == "slow":
            time.sleep(self.slow_s)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            length = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
            h.send_header("Content-Length", length or "0")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()
