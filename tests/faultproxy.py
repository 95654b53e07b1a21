"""A fault-injecting reverse HTTP proxy for tests: 127.0.0.1 only, in front of one upstream (moto's S3
server, or a static file server), injecting 503/500 errors, connection resets, truncated bodies and delays
on a chosen share of requests, optionally only for some methods and paths, and counting what it did.

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.set_rules([Fault("503", share=0.15), Fault("reset", share=0.05, methods={"GET"})])
    ... point the client at proxy.url ...
    proxy.injected  # Counter({"503": 12, "reset": 3})
    proxy.stop()

Rules are tried in order for each request; the first one that matches (method, regex on path+query) and
fires (probability `share`, seeded, so a run is reproducible; `share=1.0` makes a permanent fault; at
most `limit` times when set) decides the fault; otherwise the request is forwarded unchanged. Kinds:
  "503"          answer 503 SlowDown (S3 XML error body) without forwarding;
  "500"          answer 500 InternalError without forwarding;
  "404"          answer 404 NoSuchKey without forwarding (a permanent "missing" object);
  "reset"        close the client connection with a TCP RST before forwarding (request not applied);
  "reset_after"  forward, then reset instead of answering (request applied, the response lost);
  "truncate"     forward, send the headers and half the body, then close (a body cut mid-stream);
  "delay"        sleep `delay_s`, then forward.
Bounded: the proxy stops by itself after `max_requests` requests or `lifetime_s` seconds, whichever is
first, and every socket has a timeout. Nothing but the upstream is ever contacted.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Optional
from urllib.parse import urlsplit

KINDS = ("503", "500", "404", "reset", "reset_after", "truncate", "delay")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_S3_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "404": (404, "NoSuchKey", "The specified key does not exist."),
}


@dataclass(frozen=True)
class Fault:
    """One injection rule: `kind` on a `share` of the requests matching `methods` and `path` (a regex
    searched in the request target, path + query); share 1.0 = every matching request (permanent)."""

    kind: str
    share: float = 1.0
    methods: Optional[frozenset[str]] = None
    path: Optional[str] = None
    delay_s: float = 0.5
    limit: Optional[int] = None  # fire at most this many times (None = no limit)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be within 0..1, got {self.share}")
        if self.methods is not None:
            object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))

    def matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass
class FaultProxy:
    """See the module docstring. `url` is valid after `start()`."""

    upstream: str
    seed: int = 0
    max_requests: int = 20_000
    lifetime_s: float = 600.0
    upstream_timeout_s: float = 30.0
    injected: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)  # by method, all requests seen
    log: list = field(default_factory=list)  # (method, target, fault or None), the last 1000
    _rules: list = field(default_factory=list)
    _fired: Counter = field(default_factory=Counter)  # per rule index, since set_rules
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Optional[ThreadingHTTPServer] = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        parts = urlsplit(self.upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream must be http://127.0.0.1:PORT, got {self.upstream!r}")
        self._upstream_host, self._upstream_port = parts.hostname, parts.port or 80

    # -- control ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_rules(self, rules: Iterable[Fault]) -> "FaultProxy":
        with self._lock:
            self._rules = list(rules)
            self._fired = Counter()
        return self

    def clear(self) -> "FaultProxy":
        """No faults from now on (counts are kept)."""
        return self.set_rules([])

    def total_injected(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def stop(self) -> None:
        if self._stopped.is_set() or self._server is None:
            return
        self._stopped.set()
        threading.Thread(target=self._shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, method: str, target: str) -> Optional[Fault]:
        with self._lock:
            self.requests[method] += 1
            fault = None
            for index, rule in enumerate(self._rules):
                if rule.limit is not None and self._fired[index] >= rule.limit:
                    continue
                if rule.matches(method, target) and (rule.share >= 1.0 or self._rng.random() < rule.share):
                    fault = rule
                    self._fired[index] += 1
                    self.injected[rule.kind] += 1
                    break
            self.log.append((method, target, None if fault is None else fault.kind))
            del self.log[:-1000]
            over = sum(self.requests.values()) >= self.max_requests
        if over:
            self.stop()
        return fault


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as SDK clients use it
    timeout = 60

    def log_message(self, *args) -> None:  # quiet: counts are in FaultProxy
        pass

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner.decide(self.command, self.path)
        kind = fault.kind if fault else None
        if kind in _S3_ERRORS:
            return self._error(*_S3_ERRORS[kind])
        if kind == "reset":
            return self._reset()
        if kind == "delay":
            time.sleep(fault.delay_s)
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError:
            return self._error(502, "BadGateway", "upstream unreachable")
        if kind == "reset_after":
            return self._reset()
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = _declared_length(headers) if self.command == "HEAD" else len(payload)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if kind == "truncate" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._reset()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        owner = self.owner
        connection = http.client.HTTPConnection(owner._upstream_host, owner._upstream_port,
                                                timeout=owner.upstream_timeout_s)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            return response.status, response.reason, response.getheaders(), payload
        finally:
            connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed load balancer would."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def _declared_length(headers: list[tuple[str, str]]) -> Optional[int]:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)
    return None
