"""Story order: which clips make each training sample, per rank, resumable exactly.

Each epoch has a seeded permutation of items (pre-training: clips, taken ``num_scenes`` at
a time; SFT: shot groups). Story ``k`` of the epoch belongs to rank ``k % world_size``,
and every rank gets the same number of stories per epoch (the remainder is dropped) so
data-parallel ranks step together. Everything a story depends on is a pure function of
(seed, epoch, k), so ``state_dict`` needs only the epoch and the rank's position.

A run resumed on another number of ranks continues the epoch exactly:
:meth:`merged_state` takes the positions every old rank saved and returns the epoch's
stories nobody has taken yet, which the new ranks then deal among themselves (stories
``start`` onwards, less the few in ``done`` that a rank ahead of the others took). A story
is neither repeated nor skipped within the epoch; the next one starts afresh.
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
        # This epoch's stories are k = start.. less `done` (taken before a reshard); those
        # of the next epoch that were taken early are `done_next`.
        self.start, self.done, self.done_next = 0, [], []
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
            self.start, self.done, self.done_next = 0, self.done_next, []
            self.per_rank = self._left(0, self.done) // self.world_size
        story = self._story(self._global(self.rank + self.world_size * self.position))
        self.position += 1
        return story

    def _left(self, start: int, done: list[int]) -> int:
        """Stories of the epoch from ``start`` on that are not ``done``."""
        return self.stories_per_epoch() - start - len(done)

    def _global(self, j: int, start: int | None = None, done: list[int] | None = None) -> int:
        """The epoch's story index of the ``j``-th story left (from ``start``, less ``done``)."""
        start = self.start if start is None else start
        k = start + j
        for taken in self.done if done is None else done:  # sorted, all >= start
            if taken > k:
                break
            k += 1
        return k

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
            "start": self.start,
            "done": list(self.done),
            "done_next": list(self.done_next),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` left off: this rank's own saved state, or a
        :meth:`merged_state` (any number of ranks)."""
        self._check_same_data(state)
        saved_world = state.get("world_size")
        if saved_world is not None and saved_world != self.world_size:
            raise DataError(
                f"{self.kind} story order was saved by {saved_world} ranks, this run has "
                f"{self.world_size}: resume from the merged_state of every rank's position"
            )
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start = int(state.get("start", 0))
        self.done = [int(k) for k in state.get("done", [])]
        self.done_next = [int(k) for k in state.get("done_next", [])]
        self.per_rank = self._left(self.start, self.done) // self.world_size
        self.position = min(int(state["position"]), self.per_rank)

    def merged_state(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The stories of the epoch that no rank has taken, from the states every rank of
        an earlier run saved (in rank order): a state any number of ranks resume from.

        Ranks step together but a rank that skipped a bad story has taken one more, so
        the ranks' positions differ by a few: the stories left start at the first one
        some rank has not taken, less those another rank took beyond it. A rank that
        already went on to the next epoch took its whole share of this one. The epoch's
        remainder stays out, as it would have: with the same global batch the new ranks
        then take, step for step, the stories the old ones would have, to the epoch's end.
        """
        self._check_states(states)
        world, epoch = len(states), min(int(s["epoch"]) for s in states)
        here = [s for s in states if int(s["epoch"]) == epoch]
        start, done = int(here[0].get("start", 0)), [int(k) for k in here[0].get("done", [])]
        per_rank = self._left(start, done) // world
        # Position j of the epoch's stories left (j = rank + world * q): taken or not.
        taken = [int(s["position"]) if int(s["epoch"]) == epoch else per_rank for s in states]
        # The first story some rank has not taken; left out after it: those another rank
        # took, and the epoch's remainder (past world * per_rank), which no rank would take.
        first = min(
            [r + world * q for r, q in enumerate(taken) if q < per_rank] or [per_rank * world]
        )
        left_out = [
            self._global(j, start, done)
            for j in range(first, self._left(start, done))
            if j >= world * per_rank or j // world < taken[j % world]
        ]
        next_done = self._taken_of_next_epoch(states, epoch)
        merged = {**here[0], "position": 0, "rank": None, "world_size": None}
        if first >= world * per_rank:  # the epoch is used up: the next, less what was taken of it
            return {**merged, "epoch": epoch + 1, "start": 0, "done": next_done, "done_next": []}
        new_start = self._global(first, start, done)
        return {
            **merged,
            "epoch": epoch,
            "start": new_start,
            "done": sorted({*left_out, *(k for k in done if k > new_start)}),
            "done_next": next_done,
        }

    def _check_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Every rank's state, in rank order, of this data, at most an epoch apart."""
        world = len(states)
        for rank, state in enumerate(states):
            self._check_same_data(state)
            if state["rank"] != rank or state["world_size"] != world:
                raise DataError(
                    f"{self.kind} story order: position {rank} of {world} was saved as rank "
                    f"{state['rank']} of {state['world_size']}; the checkpoint is inconsistent"
                )
        epochs = [int(s["epoch"]) for s in states]
        if max(epochs) > min(epochs) + 1:
            raise DataError(f"{self.kind} story order: the ranks' positions are epochs apart")

    def _taken_of_next_epoch(self, states: Sequence[dict[str, Any]], epoch: int) -> list[int]:
        """Stories of epoch ``epoch + 1`` already taken: before the last reshard (every
        rank still in ``epoch`` carries those), and by the ranks already in it (their
        layout: start 0, less those)."""
        world = len(states)
        taken = {int(k) for s in states if int(s["epoch"]) == epoch for k in s.get("done_next", [])}
        for s in states:
            if int(s["epoch"]) == epoch + 1:
                early = [int(k) for k in s.get("done", [])]
                positions = range(int(s["position"]))
                taken.update(self._global(s["rank"] + world * q, 0, early) for q in positions)
        return sorted(taken)

    def _check_same_data(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("data") != self._fingerprint:
            raise DataError(
                f"{self.kind} story order was saved for other data (or another stage); "
                "resume with the manifest and num_scenes of that run"
            )


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
