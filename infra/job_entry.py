"""One entry for every ``python -m ...`` job: a typed spec in, an honest exit status out.

    python -m MODULE --spec JSON|FILE

The CLI writes the job's spec (a pydantic model, one per job) as JSON; the job module's
``main`` is ``job_main(ItsSpec, body)``, which

- turns SIGTERM (``m2d stop``, Ray's job stop) into ``SystemExit(143)`` from the start,
  so cleanup handlers and ``finally`` blocks run;
- reads and validates the spec: one that does not validate is one line naming the field,
  exit status 2;
- maps an ``M2DError`` (a mistake the user can fix) to one line ``error: ...`` on stderr
  and exit status 2, Ctrl-C to ``stopped`` and 130, anything else to exit status 1 with
  its traceback on stderr, the job's log.

Callers decide from the exit status alone; none reads the job's stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from infra.errors import ConfigError, M2DError

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USER_ERROR", "job_main", "spec_argv"]

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # the shell's status for a program ended by SIGINT
SpecT = TypeVar("SpecT", bound=BaseModel)


def spec_argv(spec: BaseModel) -> list[str]:
    """The job's command-line arguments for ``spec``."""
    return ["--spec", spec.model_dump_json()]


def job_main(
    spec_type: type[SpecT],
    body: Callable[[SpecT], int | None],
    argv: list[str] | None = None,
) -> int:
    """Run ``body(spec)`` as a job entry point; the process's exit status (``None`` from
    ``body`` is success)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # m2d names its MLflow runs itself; MLflow would also print them on stdout, the data.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        spec = _read_spec(spec_type, sys.argv[1:] if argv is None else argv)
        return body(spec) or 0
    except M2DError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C: the cleanup ran on the way out
        print("stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE


def _read_spec(spec_type: type[SpecT], argv: list[str]) -> SpecT:
    if len(argv) != 2 or argv[0] != "--spec":
        raise ConfigError(f"usage: --spec JSON|FILE (a {spec_type.__name__}), got {argv}")
    value = argv[1]
    try:
        text = value if value.lstrip().startswith("{") else Path(value).read_text()
    except OSError as exc:
        raise ConfigError(f"--spec {value}: cannot read it ({exc.strerror})") from None
    try:
        return spec_type.model_validate_json(text)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join([spec_type.__name__, *(str(part) for part in error["loc"])])
        raise ConfigError(f"{where}: {error['msg']}") from None
