"""The README's CLI tour runs as written (issue 29): its lines that need no run, no
service and no credentials - each line's optional parts (`[--json]`) both left out and
put in - run on a fresh machine with exit 0, through the installed `m2d`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
M2D = Path(sys.executable).with_name("m2d")

#: The tour's offline lines, as the README writes them (before their comments).
OFFLINE = [
    "m2d --help",
    "m2d cluster list [--json]",
    "m2d cluster show a100x64",
    "m2d cluster validate [PATH ...]",
    "m2d cluster schema [--write]",
    "m2d plan --cluster a100x64 --stage pretrain [--json]",
    "m2d launch --cluster a100x64 --stage pretrain --dry-run",
]


def _tour() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## CLI tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines()]


def _forms(line: str) -> list[list[str]]:
    """The command without its optional parts, and with each flag-only one put in."""
    bare = re.sub(r" \[[^\]]*\]", "", line).split()
    options = [o for o in re.findall(r"\[([^\]]*)\]", line) if o.startswith("--") and " " not in o]
    with_options = [*bare, *(o for o in options if o != "--write")]  # --write changes the repo
    return [bare] if with_options == bare else [bare, with_options]


@pytest.mark.parametrize("line", OFFLINE)
def test_an_offline_line_of_the_tour_runs_as_written(line, tmp_path):
    assert line in _tour(), f"the README's tour no longer holds {line!r}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env.update(M2D_HOME=str(tmp_path / "home"), AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    for argv in _forms(line):
        done = subprocess.run(
            [str(M2D), *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr
