"""Local processes that jobs and the launcher keep track of by pid, and the loopback
ports they listen on."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists on this host (signal 0 probes, sends
    nothing); someone else's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; whoever
    binds it next may still race another process for it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
