"""The frozen encoders' conventions, shared by training and sampling.

Both sides must encode exactly alike - a scene's video alone through the VAE, scaled by
``scaling_factor``; each prompt padded or truncated to the text length and run through
T5 without an attention mask, as diffusers' CogVideoX pipeline does - or the sampler's
context would not be what the model was trained on. The tokenizer, T5 and VAE are
passed in (duck-typed), so this module needs only torch.

Shape legend: B batch, T pixel frames, H/W pixels, f latent frames, C latent channels,
h/w latent size, N prompts, L text tokens, D text width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["encode_prompt_batch", "encode_video", "to_unit_range"]


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [-1, 1]; float input is taken as already there."""
    if video.dtype == torch.uint8:
        return video.float() / 127.5 - 1.0
    return video.float()


@torch.no_grad()
def encode_video(
    vae: Any,
    video_B3THW: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """One scene's VAE latents (B, f, C, h, w), scaled by ``vae.config.scaling_factor``.

    ``video_B3THW`` is uint8 or float in [-1, 1]. ``sample`` draws from the posterior with
    ``generator`` (CogVideoX training does); otherwise the posterior's mode is used.
    """
    # The VAE's own device and dtype, not its first parameter's: ToyVAE has none.
    pixels = to_unit_range(video_B3THW).to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    z_BCfhw = posterior.sample(generator) if sample else posterior.mode()
    return z_BCfhw.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor


@torch.no_grad()
def encode_prompt_batch(
    tokenizer: Any, text_encoder: Any, prompts: Sequence[str], text_tokens: int
) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """T5 embeddings (N, text_tokens, D) of N prompts and which of them were truncated.

    Without an attention mask every row is computed independently, so one batch equals
    encoding the prompts one by one.
    """
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=text_tokens,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    lengths = [len(row) for row in tokenizer(list(prompts), add_special_tokens=True).input_ids]
    param = next(text_encoder.parameters())
    embeds_NLD = text_encoder(ids.to(param.device))[0]
    return embeds_NLD, tuple(length > text_tokens for length in lengths)
