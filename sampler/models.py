"""A checkpoint to sample, loaded: the pipeline plus what the checkpoint says about itself.

Three kinds of checkpoint folder are accepted (local or ``s3://``):

- a **training checkpoint** (``checkpoint_NNNNNNNN/`` with ``deepspeed/`` and
  ``run_config.json``): ZeRO shards consolidated by DeepSpeed's reader; VAE, T5 and
  scheduler from the run's own model source (the ``tiny`` ones drawn from the run's
  seed, so they are the ones it trained with); frames, size and text length default to
  the run's recipe;
- an **exported transformer** (``m2d export``: ``config.json`` + safetensors): the rest
  from the spec's model source;
- a whole **diffusers CogVideoX folder** (``transformer/``, ``vae/``, ...).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel

from infra.checkpoints import (
    DEEPSPEED_TAG,
    RUN_CONFIG,
    TRAINER_STATE,
    consolidated_state_dict,
    fetch_checkpoint,
)
from infra.config import ModelConfig, RunConfig, StageRecipe, StorageConfig
from infra.errors import ConfigError, StorageError
from infra.model_store import ENCODER_SUBFOLDERS, fetch_folder, resolve_model_folder
from infra.sample_spec import CheckpointSpec, SampleJobSpec
from infra.storage import filesystem
from mask2dit.components import (
    ModelParts,
    load_parts,
    load_transformer,
    tiny_parts,
    transformer_config,
)
from sampler.pipeline import MultiScenePipeline

__all__ = ["CheckpointInfo", "checkpoint_kind", "describe_checkpoint", "load_pipeline"]


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
            return "diffusers"
        if fs.isfile(f"{root}/config.json"):
            return "transformer"
        exists = fs.exists(root)
    except OSError as exc:
        raise StorageError(f"checkpoint {uri}: cannot read ({exc})") from None
    problem = "is not a checkpoint folder" if exists else "does not exist"
    raise ConfigError(
        f"checkpoint {uri} {problem}; give RUN[:STEP], a checkpoint_NNNNNNNN folder, an "
        "`m2d export` folder or a diffusers CogVideoX folder"
    )


def describe_checkpoint(spec: SampleJobSpec, checkpoint: CheckpointSpec) -> CheckpointInfo:
    """The checkpoint's kind, step, source MLflow run and recipe, without loading weights."""
    kind = checkpoint_kind(checkpoint.uri, spec.storage)
    if kind != "training":
        return CheckpointInfo(kind, 0, None, spec.recipe, spec.model, spec.storage)
    fs, path = filesystem(checkpoint.uri, spec.storage)
    try:
        run = RunConfig.model_validate_json(fs.cat_file(f"{path.rstrip('/')}/{RUN_CONFIG}"))
        state = json.loads(fs.cat_file(f"{path.rstrip('/')}/{TRAINER_STATE}"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {checkpoint.uri}: unreadable {RUN_CONFIG}/{TRAINER_STATE} ({exc}); "
            "give a checkpoint of a finished save"
        ) from None
    return CheckpointInfo(
        kind, state["step"], state.get("mlflow_run_id"), run.recipe, run.model, run.storage
    )


def load_pipeline(
    spec: SampleJobSpec,
    checkpoint: CheckpointSpec,
    info: CheckpointInfo,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> MultiScenePipeline:
    """Load ``checkpoint`` into a pipeline on ``device`` (bf16 on CUDA by default)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if info.kind == "training":
        with tempfile.TemporaryDirectory(prefix="m2d-sample-") as tmp:
            local = fetch_checkpoint(checkpoint.uri, spec.storage, Path(tmp))
            state = consolidated_state_dict(local)
        base = _base_folder(info)
        transformer = load_transformer(transformer_config(base), state)
        parts = _with_transformer(base, transformer, info.recipe.seed, dtype)
    else:
        folder = fetch_folder(checkpoint.uri, spec.storage)
        if info.kind == "diffusers":
            parts = load_parts(folder, dtype)
        else:
            transformer = CogVideoXTransformer3DModel.from_pretrained(folder)
            parts = _with_transformer(_base_folder(info), transformer, info.recipe.seed, dtype)
    pipeline = MultiScenePipeline.from_parts(
        parts,
        scheduler=spec.scheduler,
        policy=info.recipe.mask_policy,
        vae_tiling=spec.vae_tiling,
        vae_slicing=spec.vae_slicing,
    )
    # Parts load in ``dtype``; casting again only makes diffusers warn (fp32 VAE parts).
    return pipeline.to(device, None if dtype == torch.float32 else dtype)


def _base_folder(info: CheckpointInfo) -> Path | None:
    """The local folder of the VAE, T5 and scheduler (``None``: the tiny ones)."""
    if info.model.source == "tiny":
        return None
    return resolve_model_folder(info.model.source, info.storage, subfolders=ENCODER_SUBFOLDERS)


def _with_transformer(
    base: Path | None, transformer: CogVideoXTransformer3DModel, seed: int, dtype: torch.dtype
) -> ModelParts:
    """``transformer`` with the VAE, T5 and scheduler of ``base`` (``None``: tiny, seeded)."""
    if base is None:
        return tiny_parts(seed)._replace(transformer=transformer)
    return load_parts(base, dtype, transformer=transformer)
