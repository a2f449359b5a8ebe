"""The CLI's one way to a job that runs here: build the job's typed spec from the
command's options, run ``python -m MODULE --spec JSON`` with this Python (so the
orchestrator never imports the trainer or torch), relay what it prints, and exit with its
exit status (``infra.jobs``: 2 for a user error, which the job has said in one line)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError

from infra.jobs import spec_argv
from orchestrator.cli import UserError

__all__ = ["make_spec", "parse_size", "run_job"]

SpecT = TypeVar("SpecT", bound=BaseModel)
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def make_spec(
    spec_type: type[SpecT], options: dict[str, str] | None = None, **values: Any
) -> SpecT:
    """``spec_type(**values)``; a value out of range is one line naming its option
    (``--field-name``, or ``options[field]`` where one option sets several fields)."""
    try:
        return spec_type(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        option = (options or {}).get(field) or "--" + field.replace("_", "-")
        raise UserError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None


def run_job(module: str, spec: BaseModel) -> None:
    """Run the job ``module`` on ``spec`` here, in the foreground: its stdout and stderr are
    relayed line by line as it prints them, and a failure exits with the job's own exit
    status. Ctrl-C reaches the job too (the terminal signals both); its exit is waited for."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *spec_argv(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    errors = threading.Thread(target=_relay, args=(process.stderr, True), daemon=True)
    errors.start()
    try:
        _relay(process.stdout, False)
        code = process.wait()
    except KeyboardInterrupt:
        code = process.wait()
    errors.join()
    if code:
        raise click.exceptions.Exit(code)


def _relay(stream, err: bool) -> None:
    for line in stream:
        click.echo(line, nl=False, err=err)


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """``HEIGHTxWIDTH`` as two ints (``None, None`` for no value)."""
    if value is None:
        return None, None
    match = _SIZE.match(value)
    if not match:
        raise click.BadParameter(f"{value!r}: give HEIGHTxWIDTH, e.g. 480x720")
    return int(match[1]), int(match[2])
