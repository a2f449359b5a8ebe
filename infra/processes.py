"""Local processes that jobs and the launcher keep track of by pid, and the loopback
ports they listen on."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "pid_alive", "port_in_use"]


def pid_alive(pid: int) -> bool:
    """True while a process with this pid runs on this host (signal 0 probes, sends
    nothing); someone else's process counts as alive, an exited one that its parent has
    not reaped yet (a zombie: where the parent is gone, an init that does not reap keeps
    it for good) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (Linux's /proc; elsewhere: no)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; whoever
    binds it next may still race another process for it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on (or holds) ``host:port``: a server started
    there would fail after its start-up, or a user would reach another one."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False
