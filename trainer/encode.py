"""Frozen encoders of a training step: scene videos -> VAE latents, scene captions -> T5.

Shape legend: B batch, n scenes, T pixel frames of one scene, F latent frames (all scenes),
C latent channels, H/W pixel and h/w latent height/width, D text width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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
    param = next(vae.parameters())
    latents, scene_frames = [], []
    for video_BTCHW in videos:
        if video_BTCHW.ndim != 5 or video_BTCHW.shape[2] != 3:
            raise ValueError(f"each scene must be (B, T, 3, H, W), got {tuple(video_BTCHW.shape)}")
        pixels = _to_unit_range(video_BTCHW).to(device=param.device, dtype=param.dtype)
        dist = vae.encode(pixels.permute(0, 2, 1, 3, 4)).latent_dist  # VAE takes (B, 3, T, H, W)
        z_BCFhw = dist.sample(generator) if sample else dist.mode()
        latents.append(z_BCFhw.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor)
        scene_frames.append(z_BCFhw.shape[2])
    return torch.cat(latents, dim=1), scene_frames


def _to_unit_range(video: torch.Tensor) -> torch.Tensor:
    if video.dtype == torch.uint8:
        return video.float() / 127.5 - 1.0
    return video.float()


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
    ids = tokenizer(
        flat,
        padding="max_length",
        max_length=text_tokens,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    param = next(text_encoder.parameters())
    embeds = text_encoder(ids.to(param.device))[0]
    return embeds.reshape(len(captions), -1, embeds.shape[-1])
