"""``m2d data``: synthesize a small dataset, find shots, import a clip list, inspect manifests.

The work runs in ``trainer.data`` job modules started as subprocesses with this Python:
the orchestrator never imports the trainer (or torch), so the CLI stays instant.
"""

from __future__ import annotations

import click

from infra.config import StorageConfig
from infra.job_specs import ImportSpec, InspectSpec, ShotsSpec, SynthSpec
from orchestrator.commands.data_filter import filter_
from orchestrator.commands.data_precompute import precompute
from orchestrator.jobs import make_spec, object_store, parse_size, run_here, spec_options


@click.group()
def data() -> None:
    """Synthesize, import and inspect training data."""


@data.command()
@spec_options(SynthSpec, "out", "world", "stories", "scenes", "shots", "frames")
@click.option("--size", default=None, help="HEIGHTxWIDTH of the videos (default 32x32; toy 16x16).")
@spec_options(SynthSpec, "held_out", "fps", "seed")
@spec_options(StorageConfig, "endpoint_url")
def synth(size: str | None, endpoint_url: str | None, **options) -> None:
    """Write mp4 stories plus pretrain.jsonl and sft.jsonl (and, for the toy world, the
    held-out evaluation stories: eval.jsonl and eval_extend.jsonl)."""
    height, width = parse_size(size)
    sizes = {"height": "--size", "width": "--size"}
    storage = object_store(options["out"], endpoint_url)
    spec = make_spec(SynthSpec, sizes, height=height, width=width, storage=storage, **options)
    run_here("datajobs.synth", spec)


@data.command()
@click.argument("manifest")
@spec_options(InspectSpec, "scenes", "check")
@spec_options(StorageConfig, "endpoint_url")
def inspect(manifest: str, endpoint_url: str | None, **options) -> None:
    """Count the usable rows (or SFT groups) of MANIFEST and the skipped ones by reason."""
    storage = object_store(manifest, endpoint_url)
    spec = make_spec(InspectSpec, manifest=manifest, storage=storage, **options)
    run_here("datajobs.inspect_manifest", spec)


@data.command("import")
@click.argument("clips")
@spec_options(ImportSpec, "out", "videos", "suffix", "concurrency")
@spec_options(StorageConfig, "endpoint_url")
def import_(clips: str, endpoint_url: str | None, **options) -> None:
    """Turn a captioned clip list (Panda-70M's layout: videoID, timestamp, caption) into a
    pre-training manifest; missing or unreadable videos are counted, not fatal."""
    storage = object_store(clips, endpoint_url)
    spec = make_spec(ImportSpec, clips=clips, storage=storage, **options)
    run_here("datajobs.import_clips", spec)


@data.command()
@click.argument("videos", nargs=-1, required=True)
@spec_options(ShotsSpec, "out", "detector", "threshold", "verify", "min_shot", "max_shot")
@spec_options(ShotsSpec, "num_actors")
@spec_options(StorageConfig, "endpoint_url")
def shots(videos: tuple[str, ...], endpoint_url: str | None, **options) -> None:
    """Find the shots of VIDEOS (files, folders or s3:// prefixes) with PySceneDetect and
    write one manifest row per shot; a rerun of a killed job resumes it."""
    storage = object_store(options["out"], endpoint_url)
    spec = make_spec(ShotsSpec, videos=list(videos), storage=storage, **options)
    run_here("datajobs.shots", spec)


data.add_command(filter_)
data.add_command(precompute)
