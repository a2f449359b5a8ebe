"""The five parts of a CogVideoX model, built tiny from config dicts or loaded from a folder.

A diffusers CogVideoX folder has the subfolders ``transformer``, ``vae``, ``text_encoder``
(T5), ``tokenizer`` and ``scheduler``. The ``tiny`` parts are built from small config
dicts (nothing is downloaded) with weights drawn from a seed, so a training run and a
sampler that share the seed share the frozen VAE and T5; ``save_parts`` writes them as
such a folder, so tests exercise the real loading path. Storage (S3 copies) is not this
module's business: ``infra.model_store`` turns a URI into a local folder first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from mask2dit.presets import COGVIDEOX_SCHEDULER, build_transformer, preset_config
from mask2dit.tiny import TINY_T5, TINY_VAE
from mask2dit.weights import load_pretrained

__all__ = [
    "TINY_PRESET",
    "ModelParts",
    "load_parts",
    "load_transformer",
    "save_parts",
    "tiny_parts",
    "transformer_config",
]

TINY_PRESET = "tiny"


class ModelParts(NamedTuple):
    """A stock CogVideoX transformer and the frozen parts around it (``transformer`` is
    ``None`` when only the encoders were loaded)."""

    transformer: CogVideoXTransformer3DModel | None
    vae: AutoencoderKLCogVideoX
    text_encoder: T5EncoderModel
    tokenizer: Any
    scheduler: CogVideoXDDIMScheduler


def tiny_parts(seed: int = 0) -> ModelParts:
    """Tiny transformer, VAE, T5, tokenizer and scheduler, weights drawn from ``seed``."""
    cfg = preset_config(TINY_PRESET)
    tokenizer = ByT5Tokenizer()
    transformer = build_transformer(TINY_PRESET, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCogVideoX(latent_channels=cfg["in_channels"], **TINY_VAE)
        t5 = T5Config(vocab_size=len(tokenizer), d_model=cfg["text_embed_dim"], **TINY_T5)
        text_encoder = T5EncoderModel(t5)
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
    return ModelParts(transformer, vae, text_encoder, tokenizer, scheduler)


def load_parts(
    root: str | os.PathLike,
    dtype: torch.dtype | None = None,
    *,
    transformer: CogVideoXTransformer3DModel | None = None,
    encoders_only: bool = False,
) -> ModelParts:
    """Load the parts from a local diffusers CogVideoX folder.

    ``dtype`` casts the models on load (``None`` keeps the saved dtype). A given
    ``transformer`` replaces the folder's (whose subfolder is then not read): a trained
    or exported transformer sampled with a base model's VAE and T5. ``encoders_only``
    reads no transformer at all (its ``transformer`` is ``None``).
    """
    root = Path(root)
    if transformer is None and not encoders_only:
        transformer = load_pretrained(CogVideoXTransformer3DModel, root / "transformer", dtype)
    return ModelParts(
        transformer=transformer,
        vae=load_pretrained(AutoencoderKLCogVideoX, root / "vae", dtype),
        text_encoder=load_pretrained(T5EncoderModel, root / "text_encoder", dtype),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        scheduler=CogVideoXDDIMScheduler.from_pretrained(root / "scheduler"),
    )


def save_parts(parts: ModelParts, root: str | os.PathLike) -> Path:
    """Write the parts as a diffusers CogVideoX folder; returns its path."""
    root = Path(root)
    for name, part in parts._asdict().items():
        part.save_pretrained(root / name)
    return root


def transformer_config(folder: str | os.PathLike | None) -> dict[str, Any]:
    """The stock transformer config of a model folder, or of the tiny preset for ``None``."""
    if folder is None:
        return preset_config(TINY_PRESET)
    return dict(CogVideoXTransformer3DModel.load_config(Path(folder) / "transformer"))


def load_transformer(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> CogVideoXTransformer3DModel:
    """A stock transformer from its config with exactly these weights (strict: a missing
    or unexpected key is an error, never a silently random layer)."""
    model = CogVideoXTransformer3DModel.from_config(config)
    model.load_state_dict(state_dict, strict=True)
    return model
