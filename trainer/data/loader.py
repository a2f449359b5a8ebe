"""Decode stories into model-ready frames, skipping bad clips without losing the place.

Frame sampling follows the recipe (docs/method.md §6): ``frames`` frames at the largest
stride up to 3 that fits, pre-training clips inside 5%..95% of the clip, SFT shots
whole; then scale to cover ``height`` x ``width`` and center-crop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from infra.config import StorageConfig
from infra.errors import DataError
from infra.logging import get_logger
from infra.video import VideoError, read_frames, resize_center_crop, sample_frame_indices
from trainer.data.manifest import Clip, SkipCounts
from trainer.data.order import PretrainOrder, SFTOrder, Story, order_state

log = get_logger("data.loader")

SPANS: dict[str, tuple[float, float] | None] = {"pretrain": (0.05, 0.95), "sft": None}
MAX_STRIDE = 3


@dataclass(frozen=True)
class DecodedStory:
    """A story and one uint8 (T, 3, H, W) video per scene, in scene order."""

    story: Story
    videos: list[torch.Tensor]


def clip_frame_count(clip: Clip) -> int:
    """Frames available in a clip: ``num_frames``, capped by the start..end cut if any."""
    if clip.end is None:
        return clip.num_frames
    cut = int((clip.end - (clip.start or 0.0)) * clip.fps + 1e-6)
    return min(clip.num_frames, cut)


def decode_clip(
    clip: Clip,
    frames: int,
    height: int,
    width: int,
    span: tuple[float, float] | None,
    rng: random.Random | None = None,
    storage: StorageConfig | None = None,
) -> torch.Tensor:
    """One clip as uint8 (frames, 3, height, width); VideoError(reason) if unusable."""
    indices = clip_frame_indices(clip, frames, span, rng)
    return decode_frames(clip, indices, height, width, storage)


def clip_frame_indices(
    clip: Clip, frames: int, span: tuple[float, float] | None, rng: random.Random | None = None
) -> list[int]:
    """The frames of ``clip`` that training reads (VideoError ``too_short`` if too few)."""
    return sample_frame_indices(clip_frame_count(clip), frames, MAX_STRIDE, span, rng)


def decode_frames(
    clip: Clip, indices: list[int], height: int, width: int, storage: StorageConfig | None = None
) -> torch.Tensor:
    """The frames at ``indices`` of ``clip``, resized and center-cropped: uint8 (T, 3, H, W)."""
    raw = read_frames(clip.path, indices, storage, start=clip.start, end=clip.end)
    return resize_center_crop(raw, height, width)


class StoryLoader:
    """Iterates DecodedStory in a story order, forever; bad stories are skipped and counted.

    ``skips`` counts skipped stories by the reason of their first bad clip (``missing``,
    ``zero_byte``, ``undecodable``, ``truncated``, ``too_short``). A skipped story still
    advances the order, so ``state_dict`` resumes exactly. ``max_consecutive_skips``
    stories in a row that cannot be used raise DataError: an all-broken dataset is an
    error, not an endless loop. ``span``: the part of each clip frames are drawn from
    (default: the stage's, ``SPANS``; the run's ``data.pretrain_span`` overrides it).
    """

    def __init__(
        self,
        order: PretrainOrder | SFTOrder,
        frames: int,
        height: int,
        width: int,
        stage: Literal["pretrain", "sft"],
        storage: StorageConfig | None = None,
        seed: int = 0,
        max_consecutive_skips: int = 100,
        span: tuple[float, float] | Literal["stage"] | None = "stage",
    ) -> None:
        if stage not in SPANS:
            raise ValueError(f"stage must be 'pretrain' or 'sft', not {stage!r}")
        self.order, self.stage, self.storage, self.seed = order, stage, storage, seed
        self.span = SPANS[stage] if span == "stage" else span
        self.frames, self.height, self.width = frames, height, width
        self.max_consecutive_skips = max_consecutive_skips
        self.skips = SkipCounts()

    def __iter__(self) -> Iterator[DecodedStory]:
        return self

    def __next__(self) -> DecodedStory:
        for _ in range(self.max_consecutive_skips):
            story = next(self.order)
            # A per-story seed (not a shared stream) keeps resumed frame choices identical;
            # story ids are unique within an epoch and carry the epoch.
            rng = random.Random(f"frames:{self.seed}:{story.id}")
            try:
                return DecodedStory(story, [self._decode(clip, rng) for clip in story.clips])
            except VideoError as exc:
                self._skip(story, exc)
        raise DataError(
            f"{self.max_consecutive_skips} stories in a row could not be decoded "
            f"(skipped so far: {self.skips}); check the manifest's paths and files"
        )

    def _decode(self, clip: Clip, rng: random.Random) -> torch.Tensor:
        return decode_clip(clip, self.frames, self.height, self.width, self.span, rng, self.storage)

    def _skip(self, story: Story, exc: VideoError) -> None:
        self.skips.add(exc.reason)
        log.warning("skipped story %s: %s; skips so far: %s", story.id, exc, self.skips)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the order's position and the skip counts."""
        return {"order": self.order.state_dict(), "skips": self.skips.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` of an earlier run."""
        self.order.load_state_dict(order_state(state))
        self.skips = SkipCounts(state.get("skips"))
