"""``m2d stack up|down|status``: the local stack behind the ``localstack`` profile.

An MLflow server, an S3 API server and a Ray head (``--nodes 2``: and a second Ray node)
on this machine's loopback, at the addresses the profile names; pid files and logs in
``$M2D_HOME/stack``. See ``orchestrator.stack``.
"""

from __future__ import annotations

from pathlib import Path

import click

from orchestrator import profiles, runs
from orchestrator.cli import UserError
from orchestrator.completion import cluster_option
from orchestrator.stack import PROFILE, Stack, read_state, write_state


def stack_dir() -> Path:
    return runs.m2d_home() / "stack"


def _stack(ctx: click.Context, cluster_name: str) -> Stack:
    directory = profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])
    loaded = profiles.load_profile(profiles.find_profile(cluster_name, directory))
    return Stack(loaded.profile, stack_dir(), cluster_name)


def _recorded(ctx: click.Context) -> Stack:
    """The stack ``up`` started, with the profile it was started for."""
    return _stack(ctx, read_state(stack_dir()).get("cluster", PROFILE))


@click.group()
def stack() -> None:
    """Run the localstack profile's services (Ray, MLflow, S3) on this machine."""


@stack.command()
@cluster_option(default=PROFILE, show_default=True, help="Profile it serves.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(1, 8), help="Ray nodes.")
@click.option(
    "--cpus-per-node",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="CPUs each Ray node offers.",
)
@click.pass_context
def up(ctx: click.Context, cluster_name: str, nodes: int, cpus_per_node: int) -> None:
    """Start the services that are not running yet (each waited for until it answers)."""
    recorded = read_state(stack_dir()).get("cluster")
    if recorded and recorded != cluster_name and _recorded(ctx).running():
        raise UserError(
            f"the stack in {stack_dir()} runs for profile {recorded!r}; run `m2d stack down` "
            f"before starting it for {cluster_name!r}"
        )
    found = _stack(ctx, cluster_name)
    write_state(stack_dir(), {**read_state(stack_dir()), "cluster": cluster_name})
    found.up(nodes, cpus_per_node, click.echo)
    if read_state(stack_dir()).get("multi_node"):
        click.echo(
            "ray: multi-node mode - Ray binds its gRPC servers to all interfaces (it binds "
            "loopback only for one node at 127.0.0.1); every connection needs the token"
        )
    storage = found.profile.storage
    click.echo(f"stack up: `m2d launch --cluster {cluster_name} --stage pretrain` uses it")
    if storage.credentials_file:
        click.echo(
            f"data for it: AWS_SHARED_CREDENTIALS_FILE={storage.credentials_file} m2d data "
            f"synth --out s3://{found.bucket}/data/synth --endpoint-url {storage.endpoint_url}"
        )


@stack.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop every service of the stack (the S3 server's buckets are saved first)."""
    found = _recorded(ctx)
    if not found.running():
        click.echo(f"stack: nothing running ({stack_dir()})")
        return
    found.down(click.echo)


@stack.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Which services of the stack run, and where their logs are."""
    found = _recorded(ctx)
    for name, state, log in found.status():
        click.echo(f"{name:<11} {state:<22} {log}")
