"""The denoising loop of ``diffusers.CogVideoXPipeline.__call__`` over a whole story.

Step for step the stock loop - the guidance batch ``[uncond; cond]``, ``scale_model_input``,
``noise_pred.float()``, the optional dynamic CFG formula, the DDIM step or the DPM step with
its ``old_pred_original_sample``, the cast back to the latent dtype - with ``Mask2DiT`` in
place of the stock transformer, plus extension mode: the first scenes are clean context,
modulated at t = 0 and restored after every scheduler step (docs/method.md §5, §7).

Shape legend: S stories, B model batch (S, or 2S with guidance), n scenes, F latent frames
(all scenes), C latent channels, h/w latent height/width, L text tokens (all scenes),
D text width.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from mask2dit.model import Mask2DiT
from mask2dit.sampling.params import SamplingParams

__all__ = ["SCHEDULERS", "Scheduler", "StoryText", "build_scheduler", "denoise"]

SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
Scheduler = CogVideoXDDIMScheduler | CogVideoXDPMScheduler


def build_scheduler(kind: str, config: Any) -> Scheduler:
    """A CogVideoX ``ddim`` or ``dpm`` scheduler from a scheduler config (both share it)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; valid: {sorted(SCHEDULERS)}")
    return SCHEDULERS[kind].from_config(config)


@dataclass(frozen=True)
class StoryText:
    """The model's text input for S stories: (B, n * text_tokens, D).

    With guidance the batch is ``[uncond; cond]`` (the stock order: S unconditional rows,
    then S conditional) and B = 2S, else B = S.
    """

    embeds: torch.Tensor
    text_tokens: int
    guided: bool

    def first_scenes(self, num_scenes: int) -> torch.Tensor:
        """Text of the first ``num_scenes`` scenes: each extension step runs on a prefix."""
        return self.embeds[:, : num_scenes * self.text_tokens]


def denoise(
    transformer: Mask2DiT,
    scheduler: Scheduler,
    latents: torch.Tensor,
    text: StoryText,
    scene_frames: list[int],
    params: SamplingParams,
    generators: Sequence[torch.Generator | None] | None,
    context_frames: int = 0,
) -> torch.Tensor:
    """Run the sampler from ``latents`` (S, F, C, h, w), S stories, and return the final
    latents; story s's scheduler noise (the DPM step's) comes from ``generators[s]``.

    The first ``context_frames`` latent frames are whole context scenes: their timestep is
    0 in every call and they are put back to their given values after every step, so the
    result holds them bit for bit.
    """
    num_scenes = len(scene_frames)
    num_context = _scenes_in(scene_frames, context_frames)
    embeds = text.first_scenes(num_scenes)
    clean = latents[:, :context_frames].clone()
    dtype = latents.dtype
    scheduler.set_timesteps(params.num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    step_kwargs = _step_kwargs(scheduler, _step_generator(generators), params.eta)
    old_pred_original_sample = None  # DPM-Solver++ (2M) history, as in the stock loop
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if text.guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        v_pred = transformer(
            model_input,
            embeds,
            _scene_timesteps(t, model_input.shape[0], num_scenes, num_context),
            scene_frames,
            text_lens=[text.text_tokens] * num_scenes,
            policy=params.policy,
        ).float()
        v_pred = _guide(v_pred, t, params, text.guided)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            back = timesteps[i - 1] if i > 0 else None
            latents, old_pred_original_sample = scheduler.step(
                v_pred, old_pred_original_sample, t, back, latents, **step_kwargs, return_dict=False
            )
        else:
            latents = scheduler.step(v_pred, t, latents, **step_kwargs, return_dict=False)[0]
        latents = latents.to(dtype)
        if context_frames:
            # The step moved the context too; docs/method.md §7: put it back clean every step.
            latents = torch.cat([clean, latents[:, context_frames:]], dim=1)
    return latents


def _step_generator(
    generators: Sequence[torch.Generator | None] | None,
) -> torch.Generator | list[torch.Generator] | None:
    """What ``scheduler.step`` takes: one generator, or a list that seeds each story's rows
    alone (``diffusers.utils.torch_utils.randn_tensor``)."""
    if not generators or all(g is None for g in generators):
        return None
    if any(g is None for g in generators):
        raise ValueError("give every story of a batch a generator, or none of them")
    return generators[0] if len(generators) == 1 else list(generators)


def _step_kwargs(
    scheduler: Scheduler, generator: torch.Generator | list[torch.Generator] | None, eta: float
) -> dict[str, Any]:
    # The stock prepare_extra_step_kwargs: the DPM step draws its noise from generator.
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _scenes_in(scene_frames: list[int], context_frames: int) -> int:
    """How many whole scenes the first ``context_frames`` latent frames are."""
    total, scenes = 0, 0
    while total < context_frames:
        total += scene_frames[scenes]
        scenes += 1
    if total != context_frames or scenes >= len(scene_frames):
        raise ValueError(
            f"{context_frames} context frames must be whole scenes of {scene_frames}, "
            "leaving at least one scene to generate"
        )
    return scenes


def _scene_timesteps(
    t: torch.Tensor, batch_size: int, num_scenes: int, num_context: int
) -> torch.Tensor:
    """(B,) stock broadcast without context; (B, n) with the context scenes at t = 0."""
    if num_context == 0:
        return t.expand(batch_size)
    timesteps = t.expand(batch_size, num_scenes).clone()
    timesteps[:, :num_context] = 0
    return timesteps


def _guide(
    v_pred: torch.Tensor, t: torch.Tensor, params: SamplingParams, guided: bool
) -> torch.Tensor:
    """Classifier-free guidance over the ``[uncond; cond]`` halves, the stock formula."""
    if not guided:
        return v_pred
    scale = params.guidance_scale
    if params.use_dynamic_cfg:
        # CogVideoXPipeline's formula verbatim, though it mixes the step count with the
        # timestep value (t ~ 999 vs 50 steps); kept so results match the stock pipeline.
        steps = params.num_inference_steps
        scale = 1 + scale * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
    uncond, cond = v_pred.chunk(2)
    return uncond + scale * (cond - uncond)
