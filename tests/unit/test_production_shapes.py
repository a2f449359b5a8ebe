"""Mask²DiT at production size without a GPU (issue 16, point 5): the real CogVideoX-2B
and 5B configs on the `meta` device, a forward at 3 x 49 x 480x720 (and the 5B at 6
scenes). Shapes, RoPE over all latent frames, the scene layout, the mask's terms and the
parameter set are checked against stock diffusers on `meta` and against the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel

from mask2dit.attention import _attention_terms
from mask2dit.model import Mask2DiT
from orchestrator.plan.estimate import Sequence, visible_pairs
from orchestrator.plan.shapes import transformer_shapes

MODELS = Path(__file__).resolve().parents[2] / "orchestrator" / "plan" / "model_configs"
FRAMES, HEIGHT, WIDTH, TEXT = 49, 480, 720, 226
LATENT_FRAMES, LATENT_H, LATENT_W = 13, 60, 90  # 4x temporal, 8x spatial


def _config(name: str) -> dict:
    return json.loads((MODELS / name / "transformer" / "config.json").read_text())


def _forward(name: str, scenes: int):
    """Mask2DiT over the stock model on meta; one bf16 forward; what it saw."""
    config = _config(name)
    with torch.device("meta"):
        stock = CogVideoXTransformer3DModel.from_config(config).to(torch.bfloat16)
        model = Mask2DiT(CogVideoXTransformer3DModel.from_config(config).to(torch.bfloat16))
        latents = torch.empty(
            1, scenes * LATENT_FRAMES, 16, LATENT_H, LATENT_W, dtype=torch.bfloat16
        )
        text = torch.empty(1, scenes * TEXT, 4096, dtype=torch.bfloat16)
        timesteps = torch.tensor([500])
    seen = {}
    layout_of = model._layout

    def recording_layout(*args, **kwargs):
        seen["layout"] = layout_of(*args, **kwargs)
        return seen["layout"]

    model._layout = recording_layout
    with torch.no_grad():
        out = model(latents, text, timesteps, [LATENT_FRAMES] * scenes)
    return stock, model, out, seen["layout"]


@pytest.mark.parametrize(
    "name, scenes", [("CogVideoX-2b", 3), ("CogVideoX-5b", 3), ("CogVideoX-5b", 6)]
)
def test_a_production_size_forward_on_meta(name, scenes):
    stock, model, out, layout = _forward(name, scenes)
    frames = scenes * LATENT_FRAMES
    assert out.shape == (1, frames, 16, LATENT_H, LATENT_W) and out.dtype == torch.bfloat16
    # The parameter set is the stock one (Mask2DiT adds none), and the planner's.
    mine = {n: tuple(p.shape) for n, p in model.transformer.named_parameters()}
    assert mine == {n: tuple(p.shape) for n, p in stock.named_parameters()}
    assert mine == transformer_shapes(_config(name))
    # Layout: [T_1 .. T_n | V_1 .. V_n], 226 text and 13 x 30 x 45 video tokens a scene.
    per_scene_video = LATENT_FRAMES * (LATENT_H // 2) * (LATENT_W // 2)
    assert layout.text_lens == (TEXT,) * scenes
    assert layout.video_lens == (per_scene_video,) * scenes
    assert layout.seq_len == scenes * (TEXT + per_scene_video)
    if scenes == 3:
        assert layout.seq_len == 53_328
    # Positions run on over all scenes' latent frames (docs/method.md §3).
    if _config(name)["use_rotary_positional_embeddings"]:
        key, (cos, sin) = model._rope_cache
        assert key[0] == frames
        assert cos.shape == sin.shape == (frames * per_scene_video // LATENT_FRAMES, 64)
    else:
        key, table = model._sincos_cache
        assert key[0] == frames
        assert table.shape[1] == _config(name)["max_text_seq_length"] + scenes * per_scene_video
    # The v2 mask's terms: disjoint (query, key) blocks whose pairs are what the planner
    # counts from the policy alone.
    terms = _attention_terms(layout, "v2")
    pairs = sum((t.rows.stop - t.rows.start) * (t.keys.stop - t.keys.start) for t in terms)
    sequence = Sequence(scenes, TEXT, per_scene_video, LATENT_FRAMES, LATENT_H // 2, LATENT_W // 2)
    assert pairs == visible_pairs(sequence, "v2")
    video = scenes * per_scene_video
    assert (
        pairs
        == video * video
        + scenes * (TEXT + per_scene_video) * TEXT
        + scenes * TEXT * per_scene_video
    )
