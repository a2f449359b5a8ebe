"""Where a worker's micro-batches come from: the one seam between the loop and the data.

:func:`make_batches` returns a :class:`StoryBatches`: ``next()`` gives one micro-batch as
(videos, captions) - videos a list over scenes of uint8 (B, T, 3, H, W), captions
``[B][n]`` strings - or, from precomputed latents, an :class:`EncodedBatch`; and
``state_dict()`` / ``load_state_dict()`` carry the data position through checkpoints, and
``merged_state()`` turns the positions every rank of a run saved into one that a run on
another number of workers resumes from.
:func:`encode_batch` turns either into the step's latents and text embeddings. The source
is the run's ``data`` section, in this order: ``synthetic`` (seeded random stories for
smoke runs that need no files), the stage's precomputed latents (``<stage>_latents``,
written by ``datajobs.precompute``), or the stage's manifest (``<stage>``) decoded on
the fly. Both file sources draw stories in the same order, so sharding across ranks
and exact resume are the same. ``data.prefetch`` > 0 reads that many micro-batches ahead
in a background thread (:class:`PrefetchedBatches`).
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from infra.config import RunConfig
from infra.errors import ConfigError
from infra.logging import get_logger
from trainer.encode import encode_prompts, encode_videos

__all__ = [
    "Batch",
    "EncodedBatch",
    "PrefetchedBatches",
    "StoryBatches",
    "encode_batch",
    "make_batches",
]

log = get_logger("trainer.batches")

Batch = tuple[list[torch.Tensor], list[list[str]]]


@dataclass
class EncodedBatch:
    """A micro-batch of precomputed stories: per scene the VAE posterior, and T5 text.

    ``means``/``logvars``: a list over scenes of (B, C, f, h, w); ``text``: (B, n * L, D);
    ``captions``: ``[B][n]`` strings (for logs and tests).
    """

    means: list[torch.Tensor]
    logvars: list[torch.Tensor]
    text: torch.Tensor
    captions: list[list[str]]


class StoryBatches(Protocol):
    """Micro-batches of stories for one worker, with a resumable position."""

    def next(self) -> Batch | EncodedBatch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def merged_state(self, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        """What this worker (``rank`` of another world size) loads to continue from the
        positions ``states`` every rank of the checkpoint saved."""
        ...

    def skip_counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def make_batches(run: RunConfig, rank: int, world_size: int) -> StoryBatches:
    """The batch source of this worker for ``run.stage``, read ahead by ``data.prefetch``."""
    source = _source(run, rank, world_size)
    if run.data.prefetch > 0:
        return PrefetchedBatches(source, run.data.prefetch, run.workers.cpus_per_worker)
    return source


def _source(run: RunConfig, rank: int, world_size: int) -> StoryBatches:
    if run.data.synthetic:
        return SyntheticStories(run, rank)
    found = run.data.stage_input(run.stage)
    if found is None:
        raise ConfigError(
            f"no {run.stage} manifest: set data.{run.stage}, data.{run.stage}_latents, or "
            "data.synthetic for a smoke run without files"
        )
    key, uri = found
    if key.endswith("_latents"):
        return PrecomputedStories(run, uri, rank, world_size)
    return ManifestStories(run, uri, rank, world_size)


class PrefetchedBatches:
    """Reads the next ``depth`` micro-batches of ``source`` in a background thread.

    Decoding (PyAV) and resizing (torch) release the GIL, so on a GPU worker the next
    batch is read while the step runs instead of before it. ``state_dict()`` and
    ``skip_counts()`` describe the batches handed out by ``next()``, not those read
    ahead, so a checkpoint resumes exactly where the step was. An error of the source
    (e.g. a dataset where nothing decodes) is raised by the ``next()`` that reaches it.
    """

    def __init__(self, source: StoryBatches, depth: int, threads: int) -> None:
        self.source, self.depth, self.threads = source, depth, threads
        self.position = copy.deepcopy(source.state_dict())
        self.skips = source.skip_counts()
        self.queue: queue.Queue[tuple[Any, Any, Any, BaseException | None]] = queue.Queue(depth)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def next(self) -> Batch | EncodedBatch:
        if self.thread is None:
            self.thread = threading.Thread(target=self._read, name="m2d-prefetch", daemon=True)
            self.thread.start()
        batch, position, skips, error = self.queue.get()
        if error is not None:
            raise error
        self.position, self.skips = position, skips
        return batch

    def _read(self) -> None:
        # Thread settings are per thread: give the reader the worker's CPU budget.
        torch.set_num_threads(self.threads)
        while not self.stopping.is_set():
            try:
                batch = self.source.next()
                position = copy.deepcopy(self.source.state_dict())
                item = (batch, position, self.source.skip_counts(), None)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (None, None, None, exc)
            while not self.stopping.is_set():
                try:
                    self.queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.thread is not None:
            raise RuntimeError("load_state_dict after reading started: restore before next()")
        self.source.load_state_dict(state)
        self.position = copy.deepcopy(self.source.state_dict())
        self.skips = self.source.skip_counts()

    def merged_state(self, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        return self.source.merged_state(states, rank)

    def skip_counts(self) -> dict[str, int]:
        return dict(self.skips)

    def close(self) -> None:
        """Stop the reader thread (it also dies with the process: a daemon)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.source.close()


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

    def merged_state(self, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        """Every rank draws one batch a step: their index is the step count."""
        return {"index": int(states[0]["index"])}

    def skip_counts(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        """Nothing to release."""


class ManifestStories:
    """Stories from the stage's manifest via ``trainer.data`` (story order + decoding loader)."""

    def __init__(self, run: RunConfig, uri: str, rank: int, world_size: int) -> None:
        from trainer.data import loader, manifest, order

        r = run.recipe
        if run.stage == "pretrain":
            clips, self.read_skips = manifest.read_clips(uri, run.storage)
            story_order = order.PretrainOrder(clips, r.num_scenes, r.seed, rank, world_size)
        else:
            groups, self.read_skips = manifest.read_shot_groups(uri, r.num_scenes, run.storage)
            story_order = order.SFTOrder(groups, r.num_scenes, r.seed, rank, world_size)
        self.loader = loader.StoryLoader(
            story_order,
            r.frames,
            r.height,
            r.width,
            run.stage,
            run.storage,
            r.seed,
            span=run.data.clip_span(run.stage),
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

    def merged_state(self, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        return {"loader": _merged_loader(self.loader.order, states, rank)}

    def skip_counts(self) -> dict[str, int]:
        return self.read_skips.merge(self.loader.skips).as_dict()

    def close(self) -> None:
        """Nothing to release: each clip's file is closed after its frames are read."""


class PrecomputedStories:
    """Stories from precomputed latents: the decode path's story order over the index's entries.

    The index holds the clips (pre-training) or shot groups (SFT) that decoded; the same
    story-order classes draw stories from them, and each scene's tensors are read from its
    shard instead of decoding and encoding the video.
    """

    def __init__(self, run: RunConfig, uri: str, rank: int, world_size: int) -> None:
        from trainer.data import latents, order

        r = run.recipe
        self.index = latents.read_index(uri, run.storage)
        expected = {"stage": run.stage, "frames": r.frames, "height": r.height, "width": r.width}
        expected["text_tokens"] = run.model.text_tokens
        if run.stage == "sft":
            expected["num_scenes"] = r.num_scenes
        latents.check_recipe(self.index, expected)
        if self.index.settings.model_source != run.model.source:
            log.warning(
                "latents at %s were encoded with model %s, this run uses %s: make sure "
                "the VAE and T5 are the same",
                uri,
                self.index.settings.model_source,
                run.model.source,
            )
        self.entries = {entry.clip(): entry for entry in self.index.entries}
        if run.stage == "pretrain":
            clips = [entry.clip() for entry in self.index.entries]
            story_order = order.PretrainOrder(clips, r.num_scenes, r.seed, rank, world_size)
        else:
            groups = self.index.groups()
            story_order = order.SFTOrder(groups, r.num_scenes, r.seed, rank, world_size)
        self.order = story_order
        self.reader = latents.ShardReader(self.index.uri, run.storage)
        self.batch_size = run.deepspeed.micro_batch_per_gpu

    def next(self) -> EncodedBatch:
        stories = [next(self.order) for _ in range(self.batch_size)]
        scenes = [[self.reader.read(self.entries[clip]) for clip in s.clips] for s in stories]
        num_scenes = len(scenes[0])
        means = [torch.stack([story[i]["mean"] for story in scenes]) for i in range(num_scenes)]
        logvars = [torch.stack([s[i]["logvar"] for s in scenes]) for i in range(num_scenes)]
        text = torch.stack([torch.cat([scene["text"] for scene in s]) for s in scenes])
        return EncodedBatch(means, logvars, text, [_captions(story) for story in stories])

    def state_dict(self) -> dict[str, Any]:
        # The decode path's layout, so a run can switch sources when the clips are the same.
        skips = self.index.skips.as_dict()
        return {"loader": {"order": self.order.state_dict(), "skips": skips}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from trainer.data.order import order_state

        self.order.load_state_dict(order_state(state["loader"]))

    def merged_state(self, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
        return {"loader": _merged_loader(self.order, states, rank)}

    def skip_counts(self) -> dict[str, int]:
        return self.index.skips.as_dict()

    def close(self) -> None:
        """Nothing to release: shard reads are ranged reads of closed files."""


@torch.no_grad()
def encode_batch(
    parts: Any, batch: Batch | EncodedBatch, generator: torch.Generator, text_tokens: int
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """The step's inputs: latents (B, F, C, h, w), latent frames per scene, text (B, nL, D).

    ``parts`` holds the frozen ``vae``, ``tokenizer`` and ``text_encoder``. Pixel batches
    are encoded (VAE per scene, T5 per caption); precomputed ones sample their stored
    posterior with the same ``generator``, scene by scene, as the VAE path does.
    """
    if isinstance(batch, EncodedBatch):
        from trainer.data.latents import sample_latents

        scenes = [
            sample_latents(parts.vae, mean, logvar, generator)
            for mean, logvar in zip(batch.means, batch.logvars, strict=True)
        ]
        text = batch.text.to(next(parts.text_encoder.parameters()).device)
        return torch.cat(scenes, dim=1), [z.shape[1] for z in scenes], text
    videos, captions = batch
    latents, scene_frames = encode_videos(parts.vae, videos, generator)
    text = encode_prompts(parts.tokenizer, parts.text_encoder, captions, text_tokens)
    return latents, scene_frames, text


def _merged_loader(order: Any, states: list[Mapping[str, Any]], rank: int) -> dict[str, Any]:
    """A file source's merged loader state: the stories no rank has taken, and the stories
    every rank skipped so far (counted on the new rank 0, which reports them)."""
    from trainer.data.manifest import SkipCounts
    from trainer.data.order import order_state

    loaders = [state["loader"] for state in states]
    skips = SkipCounts()
    if rank == 0:
        for loader in loaders:
            skips = skips.merge(SkipCounts(loader.get("skips")))
    merged = order.merged_state([order_state(loader) for loader in loaders])
    return {"order": merged, "skips": skips.as_dict()}


def _captions(story: Any) -> list[str]:
    """Scene captions of a ``trainer.data`` story, in scene order."""
    return [clip.caption for clip in story.clips]
