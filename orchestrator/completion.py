"""Shell completion: the values m2d's options and arguments complete to.

``m2d completion bash|zsh|fish`` prints the script for a shell (click's completion, which
asks ``m2d`` itself at each TAB); the callbacks here give it cluster profile names and run
names. They read only folder listings - no YAML, no MLflow, no Ray - so a TAB is instant.
"""

from __future__ import annotations

from collections.abc import Callable

import click
from click.shell_completion import CompletionItem

from orchestrator import profiles, runs


def cluster_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """The profiles of the clusters folder (``--clusters-dir`` if given on the line)."""
    try:
        folder = profiles.clusters_dir(ctx.find_root().params.get("clusters_dir"))
    except Exception:  # a folder that is not there completes to nothing
        return []
    names = (path.stem for path in profiles.profile_paths(folder))
    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def run_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """The runs this machine's registry knows, newest first."""
    folder = runs.registry_dir()
    if not folder.is_dir():
        return []
    found = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime, reverse=True)
    return [CompletionItem(p.stem) for p in found if p.stem.startswith(incomplete)]


def cluster_option(**options) -> Callable:
    """``--cluster NAME`` (the ``cluster_name`` parameter), completing profile names; help
    "Profile name in clusters/." unless ``options`` say otherwise."""
    options.setdefault("help", "Profile name in clusters/.")
    return click.option("--cluster", "cluster_name", shell_complete=cluster_names, **options)
