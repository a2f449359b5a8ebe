"""Shell completion (issue 29 point 7): `m2d completion bash|zsh|fish` prints the script,
and a TAB completes commands, stages, cluster profiles and run names - asked of click's
completion directly, and once through a real bash with the printed script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.shell_completion import ShellComplete
from click.testing import CliRunner

from orchestrator.cli import cli

M2D = Path(sys.executable).with_name("m2d")


@pytest.fixture(autouse=True)
def world(tmp_path, monkeypatch):
    """Two profiles and two recorded runs (``second`` the newer), nothing else."""
    clusters = tmp_path / "clusters"
    clusters.mkdir()
    for name in ("alpha", "alpine"):
        (clusters / f"{name}.yaml").write_text("extends: local\n")
    registry = tmp_path / "home" / "runs"
    registry.mkdir(parents=True)
    for age, name in ((200, "first-run"), (100, "second-run")):
        (registry / f"{name}.json").write_text("{}")
        stamp = time.time() - age
        os.utime(registry / f"{name}.json", (stamp, stamp))
    monkeypatch.setenv("M2D_CLUSTERS_DIR", str(clusters))
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    return tmp_path


def _complete(args: list[str], incomplete: str) -> list[str]:
    found = ShellComplete(cli, {}, "m2d", "_M2D_COMPLETE").get_completions(args, incomplete)
    return [item.value for item in found]


@pytest.mark.parametrize(
    ("args", "incomplete", "expected"),
    [
        ([], "sta", ["stack", "status"]),
        (["launch", "--cluster"], "alp", ["alpha", "alpine"]),
        (["launch", "--cluster"], "alpi", ["alpine"]),
        (["launch", "--cluster", "alpha", "--stage"], "", ["pretrain", "sft"]),
        (["plan", "--cluster"], "", ["alpha", "alpine"]),
        (["cluster", "show"], "", ["alpha", "alpine"]),
        (["status"], "", ["second-run", "first-run"]),  # newest first
        (["logs"], "f", ["first-run"]),
        (["launch", "--resume"], "", ["second-run", "first-run"]),
        (["launch", "--cluster", "alpha", "--stage", "sft", "--from"], "sec", ["second-run"]),
        (["checkpoints"], "", ["second-run", "first-run"]),
        (["completion"], "", ["bash", "zsh", "fish"]),
    ],
)
def test_a_tab_completes_what_the_position_takes(args, incomplete, expected):
    assert _complete(args, incomplete) == expected


def test_a_clusters_dir_on_the_line_is_where_profiles_complete_from(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "beta.yaml").write_text("extends: local\n")
    assert _complete(["--clusters-dir", str(other), "plan", "--cluster"], "") == ["beta"]
    assert _complete(["--clusters-dir", str(tmp_path / "nowhere"), "plan", "--cluster"], "") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_the_script_of_each_shell(shell):
    done = CliRunner().invoke(cli, ["completion", shell])
    assert done.exit_code == 0, done.output
    assert "_M2D_COMPLETE" in done.stdout and done.stdout.endswith("\n")
    unknown = CliRunner().invoke(cli, ["completion", "tcsh"])
    assert unknown.exit_code == 2 and "'tcsh' is not one of" in unknown.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_run_names_with_the_printed_script():
    """The script as a user sources it, then a TAB after `m2d status `."""
    script = CliRunner().invoke(cli, ["completion", "bash"]).stdout
    line = 'COMP_WORDS=(m2d status ""); COMP_CWORD=2; _m2d_completion m2d; echo "${COMPREPLY[*]}"'
    env = {**os.environ, "PATH": f"{M2D.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", f"{script}\n{line}"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["second-run", "first-run"]
