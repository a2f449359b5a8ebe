"""Frozen encoders of a training step: scene videos -> VAE latents, scene captions -> T5.

Shape legend: B batch, n scenes, T pixel frames of one scene, F latent frames (all scenes),
C latent channels, H/W pixel and h/w latent height/width, D text width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mask2dit.encoding import encode_prompt_batch, encode_video

__all__ = ["encode_prompts", "encode_videos"]


@torch.no_grad()
def encode_videos(
    vae: Any,
    videos: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """Encode each scene separately and concatenate the latents along frames.

    ``videos`` is a list over scenes of uint8 (B, T, 3, H, W) in [0, 255] (or float in
    [-1, 1]). Returns latents (B, F, C, h, w) scaled by ``vae.config.scaling_factor`` and
    the latent frames of each scene. ``sample`` draws from the posterior with
    ``generator`` (CogVideoX training does); otherwise its mode is used.
    """
    if not videos:
        raise ValueError("videos must hold at least one scene")
    latents = []
    for video_BTCHW in videos:
        if video_BTCHW.ndim != 5 or video_BTCHW.shape[2] != 3:
            raise ValueError(f"each scene must be (B, T, 3, H, W), got {tuple(video_BTCHW.shape)}")
        latents.append(encode_video(vae, video_BTCHW.transpose(1, 2), generator, sample))
    scene_frames = [z.shape[1] for z in latents]
    return torch.cat(latents, dim=1), scene_frames


@torch.no_grad()
def encode_prompts(
    tokenizer: Any,
    text_encoder: Any,
    captions: Sequence[Sequence[str]],
    text_tokens: int,
) -> torch.Tensor:
    """T5 embeddings of every scene caption, concatenated per sample: (B, n * text_tokens, D).

    ``captions[b][i]`` is scene i of sample b. Each caption is padded or truncated to
    ``text_tokens`` and encoded without an attention mask, as CogVideoX's pipeline does.
    """
    num_scenes = {len(scenes) for scenes in captions}
    if len(num_scenes) != 1:
        raise ValueError(f"every sample needs the same number of scene captions, got {num_scenes}")
    flat = [caption for scenes in captions for caption in scenes]
    embeds, _ = encode_prompt_batch(tokenizer, text_encoder, flat, text_tokens)
    return embeds.reshape(len(captions), -1, embeds.shape[-1])
