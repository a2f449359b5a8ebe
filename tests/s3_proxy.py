"""A reverse proxy in front of the S3 API server that counts, per client process, the
bytes of every object it GETs: how tests measure what a rank or an actor reads. It can
also hold the requests on chosen keys, never forwarding them: an upload caught halfway;
and go down (every request answered by a dropped connection, as from a server that is
gone) from the first request on a chosen key until the test brings it back.

Everything runs on 127.0.0.1, so the client's TCP port names its process (psutil).
Requests are forwarded unchanged (moto does not check signatures against the host).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import psutil

# Per connection, not forwarded (RFC 9110 section 7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class CountingProxy:
    """``with CountingProxy(upstream) as proxy:`` - ``proxy.url`` is the endpoint to use,
    ``proxy.reads`` a Counter of GET body bytes by (pid, bucket/key)."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.reads: Counter[tuple[int, str]] = Counter()
        self.lock = threading.Lock()
        self.holds: Callable[[str], bool] = lambda key: False
        self.held = threading.Event()  # set once a request was held
        self.release = threading.Event()
        self.trips: Callable[[str], bool] = lambda key: False  # down at the first such key
        self.down = False
        self.refused: list[str] = []  # keys of the requests dropped while down
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def clear(self) -> None:
        with self.lock:
            self.reads.clear()

    def bytes_by_pid(self, prefix: str = "") -> dict[int, int]:
        """GET body bytes of keys under ``prefix`` ("bucket/path"), by reading process."""
        totals: Counter[int] = Counter()
        with self.lock:
            for (pid, key), size in self.reads.items():
                if key.startswith(prefix):
                    totals[pid] += size
        return dict(totals)

    def keys_read(self, prefix: str = "") -> set[str]:
        with self.lock:
            return {key for (_, key), size in self.reads.items() if key.startswith(prefix)}

    def record(self, pid: int, key: str, size: int) -> None:
        with self.lock:
            self.reads[pid, key] += size


def _key(path: str) -> str:
    """``bucket/key`` of a request path (query string dropped)."""
    return unquote(urlsplit(path).path).lstrip("/")


def _client_pid(address: tuple[str, int]) -> int:
    """The local process whose TCP socket is ``address`` (-1 if it is gone already)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and (conn.laddr.ip, conn.laddr.port) == address and conn.pid:
            return conn.pid
    return -1


def _handler(proxy: CountingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def setup(self) -> None:
            super().setup()
            self.pid = _client_pid(self.client_address[:2])

        def log_message(self, *args) -> None:  # quiet: the test reports what matters
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if not proxy.down and self.command in ("PUT", "POST") and proxy.trips(_key(self.path)):
                proxy.down, proxy.trips = True, lambda key: False  # once
            if proxy.down:
                with proxy.lock:
                    proxy.refused.append(_key(self.path))
                self.close_connection = True  # no answer: the client sees the line drop
                return
            if self.command in ("PUT", "POST") and proxy.holds(_key(self.path)):
                proxy.held.set()
                proxy.release.wait(timeout=600)
                self.send_error(503, "held by the test")
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response_only(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            if self.command == "GET" and response.status in (200, 206):
                proxy.record(self.pid, _key(self.path), len(data))

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler
