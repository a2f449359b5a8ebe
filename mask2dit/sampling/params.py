"""What a sampling call takes (``SamplingParams``) and gives back (``StoryOutput``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

__all__ = ["SamplingParams", "StoryOutput"]


@dataclass(frozen=True)
class SamplingParams:
    """Every knob of one sampling call (``to_dict()`` goes into meta.json as is).

    Defaults are the paper's reference release: 50 steps, guidance 6, 49 frames of
    480x720 per scene, 226 T5 tokens per scene prompt.
    """

    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    #: CogVideoXPipeline's cosine guidance schedule (its exact formula).
    use_dynamic_cfg: bool = False
    #: Replicated for every scene of the unconditional half.
    negative_prompt: str = ""
    #: Tokens per scene prompt (padded/truncated); 226 for the real CogVideoX T5.
    text_tokens: int = 226
    #: Default pixel frames per scene (8k + 1, see ``latent_frames``); a call may give one
    #: count per scene.
    num_frames: int = 49
    height: int = 480
    width: int = 720
    #: Passed to ``scheduler.step`` when it takes it, as the stock pipeline does.
    eta: float = 0.0
    #: Mask policy name or rule string; ``None`` keeps the model's.
    policy: str | None = None
    #: Context latents: posterior sample (as training encodes) or its mode.
    context_posterior: Literal["sample", "mode"] = "sample"
    #: ``uint8`` frames, or ``float`` in [0, 1] (diffusers' ``output_type="np"``).
    output: Literal["uint8", "float"] = "uint8"

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.text_tokens < 1:
            raise ValueError("num_inference_steps and text_tokens must be >= 1")
        if self.context_posterior not in ("sample", "mode"):
            raise ValueError(
                f"context_posterior must be 'sample' or 'mode', got {self.context_posterior!r}"
            )
        if self.output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StoryOutput:
    """One sampled story.

    ``frames[i]`` is scene i, (T_i, H, W, 3) on the CPU (uint8, or float in [0, 1]);
    ``latents`` (1, F, C, h, w) are the final latents of all scenes, the context ones
    exactly as given; ``scene_frames`` the latent frames per scene; the first
    ``context_scenes`` scenes were given, not generated; ``truncated[i]`` says whether
    prompt i was cut to ``text_tokens``.
    """

    frames: list[torch.Tensor]
    latents: torch.Tensor
    scene_frames: list[int]
    context_scenes: int = 0
    truncated: tuple[bool, ...] = field(default_factory=tuple)
