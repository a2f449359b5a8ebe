"""Local processes that jobs and the launcher keep track of by pid, and the loopback
ports they listen on."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "pid_alive", "port_in_use", "process_alive", "process_start"]


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


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux's /proc; None where
    there is no /proc or no such process). With the pid, it names one process: a pid
    the kernel hands out again belongs to a process that started later."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether the process that had ``pid`` when it started at ``start`` (from
    ``process_start``) still runs: not the pid alone, which a later process may have been
    given. ``start`` None (a record from before starts were kept): the pid alone."""
    if not pid_alive(pid):
        return False
    return start is None or process_start(pid) in (start, None)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (Linux's /proc; elsewhere: no)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# Below Linux's ephemeral range (32768-60999, where every bind to port 0 and every
# outgoing connection takes its port) and above Ray's worker ports (10002-19999).
_QUIET_PORTS = (20000, 32767)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds now, drawn at random from a range the
    OS hands to no one by itself: a port it picked (bind to port 0) is the one it hands
    out next to other processes' connections and servers - on a busy machine (a Ray
    cluster starting its processes) taken again before the caller binds it. Whoever
    binds it next may still race another process for it."""
    import random

    for _ in range(100):
        port = random.randint(*_QUIET_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port``: a server started there would
    fail after its start-up, or a user would reach another one. (With SO_REUSEADDR, as
    servers bind: the closed connections of a server stopped a moment ago, in TIME_WAIT,
    do not count.)"""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False
