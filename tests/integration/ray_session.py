"""The processes of a job's local Ray session, found with psutil (shared by the tests that
read their sockets or wait for them to end)."""

from __future__ import annotations

import contextlib

import psutil


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def ray_session(job: psutil.Process) -> list[psutil.Process]:
    """The job and every process of its Ray session: its descendants (with address
    "local" the driver starts GCS and raylet, the raylet the workers and agents), plus
    any process that names the session directory (one that outlived its parent)."""
    found = {job.pid: job}
    found.update((process.pid, process) for process in job.children(recursive=True))
    flags = ("--session_dir=", "--session-dir=")
    dirs = {
        arg.split("=", 1)[1] for p in found.values() for arg in _cmdline(p) if arg.startswith(flags)
    }
    assert dirs, "no process of the job names its Ray session directory"
    for process in psutil.process_iter():
        if any(arg.split("=", 1)[-1] in dirs for arg in _cmdline(process)):
            found.setdefault(process.pid, process)
    return list(found.values())


def wait_gone(processes: list[psutil.Process], timeout: float = 60.0) -> list[psutil.Process]:
    """Wait until ``processes`` have exited; kill those left after ``timeout``, and return
    them."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    return alive
