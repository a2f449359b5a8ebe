"""The five parts of a CogVideoX model, built from config dicts or loaded from a folder.

A diffusers CogVideoX folder has the subfolders ``transformer``, ``vae``, ``text_encoder``
(T5), ``tokenizer`` and ``scheduler``. The built-in models (``mask2dit.tiny``: ``tiny``
for tests, ``toy`` for the toy world) are built from small config dicts (nothing is
downloaded) with weights drawn from a seed, so a training run and a sampler that share
the seed share the frozen VAE and T5; ``save_parts`` writes them as such a folder, so
tests exercise the real loading path. Storage (S3 copies) is not this module's business:
``infra.model_store`` turns a URI into a local folder first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from mask2dit.presets import COGVIDEOX_SCHEDULER, build_transformer, preset_config
from mask2dit.tiny import TINY_T5, TINY_VAE, TOY_T5, TOY_VAE, TOY_VAE_CLASS
from mask2dit.toy import ToyVAE, word_text_encoder, word_tokenizer
from mask2dit.weights import load_pretrained

__all__ = [
    "TINY_PRESET",
    "TOY_PRESET",
    "ModelParts",
    "built_in_parts",
    "load_parts",
    "load_transformer",
    "save_parts",
    "tiny_parts",
    "toy_parts",
    "transformer_config",
]

TINY_PRESET = "tiny"
TOY_PRESET = "toy"
# The VAE classes a model folder's vae/config.json may name (its ``_class_name``).
_VAE_CLASSES = {"AutoencoderKLCogVideoX": AutoencoderKLCogVideoX, TOY_VAE_CLASS: ToyVAE}


class ModelParts(NamedTuple):
    """A stock CogVideoX transformer and the frozen parts around it (``transformer`` is
    ``None`` when only the encoders were loaded)."""

    transformer: CogVideoXTransformer3DModel | None
    vae: AutoencoderKLCogVideoX | ToyVAE
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


def toy_parts(vocabulary: Sequence[str], seed: int = 0) -> ModelParts:
    """The toy model (``mask2dit.toy``): transformer drawn from ``seed``, the exact pixel
    VAE, and a word-level tokenizer and T5 over ``vocabulary`` (T5 drawn from ``seed``)."""
    cfg = preset_config(TOY_PRESET)
    tokenizer = word_tokenizer(vocabulary)
    t5 = {**TOY_T5, "d_model": cfg["text_embed_dim"]}
    vae = ToyVAE(**TOY_VAE)
    if vae.latent_channels != cfg["in_channels"]:
        raise ValueError(
            f"ToyVAE gives {vae.latent_channels} latent channels, the toy preset takes "
            f"{cfg['in_channels']}"
        )
    return ModelParts(
        transformer=build_transformer(TOY_PRESET, seed=seed),
        vae=vae,
        text_encoder=word_text_encoder(t5, len(tokenizer), seed + 1),
        tokenizer=tokenizer,
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )


def built_in_parts(source: str, seed: int = 0, vocabulary: Sequence[str] = ()) -> ModelParts:
    """The parts of built-in model ``source`` (``mask2dit.tiny.BUILT_IN_SOURCES``);
    ``vocabulary`` is the toy model's words (the toy world's, passed in by the caller)."""
    if source == TINY_PRESET:
        return tiny_parts(seed)
    if source == TOY_PRESET:
        if not vocabulary:
            raise ValueError("the toy model needs its vocabulary (the toy world's words)")
        return toy_parts(vocabulary, seed)
    raise ValueError(f"{source!r} is no built-in model; valid: {TINY_PRESET}, {TOY_PRESET}")


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
        vae=load_pretrained(_vae_class(root / "vae"), root / "vae", dtype),
        text_encoder=load_pretrained(T5EncoderModel, root / "text_encoder", dtype),
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        scheduler=CogVideoXDDIMScheduler.from_pretrained(root / "scheduler"),
    )


def _vae_class(folder: Path) -> type[AutoencoderKLCogVideoX | ToyVAE]:
    """The VAE class a saved ``vae`` folder names; an unknown one is a ``ValueError``."""
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name not in _VAE_CLASSES:
        raise ValueError(f"{folder}/config.json: VAE class {name!r}; valid: {sorted(_VAE_CLASSES)}")
    return _VAE_CLASSES[name]


def save_parts(parts: ModelParts, root: str | os.PathLike) -> Path:
    """Write the parts as a diffusers CogVideoX folder; returns its path."""
    root = Path(root)
    for name, part in parts._asdict().items():
        part.save_pretrained(root / name)
    return root


def transformer_config(
    folder: str | os.PathLike | None, built_in: str = TINY_PRESET
) -> dict[str, Any]:
    """The stock transformer config of a model folder, or for ``None`` of the built-in
    model ``built_in``."""
    if folder is None:
        return preset_config(built_in)
    return dict(CogVideoXTransformer3DModel.load_config(Path(folder) / "transformer"))


def load_transformer(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> CogVideoXTransformer3DModel:
    """A stock transformer from its config with exactly these weights (strict: a missing
    or unexpected key is an error, never a silently random layer)."""
    model = CogVideoXTransformer3DModel.from_config(config)
    model.load_state_dict(state_dict, strict=True)
    return model
