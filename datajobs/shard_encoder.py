"""Encoding one shard of the latent precompute: decode, VAE posterior, T5, write.

Used by the Ray Data actors of ``datajobs.precompute`` (:class:`ShardEncoder`) and,
in-process, by tests and benchmarks (:func:`encode_shard`). Frames are chosen as
training chooses them (``trainer.data.loader``), with a window drawn once per entry
from ``random.Random(f"frames:{seed}:{key}")``; pixels go through the VAE as
``mask2dit.encoding.encode_video`` sends them, and captions through T5 as
``encode_prompt_batch`` does.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any

from infra.config import StorageConfig
from infra.logging import get_logger
from trainer.data.latents import Settings, shard_uri, write_atomic
from trainer.data.manifest import Clip, SkipCounts

__all__ = ["Item", "ShardEncoder", "encode_shard", "load_encoders", "posterior"]

log = get_logger("data.precompute")

SPANS = {"pretrain": (0.05, 0.95), "sft": None}  # as trainer.data.loader.SPANS
TEXT_BATCH = 32


@dataclass(frozen=True)
class Item:
    """One entry to encode: a pre-training clip, or shot ``shot`` of SFT group ``group``."""

    key: str
    group: str
    shot: int
    clip: Clip

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "group": self.group, "shot": self.shot, **asdict(self.clip)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Item:
        data = dict(data)
        key, group, shot = data.pop("key"), data.pop("group"), data.pop("shot")
        return cls(key, group, shot, Clip(**data))


def encode_shard(
    parts: Any,
    settings: Settings,
    out: str,
    name: str,
    items: list[Item],
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Decode and encode one shard's items; write its tensors, then its sidecar.

    Returns the sidecar: ``{"shard", "entries": [Entry fields], "skips": {reason: n}}``.
    """
    import torch
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    entries, skips = [], SkipCounts()
    for item in items:
        encoded = _encode_item(parts.vae, settings, item, storage)
        if isinstance(encoded, str):
            skips.add(encoded)
            continue
        indices, mean, logvar = encoded
        tensors[f"{item.key}.mean"], tensors[f"{item.key}.logvar"] = mean, logvar
        stride = indices[1] - indices[0] if len(indices) > 1 else 1
        entries.append(_entry(item, name, indices[0], stride))
    texts = _encode_captions(parts, [e["caption"] for e in entries], settings.text_tokens)
    for entry, text in zip(entries, texts, strict=True):
        tensors[f"{entry['key']}.text"] = text
    if tensors:
        write_atomic(shard_uri(out, name, "safetensors"), save(tensors), storage)
    sidecar = {"shard": name, "entries": entries, "skips": skips.as_dict()}
    write_atomic(shard_uri(out, name, "json"), json.dumps(sidecar).encode(), storage)
    return sidecar


def _encode_item(vae: Any, settings: Settings, item: Item, storage: StorageConfig | None):
    """(frame indices, mean, logvar) of one entry, or the skip reason."""
    from infra.video import VideoError
    from trainer.data.loader import clip_frame_indices, decode_frames

    rng = random.Random(f"frames:{settings.seed}:{item.key}")
    try:
        indices = clip_frame_indices(item.clip, settings.frames, SPANS[settings.stage], rng)
        video_TCHW = decode_frames(item.clip, indices, settings.height, settings.width, storage)
    except VideoError as exc:
        log.warning("skipped %s (%s): %s", item.key, exc.reason, exc)
        return exc.reason
    mean, logvar = posterior(vae, video_TCHW[None].transpose(1, 2))
    return indices, mean[0].cpu().clone(), logvar[0].cpu().clone()


def posterior(vae: Any, video_B3THW: Any) -> tuple[Any, Any]:
    """The VAE posterior's (mean, logvar), each (B, C, f, h, w), of one scene's pixels.

    The input is prepared exactly as ``mask2dit.encoding.encode_video`` prepares it.
    """
    import torch

    from mask2dit.encoding import to_unit_range

    with torch.no_grad():
        pixels = to_unit_range(video_B3THW).to(device=vae.device, dtype=vae.dtype)
        parameters = vae.encode(pixels).latent_dist.parameters
    return parameters.chunk(2, dim=1)


def _encode_captions(parts: Any, captions: list[str], text_tokens: int) -> list[Any]:
    from mask2dit.encoding import encode_prompt_batch

    texts = []
    for start in range(0, len(captions), TEXT_BATCH):
        chunk = captions[start : start + TEXT_BATCH]
        embeds, _ = encode_prompt_batch(parts.tokenizer, parts.text_encoder, chunk, text_tokens)
        texts.extend(row.cpu().clone() for row in embeds)
    return texts


def _entry(item: Item, shard: str, frame_start: int, frame_stride: int) -> dict[str, Any]:
    """An Entry's fields (JSON): where the tensors are, the clip, its frame window."""
    entry = {"key": item.key, "shard": shard, "group": item.group, "shot": item.shot}
    entry.update(asdict(item.clip), frame_start=frame_start, frame_stride=frame_stride)
    return entry


def load_encoders(settings: Settings, storage: StorageConfig | None, device: str) -> Any:
    """The frozen VAE and T5 (with tokenizer) of ``settings.model_source``."""
    import torch

    from infra.config import ModelConfig
    from trainer.components import load_training_parts

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = ModelConfig(source=settings.model_source, text_tokens=settings.text_tokens)
    dtype = dtypes[settings.dtype]
    return load_training_parts(model, storage, torch.device(device), dtype, encoders_only=True)


class ShardEncoder:
    """A Ray Data actor: loads the encoders once, then encodes one shard per call."""

    def __init__(self, settings: dict, storage: dict | None, out: str, device: str) -> None:
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.settings = Settings.from_dict(settings)
        self.storage = StorageConfig.model_validate(storage) if storage else None
        self.out = out
        self.parts = load_encoders(self.settings, self.storage, device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        names, kept, skipped = [], [], []
        for name, items in zip(batch["name"], batch["items"], strict=True):
            tasks = [Item.from_dict(i) for i in json.loads(items)]
            sidecar = encode_shard(self.parts, self.settings, self.out, name, tasks, self.storage)
            names.append(name)
            kept.append(len(sidecar["entries"]))
            skipped.append(sum(sidecar["skips"].values()))
        return {"name": names, "kept": kept, "skipped": skipped}
