"""Frozen-model helpers of the sampler: scene prompts -> T5, context videos <-> VAE latents.

These mirror ``diffusers.CogVideoXPipeline`` (prompt encoding, ``decode_latents``, the
"np" post-processing) and the training encoder (one VAE call per scene), so that the
sampler needs neither the trainer nor the stock pipeline object.

Shape legend: n scenes, T pixel frames of one scene, H/W pixel and h/w latent height/width,
f latent frames of one scene, C latent channels, L text tokens, D text width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mask2dit.encoding import encode_prompt_batch, encode_video

__all__ = [
    "PromptEmbeds",
    "decode_scene",
    "encode_context_video",
    "encode_scene_prompts",
    "to_output_frames",
]

_log = logging.getLogger("m2d.sampler")


@dataclass(frozen=True)
class PromptEmbeds:
    """T5 embeddings of one story's scene prompts, each padded/truncated to ``text_tokens``.

    ``embeds`` is (1, n * text_tokens, D), the scenes concatenated in order, as
    ``Mask2DiT`` takes them. ``truncated[i]`` says whether prompt i lost tokens.
    """

    embeds: torch.Tensor
    text_tokens: int
    truncated: tuple[bool, ...]

    @property
    def num_scenes(self) -> int:
        return len(self.truncated)


@torch.no_grad()
def encode_scene_prompts(
    tokenizer: Any,
    text_encoder: Any,
    prompts: Sequence[str],
    text_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    label: str = "scene",
) -> PromptEmbeds:
    """Encode each prompt as CogVideoXPipeline does (padded to ``text_tokens``, no mask).

    All prompts go through T5 in one batch: without an attention mask every row is
    computed independently, so this equals encoding them one by one. Truncated prompts
    are logged as a warning (naming ``label`` and the index) and flagged in the result.
    """
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    embeds_nLD, truncated = encode_prompt_batch(tokenizer, text_encoder, prompts, text_tokens)
    for index, cut in enumerate(truncated):
        if cut:
            _log.warning(
                "%s %d prompt truncated to %d tokens: %.80s",
                label,
                index,
                text_tokens,
                prompts[index],
            )
    embeds = embeds_nLD.reshape(1, -1, embeds_nLD.shape[-1]).to(device=device, dtype=dtype)
    return PromptEmbeds(embeds=embeds, text_tokens=text_tokens, truncated=truncated)


@torch.no_grad()
def encode_context_video(
    vae: Any,
    frames_THWC: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """VAE latents (1, f, C, h, w), scaled by ``scaling_factor``, of one context scene.

    ``frames_THWC`` is uint8 (T, H, W, 3) already at the sampling size. Encoded alone, as
    the training encoder encodes each scene; ``sample`` draws from the posterior with
    ``generator`` (training does), otherwise its mode is used (deterministic).
    """
    if frames_THWC.dtype != torch.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(
            f"a context video must be uint8 (T, H, W, 3), got {frames_THWC.dtype} "
            f"{tuple(frames_THWC.shape)}"
        )
    return encode_video(vae, frames_THWC.permute(3, 0, 1, 2)[None], generator, sample)


@torch.no_grad()
def decode_scene(vae: Any, latents_1fChw: torch.Tensor) -> torch.Tensor:
    """Decode one scene's latents to pixels (1, 3, T, H, W) in [-1, 1].

    Exactly ``CogVideoXPipeline.decode_latents``: the same ``1 / scaling_factor * x``
    (not ``x / scaling_factor``, which can differ in the last bit).
    """
    latents = latents_1fChw.permute(0, 2, 1, 3, 4).to(device=vae.device, dtype=vae.dtype)
    latents = 1 / vae.config.scaling_factor * latents
    return vae.decode(latents).sample


def to_output_frames(pixels_13THW: torch.Tensor, output: str) -> torch.Tensor:
    """(T, H, W, 3) on the CPU: ``float`` in [0, 1] as diffusers' ``output_type="np"``,
    or ``uint8`` rounded from it as diffusers' PIL conversion does."""
    frames = (pixels_13THW[0] * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu()
    if output == "float":
        return frames
    if output == "uint8":
        return (frames * 255).round().to(torch.uint8)
    raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
