"""The sample-batch items: what one (checkpoint, story, seed) renders and where it goes.

An item's folder is ``OUT/<checkpoint>/<story>/<seed>/`` with ``scene_XX.mp4`` per scene,
``story.mp4`` (the scenes one after another), ``preview.gif`` and ``contact.png`` (small,
for MLflow), ``latents.safetensors`` (the final latents the scenes decode from: re-decode
them, or compare samples before the lossy mp4 encoder) and ``meta.json`` - written last,
so an item is finished exactly when its meta.json exists. A rerun skips finished items
whose meta.json records the same inputs, refuses (naming the folder) when they differ, and
re-renders them only with ``overwrite``; a half-written item (no meta.json) is rendered
again.

Randomness is a function of the item's noise seed alone (a CPU ``torch.Generator`` per
item), so an item renders the same on any actor, in any order, in a first run or a
resumed one. The noise seed (``noise_seed``) is drawn from the story and the seed by
default: two stories never start from the same noise (scores averaged over stories are
then over independent samples; with one noise for all, whatever no prompt fixes - a
background, a camera move - would be the same draw in every story), while every
checkpoint renders a story from the same noise (paired comparisons). ``--noise shared``
uses the seed itself for every story.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from infra.config import StorageConfig
from infra.errors import ConfigError, DataError
from infra.job_specs import CheckpointSpec, SampleJobSpec
from infra.previews import preview_frames, write_contact_sheet, write_gif
from infra.prompts import Story
from infra.run_folder import (
    ITEM_META,
    ItemInputs,
    ItemMeta,
    ItemSource,
    read_item_meta,
    write_item_meta,
)
from infra.storage import filesystem, join
from infra.video import read_frames, resize_center_crop, write_video
from mask2dit.sampling.params import SamplingParams, StoryOutput
from mask2dit.tiny import BUILT_IN_SOURCES, built_in_configs
from sampler.checkpoint_info import CheckpointInfo

if TYPE_CHECKING:  # the driver plans without the model frameworks
    from mask2dit.sampling.pipeline import MultiScenePipeline

__all__ = [
    "FPS",
    "LATENTS",
    "Item",
    "item_uri",
    "noise_seed",
    "plan_items",
    "read_latents",
    "render_stories",
    "sampling_params",
    "write_item",
]

FPS = 8  # CogVideoX's frame rate
LATENTS = "latents.safetensors"


@dataclass(frozen=True)
class Item:
    """One unit of work: a story rendered by a checkpoint with a seed."""

    checkpoint: str
    story: str
    seed: int


def noise_seed(story: str, seed: int, noise: str) -> int:
    """The seed of an item's generator: ``seed`` itself (``shared``), or a 63-bit number
    drawn from the story id and ``seed`` (``story``), the same on every machine."""
    if noise == "shared":
        return seed
    digest = hashlib.sha256(f"{story}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def item_uri(out: str, item: Item) -> str:
    """The item's output folder."""
    return join(out, item.checkpoint, item.story, str(item.seed))


def _temporal_ratio(info: CheckpointInfo) -> int:
    """Pixel frames per latent frame of the checkpoint's VAE: a built-in model's own, else
    CogVideoX's 4."""
    if info.model.source in BUILT_IN_SOURCES:
        return built_in_configs(info.model.source)["transformer"]["temporal_compression_ratio"]
    return 4


def sampling_params(spec: SampleJobSpec, info: CheckpointInfo) -> SamplingParams:
    """The spec's settings; frames, size and text length default to the checkpoint's."""
    frames = spec.frames or info.recipe.frames
    # An odd latent count decodes back to the same frame count (MultiScenePipeline's
    # latent_frames): 8k + 1 frames for CogVideoX, 2k + 1 for the toy VAE (ratio 1).
    ratio = _temporal_ratio(info)
    if (frames - 1) % (2 * ratio):
        examples = ", ".join(str(2 * ratio * k + 1) for k in range(1, 4))
        raise ConfigError(
            f"--frames {frames}: the model's VAE decodes {2 * ratio}k+1 frames per scene "
            f"back to the same count; use {examples}, ..."
        )
    return SamplingParams(
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        negative_prompt=spec.negative_prompt,
        text_tokens=info.model.text_tokens,
        num_frames=frames,
        height=spec.height or info.recipe.height,
        width=spec.width or info.recipe.width,
        policy=info.recipe.mask_policy,
    )


def inputs_record(
    story: Story,
    seed: int,
    checkpoint: CheckpointSpec,
    spec: SampleJobSpec,
    params: SamplingParams,
) -> ItemInputs:
    """What an item's output depends on; meta.json keeps it and a rerun compares it.

    VAE tiling blends overlapping tiles, so it changes the pixels; slicing decodes the
    samples of a batch one at a time, and the sampler decodes each item alone, so it does
    not. The batch size does not either (beyond float rounding): each item draws from its
    own seed's generator.
    """
    return ItemInputs(
        story=story.id,
        seed=seed,
        noise_seed=noise_seed(story.id, seed, spec.noise),
        mode=spec.mode,
        prompts=list(story.prompts),
        context_videos=list(story.context_videos),
        checkpoint=checkpoint.uri,
        scheduler=spec.scheduler,
        vae_tiling=spec.vae_tiling,
        params=params.to_dict(),
    )


def plan_items(
    spec: SampleJobSpec,
    stories: list[Story],
    params: dict[str, SamplingParams],
) -> tuple[list[Item], list[Item]]:
    """The items still to render and the finished ones (in checkpoint order)."""
    todo, finished = [], []
    for checkpoint in spec.checkpoints:
        for story in stories:
            for seed in spec.seeds:
                item = Item(checkpoint.label, story.id, seed)
                wanted = inputs_record(story, seed, checkpoint, spec, params[item.checkpoint])
                if _finished(spec, item, wanted):
                    finished.append(item)
                else:
                    todo.append(item)
    return todo, finished


