"""Mask²DiT sampling (docs/method.md §7): fixed-count stories and auto-regressive extension.

``MultiScenePipeline`` holds a ``Mask2DiT``, the frozen CogVideoX VAE, T5 and tokenizer and
a CogVideoX DDIM or DPM scheduler. Prompts are encoded, noise drawn and latents decoded as
``diffusers.CogVideoXPipeline`` does, and the loop is its loop (``mask2dit.sampling.denoise``),
so at one scene the result is the stock pipeline's (``tests/unit/test_sampler_pipeline.py``).

Shape legend: n scenes, F latent frames (all scenes), C latent channels, h/w latent
height/width, T/H/W pixel frames/height/width of one scene.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.utils.torch_utils import randn_tensor
from transformers import T5EncoderModel

from mask2dit.components import ModelParts, load_parts
from mask2dit.model import Mask2DiT
from mask2dit.policy import DEFAULT_POLICY
from mask2dit.sampling.denoise import SCHEDULERS, Scheduler, StoryText, build_scheduler, denoise
from mask2dit.sampling.encode import (
    decode_scene,
    encode_context_video,
    encode_scene_prompts,
    to_output_frames,
)
from mask2dit.sampling.params import SamplingParams, StoryOutput
from mask2dit.tiny import spatial_compression

__all__ = ["MultiScenePipeline"]

DEFAULT_PARAMS = SamplingParams()  # frozen, so one shared default is safe


class MultiScenePipeline:
    """Samples multi-scene stories from a ``Mask2DiT`` and the frozen CogVideoX parts.

    ``generate``/``extend``/``extend_latents`` sample one story (its n and frames per
    scene are its own); their ``*_batch`` forms sample several stories of the same shape
    in one model batch (B stories, 2B rows with classifier-free guidance), each from its
    own generator, so each equals its one-story call to float tolerance. Calls run under
    ``torch.no_grad``; latents and text embeddings take the transformer's device and dtype
    (bf16 on GPU).
    """

    def __init__(
        self,
        transformer: Mask2DiT,
        vae: AutoencoderKLCogVideoX,
        text_encoder: T5EncoderModel,
        tokenizer: Any,
        scheduler: Scheduler,
        *,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
    ) -> None:
        if not isinstance(scheduler, tuple(SCHEDULERS.values())):
            raise TypeError(
                f"scheduler must be one of {[c.__name__ for c in SCHEDULERS.values()]}, got "
                f"{type(scheduler).__name__}"
            )
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        # The stock VAE memory switches (tiling: 480x720 decoded in overlapping tiles;
        # slicing: one sample at a time), so their results are the stock ones.
        if vae_tiling:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        if vae_slicing:
            vae.enable_slicing()
        else:
            vae.disable_slicing()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        scheduler: str = "ddim",
        policy: str = DEFAULT_POLICY,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> MultiScenePipeline:
        """Load a local diffusers CogVideoX folder (subfolders ``transformer``, ``vae``,
        ``text_encoder``, ``tokenizer``, ``scheduler``); ``scheduler`` picks ``ddim`` or
        ``dpm`` over the folder's scheduler config. ``dtype`` defaults to bf16 on CUDA
        (as CogVideoX runs) and float32 elsewhere. ``kwargs`` go to the constructor.
        """
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        parts = load_parts(path, dtype)
        return cls.from_parts(parts, scheduler=scheduler, policy=policy, **kwargs).to(device)

    @classmethod
    def from_parts(
        cls,
        parts: ModelParts,
        *,
        scheduler: str = "ddim",
        policy: str = DEFAULT_POLICY,
        **kwargs: Any,
    ) -> MultiScenePipeline:
        """Wrap loaded parts (``mask2dit.components``); ``scheduler`` is ``ddim`` or ``dpm``
        over the parts' scheduler config."""
        return cls(
            Mask2DiT(parts.transformer, policy=policy),
            parts.vae,
            parts.text_encoder,
            parts.tokenizer,
            build_scheduler(scheduler, parts.scheduler.config),
            **kwargs,
        )

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> MultiScenePipeline:
        """Move (and optionally cast) every model, in eval mode; returns ``self``."""
        for module in (self.transformer, self.vae, self.text_encoder):
            # Without dtype each model keeps its own (e.g. a float32 VAE next to bf16 DiT).
            if dtype is None:
                module.to(device=device)
            else:
                module.to(device=device, dtype=dtype)
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> StoryOutput:
        """Fixed-count generation: all ``len(prompts)`` scenes in one denoising pass.

        ``num_frames``: pixel frames for every scene or one count per scene (default
        ``params.num_frames``); each must be 8k + 1 (see ``latent_frames``).
        """
        return self.generate_batch(
            [prompts], params, num_frames=num_frames, generators=[generator]
        )[0]

    @torch.no_grad()
    def generate_batch(
        self,
        stories: Sequence[Sequence[str]],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[StoryOutput]:
        """``generate`` for B stories of the same scene count in one model batch; story b
        draws from ``generators[b]`` alone (default: none)."""
        generators = _generators(stories, generators)
        scene_frames = [
            self.latent_frames(t) for t in _per_scene(num_frames, _one_shape(stories), params)
        ]
        text, truncated = self._encode_prompts(stories, params)
        noise = torch.cat([self._noise(sum(scene_frames), params, g) for g in generators])
        latents = denoise(
            self.transformer, self.scheduler, noise, text, scene_frames, params, generators
        )
        return self._outputs(latents, scene_frames, params, 0, truncated)

    def extend(
        self,
        prompts: Sequence[str],
        context_videos: Sequence[torch.Tensor],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> StoryOutput:
        """Auto-regressive extension of k context videos by ``len(prompts) - k`` scenes.

        ``context_videos`` are uint8 (T, H, W, 3) already at ``params.height x
        params.width`` (sampled and cropped by the caller, as training reads clips), each
        encoded alone. ``prompts`` covers the context scenes and the new ones;
        ``num_frames`` is for the new scenes. Randomness order: context posterior samples
        (``context_posterior="sample"``), then each new scene's noise, in scene order.
        """
        return self.extend_batch(
            [prompts], [context_videos], params, num_frames=num_frames, generators=[generator]
        )[0]

    @torch.no_grad()
    def extend_batch(
        self,
        stories: Sequence[Sequence[str]],
        context_videos: Sequence[Sequence[torch.Tensor]],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[StoryOutput]:
        """``extend`` for B stories in one model batch: the same scene count, and context
        videos of the same count and lengths; story b draws from ``generators[b]`` alone."""
        generators = _generators(stories, generators)
        if len(context_videos) != len(stories) or not all(context_videos):
            raise ValueError("extend needs at least one context video per story; use generate()")
        context = [
            [self._encode_context(video, params, generator) for video in videos]
            for videos, generator in zip(context_videos, generators, strict=True)
        ]
        frames = {tuple(c.shape[1] for c in story) for story in context}
        if len(frames) != 1:
            raise ValueError(f"the stories' context scenes differ in latent frames: {frames}")
        return self.extend_latents_batch(
            stories,
            torch.cat([torch.cat(story, dim=1) for story in context]),
            list(frames.pop()),
            params,
            num_frames=num_frames,
            generators=generators,
        )

    def extend_latents(
        self,
        prompts: Sequence[str],
        context_latents: torch.Tensor,
        context_frames: Sequence[int],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> StoryOutput:
        """Extension from clean context latents (1, F_ctx, C, h, w) of ``len(context_frames)``
        scenes (latent frames each, e.g. a previous ``StoryOutput``'s ``latents`` and
        ``scene_frames``); ``num_frames`` is pixel frames per *new* scene.

        New scenes are generated one at a time; each one's final latents join the context
        of the next as they are. They are what its frames decode from, so the context stays
        exactly the scene shown - no lossy decode -> uint8 -> encode round trip that would
        drift further with every chained scene, and no extra VAE encode.
        """
        return self.extend_latents_batch(
            [prompts],
            context_latents,
            context_frames,
            params,
            num_frames=num_frames,
            generators=[generator],
        )[0]

    @torch.no_grad()
    def extend_latents_batch(
        self,
        stories: Sequence[Sequence[str]],
        context_latents: torch.Tensor,
        context_frames: Sequence[int],
        params: SamplingParams = DEFAULT_PARAMS,
        *,
        num_frames: int | Sequence[int] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[StoryOutput]:
        """``extend_latents`` for B stories of the same scene count in one model batch;
        ``context_latents`` is (B, F_ctx, C, h, w), story b draws from ``generators[b]``."""
        generators = _generators(stories, generators)
        num_context = len(context_frames)
        new_prompts = _one_shape(stories)[num_context:]
        if not new_prompts:
            raise ValueError(
                f"{len(stories[0])} prompts for {num_context} context scenes: give one prompt "
                "per context scene plus at least one for a new scene"
            )
        self._check_context(context_latents, len(stories), context_frames, params)
        new_frames = [self.latent_frames(t) for t in _per_scene(num_frames, new_prompts, params)]
        text, truncated = self._encode_prompts(stories, params)
        latents = context_latents.to(device=self.device, dtype=self.dtype)
        scene_frames = list(context_frames)
        for frames in new_frames:
            noise = torch.cat([self._noise(frames, params, g) for g in generators])
            latents = denoise(
                self.transformer,
                self.scheduler,
                torch.cat([latents, noise], dim=1),
                text,
                [*scene_frames, frames],
                params,
                generators,
                context_frames=sum(scene_frames),
            )
            scene_frames.append(frames)
        return self._outputs(latents, scene_frames, params, num_context, truncated)

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a scene of ``pixel_frames`` frames; raises unless it round-trips.

        The CogVideoX VAE maps 4k + 1 frames to k + 1 latents, but decodes latents in
        2-frame batches after a first odd batch: an even latent count comes back as 4
        frames per latent (45 -> 12 -> 48). So scenes have 8k + 1 frames (1, 9, ..., 49).
        The toy VAE (ratio 1) keeps the same rule: 2k + 1 frames (the toy world's 5).
        """
        ratio = self.vae.config.temporal_compression_ratio
        latent = (pixel_frames - 1) // ratio + 1
        if pixel_frames < 1 or (pixel_frames - 1) % ratio or latent % 2 == 0:
            examples = ", ".join(str(2 * ratio * k + 1) for k in range(3))
            raise ValueError(
                f"{pixel_frames} frames per scene: must be {2 * ratio}k + 1 ({examples}, ...) "
                "so that the VAE decodes the scene back to the same frame count"
            )
        return latent

    # ------------------------------------------------------------------ inputs / outputs

    def _encode_prompts(
        self, stories: Sequence[Sequence[str]], params: SamplingParams
    ) -> tuple[StoryText, list[tuple[bool, ...]]]:
        """Each distinct story's scene prompts once (seeds of a story share them), and with
        guidance the negative prompt once, repeated per scene before them."""
        encode = (self.tokenizer, self.text_encoder)
        place = (params.text_tokens, self.device, self.dtype)
        encoded = {}
        for prompts in stories:
            if tuple(prompts) not in encoded:
                encoded[tuple(prompts)] = encode_scene_prompts(*encode, prompts, *place)
        conds = [encoded[tuple(prompts)] for prompts in stories]
        embeds = torch.cat([cond.embeds for cond in conds])
        guided = params.guidance_scale > 1.0  # the stock rule: 1 means no guidance
        if guided:
            # One T5 pass; unmasked T5 gives every copy the same rows anyway.
            negative = encode_scene_prompts(
                *encode, [params.negative_prompt], *place, label="negative"
            )
            num_scenes = len(stories[0])
            uncond = negative.embeds.repeat(len(stories), num_scenes, 1)
            embeds = torch.cat([uncond, embeds])  # the stock [uncond; cond] halves
        return StoryText(embeds, params.text_tokens, guided), [cond.truncated for cond in conds]

    def _noise(
        self, num_frames: int, params: SamplingParams, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Initial latents as the stock ``prepare_latents``: randn * init_noise_sigma."""
        shape = (1, num_frames, self.transformer.config.in_channels, *self._latent_size(params))
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise * self.scheduler.init_noise_sigma

    def _encode_context(
        self, video: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
    ) -> torch.Tensor:
        expected = (params.height, params.width)
        if video.ndim != 4 or tuple(video.shape[1:3]) != expected:
            raise ValueError(
                f"context video has shape {tuple(video.shape)}; expected (T, {expected[0]}, "
                f"{expected[1]}, 3) - sample and crop it to the sampling size first"
            )
        self.latent_frames(video.shape[0])
        sample = params.context_posterior == "sample"
        latents = encode_context_video(self.vae, video, generator, sample=sample)
        return latents.to(device=self.device, dtype=self.dtype)

    def _check_context(
        self,
        latents: torch.Tensor,
        batch: int,
        context_frames: Sequence[int],
        params: SamplingParams,
    ) -> None:
        if not context_frames or any(f < 1 or f % 2 == 0 for f in context_frames):
            raise ValueError(
                f"context_frames {list(context_frames)}: need odd latent frame counts (8k + 1 "
                "pixel frames), one per context scene"
            )
        height, width = self._latent_size(params)
        expected = (batch, sum(context_frames), self.transformer.config.in_channels, height, width)
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"context latents have shape {tuple(latents.shape)}, expected {expected}"
            )

    def _outputs(
        self,
        latents: torch.Tensor,
        scene_frames: list[int],
        params: SamplingParams,
        context_scenes: int,
        truncated: list[tuple[bool, ...]],
    ) -> list[StoryOutput]:
        """Each story's scenes decoded separately (the VAE never sees a scene boundary)."""
        outputs = []
        for story, cut in zip(latents.split(1), truncated, strict=True):
            frames, start = [], 0
            for count in scene_frames:
                pixels = decode_scene(self.vae, story[:, start : start + count])
                frames.append(to_output_frames(pixels, params.output))
                start += count
            outputs.append(StoryOutput(frames, story, list(scene_frames), context_scenes, cut))
        return outputs

    def _latent_size(self, params: SamplingParams) -> tuple[int, int]:
        spatial = spatial_compression(self.vae.config)
        multiple = spatial * self.transformer.config.patch_size
        if params.height % multiple or params.width % multiple:
            raise ValueError(
                f"size {params.height}x{params.width}: height and width must be multiples of "
                f"{multiple} (VAE factor {spatial} x patch size)"
            )
        return params.height // spatial, params.width // spatial


def _per_scene(
    num_frames: int | Sequence[int] | None, prompts: Sequence[str], params: SamplingParams
) -> list[int]:
    """Pixel frames of each scene from one count, one count per scene, or the default."""
    if num_frames is None:
        num_frames = params.num_frames
    if isinstance(num_frames, int):
        return [num_frames] * len(prompts)
    frames = [int(t) for t in num_frames]
    if len(frames) != len(prompts):
        raise ValueError(f"num_frames has {len(frames)} entries for {len(prompts)} scenes")
    return frames


def _generators(
    stories: Sequence[Sequence[str]], generators: Sequence[torch.Generator | None] | None
) -> list[torch.Generator | None]:
    """One generator (or None) per story."""
    if not stories:
        raise ValueError("no stories to sample")
    if generators is None:
        return [None] * len(stories)
    if len(generators) != len(stories):
        raise ValueError(f"{len(generators)} generators for {len(stories)} stories")
    return list(generators)


def _one_shape(stories: Sequence[Sequence[str]]) -> Sequence[str]:
    """The first story's prompts, once every story is checked to have as many scenes."""
    counts = {len(prompts) for prompts in stories}
    if len(counts) != 1:
        raise ValueError(f"stories of one batch need the same scene count, got {sorted(counts)}")
    return stories[0]
