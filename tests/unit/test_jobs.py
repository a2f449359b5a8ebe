"""Every job's entry (``infra.job_entry.job_main``): a bad spec or a user error is exit status 2
with one line, an internal error exit status 1 with its traceback, SIGTERM a clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from infra.errors import DataError
from infra.job_entry import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USER_ERROR, job_main

ROOT = Path(__file__).resolve().parents[2]
# Every job module: each takes a spec.
JOB_MODULES = [
    "datajobs.synth",
    "datajobs.inspect_manifest",
    "datajobs.filter",
    "datajobs.precompute",
    "trainer.export",
    "trainer.job",
    "sampler.job",
]


class Spec(BaseModel):
    name: str


@pytest.mark.parametrize("module", JOB_MODULES)
@pytest.mark.parametrize("spec", ['{"no_such_key": 1}', "[]", "/nonexistent/spec.json"])
def test_a_bad_spec_is_one_line_and_exit_2(module, spec):
    result = subprocess.run(
        [sys.executable, "-m", module, "--spec", spec], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""


def test_no_spec_is_a_usage_line():
    result = subprocess.run(
        [sys.executable, "-m", "datajobs.synth", "--out", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.startswith("error: usage: --spec JSON|FILE (a SynthSpec)")


def test_user_error_is_one_line_internal_error_a_traceback(capsys):
    def refuse(spec: Spec) -> None:
        raise DataError(f"{spec.name}: not found; fix the path")

    def crash(spec: Spec) -> None:
        raise RuntimeError("a bug")

    argv = ["--spec", json.dumps({"name": "m.jsonl"})]
    assert job_main(Spec, refuse, argv) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: m.jsonl: not found; fix the path\n"
    assert job_main(Spec, crash, argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "RuntimeError: a bug" in err
    assert job_main(Spec, lambda spec: None, argv) == 0

    def interrupted(spec: Spec) -> None:
        raise KeyboardInterrupt

    assert job_main(Spec, interrupted, argv) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "stopped\n"


def test_a_spec_file_is_read(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "from-file"}))
    seen = []
    assert job_main(Spec, lambda spec: seen.append(spec.name), ["--spec", str(path)]) == 0
    assert seen == ["from-file"]


SIGTERM_JOB = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pydantic import BaseModel
    from infra.job_entry import job_main

    class Spec(BaseModel):
        marks: str

    def body(spec):
        marks = Path(spec.marks)
        try:
            (marks / "started").touch()
            time.sleep(60)
        finally:
            (marks / "cleaned").touch()

    sys.exit(job_main(Spec, body))
    """
)


def test_sigterm_stops_the_job_through_its_cleanup(tmp_path):
    spec = json.dumps({"marks": str(tmp_path)})
    job = subprocess.Popen([sys.executable, "-c", SIGTERM_JOB, "--spec", spec], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == 128 + signal.SIGTERM
    assert (tmp_path / "cleaned").exists()


def test_spec_options_make_switches_of_boolean_fields():
    """A field that defaults to False is a flag (`--overwrite`); one that defaults to True
    is a pair (`--tracking/--no-tracking`); neither takes a value."""
    import click
    from click.testing import CliRunner
    from pydantic import BaseModel

    from orchestrator.jobs import spec_options

    class Switches(BaseModel):
        overwrite: bool = False
        tracking: bool = True

    @click.command()
    @spec_options(Switches, "overwrite", "tracking")
    def command(overwrite: bool, tracking: bool) -> None:
        click.echo(f"{overwrite} {tracking}")

    runner = CliRunner()
    assert runner.invoke(command, []).output == "False True\n"
    assert runner.invoke(command, ["--overwrite", "--no-tracking"]).output == "True False\n"
    assert runner.invoke(command, ["--overwrite", "yes"]).exit_code == 2  # no value taken
