"""The ``m2d`` command: one click group whose subcommands load on first use.

Each subcommand lives in ``orchestrator.commands.<module>`` and is imported only when
invoked (click's "lazy loading" pattern), so ``m2d --help`` never pays for torch, Ray or
DeepSpeed. Register a new command by adding one line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import click

from infra.errors import M2DError, environment_problem

# name -> "module:attribute" of a click command or group.
COMMANDS = {
    "checkpoints": (
        "orchestrator.commands.checkpoints:checkpoints",
        "A run's checkpoints and whether each is complete.",
    ),
    "completion": (
        "orchestrator.commands.completion:completion",
        "Print the shell completion script (bash, zsh, fish).",
    ),
    "cluster": (
        "orchestrator.commands.cluster:cluster",
        "List, show and validate cluster profiles.",
    ),
    "dashboard": ("orchestrator.commands.dashboard:dashboard", "Open the MLflow UI."),
    "eval": ("orchestrator.commands.eval:eval_", "Score sampled stories (consistency metrics)."),
    "export": ("orchestrator.commands.export:export", "Export a checkpoint for diffusers."),
    "launch": ("orchestrator.commands.launch:launch", "Launch a training stage on a cluster."),
    "data": ("orchestrator.commands.data:data", "Synthesize and inspect training data."),
    "logs": ("orchestrator.commands.status:logs", "Print (or follow) a run's output."),
    "plan": ("orchestrator.commands.plan:plan", "Memory per GPU, step time and cost of a stage."),
    "relaunch": (
        "orchestrator.commands.launch:relaunch",
        "Start a new run like an earlier one.",
    ),
    "runs": ("orchestrator.commands.status:runs_", "Table of recent runs."),
    "sample-batch": (
        "orchestrator.commands.sample:sample_batch",
        "Render evaluation videos from checkpoints.",
    ),
    "stack": (
        "orchestrator.commands.stack:stack",
        "Run the localstack services (Ray, MLflow, S3) here.",
    ),
    "status": ("orchestrator.commands.status:status", "State of a run."),
    "stop": ("orchestrator.commands.status:stop", "Stop a run (checkpoints stay)."),
}


def set_option(example: str) -> Callable[[Callable], Callable]:
    """``--set KEY.PATH=VALUE`` (repeatable): one resolved key of the profile + stage."""
    return click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY.PATH=VALUE",
        help=f"Override one resolved key, e.g. {example}.",
    )


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit status 2, no traceback."""

    exit_code = 2


class LazyGroup(click.Group):
    """A click group whose subcommands are imported by name on first use."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = self.lazy_commands[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the registry, so `m2d --help` imports no command module.
        rows = [(name, self.lazy_commands[name][1]) for name in sorted(self.lazy_commands)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except M2DError as exc:
            raise UserError(str(exc)) from None
        except Exception as exc:  # an object store or a path that is not right here
            if problem := environment_problem(exc):
                raise UserError(problem) from None
            raise


@click.group(cls=LazyGroup, lazy_commands=COMMANDS)
@click.option(
    "--clusters-dir",
    envvar="M2D_CLUSTERS_DIR",
    type=click.Path(file_okay=False),
    help="Folder of cluster profiles (default: ./clusters, else the repository's).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    envvar="M2D_VERBOSE",
    help="Show everything a job prints (Ray's and DeepSpeed's lines too), not only m2d's.",
)
@click.version_option(package_name="m2d")
@click.pass_context
def cli(ctx: click.Context, clusters_dir: str | None, verbose: bool) -> None:
    """m2d: train and sample Mask²DiT multi-scene video models on Ray + DeepSpeed clusters."""
    ctx.obj = {"clusters_dir": clusters_dir, "verbose": verbose}
    # m2d names its MLflow runs itself; MLflow would also print them on stdout, the data.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not verbose:  # MLflow's own INFO lines (e.g. creating a new store's tables)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def verbose() -> bool:
    """Whether ``m2d -v`` asked for every line of a job on the console."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and (root.obj or {}).get("verbose"))


def main() -> None:
    """Console-script entry point."""
    cli()
