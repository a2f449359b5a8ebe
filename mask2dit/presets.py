"""Tiny CogVideoX transformers for tests and toy runs (built, never downloaded).

The presets are plain ``CogVideoXTransformer3DModel`` keyword dicts (``mask2dit.tiny``,
torch-free), so a model built from one has exactly the stock parameter set.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel

from mask2dit.tiny import TRANSFORMER_PRESETS

__all__ = ["COGVIDEOX_SCHEDULER", "PRESETS", "build_transformer", "preset_config"]

PRESETS = TRANSFORMER_PRESETS


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
