"""A checkpoint to sample, described: its kind and what it says about itself (step, MLflow
run, recipe, model source), read from its JSON files without loading any weights. The
sample job's driver checks every checkpoint with this before Ray starts; the actors load
the weights with ``sampler.models``.

Three kinds of checkpoint folder are accepted (local or ``s3://``):

- a **training checkpoint** (``checkpoint_NNNNNNNN/`` with ``deepspeed/`` and
  ``run_config.json``);
- an **exported transformer** (``m2d export``: ``config.json`` + safetensors);
- a whole **diffusers CogVideoX folder** (``transformer/``, ``vae/``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.checkpoint_layout import DEEPSPEED_TAG
from infra.config import ModelConfig, StageRecipe, StorageConfig
from infra.errors import ConfigError, StorageError
from infra.job_specs import CheckpointSpec, SampleJobSpec
from infra.run_folder import read_run_config, read_trainer_state
from infra.storage import filesystem

__all__ = ["CheckpointInfo", "checkpoint_kind", "describe_checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, read from its JSON files (no weights)."""

    kind: str
    #: Training step of the weights (0 when unknown): the x-axis of MLflow previews.
    step: int
    #: The MLflow run that trained it, when the checkpoint records one.
    mlflow_run_id: str | None
    #: Its training recipe (frames, size, seed, mask policy), else the spec's.
    recipe: StageRecipe
    model: ModelConfig
    storage: StorageConfig


def checkpoint_kind(uri: str, storage: StorageConfig | None) -> str:
    """``training``, ``transformer`` or ``diffusers``; a ConfigError for anything else."""
    fs, path = filesystem(uri, storage)
    root = path.rstrip("/")
    try:
        if fs.isdir(f"{root}/{DEEPSPEED_TAG}"):
            return "training"
        if fs.isdir(f"{root}/transformer"):
            _check_weights(fs, f"{root}/transformer", uri)
            return "diffusers"
        if fs.isfile(f"{root}/config.json"):
            _check_weights(fs, root, uri)
            return "transformer"
        exists = fs.exists(root)
    except OSError as exc:
        raise StorageError(f"checkpoint {uri}: cannot read ({exc})") from None
    problem = "is not a checkpoint folder" if exists else "does not exist"
    raise ConfigError(
        f"checkpoint {uri} {problem}; give RUN[:STEP], a checkpoint_NNNNNNNN folder, an "
        "`m2d export` folder or a diffusers CogVideoX folder"
    )


def _check_weights(fs, folder: str, uri: str) -> None:
    """Refuse, here and in one line, a model folder whose transformer has no weights file
    (a copy cut short): the sampling actors would each fail to load it."""
    if not fs.glob(f"{folder}/diffusion_pytorch_model*"):
        raise ConfigError(
            f"checkpoint {uri}: {folder.rsplit('/', 1)[-1]}/ has no weights file "
            "(diffusion_pytorch_model*.safetensors); copy the whole folder or run `m2d "
            "export` again"
        )


def describe_checkpoint(spec: SampleJobSpec, checkpoint: CheckpointSpec) -> CheckpointInfo:
    """The checkpoint's kind, step, source MLflow run and recipe, without loading weights."""
    kind = checkpoint_kind(checkpoint.uri, spec.storage)
    if kind != "training":
        return CheckpointInfo(kind, 0, None, spec.recipe, spec.model, spec.storage)
    run = read_run_config(checkpoint.uri, spec.storage, fix="give a checkpoint of a finished save")
    state = read_trainer_state(checkpoint.uri, spec.storage)
    return CheckpointInfo(kind, state.step, state.mlflow_run_id, run.recipe, run.model, run.storage)
