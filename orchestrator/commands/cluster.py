"""``m2d cluster``: list, show, validate cluster profiles and export their JSON schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from infra.config import STAGES, ClusterProfile
from infra.errors import ConfigError
from orchestrator import profiles
from orchestrator.completion import cluster_names
from orchestrator.output import print_json, print_table


def profile_schema() -> str:
    """The JSON schema of a cluster profile, as written to ``clusters/schema.json``."""
    schema = ClusterProfile.model_json_schema()
    schema["title"] = "m2d cluster profile"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _directory(ctx: click.Context) -> Path:
    return profiles.clusters_dir(ctx.find_root().obj["clusters_dir"])


def check(loaded: profiles.LoadedProfile) -> None:
    """Validate both stages of a profile; raises ConfigError naming file, line and key."""
    for stage in STAGES:
        profiles.resolve(loaded, stage, {})


@click.group()
def cluster() -> None:
    """List, show and validate cluster profiles (clusters/*.yaml)."""


@cluster.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Table of the profiles: name, workers, GPUs, Ray address, whether each is valid.

    --json: an array of objects with name, file, valid, problem (null when valid),
    num_workers, nodes, gpus_per_worker, gpu_type, ray_address and description (null
    where an invalid profile does not say).
    """
    from rich.table import Table

    rows = [_profile_row(path) for path in profiles.profile_paths(_directory(ctx))]
    if as_json:
        print_json(rows)
        return
    table = Table("cluster", "workers", "gpu", "ray", "status", "description")
    for row in rows:
        if not row["valid"]:
            table.add_row(row["name"], "", "", "", f"[red]invalid[/red]: {row['problem']}", "")
            continue
        gpus = row["gpus_per_worker"]
        gpu = f"{row['gpu_type'] or 'gpu'} x{row['num_workers']}" if gpus else "cpu"
        workers = f"{row['num_workers']} on {row['nodes']} node(s)"
        table.add_row(
            row["name"], workers, gpu, row["ray_address"], "[green]ok[/green]", row["description"]
        )
    print_table(table)


def _profile_row(path: Path) -> dict[str, Any]:
    """One profile as `m2d cluster list` shows it."""
    row: dict[str, Any] = {"name": path.stem, "file": str(path), "valid": True, "problem": None}
    fields = ("num_workers", "nodes", "gpus_per_worker", "gpu_type", "ray_address", "description")
    row.update(dict.fromkeys(fields))
    try:
        loaded = profiles.load_profile(path)
        check(loaded)
    except ConfigError as exc:
        return {**row, "valid": False, "problem": str(exc)}
    workers = loaded.profile.workers
    return {
        **row,
        "num_workers": workers.num_workers,
        "nodes": workers.nodes,
        "gpus_per_worker": workers.gpus_per_worker,
        "gpu_type": workers.gpu_type,
        "ray_address": loaded.profile.ray.address,
        "description": loaded.profile.description,
    }


@cluster.command()
@click.argument("name", shell_complete=cluster_names)
@click.pass_context
def show(ctx: click.Context, name: str) -> None:
    """Print profile NAME with its `extends:` chain merged and every default filled in."""
    loaded = profiles.load_profile(profiles.find_profile(name, _directory(ctx)))
    check(loaded)
    data = loaded.profile.model_dump(mode="json", exclude={"extends"})
    # Each stage as a launch resolves it: the stage's own defaults (SFT: extension_prob
    # 0.5), then what the profile sets - not the bare recipe model's defaults.
    data["stages"] = {
        stage: loaded.profile.recipe(stage).model_dump(mode="json") for stage in STAGES
    }
    click.echo(f"# {loaded.path}\n" + yaml.safe_dump(data, sort_keys=False), nl=False)


@cluster.command()
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def validate(ctx: click.Context, paths: tuple[Path, ...]) -> None:
    """Validate profile files (default: every profile in the clusters folder)."""
    targets = list(paths) or profiles.profile_paths(_directory(ctx))
    problems = []
    for path in targets:
        try:
            check(profiles.load_profile(path))
            click.echo(f"ok  {path}")
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        for problem in problems[:-1]:
            click.echo(f"Error: {problem}", err=True)
        raise ConfigError(problems[-1])


@cluster.command()
@click.option("--write", is_flag=True, help="Write clusters/schema.json instead of printing.")
@click.pass_context
def schema(ctx: click.Context, write: bool) -> None:
    """Print (or write) the JSON schema editors use to complete profile YAML."""
    text = profile_schema()
    if not write:
        click.echo(text, nl=False)
        return
    target = _directory(ctx) / profiles.SCHEMA_FILE
    target.write_text(text)
    click.echo(f"wrote {target}")
