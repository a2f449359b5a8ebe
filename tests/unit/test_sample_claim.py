"""One sample-batch job at a time per local output folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from infra.errors import DataError
from sampler.job import LOCK_FILE, claim_output


def _exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_claim_is_held_while_the_job_runs_and_released_after(tmp_path):
    out = tmp_path / "out"
    with claim_output(str(out)):
        held = (out / LOCK_FILE).read_text()
        refused = pytest.raises(DataError, match=r"another sample-batch job .* is writing there")
        with refused, claim_output(str(out)):
            pass
        assert (out / LOCK_FILE).read_text() == held  # the refused job left it alone
    assert not (out / LOCK_FILE).exists()


def test_a_live_job_on_this_host_is_named_in_the_refusal(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(f"{socket.gethostname()} {sleeper.pid}")
        with pytest.raises(DataError) as refused, claim_output(str(tmp_path)):
            pass
        assert f"pid {sleeper.pid}" in str(refused.value)
        assert str(tmp_path / LOCK_FILE) in str(refused.value)  # how to clear it by hand
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_claim_of_a_killed_job_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"{socket.gethostname()} {_exited_pid()}")
    with claim_output(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_claim_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"not-{socket.gethostname()} {_exited_pid()}")
    with pytest.raises(DataError, match="host not-"), claim_output(str(tmp_path)):
        pass


def test_object_store_outputs_are_not_claimed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with claim_output("s3://bucket/samples"):
        pass
    assert list(tmp_path.iterdir()) == []
