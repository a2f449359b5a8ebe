"""Story order: which clips make each training sample, per rank, resumable exactly.

Each epoch has a seeded permutation of items (pre-training: clips, taken ``num_scenes`` at
a time; SFT: shot groups). Story ``k`` of the epoch belongs to rank ``k % world_size``,
and every rank gets the same number of stories per epoch (the remainder is dropped) so
data-parallel ranks step together. Everything a story depends on is a pure function of
(seed, epoch, k), so ``state_dict`` needs only the epoch and the rank's position.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from infra.errors import DataError
from infra.logging import get_logger
from trainer.data.manifest import Clip, ShotGroup

log = get_logger("data.order")


@dataclass(frozen=True)
class Story:
    """One training sample: one clip per scene, in scene order (captions in the clips)."""

    id: str
    clips: tuple[Clip, ...]


class _EpochOrder:
    """Shared machinery: epochs, per-epoch permutation, rank sharding, state."""

    kind = ""

    def __init__(
        self, num_items: int, num_scenes: int, seed: int, rank: int, world_size: int, key: str
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_scenes < 1:
            raise ValueError("num_scenes must be >= 1")
        self.num_scenes, self.seed = num_scenes, seed
        self.rank, self.world_size = rank, world_size
        self._fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
        self._num_items = num_items
        self.per_rank = self.stories_per_epoch() // world_size
        if self.per_rank < 1:
            raise DataError(
                f"{self.kind}: {self.stories_per_epoch()} stories per epoch cannot feed "
                f"{world_size} ranks; add data or use fewer workers"
            )
        self.epoch, self.position = 0, 0
        self._permutation: list[int] | None = None
        self._permutation_epoch = -1

    def stories_per_epoch(self) -> int:
        """Stories in one pass over the data, all ranks together."""
        raise NotImplementedError

    def _story(self, k: int) -> Story:
        raise NotImplementedError

    def __len__(self) -> int:
        """Stories this rank yields per epoch."""
        return self.per_rank

    def __iter__(self) -> Iterator[Story]:
        return self

    def __next__(self) -> Story:
        if self.position >= self.per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        story = self._story(self.rank + self.world_size * self.position)
        self.position += 1
        return story

    def permutation(self) -> list[int]:
        """This epoch's order of items (cached; recomputed when the epoch changes)."""
        if self._permutation_epoch != self.epoch:
            order = list(range(self._num_items))
            random.Random(f"{self.kind}:{self.seed}:{self.epoch}").shuffle(order)
            self._permutation, self._permutation_epoch = order, self.epoch
        return self._permutation

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it resumes with the next story."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.rank,
            "world_size": self.world_size,
            "data": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` left off (same data; any number of ranks)."""
        if state.get("kind") != self.kind or state.get("data") != self._fingerprint:
            raise DataError(
                f"{self.kind} story order was saved for other data (or another stage); "
                "resume with the manifest and num_scenes of that run"
            )
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        position = int(state["position"])
        if state["world_size"] != self.world_size:
            # Elastic resume: continue at the same global story count; a few stories near
            # the cut may repeat, none of the epoch's remainder is lost.
            position = position * int(state["world_size"]) // self.world_size
            log.warning(
                "resuming %s data on %d ranks (saved with %d): restarting this epoch at "
                "global story %d",
                self.kind,
                self.world_size,
                state["world_size"],
                position * self.world_size,
            )
        self.position = min(position, self.per_rank)


class PretrainOrder(_EpochOrder):
    """Pre-training stories: ``num_scenes`` unrelated clips drawn at random.

    Each epoch uses every clip at most once: the permuted clips are cut into stories of
    ``num_scenes`` consecutive entries.
    """

    kind = "pretrain"

    def __init__(
        self,
        clips: Sequence[Clip],
        num_scenes: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.clips = list(clips)
        key = "\n".join(clip.path for clip in self.clips) + f"\n{num_scenes}"
        super().__init__(len(self.clips), num_scenes, seed, rank, world_size, key)

    def stories_per_epoch(self) -> int:
        return self._num_items // self.num_scenes

    def _story(self, k: int) -> Story:
        chosen = self.permutation()[k * self.num_scenes : (k + 1) * self.num_scenes]
        return Story(f"pretrain/e{self.epoch}/{k}", tuple(self.clips[i] for i in chosen))


class SFTOrder(_EpochOrder):
    """SFT stories: a random window of ``num_scenes`` consecutive shots of a group.

    Each epoch visits every group (with at least ``num_scenes`` shots) once, in a seeded
    random order, with a window start drawn per (epoch, story).
    """

    kind = "sft"

    def __init__(
        self,
        groups: Sequence[ShotGroup],
        num_scenes: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.groups = [group for group in groups if len(group.shots) >= num_scenes]
        if len(self.groups) < len(groups):
            log.warning(
                "%d shot groups have fewer than %d shots and are not used",
                len(groups) - len(self.groups),
                num_scenes,
            )
        key = "\n".join(g.id for g in self.groups) + f"\n{num_scenes}"
        super().__init__(len(self.groups), num_scenes, seed, rank, world_size, key)

    def stories_per_epoch(self) -> int:
        return self._num_items

    def _story(self, k: int) -> Story:
        group = self.groups[self.permutation()[k]]
        windows = len(group.shots) - self.num_scenes + 1
        first = random.Random(f"sft-window:{self.seed}:{self.epoch}:{k}").randrange(windows)
        shots = group.shots[first : first + self.num_scenes]
        return Story(f"{group.id}@{first}/e{self.epoch}", shots)


def order_state(loader_state: dict[str, Any]) -> dict[str, Any]:
    """The story order's part of a loader's saved state (``"sampler"`` in checkpoints
    written before the story order had its own name)."""
    return loader_state["order"] if "order" in loader_state else loader_state["sampler"]
