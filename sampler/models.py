"""A checkpoint to sample, loaded into a ``MultiScenePipeline`` (in the sample job's actors;
``sampler.checkpoint_info`` describes it without weights).

Three kinds of checkpoint folder are accepted (local or ``s3://``):

- a **training checkpoint** (``checkpoint_NNNNNNNN/`` with ``deepspeed/`` and
  ``run_config.json``): its weights file alone (``infra.checkpoint_layout.read_weights``;
  older checkpoints: ZeRO shards consolidated by DeepSpeed's reader); VAE, T5 and
  scheduler from the run's own model source (a built-in model's - ``tiny``, ``toy`` -
  drawn from the run's seed, so they are the ones it trained with); frames, size and
  text length default to the run's recipe;
- an **exported transformer** (``m2d export``: ``config.json`` + safetensors): the rest
  from the spec's model source;
- a whole **diffusers CogVideoX folder** (``transformer/``, ``vae/``, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel

from evaluation.toy_world import VOCABULARY
from infra.checkpoint_layout import read_weights
from infra.errors import DataError, first_line
from infra.job_specs import CheckpointSpec, SampleJobSpec
from infra.model_store import ENCODER_SUBFOLDERS, fetch_folder, resolve_model_folder
from mask2dit.components import (
    ModelParts,
    built_in_parts,
    load_parts,
    load_transformer,
    transformer_config,
)
from mask2dit.sampling.pipeline import MultiScenePipeline
from mask2dit.tiny import BUILT_IN_SOURCES
from mask2dit.weights import load_pretrained
from sampler.checkpoint_info import CheckpointInfo

__all__ = ["load_pipeline"]


def load_pipeline(
    spec: SampleJobSpec,
    checkpoint: CheckpointSpec,
    info: CheckpointInfo,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> MultiScenePipeline:
    """Load ``checkpoint`` into a pipeline on ``device`` (bf16 on CUDA by default); a
    folder whose files diffusers cannot load is one DataError line naming it."""
    try:
        return _load_pipeline(spec, checkpoint, info, device, dtype)
    except OSError as exc:  # diffusers and transformers: a weights or config file missing
        raise DataError(
            f"{checkpoint.uri}: cannot load the model ({first_line(exc)}); give an `m2d "
            "export` folder, a training checkpoint or a diffusers CogVideoX folder"
        ) from None


def _load_pipeline(
    spec: SampleJobSpec,
    checkpoint: CheckpointSpec,
    info: CheckpointInfo,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> MultiScenePipeline:
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if info.kind == "training":
        state = read_weights(checkpoint.uri, spec.storage)  # not the optimizer shards
        base = _base_folder(info)
        transformer = load_transformer(transformer_config(base, info.model.source), state)
        parts = _with_transformer(info, base, transformer, dtype)
    else:
        folder = fetch_folder(checkpoint.uri, spec.storage)
        if info.kind == "diffusers":
            parts = load_parts(folder, dtype)
        else:
            transformer = load_pretrained(CogVideoXTransformer3DModel, folder, dtype)
            parts = _with_transformer(info, _base_folder(info), transformer, dtype)
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
    """The local folder of the VAE, T5 and scheduler (``None``: a built-in model's)."""
    if info.model.source in BUILT_IN_SOURCES:
        return None
    return resolve_model_folder(info.model.source, info.storage, subfolders=ENCODER_SUBFOLDERS)


def _with_transformer(
    info: CheckpointInfo,
    base: Path | None,
    transformer: CogVideoXTransformer3DModel,
    dtype: torch.dtype,
) -> ModelParts:
    """``transformer`` with the VAE, T5 and scheduler of ``base`` (``None``: the run's
    built-in model, drawn from its seed)."""
    if base is None:
        parts = built_in_parts(info.model.source, info.recipe.seed, VOCABULARY)
        return parts._replace(transformer=transformer)
    return load_parts(base, dtype, transformer=transformer)
