"""Test helpers for Ray: the processes of a job's local Ray session (found with psutil, for
the tests that read their sockets or wait for them to end), and waits on a Ray cluster's
jobs that say why when they run out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

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


def stop_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """End a service or job started with ``start_new_session``: SIGTERM to its process
    group, SIGKILL to the group if it has not exited after ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cluster_report(address: str) -> str:
    """What holds a Ray cluster's resources: its unfinished jobs, its live actors that
    need resources and its placement groups (for the message of a wait that ran out)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_placement_groups

    jobs = [
        f"{job.submission_id or job.job_id} {job.status.value}"
        for job in JobSubmissionClient(address).list_jobs()
        if not job.status.is_terminal()
    ]
    # Actors that hold what a job needs: Ray Train's PlacementGroupCleaner outlives its job
    # for a while holding only a sliver of the head's `node:` label, which blocks nothing.
    actors = [
        f"{actor.class_name} {actor.state} {actor.required_resources}"
        for actor in list_actors(address=address, detail=True, raise_on_missing_output=False)
        if actor.state != "DEAD"
        and any(not key.startswith("node:") for key in actor.required_resources or {})
    ]
    groups = [
        f"{group.placement_group_id[:8]} {group.state}"
        for group in list_placement_groups(address=address, raise_on_missing_output=False)
        if group.state != "REMOVED"
    ]
    return f"jobs: {jobs}; actors: {actors}; placement groups: {groups}"


def cluster_busy(address: str) -> bool:
    """Whether any job, resource-holding actor or placement group is still on the cluster."""
    return cluster_report(address) != "jobs: []; actors: []; placement groups: []"


def wait_job(address: str, job_id: str, timeout: float) -> str:
    """Wait for a Ray job to end and return its status; when ``timeout`` runs out, fail
    with the job's log tail and what holds the cluster (a job pending for resources and
    a job stuck inside look the same from its status alone)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {status.value} after {timeout:.0f}s;"
                f" {cluster_report(address)}\n--- job log ---\n"
                + client.get_job_logs(job_id)[-4000:]
            )
        time.sleep(1)
    return status.value
