"""A webhook receiver on 127.0.0.1 for tests: it keeps every JSON body posted to it, and
can answer 500 or not at all."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """``with Receiver() as hook:`` - ``hook.url``; ``hook.posts``: the bodies, in order;
    ``status``: what it answers; ``silent``: read the post and never answer."""

    def __init__(self, status: int = 200, silent: bool = False) -> None:
        self.posts: list[dict] = []
        self.status, self.silent = status, silent
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.posts.append(json.loads(self.rfile.read(length)))
                if receiver.silent:
                    receiver.released.wait(30)
                    return
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/SECRET-TOKEN"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
