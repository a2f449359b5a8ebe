"""Running a job module here, as the CLI's data commands do: ``python -m MODULE ARGS`` with
this Python, so the orchestrator never imports the trainer (or torch)."""

from __future__ import annotations

import subprocess
import sys

import click

from orchestrator.cli import UserError

__all__ = ["run_job"]


def run_job(module: str, args: list[str]) -> None:
    """Run ``python -m MODULE ARGS``; echo its output, and turn a failure into one line."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False
    )
    if result.stdout:
        click.echo(result.stdout, nl=False)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        message = lines[-1].removeprefix("Error: ") if lines else f"{module} failed"
        raise UserError(message)