def _finished(spec: SampleJobSpec, item: Item, wanted: ItemInputs) -> bool:
    """Whether the item is there, rendered from ``wanted``; a DataError when something
    else is there (never overwritten without ``--overwrite``)."""
    if spec.overwrite:
        return False
    uri = item_uri(spec.out, item)
    try:
        meta = read_item_meta(uri, spec.storage)
    except DataError:  # a meta.json this m2d cannot read
        found = None
    else:
        if meta is None:
            return False  # not finished: rendered (again)
        if meta.inputs == wanted:
            return True
        found = meta.inputs.model_dump()
    raise DataError(
        f"{uri} holds a sample rendered with other inputs "
        f"({_first_difference(found, wanted.model_dump())}); write to a new --out or pass "
        "--overwrite"
    )


def _first_difference(found: dict | None, wanted: dict) -> str:
    if not isinstance(found, dict):
        return f"unreadable {ITEM_META}"
    for key, value in wanted.items():
        if found.get(key) != value:
            if isinstance(value, dict) and isinstance(found.get(key), dict):
                return _first_difference(found[key], value)
            return f"{key}: {found.get(key)!r} there, {value!r} now"
    return "extra keys"


def render_stories(
    pipeline: MultiScenePipeline,
    items: list[tuple[Story, int]],
    params: SamplingParams,
    mode: str,
    storage: StorageConfig | None,
) -> list[StoryOutput]:
    """Sample (story, noise seed) items: all scenes in one pass (``fixed``), or scene by
    scene from each story's context videos or, without any, from a first scene generated
    alone (``extend``). Items of one shape (scene count, context count) share each model
    call; each item draws from its own generator, so it is what it would be alone."""
    outputs: list[StoryOutput | None] = [None] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (story, _) in enumerate(items):
        groups.setdefault((len(story.prompts), len(story.context_videos)), []).append(index)
    for indices in groups.values():
        rendered = _render_batch(pipeline, [items[i] for i in indices], params, mode, storage)
        for index, output in zip(indices, rendered, strict=True):
            outputs[index] = output
    return outputs


def _render_batch(
    pipeline: MultiScenePipeline,
    items: list[tuple[Story, int]],
    params: SamplingParams,
    mode: str,
    storage: StorageConfig | None,
) -> list[StoryOutput]:
    """Items of one shape in one batch."""
    generators = [torch.Generator().manual_seed(seed) for _, seed in items]
    stories = [story.prompts for story, _ in items]
    if items[0][0].context_videos:
        videos = [
            [_context_video(uri, params, storage) for uri in story.context_videos]
            for story, _ in items
        ]
        return pipeline.extend_batch(stories, videos, params, generators=generators)
    if mode == "fixed" or len(stories[0]) == 1:
        return pipeline.generate_batch(stories, params, generators=generators)
    first = pipeline.generate_batch([p[:1] for p in stories], params, generators=generators)
    latents = torch.cat([output.latents for output in first])
    return pipeline.extend_latents_batch(
        stories, latents, first[0].scene_frames, params, generators=generators
    )


def _context_video(uri: str, params: SamplingParams, storage: StorageConfig | None):
    """A context video's first ``num_frames`` frames, resized and center-cropped like
    training clips; uint8 (T, H, W, 3)."""
    frames = read_frames(uri, list(range(params.num_frames)), storage)
    return resize_center_crop(frames, params.height, params.width).permute(0, 2, 3, 1)


def write_item(
    out: str,
    item: Item,
    output: StoryOutput,
    inputs: ItemInputs,
    source: ItemSource,
    seconds: float,
    storage: StorageConfig | None,
) -> ItemMeta:
    """Write the item's files, meta.json last; returns the meta as written."""
    uri = item_uri(out, item)
    scenes = [frames.numpy() for frames in output.frames]
    for index, frames in enumerate(output.frames):
        write_video(f"{uri}/scene_{index:02d}.mp4", frames, FPS, storage)
    write_video(f"{uri}/story.mp4", torch.cat(output.frames), FPS, storage)
    small = [preview_frames(frames) for frames in scenes]
    write_gif(small, f"{uri}/preview.gif", fps=FPS, storage=storage)
    write_contact_sheet(small, f"{uri}/contact.png", storage=storage)
    _write_latents(f"{uri}/{LATENTS}", output, storage)
    meta = ItemMeta(
        inputs=inputs,
        checkpoint=source,
        seconds=round(seconds, 3),
        scene_frames=[int(frames.shape[0]) for frames in output.frames],
        context_scenes=output.context_scenes,
        truncated=list(output.truncated),
        written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_item_meta(uri, storage, meta)
    return meta


def _write_latents(uri: str, output: StoryOutput, storage: StorageConfig | None) -> None:
    """``latents`` (1, F, C, h, w) as sampled, with each scene's latent frame count."""
    data = safetensors.torch.save(
        {"latents": output.latents.detach().cpu().contiguous()},
        metadata={"scene_frames": json.dumps(list(output.scene_frames))},
    )
    fs, path = filesystem(uri, storage)
    with fs.open(path, "wb") as handle:
        handle.write(data)


def read_latents(uri: str, storage: StorageConfig | None = None) -> tuple[torch.Tensor, list[int]]:
    """An item's ``latents.safetensors``: the latents and each scene's latent frame count."""
    fs, path = filesystem(uri, storage)
    data = fs.cat_file(path)
    # The safetensors layout: an 8-byte little-endian header length, then the JSON header.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    scene_frames = json.loads(header["__metadata__"]["scene_frames"])
    return safetensors.torch.load(data)["latents"], scene_frames
