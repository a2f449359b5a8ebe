"""``m2d data``: synthesize a small dataset and inspect manifests.

The work runs in ``trainer.data`` job modules started as subprocesses with this Python:
the orchestrator never imports the trainer (or torch), so the CLI stays instant.
"""

from __future__ import annotations

import click

from orchestrator.commands.data_filter import filter_
from orchestrator.commands.data_precompute import precompute
from orchestrator.jobs import run_job


@click.group()
def data() -> None:
    """Synthesize and inspect training data."""


@data.command()
@click.option("--out", required=True, help="Output folder or s3:// URI.")
@click.option("--stories", default=12, show_default=True, help="Stories (shot groups).")
@click.option("--scenes", default=3, show_default=True, help="Scenes per training story.")
@click.option("--shots", type=int, default=None, help="Shots per story [default: scenes + 1].")
@click.option("--frames", default=17, show_default=True, help="Frames per shot.")
@click.option("--size", default="32x32", show_default=True, help="HEIGHTxWIDTH of the videos.")
@click.option("--fps", default=8.0, show_default=True, help="Frames per second.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same dataset.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// output.")
def synth(out, stories, scenes, shots, frames, size, fps, seed, endpoint_url) -> None:
    """Write mp4 stories with recurring characters plus pretrain.jsonl and sft.jsonl."""
    args = ["--out", out, "--stories", str(stories), "--scenes", str(scenes)]
    args += ["--frames", str(frames), "--size", size, "--fps", str(fps), "--seed", str(seed)]
    if shots is not None:
        args += ["--shots", str(shots)]
    if endpoint_url:
        args += ["--endpoint-url", endpoint_url]
    run_job("trainer.data.synth", args)


@data.command()
@click.argument("manifest")
@click.option("--scenes", type=int, default=None, help="Read as SFT shot groups of N scenes.")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths.")
def inspect(manifest, scenes, endpoint_url) -> None:
    """Count the usable rows (or SFT groups) of MANIFEST and the skipped ones by reason."""
    args = [manifest]
    if scenes is not None:
        args += ["--scenes", str(scenes)]
    if endpoint_url:
        args += ["--endpoint-url", endpoint_url]
    run_job("trainer.data.manifest", args)


data.add_command(filter_)
data.add_command(precompute)
