"""The model components of a training run: Mask²DiT transformer, frozen VAE and T5, scheduler.

A built-in source (``tiny``, or ``toy`` over the toy world's vocabulary) builds every
component from small config dicts (nothing is downloaded); any other source is a diffusers
CogVideoX folder - a local path or an ``s3://`` URI that ``infra.model_store`` first
copies into a local cache. The parts themselves are built and loaded by
``mask2dit.components``, which the sampler uses too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
from transformers import T5EncoderModel

from evaluation.toy_world import VOCABULARY
from infra.config import ModelConfig, StorageConfig
from infra.model_store import ENCODER_SUBFOLDERS, SUBFOLDERS, resolve_model_folder
from mask2dit.components import built_in_parts, load_parts, save_parts, tiny_parts
from mask2dit.model import Mask2DiT
from mask2dit.policy import DEFAULT_POLICY
from mask2dit.tiny import BUILT_IN_SOURCES
from mask2dit.toy import ToyVAE

__all__ = [
    "TrainingParts",
    "load_training_parts",
    "save_tiny_pretrained",
]


@dataclass
class TrainingParts:
    """Everything a training step needs besides the optimizer: the model folder's parts
    (``mask2dit.components.ModelParts``, stock diffusers) with the transformer wrapped in
    ``Mask2DiT`` and the VAE and T5 frozen on the device."""

    transformer: Mask2DiT | None  # None: encoders only (latent precompute)
    vae: AutoencoderKLCogVideoX | ToyVAE
    text_encoder: T5EncoderModel
    tokenizer: Any
    scheduler: CogVideoXDDIMScheduler


def load_training_parts(
    model: ModelConfig,
    storage: StorageConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    policy: str = DEFAULT_POLICY,
    seed: int = 0,
    encoders_only: bool = False,
) -> TrainingParts:
    """Build or load the components of ``model.source`` onto ``device``.

    The VAE and T5 are frozen (eval, no grad) and cast to ``dtype``. The transformer stays
    float32 on ``device``: DeepSpeed owns its training precision (it casts for bf16).
    ``seed`` only affects built-in (``tiny``, ``toy``) weights. ``encoders_only`` neither
    fetches nor loads the transformer (``TrainingParts.transformer`` is ``None``).
    """
    if model.source in BUILT_IN_SOURCES:
        parts = built_in_parts(model.source, seed, VOCABULARY)
        if encoders_only:
            parts = parts._replace(transformer=None)
    else:
        subfolders = ENCODER_SUBFOLDERS if encoders_only else SUBFOLDERS
        folder = resolve_model_folder(model.source, storage, subfolders=subfolders)
        parts = load_parts(folder, encoders_only=encoders_only)
    for frozen in (parts.vae, parts.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        frozen.to(device)
        if frozen.dtype != dtype:  # diffusers warns on a no-op cast
            frozen.to(dtype=dtype)
    return TrainingParts(
        transformer=None
        if parts.transformer is None
        else Mask2DiT(parts.transformer.to(device), policy=policy),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        scheduler=parts.scheduler,
    )


def save_tiny_pretrained(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny components as a diffusers CogVideoX folder; returns its path."""
    return save_parts(tiny_parts(seed), path)
