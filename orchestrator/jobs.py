"""The CLI's one way to a job that runs here: build the job's typed spec from the
command's options, run ``python -m MODULE --spec JSON`` with this Python (so the
orchestrator never imports the trainer or torch), sort what it prints into its log and the
console (``orchestrator.console``), and exit with its exit status (``infra.job_entry``: 2 for
a user error, which the job has said in one line)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError

from infra.config import StorageConfig, TrackingConfig
from infra.job_entry import EXIT_FAILURE, spec_argv
from infra.job_specs import EvalSpec
from orchestrator import runs
from orchestrator.cli import UserError, verbose
from orchestrator.console import JobConsole
from orchestrator.runs import m2d_home

__all__ = [
    "EVAL_JOB",
    "eval_spec",
    "make_spec",
    "object_store",
    "parse_size",
    "run_here",
    "spec_options",
]

#: The eval job's module: ``m2d eval`` runs it, ``m2d sample-batch --eval`` chains it.
EVAL_JOB = "sampler.eval_job"

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
        message = error["msg"].removeprefix("Value error, ")
        if not field:  # a check across fields: its message names them
            raise UserError(message) from None
        option = (options or {}).get(field) or "--" + field.replace("_", "-")
        raise UserError(f"{option}: {message}") from None


def run_here(module: str, spec: BaseModel) -> None:
    """Run the job ``module`` on ``spec`` here, in the foreground. Everything it prints goes
    to a log file (``$M2D_HOME/logs/``, named on the console once it holds more than the
    console shows); the console gets the job's data (stdout), m2d's messages and progress
    (``orchestrator.console``; ``m2d -v``: every line). A failure exits with the job's own
    exit status. Ctrl-C reaches the job too (the terminal signals both); its exit is
    waited for."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    log_path = job_log_dir() / f"{module.rsplit('.', 1)[-1]}-{stamp}-{os.getpid()}.log"
    console = JobConsole(log_path, verbose=verbose(), name_log_when_hiding=True)
    process = subprocess.Popen(
        [sys.executable, "-m", module, *spec_argv(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        code = console.relay(process)
    except KeyboardInterrupt:
        code = process.wait()
    console.close()
    if code == EXIT_FAILURE:
        console.say(f"the job failed; its traceback is in {log_path}")
    if code:
        raise click.exceptions.Exit(code)


def job_log_dir() -> Path:
    """Where the logs of the jobs the CLI runs here go: ``$M2D_HOME/logs``."""
    return m2d_home() / "logs"


def spec_options(
    spec_type: type[BaseModel], *fields: str, optional: tuple[str, ...] = ()
) -> Callable[[Callable], Callable]:
    """Click options ``--field-name`` for ``fields`` of a job's spec, declared once there:
    help from the field's description, its default (shown), required when it has none
    (unless ``optional`` names it: a mode of the command that runs no job needs none)."""

    def apply(command: Callable) -> Callable:
        for field in reversed(fields):
            command = _spec_option(spec_type, field, field not in optional)(command)
        return command

    return apply


def _spec_option(
    spec_type: type[BaseModel], field: str, enforce: bool = True
) -> Callable[[Callable], Callable]:
    info = spec_type.model_fields[field]
    settings: dict[str, Any] = {"help": info.description}
    if info.is_required():
        settings["required"] = enforce
    elif info.default is None:  # the type of an optional value: int | None -> int
        settings["default"] = None
        kinds = [kind for kind in typing.get_args(info.annotation) if kind is not type(None)]
        settings["type"] = kinds[0] if len(kinds) == 1 else None
    elif isinstance(info.default, bool):  # a switch: --name (default off) or --name/--no-name
        name = "--" + field.replace("_", "-")
        if info.default:
            return click.option(f"{name}/--no-{name[2:]}", field, default=True, **settings)
        return click.option(name, field, is_flag=True, **settings)
    else:
        settings.update(default=info.default, show_default=True)
    if typing.get_origin(info.annotation) is typing.Literal:  # the choices, in the help too
        settings["type"] = click.Choice(typing.get_args(info.annotation))
    return click.option("--" + field.replace("_", "-"), **settings)


def object_store(root: str, endpoint_url: str | None) -> StorageConfig | None:
    """A job's store from ``--endpoint-url`` (declared once, as ``StorageConfig``'s field:
    ``spec_options(StorageConfig, "endpoint_url")``); None without one."""
    return StorageConfig(root=root, endpoint_url=endpoint_url) if endpoint_url else None


def parse_size(value: str | None) -> tuple[int | None, int | None]:
    """``HEIGHTxWIDTH`` as two ints (``None, None`` for no value)."""
    if value is None:
        return None, None
    match = _SIZE.match(value)
    if not match:
        raise click.BadParameter(f"{value!r}: give HEIGHTxWIDTH, e.g. 480x720")
    return int(match[1]), int(match[2])


def eval_spec(
    run, samples: str, num_actors: int | None, tracking: TrackingConfig | None, options: dict
) -> EvalSpec:
    """The eval job's spec from the resolved run and the command's options (also what
    ``m2d sample-batch --eval`` chains); ``tracking`` None logs nothing."""
    workers = run.workers
    path, reference, fvd_path = (options.pop(k) for k in ("encoder_path", "reference", "fvd_path"))
    if not path and ":" not in options["encoder"]:  # MODULE:FUNCTION may need no folder
        raise UserError("--encoder-path: give the encoder's folder (save_pretrained)")
    if reference and not fvd_path:
        raise UserError("--reference needs --fvd-path: the FVD features' model folder")
    return make_spec(
        EvalSpec,
        samples=runs.absolute(samples),
        encoder_path=runs.model_path(path, runs.BUILT_IN_ENCODERS) or "",
        reference=runs.absolute(reference),
        fvd_path=runs.model_path(fvd_path, runs.BUILT_IN_ENCODERS),
        num_actors=num_actors or workers.num_workers,
        cpus_per_actor=workers.cpus_per_worker,
        gpus_per_actor=workers.gpus_per_worker,
        storage=run.storage,
        tracking=tracking,
        **options,
    )
