"""Mask²DiT adapter over a stock diffusers ``CogVideoXTransformer3DModel``
(docs/method.md §2, §3, §5).

The adapter adds no parameters. It re-runs the stock forward pass over the stock submodules
(``patch_embed``, ``time_embedding``, every block's ``norm1/attn1/norm2/ff``, ``norm_final``,
``norm_out``, ``proj_out``) with three changes: the scene mask policy in every attention,
RoPE / sin-cos positions for the total frame count (frame indices continue across scenes),
and per-scene timesteps in every AdaLN-Zero and the final norm (extension mode).

Shape legend: B batch, F latent frames (all scenes), C channels, H/W latent height/width,
n scenes, R timestep runs (consecutive scenes sharing one timestep in every sample),
Lt/Lv text/video tokens, D model width, E time-embedding width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch.utils.checkpoint import checkpoint

from mask2dit.attention import SceneLayout
from mask2dit.blocks import (
    MaskedCogVideoXAttnProcessor,
    Policy,
    RotaryEmb,
    adaln,
    block_forward,
    linear_fp32,
    modulation,
    timestep_runs,
)
from mask2dit.policy import DEFAULT_POLICY, resolve_policy
from mask2dit.weights import load_pretrained

__all__ = [
    "Mask2DiT",
    "check_supported_config",
    "video_rotary_embedding",
]


def check_supported_config(config: Any) -> None:
    """Raise ``ValueError`` for CogVideoX variants the adapter does not handle."""
    if getattr(config, "patch_size_t", None) is not None:
        raise ValueError(
            "CogVideoX 1.5 (patch_size_t set) is not supported: only CogVideoX 1.0 "
            "transformers (2B sin-cos, 5B RoPE) are"
        )
    if getattr(config, "use_learned_positional_embeddings", False):
        raise ValueError(
            "learned positional embeddings (CogVideoX-5b-I2V) are not supported: they are "
            "fixed to one clip length and cannot span several scenes"
        )
    if getattr(config, "ofs_embed_dim", None):
        raise ValueError("ofs embeddings (CogVideoX 1.5 I2V) are not supported")


def _resize_crop_region_for_grid(
    src: tuple[int, int], tgt_width: int, tgt_height: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Same arithmetic as diffusers' CogVideoX pipeline (kept here to avoid importing it)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, round(tgt_height / h * w)
    else:
        resize_width, resize_height = tgt_width, round(tgt_width / w * h)
    crop_top = round((tgt_height - resize_height) / 2.0)
    crop_left = round((tgt_width - resize_width) / 2.0)
    return (crop_top, crop_left), (crop_top + resize_height, crop_left + resize_width)


def video_rotary_embedding(
    config: Any, num_frames: int, height: int, width: int, device: torch.device | None = None
) -> RotaryEmb:
    """RoPE (cos, sin) for ``num_frames`` latent frames of ``height x width`` latents.

    Exactly the CogVideoX pipeline's ``_prepare_rotary_positional_embeddings`` for 1.0
    models, with frame indices 0 .. num_frames - 1 over all scenes together.
    """
    p = config.patch_size
    grid = (height // p, width // p)
    crops = _resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=crops,
        grid_size=grid,
        temporal_size=num_frames,
        device=device,
    )


class Mask2DiT(torch.nn.Module):
    """Multi-scene CogVideoX: n scene prompts and n scenes' latents in one sequence.

    ``transformer`` (a stock ``CogVideoXTransformer3DModel``) is the only submodule, so the
    state dict is the CogVideoX one. Construction installs ``MaskedCogVideoXAttnProcessor``
    on every attention; calling ``transformer`` directly still gives stock outputs.
    Gradient checkpointing per block follows ``transformer.enable_gradient_checkpointing()``.
    """

    def __init__(
        self, transformer: CogVideoXTransformer3DModel, policy: Policy = DEFAULT_POLICY
    ) -> None:
        super().__init__()
        check_supported_config(transformer.config)
        resolve_policy(policy)  # fail at construction on a bad policy, not mid-training
        self.transformer = transformer
        self.policy = policy
        transformer.set_attn_processor(MaskedCogVideoXAttnProcessor())
        # One cached entry each: positions depend only on (frames, height, width, device).
        self._rope_cache: tuple[tuple, RotaryEmb] | None = None
        self._sincos_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, policy: Policy = DEFAULT_POLICY, **kwargs: Any
    ) -> Mask2DiT:
        """Load a stock CogVideoX transformer (``subfolder=``, ``torch_dtype=`` ... as in
        diffusers) and wrap it."""
        return cls(load_pretrained(CogVideoXTransformer3DModel, path, **kwargs), policy=policy)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> None:
        """Save in the stock CogVideoX format (loadable by diffusers as is)."""
        self.transformer.save_pretrained(path, **kwargs)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        timesteps: torch.Tensor | float,
        scene_frames: Sequence[int],
        text_lens: Sequence[int] | None = None,
        policy: Policy | None = None,
    ) -> torch.Tensor:
        """Predict v for all scenes.

        Args:
            latents: (B, F, C, H, W), the scenes concatenated along the frame axis.
            text_embeds: (B, Lt, D_text), the scene prompts' embeddings concatenated.
            timesteps: a number or (B,) shared by all tokens, or (B, n) per scene
                (extension mode: context scenes 0, target scene t).
            scene_frames: latent frames per scene; sums to F.
            text_lens: text tokens per scene; default an equal split of Lt.
            policy: mask policy for this call; default the one given at construction.

        Returns:
            (B, F, C_out, H, W).
        """
        layout = self._layout(latents, text_embeds, scene_frames, text_lens)
        policy = self.policy if policy is None else policy
        batch_size, num_frames, _, height, width = latents.shape
        timesteps = _scene_timesteps(timesteps, batch_size, layout.num_scenes, latents.device)
        self._check_processors()
        run_timesteps, runs = timestep_runs(timesteps, layout)
        emb_BRE = self._time_embedding(run_timesteps)
        video, text = self._embed(latents, text_embeds)
        rope = self._rope(num_frames, height, width, latents.device)
        for block in self.transformer.transformer_blocks:
            args = (block, video, text, emb_BRE, runs, rope, layout, policy)
            if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
                video, text = checkpoint(block_forward, *args, use_reentrant=False)
            else:
                video, text = block_forward(*args)
        # Older diffusers ran norm_final over [text; video] for RoPE models; a LayerNorm is
        # per token, so normalising the video tokens alone is the same.
        video = self.transformer.norm_final(video)
        shift, scale = modulation(self.transformer.norm_out, emb_BRE, 2)
        video = adaln(video, self.transformer.norm_out.norm, shift, scale, runs.video)
        video = self.transformer.proj_out(video)
        return self._unpatchify(video, batch_size, num_frames, height, width)

    def _check_processors(self) -> None:
        # Another processor would silently drop layout/policy (diffusers filters kwargs).
        for name, proc in self.transformer.attn_processors.items():
            if not isinstance(proc, MaskedCogVideoXAttnProcessor):
                raise ValueError(
                    f"{name} is {type(proc).__name__}; Mask2DiT needs "
                    "MaskedCogVideoXAttnProcessor (was set_attn_processor or "
                    "fuse_qkv_projections called on the transformer?)"
                )

    def _layout(
        self,
        latents: torch.Tensor,
        text_embeds: torch.Tensor,
        scene_frames: Sequence[int],
        text_lens: Sequence[int] | None,
    ) -> SceneLayout:
        """Validate input shapes and build the token layout."""
        cfg = self.config
        if latents.ndim != 5 or text_embeds.ndim != 3:
            raise ValueError(
                f"expected latents (B, F, C, H, W) and text_embeds (B, L, D), got shapes "
                f"{tuple(latents.shape)} and {tuple(text_embeds.shape)}"
            )
        batch_size, num_frames, channels, height, width = latents.shape
        if text_embeds.shape[0] != batch_size:
            raise ValueError(
                f"batch sizes differ: latents {batch_size}, text {text_embeds.shape[0]}"
            )
        if channels != cfg.in_channels or text_embeds.shape[2] != cfg.text_embed_dim:
            raise ValueError(
                f"model takes {cfg.in_channels} latent channels and {cfg.text_embed_dim}-dim "
                f"text, got {channels} and {text_embeds.shape[2]}"
            )
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"latent size {height}x{width} not divisible by patch {cfg.patch_size}"
            )
        scene_frames = tuple(int(f) for f in scene_frames)
        if not scene_frames or min(scene_frames) < 1 or sum(scene_frames) != num_frames:
            raise ValueError(
                f"scene_frames {scene_frames} must be >= 1 each and sum to the {num_frames} "
                "latent frames"
            )
        text_lens = _text_lens(text_embeds.shape[1], len(scene_frames), text_lens)
        tokens_per_frame = (height // cfg.patch_size) * (width // cfg.patch_size)
        return SceneLayout.from_frames(text_lens, scene_frames, tokens_per_frame)

    def _time_embedding(self, timesteps_BR: torch.Tensor) -> torch.Tensor:
        """Stock time embedding of each (sample, run) timestep, in float32: (B, R, E).

        The stock forward casts the sinusoids to the model dtype; here the MLP runs in
        float32 from weights of any dtype (the same ops in fp32), as the modulation does.
        """
        batch_size, runs = timesteps_BR.shape
        embedding = self.transformer.time_embedding
        if embedding.cond_proj is not None or embedding.post_act is not None:
            raise ValueError("Mask2DiT supports CogVideoX's plain timestep MLP only")
        t_emb = self.transformer.time_proj(timesteps_BR.flatten()).float()
        hidden = embedding.act(linear_fp32(embedding.linear_1, t_emb))
        return linear_fp32(embedding.linear_2, hidden).view(batch_size, runs, -1)

    def _embed(self, latents: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``CogVideoXPatchEmbed`` split into video (B, Lv, D) and text (B, Lt, D) tokens."""
        patch_embed = self.transformer.patch_embed
        text = patch_embed.text_proj(text_embeds)
        batch_size, num_frames, channels, height, width = latents.shape
        video = patch_embed.proj(latents.reshape(-1, channels, height, width))
        video = video.view(batch_size, num_frames, *video.shape[1:])
        video = video.flatten(3).transpose(2, 3).flatten(1, 2)
        if patch_embed.use_positional_embeddings:
            # 2B: sin-cos over all frames for video; text would get zeros, so skip it.
            pos = self._sincos(num_frames, height, width, latents.device)
            video = video + pos.to(dtype=video.dtype)
        dropout = self.transformer.embedding_dropout
        return dropout(video), dropout(text)

    def _sincos(
        self, num_frames: int, height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """Video part of the stock joint sin-cos table for the total frame count."""
        pe = self.transformer.patch_embed
        pre_compression_frames = (num_frames - 1) * pe.temporal_compression_ratio + 1
        if (height, width, pre_compression_frames) == (
            pe.sample_height,
            pe.sample_width,
            pe.sample_frames,
        ):
            table = pe.pos_embedding.to(device)
        else:
            key = (num_frames, height, width, device)
            if self._sincos_cache is None or self._sincos_cache[0] != key:
                table = pe._get_positional_embeddings(height, width, pre_compression_frames, device)
                self._sincos_cache = (key, table)
            table = self._sincos_cache[1]
        return table[:, pe.max_text_seq_length :]

    def _rope(
        self, num_frames: int, height: int, width: int, device: torch.device
    ) -> RotaryEmb | None:
        if not self.config.use_rotary_positional_embeddings:
            return None
        key = (num_frames, height, width, device)
        if self._rope_cache is None or self._rope_cache[0] != key:
            rope = video_rotary_embedding(self.config, num_frames, height, width, device)
            self._rope_cache = (key, rope)
        return self._rope_cache[1]

    def _unpatchify(
        self, video: torch.Tensor, batch_size: int, num_frames: int, height: int, width: int
    ) -> torch.Tensor:
        p = self.config.patch_size
        out = video.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
        return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


def _text_lens(total: int, num_scenes: int, text_lens: Sequence[int] | None) -> tuple[int, ...]:
    if text_lens is None:
        if total % num_scenes:
            raise ValueError(
                f"{total} text tokens do not split equally into {num_scenes} scenes; pass text_lens"
            )
        return (total // num_scenes,) * num_scenes
    text_lens = tuple(int(t) for t in text_lens)
    if len(text_lens) != num_scenes or sum(text_lens) != total or min(text_lens) < 1:
        raise ValueError(
            f"text_lens {text_lens} must give >= 1 token for each of {num_scenes} scenes and "
            f"sum to the {total} text tokens"
        )
    return text_lens


def _scene_timesteps(
    timesteps: torch.Tensor | float, batch_size: int, num_scenes: int, device: torch.device
) -> torch.Tensor:
    """(B,) shared or (B, n) per-scene timesteps from a number, (), (B,) or (B, n)."""
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim == 0:
        return t.expand(batch_size)
    if t.shape == (batch_size,) or t.shape == (batch_size, num_scenes):
        return t
    raise ValueError(
        f"timesteps must be a number, (B,) = ({batch_size},) or (B, n) = "
        f"({batch_size}, {num_scenes}), got shape {tuple(t.shape)}"
    )
