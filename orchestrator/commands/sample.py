"""``m2d sample-batch``: render evaluation stories from checkpoints with a Ray Data job.

The command resolves the cluster profile, the checkpoints (``RUN``, ``RUN:STEP`` or a
folder/URI) and the options into a ``SampleJobSpec`` and runs ``python -m sampler.job``:
in the foreground for a ``local`` profile, through the Ray Jobs API otherwise. It never
imports the sampler (or torch), so it starts at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
from pydantic import ValidationError

from infra.config import RunConfig
from infra.errors import ConfigError
from infra.job_specs import CheckpointSpec, EvalSpec, SampleJobSpec
from infra.storage import is_remote
from orchestrator import runs, submit
from orchestrator.cli import UserError, set_option
from orchestrator.completion import cluster_option
from orchestrator.jobs import EVAL_JOB, eval_spec, parse_size, spec_options

JOB_MODULE = "sampler.job"


FVD_OPTIONS = ("reference", "fvd_features", "fvd_path")
LATEST = {"latest-pretrain": "pretrain", "latest-sft": "sft"}


def resolve_checkpoint(reference: str, cluster: str = "") -> CheckpointSpec:
    """``RUN`` (its latest checkpoint), ``RUN:STEP``, ``latest-sft``/``latest-pretrain``
    (the newest finished run of that stage on ``cluster``) or a checkpoint folder/URI."""
    name, _, step = reference.partition(":") if not is_remote(reference) else (reference, "", "")
    if name in LATEST and not runs.has_record(name):
        name = _latest_run(cluster, LATEST[name])
    if runs.has_record(name):
        record = runs.load_record(name)
        uri = _run_checkpoint(record, step) if step else runs.latest_checkpoint(record)
        label = f"{name}-{uri.rstrip('/').rsplit('/', 1)[-1].replace('checkpoint_', 'step')}"
        return CheckpointSpec(uri=uri, label=label, run=name)
    if not is_remote(reference) and not Path(reference).expanduser().exists():
        raise ConfigError(
            f"--checkpoint {reference}: no run or folder of that name; `m2d runs` lists runs, "
            "or give a checkpoint folder path or s3:// URI"
        )
    uri = reference if is_remote(reference) else str(Path(reference).expanduser().resolve())
    return CheckpointSpec(uri=uri, label=_folder_label(uri))


def _latest_run(cluster: str, stage: str) -> str:
    record = runs.latest_finished(cluster, stage)
    if record is None:
        raise ConfigError(
            f"no finished {stage} run of cluster {cluster!r}; `m2d runs` lists runs, or give "
            "--checkpoint RUN[:STEP] or a folder"
        )
    return record.name


def _run_checkpoint(record: runs.RunRecord, step: str) -> str:
    if not step.isdigit():
        raise ConfigError(f"--checkpoint {record.name}:{step}: STEP must be a step number")
    return runs.checkpoint_at(record, int(step))


def _folder_label(uri: str) -> str:
    """``parent-name`` of the folder (a checkpoint_N alone would clash across runs)."""
    parts = [p for p in uri.rstrip("/").split("/") if p][-2:]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def parse_seeds(value: str) -> list[int]:
    try:
        return [int(seed) for seed in value.split(",") if seed.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give integers separated by commas, e.g. 0,1"
        ) from None


def build_spec(run: RunConfig, references: tuple[str, ...], options: dict) -> SampleJobSpec:
    """The job spec from the profile's resolved SFT run and the command's options."""
    height, width = parse_size(options.pop("size"))
    out, prompts = options.pop("out"), options.pop("prompts")
    checkpoints = [resolve_checkpoint(reference, run.cluster) for reference in references]
    labels = [c.label for c in checkpoints]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--checkpoint given twice: {labels}")
    workers = run.workers
    return SampleJobSpec(
        cluster=run.cluster,
        checkpoints=checkpoints,
        prompts=prompts if prompts == "eval50" else runs.absolute(prompts),
        out=runs.absolute(out),
        height=height,
        width=width,
        num_actors=options.pop("num_actors") or workers.num_workers,
        cpus_per_actor=workers.cpus_per_worker,
        gpus_per_actor=workers.gpus_per_worker,
        model=run.model,
        recipe=run.recipe,
        storage=run.storage,
        tracking=None if options.pop("no_tracking") else run.tracking,
        **options,
    )


@click.command("sample-batch")
@cluster_option(required=True)
@click.option(
    "--checkpoint",
    "references",
    multiple=True,
    required=True,
    metavar="RUN[:STEP]|latest-sft|URI",
    help="Checkpoint to sample; repeat to compare several.",
)
@click.option("--prompts", required=True, help="Stories JSONL (path or URI), or 'eval50'.")
@click.option("--out", required=True, help="Output root (path or s3:// URI).")
@spec_options(SampleJobSpec, "mode", "steps", "guidance")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@spec_options(SampleJobSpec, "noise")
@click.option("--frames", type=int, help="Frames per scene (8k+1) [default: the checkpoint's].")
@click.option("--size", help="HEIGHTxWIDTH [default: the checkpoint's].")
@spec_options(SampleJobSpec, "negative_prompt", "scheduler")
@click.option(
    "--num-actors",
    type=click.IntRange(min=1),
    help="Model replicas [default: the profile's workers].",
)
@spec_options(SampleJobSpec, "batch_size", "overwrite", "vae_tiling", "vae_slicing")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--eval", "then_eval", is_flag=True, help="Then score them (as `m2d eval`).")
@spec_options(EvalSpec, "encoder", "encoder_path", optional=("encoder_path",))
@spec_options(EvalSpec, "reference", "fvd_features", "fvd_path")
@set_option("workers.num_workers=4 or ray.address=http://HOST:8265")
@click.pass_context
def sample_batch(
    ctx: click.Context,
    cluster_name: str,
    references: tuple[str, ...],
    assignments: tuple[str, ...],
    then_eval: bool,
    **options,
):
    """Render evaluation videos of the stories in --prompts from each --checkpoint (and
    with --eval, score them)."""
    scoring = {k: options.pop(k) for k in ("encoder", "encoder_path", *FVD_OPTIONS)}
    if not then_eval and (scoring["encoder_path"] or scoring["reference"]):
        raise UserError("--encoder-path and --reference score samples: add --eval")
    options["seeds"] = parse_seeds(options["seeds"])
    run = runs.resolve_run(ctx.find_root().obj["clusters_dir"], cluster_name, "sft", assignments)
    try:
        spec = build_spec(run, references, options)
    except ValidationError as exc:  # an option out of range
        error = exc.errors()[0]
        option = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "option"
        raise UserError(f"{option}: {error['msg']}") from None
    then = ()
    if then_eval:
        scored = eval_spec(run, spec.out, spec.num_actors, spec.tracking, scoring)
        then = ((EVAL_JOB, scored),)
    submit.run_job_on(run, JOB_MODULE, spec, "sample-batch", then=then)
