"""Test helpers for `m2d` as a user types it: one command in a subprocess, and waits on a
run's state as `m2d status` reports it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]


def local_env(**extra: str) -> dict[str, str]:
    """This shell's environment, plus ``extra``, for a command whose job must start its own
    local Ray rather than join the cluster a ``RAY_ADDRESS`` of this shell names."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(extra)
    return env


def run_m2d(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`m2d ARGS` from the repository root with exactly ``env``; output captured."""
    return subprocess.run(
        [*M2D, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def status_state(env: dict[str, str], name: str) -> str:
    """The ``state:`` line of `m2d status NAME` ('' when it has none)."""
    status = run_m2d(env, "status", name)
    for line in status.stdout.splitlines():
        if line.startswith("state:"):
            return line.split(":", 1)[1].strip()
    return ""


def wait_state(env: dict[str, str], name: str, wanted: set[str], timeout: float = 420) -> str:
    """Poll `m2d status NAME` until its state is one of ``wanted``; that state."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = status_state(env, name)
        if state in wanted:
            return state
        time.sleep(2)
    raise AssertionError(f"run {name} stayed {state!r}, wanted {wanted}")


def register_run(name: str, run_dir: str, **fields) -> object:
    """Put a local pretrain run that a test's job wrote in ``run_dir`` into the registry
    (as `m2d launch` would), so that `m2d` commands take it by name; its record."""
    from orchestrator.runs import RunRecord

    record = RunRecord(
        name=name,
        cluster="local",
        stage="pretrain",
        run_dir=run_dir,
        config_uri=f"{run_dir}/run_config.json",
        kind="local",
        **fields,
    )
    record.save()
    return record
