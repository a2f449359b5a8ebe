"""The fast tier holds what it promises: a test that starts a server or a distributed job
without the `integration` mark is refused (tests/conftest.py, by the rules of tests/tiers.py)
at collection or when it starts the process, and the suite never writes into the user's
own M2D_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from tiers import leftover_state, service_command, unmarked_service_tests

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    ("argv", "found"),
    [
        ([str(BIN / "ray"), "start", "--head"], "ray"),
        (["mlflow", "server"], "mlflow"),
        ([str(BIN / "moto_server"), "-p", "9000"], "moto_server"),
        ("torchrun --nproc-per-node 2 train.py", "torchrun"),
        ([sys.executable, "-m", "torch.distributed.run", "x.py"], "-m torch.distributed.run"),
        ([sys.executable, "-m", "mlflow", "server"], "-m mlflow"),
        ([sys.executable, "-m", "ray.util.client.server"], "-m ray.util.client.server"),
        ([sys.executable, "-c", "pass"], None),
        ([sys.executable, "-m", "datajobs.synth", "--spec", "{}"], None),
        ([sys.executable, "-m", "raylike"], None),
        ([""], None),
    ],
)
def test_service_commands_are_recognised(argv, found):
    assert service_command(argv) == found


def _item(nodeid: str, fixtures: list[str], marked: bool) -> SimpleNamespace:
    marker = object() if marked else None
    return SimpleNamespace(
        nodeid=nodeid, fixturenames=fixtures, get_closest_marker=lambda name: marker
    )


def test_collection_names_unmarked_tests_of_services_and_of_the_integration_folder():
    items = [
        _item("tests/unit/test_a.py::uses_s3", ["tmp_path", "s3_endpoint"], marked=False),
        _item("tests/unit/test_a.py::marked", ["mlflow_server"], marked=True),
        _item("tests/integration/test_b.py::plain", ["tmp_path"], marked=False),
        _item("tests/unit/test_a.py::pure", ["tmp_path"], marked=False),
    ]
    assert unmarked_service_tests(items) == [
        "tests/unit/test_a.py::uses_s3",
        "tests/integration/test_b.py::plain",
    ]


def test_an_unmarked_test_cannot_start_a_server():
    with pytest.raises(pytest.fail.Exception, match="started mlflow: mark it `integration`"):
        subprocess.Popen([str(BIN / "mlflow"), "--version"])
    # ... while any other process starts as usual
    assert subprocess.run([sys.executable, "-c", "pass"], check=True).returncode == 0


def test_a_process_group_left_behind_is_found(tmp_path):
    group = "a torch.distributed process group"
    assert group not in leftover_state()
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        assert group in leftover_state()
    finally:
        dist.destroy_process_group()
    assert group not in leftover_state()


def test_the_suite_runs_with_a_temporary_m2d_home():
    home = Path(os.environ["M2D_HOME"])
    user_home = Path.home() / ".m2d"
    assert home != user_home and user_home not in home.parents


def test_writing_into_the_users_home_fails_the_suite(tmp_path):
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    env = {**os.environ, "M2D_HOME": str(user_home), "M2D_TIERS_PROBE": str(user_home)}
    probe = f"{__file__}::test_probe_writes_into_the_users_home"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", probe],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert f"the tests wrote into the user's {user_home}: logs, logs/stray.log" in done.stderr


@pytest.mark.skipif("M2D_TIERS_PROBE" not in os.environ, reason="run by the test above only")
def test_probe_writes_into_the_users_home():
    logs = Path(os.environ["M2D_TIERS_PROBE"]) / "logs"
    logs.mkdir()
    (logs / "stray.log").write_text("a job's log where the user keeps theirs")
