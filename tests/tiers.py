"""The test tiers' rules, shared by tests/conftest.py and the tests of those rules: what
makes a test `integration` (a server, a Ray or DeepSpeed process, distributed state)."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

#: Fixtures that start a server or a distributed job: a test using one is `integration`.
SERVICE_FIXTURES = frozenset(
    {"s3_endpoint", "s3_bucket", "mlflow_server", "ray_head_session", "ray_head"}
    | {"synth_data", "s3_pretrain"}  # tests/integration/conftest.py: jobs and the above
)
#: Programs that are a server or a distributed process, by executable or `-m` module.
SERVICE_PROGRAMS = ("ray", "mlflow", "moto_server", "deepspeed", "torchrun", "chromium")
SERVICE_MODULES = ("ray", "mlflow", "moto", "deepspeed", "torch.distributed.run")


def unmarked_service_tests(items) -> list[str]:
    """The tests that use a service fixture, or live in tests/integration/, unmarked."""
    return [
        item.nodeid
        for item in items
        if item.get_closest_marker("integration") is None
        and (SERVICE_FIXTURES & set(item.fixturenames) or "/integration/" in item.nodeid)
    ]


def service_command(args) -> str | None:
    """What in a command line starts a server or a distributed process, or None."""
    argv = [args] if isinstance(args, (str, bytes)) else list(args)
    argv = [os.fsdecode(arg) for arg in argv]
    program = Path(argv[0].split()[0]).name if argv and argv[0].strip() else ""
    if program in SERVICE_PROGRAMS:
        return program
    for flag, value in itertools.pairwise(argv):
        if flag == "-m" and any(value == m or value.startswith(f"{m}.") for m in SERVICE_MODULES):
            return f"-m {value}"
    return None


def leftover_state() -> list[str]:
    """What distributed state this process holds: an initialized Ray, a process group."""
    left = []
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        left.append("an initialized Ray")
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        left.append("a torch.distributed process group")
    return left
