"""Where a worker's micro-batches come from: the one seam between the loop and the data.

:func:`make_batches` returns a :class:`StoryBatches`: ``next()`` gives one micro-batch as
(videos, captions) - videos a list over scenes of uint8 (B, T, 3, H, W), captions
``[B][n]`` strings - and ``state_dict()`` / ``load_state_dict()`` carry the data position
through checkpoints. The source is the stage's manifest through ``trainer.data``
(``data = {"pretrain": uri, "sft": uri}``), or, with ``data = {"synthetic": true}``,
seeded random stories for smoke runs that need no files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from infra.config import RunConfig
from infra.errors import ConfigError

__all__ = ["Batch", "StoryBatches", "make_batches"]

Batch = tuple[list[torch.Tensor], list[list[str]]]


class StoryBatches(Protocol):
    """Micro-batches of stories for one worker, with a resumable position."""

    def next(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def skip_counts(self) -> dict[str, int]: ...


def make_batches(
    run: RunConfig, data: Mapping[str, Any] | None, rank: int, world_size: int
) -> StoryBatches:
    """The batch source of this worker for ``run.stage``."""
    data = dict(data or {})
    if data.get("synthetic"):
        return SyntheticStories(run, rank)
    uri = data.get(run.stage)
    if not uri:
        raise ConfigError(
            f"no {run.stage} manifest: pass --data-{run.stage} URI to the job (or "
            "data.synthetic for a smoke run without files)"
        )
    return ManifestStories(run, uri, rank, world_size)


class SyntheticStories:
    """Seeded random stories: frame noise around one per-story colour, captions naming it.

    Each micro-batch depends only on (seed, rank, index), so the position is one integer.
    """

    def __init__(self, run: RunConfig, rank: int) -> None:
        self.recipe, self.batch_size = run.recipe, run.deepspeed.micro_batch_per_gpu
        self.rank, self.index = rank, 0

    def next(self) -> Batch:
        r = self.recipe
        g = torch.Generator().manual_seed(hash((r.seed, self.rank, self.index)) & (2**63 - 1))
        self.index += 1
        shape = (self.batch_size, r.frames, 3, r.height, r.width)
        colours = torch.randint(0, 256, (self.batch_size, r.num_scenes, 3), generator=g)
        videos = []
        for scene in range(r.num_scenes):
            base = colours[:, scene, None, :, None, None].float()
            frames = base + 20 * torch.randn(shape, generator=g)
            videos.append(frames.clamp(0, 255).to(torch.uint8))
        captions = [
            [f"scene {i}: colour {tuple(c.tolist())}" for i, c in enumerate(sample)]
            for sample in colours
        ]
        return videos, captions

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])

    def skip_counts(self) -> dict[str, int]:
        return {}


class ManifestStories:
    """Stories from the stage's manifest via ``trainer.data`` (sampler + decoding loader)."""

    def __init__(self, run: RunConfig, uri: str, rank: int, world_size: int) -> None:
        from trainer.data import loader, manifest, samplers

        r = run.recipe
        if run.stage == "pretrain":
            clips, self.read_skips = manifest.read_clips(uri, run.storage)
            sampler = samplers.PretrainSampler(clips, r.num_scenes, r.seed, rank, world_size)
        else:
            groups, self.read_skips = manifest.read_shot_groups(uri, r.num_scenes, run.storage)
            sampler = samplers.SFTSampler(groups, r.num_scenes, r.seed, rank, world_size)
        self.loader = loader.StoryLoader(
            sampler, r.frames, r.height, r.width, run.stage, run.storage, r.seed
        )
        self.batch_size = run.deepspeed.micro_batch_per_gpu

    def next(self) -> Batch:
        items = [next(self.loader) for _ in range(self.batch_size)]  # the loader never ends
        num_scenes = len(items[0].videos)
        videos = [
            torch.stack([torch.as_tensor(item.videos[i]) for item in items])
            for i in range(num_scenes)
        ]
        return videos, [_captions(item.story) for item in items]

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])

    def skip_counts(self) -> dict[str, int]:
        return self.read_skips.merge(self.loader.skips).as_dict()


def _captions(story: Any) -> list[str]:
    """Scene captions of a ``trainer.data`` story, in scene order."""
    return [clip.caption for clip in story.clips]
