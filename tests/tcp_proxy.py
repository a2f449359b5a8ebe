"""A TCP proxy that can turn into a black hole: connections are accepted and nothing is
answered (a tracking server that hangs), then forwarding again."""

from __future__ import annotations

import contextlib
import socket
import threading


class SwitchProxy:
    """``with SwitchProxy(port) as proxy:`` forwards 127.0.0.1:``proxy.port`` to
    127.0.0.1:``port``; ``proxy.blackhole = True`` stops answering, on new and open
    connections alike, until it is set back to False.

    What a client sends into the black hole is lost, as on a network that drops it: the
    server never sees it, and the connection it came on is closed once the hole ends (its
    client has given up by then). Holding such bytes and forwarding them later would
    replay requests their clients abandoned, all at once - no real outage does that.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.blackhole = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = False

    def __enter__(self) -> SwitchProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.blackhole:  # accepted, never answered
            self._swallow(client)
            _close(client)
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.blackhole:
                    self._swallow(source)  # this and what follows never arrive
                    break
                target.sendall(data)
        _close(source)
        _close(target)

    def _swallow(self, source: socket.socket) -> None:
        """Read and drop what ``source`` sends until the hole ends or it hangs up."""
        source.settimeout(0.1)
        while self.blackhole and not self.closed:
            try:
                if not source.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
