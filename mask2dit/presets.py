"""Tiny CogVideoX transformer configs for tests and toy runs (built, never downloaded).

The configs are plain ``CogVideoXTransformer3DModel`` keyword dicts, so a model built from
one has exactly the stock parameter set. ``attention_head_dim`` is 16: CogVideoX RoPE
splits the head dim into a temporal quarter and two spatial 3/8 parts (docs/method.md §9).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel

__all__ = ["COGVIDEOX_SCHEDULER", "PRESETS", "build_transformer", "preset_config"]

_TINY: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    # Pixel frames: (K - 1) * 4 + 1 for K latent frames (diffusers' documented quirk).
    "sample_frames": 9,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 12,
    "use_rotary_positional_embeddings": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # CogVideoX-5B style: RoPE on video tokens, no additive positional embedding.
    "tiny": _TINY,
    # CogVideoX-2B style: 3D sin-cos embedding added to video tokens, no RoPE. The stock
    # model then needs text length == max_text_seq_length (12 = 3 scenes x 4 tokens).
    "tiny_sincos": {**_TINY, "use_rotary_positional_embeddings": False},
}


# The noise schedule CogVideoX-5B ships (its scheduler/scheduler_config.json): v-prediction
# with zero-terminal-SNR rescaling. Used where no pretrained folder gives one.
COGVIDEOX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 1.0,
    "timestep_spacing": "trailing",
}


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the named preset's ``CogVideoXTransformer3DModel`` kwargs."""
    if name not in PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; valid: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def build_transformer(preset_name: str, seed: int = 0) -> CogVideoXTransformer3DModel:
    """A stock CogVideoX transformer from a preset, with weights drawn from ``seed``.

    diffusers initialises every layer with random weights (no zero-init of the AdaLN gates),
    so outputs depend on every path. The global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CogVideoXTransformer3DModel(**preset_config(preset_name))
