"""The built-in models' configs as plain dicts (no torch): ``tiny`` and ``toy``.

``tiny`` is a small CogVideoX (transformer, VAE, ByT5-tokenized T5) for tests. ``toy`` is
sized to learn the toy world (``evaluation.toy_world``) on 2 CPU cores: an exactly
invertible pixel VAE and a word-level T5 (``mask2dit.toy``) around a small transformer.
``mask2dit.presets`` and ``mask2dit.components`` build them from these; the planner
(``orchestrator.plan``) reads them to plan a built-in ``model.source`` without importing
torch. ``attention_head_dim`` is 16 or 32: CogVideoX RoPE splits the head dim into a
temporal quarter and two spatial 3/8 parts (docs/method.md §9).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BUILT_IN_SOURCES",
    "BYT5_VOCAB_SIZE",
    "TINY_T5",
    "TINY_VAE",
    "TOY_T5",
    "TOY_VAE",
    "TOY_VAE_CLASS",
    "TRANSFORMER_PRESETS",
    "built_in_configs",
    "spatial_compression",
    "tiny_configs",
    "toy_configs",
]

#: ``model.source`` values that name a model built from these configs, not a folder.
BUILT_IN_SOURCES: tuple[str, ...] = ("tiny", "toy")

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

# The toy world's scenes: 5 frames of 16x16 pixels. ToyVAE keeps every frame (the sampler
# needs an odd latent count) and folds 2x2 pixel blocks into 12 channels (16x16 -> 8x8),
# so a 2x2 patch is a 4x4-pixel token, 16 per frame; text: 5 words + eos fit 8 tokens.
# Measured on the 2-core development machine, one thread, batch 1 story of 3 scenes
# (held-out v-loss, seeded AdamW at lr 1e-3): folding 4x4 blocks instead (48 channels, 4
# tokens per frame) learned worse at equal steps even with 5x the parameters (0.62-0.65
# against 0.49-0.52 after 800 steps); 6 blocks beat 4 slightly after 3,000 steps (0.350
# against 0.359). A step's forward and backward take ~70 ms (1.84M parameters), AdamW
# ~8 ms: 3,000 steps fit well inside 10 minutes with the job's own per-step costs.
_TOY: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 12,
    "out_channels": 12,
    "time_embed_dim": 64,
    "text_embed_dim": 32,
    "num_layers": 6,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 5,
    "patch_size": 2,
    "temporal_compression_ratio": 1,
    "max_text_seq_length": 8,
    "use_rotary_positional_embeddings": True,
}

#: ``CogVideoXTransformer3DModel`` keyword dicts by preset name.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # CogVideoX-5B style: RoPE on video tokens, no additive positional embedding.
    "tiny": _TINY,
    # CogVideoX-2B style: 3D sin-cos embedding added to video tokens, no RoPE. The stock
    # model then needs text length == max_text_seq_length (12 = 3 scenes x 4 tokens).
    "tiny_sincos": {**_TINY, "use_rotary_positional_embeddings": False},
    "toy": _TOY,
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

#: ``mask2dit.toy.ToyVAE``'s name, as its saved ``config.json`` states it.
TOY_VAE_CLASS = "ToyVAE"
# ToyVAE's config. Toy-world pixels in [-1, 1] have std 0.47 (mean -0.40; 6,000 scenes),
# so x2 gives latents of about unit std, as diffusers scales its VAEs' latents; a power
# of two also makes the scaling exact, so the latents are the pixels bit for bit.
TOY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "spatial_compression_ratio": 2,
    "temporal_compression_ratio": 1,
    "scaling_factor": 2.0,
}
# A fixed vocab_size (>= the toy world's 17 words + pad, eos, unk) keeps the T5's shapes
# independent of the vocabulary, so the planner can read them; d_model = vocab_size lets
# every token's embedding be orthogonal to every other's (``mask2dit.toy``).
TOY_T5: dict[str, Any] = {
    "vocab_size": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
}


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


def toy_configs() -> dict[str, dict[str, Any]]:
    """The ``config.json`` contents of the toy model's parts, by subfolder."""
    transformer = copy.deepcopy(TRANSFORMER_PRESETS["toy"])
    return {
        "transformer": transformer,
        "vae": {"_class_name": TOY_VAE_CLASS, **TOY_VAE},
        "text_encoder": {**TOY_T5, "d_model": transformer["text_embed_dim"]},
    }


def built_in_configs(source: str) -> dict[str, dict[str, Any]]:
    """The part configs of a built-in ``model.source`` (one of ``BUILT_IN_SOURCES``)."""
    if source == "tiny":
        return tiny_configs()
    if source == "toy":
        return toy_configs()
    raise ValueError(f"{source!r} is no built-in model; valid: {', '.join(BUILT_IN_SOURCES)}")


def spatial_compression(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along height and width, from a VAE's config.

    ``ToyVAE`` states it (``spatial_compression_ratio``); a CogVideoX VAE halves the size
    at every level but the last (8 for its 4 levels, diffusers' ``vae_scale_factor``).
    """
    if "spatial_compression_ratio" in vae_config:
        return int(vae_config["spatial_compression_ratio"])
    levels = vae_config.get("block_out_channels", (128, 256, 256, 512))
    return 2 ** (len(levels) - 1)
