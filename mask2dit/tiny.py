"""The tiny CogVideoX model's configs as plain dicts (no torch), for tests and toy runs.

``mask2dit.presets`` and ``mask2dit.components`` build the tiny transformer, VAE and T5
from these; the planner (``orchestrator.plan``) reads them to plan a ``model.source:
tiny`` run without importing torch. ``attention_head_dim`` is 16: CogVideoX RoPE splits
the head dim into a temporal quarter and two spatial 3/8 parts (docs/method.md §9).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["BYT5_VOCAB_SIZE", "TINY_T5", "TINY_VAE", "TRANSFORMER_PRESETS", "tiny_configs"]

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

#: ``CogVideoXTransformer3DModel`` keyword dicts by preset name.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # CogVideoX-5B style: RoPE on video tokens, no additive positional embedding.
    "tiny": _TINY,
    # CogVideoX-2B style: 3D sin-cos embedding added to video tokens, no RoPE. The stock
    # model then needs text length == max_text_seq_length (12 = 3 scenes x 4 tokens).
    "tiny_sincos": {**_TINY, "use_rotary_positional_embeddings": False},
}

# A 4-level CogVideoX VAE: 8x spatial and 4x temporal compression (4k+1 -> k+1 frames),
# as diffusers' own VAE tests build it; latent channels match the tiny transformer.
TINY_VAE: dict[str, Any] = {
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "norm_num_groups": 2,
    "temporal_compression_ratio": 4,
    "sample_height": 32,
    "sample_width": 32,
}
TINY_T5: dict[str, Any] = {
    "d_kv": 8,
    "d_ff": 32,
    "num_layers": 1,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}
#: ``len(ByT5Tokenizer())``: the tiny T5's vocabulary (bytes, specials, extra ids).
BYT5_VOCAB_SIZE = 384


def tiny_configs(preset: str = "tiny") -> dict[str, dict[str, Any]]:
    """The ``config.json`` contents a saved tiny model would have, by subfolder."""
    transformer = copy.deepcopy(TRANSFORMER_PRESETS[preset])
    return {
        "transformer": transformer,
        "vae": {**copy.deepcopy(TINY_VAE), "latent_channels": transformer["in_channels"]},
        "text_encoder": {
            **TINY_T5,
            "vocab_size": BYT5_VOCAB_SIZE,
            "d_model": transformer["text_embed_dim"],
        },
    }
