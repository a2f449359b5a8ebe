"""Precomputed latents: the storage format ``datajobs.precompute`` writes and the trainer
reads in place of decoding videos and running the frozen VAE and T5 every step.

Layout under OUT (a local folder or an ``s3://`` prefix)::

    precompute.json              the settings; written first, a rerun with others is refused
    shards/NNNNNN.safetensors    per entry KEY: KEY.mean, KEY.logvar (C, f, h, w), KEY.text (L, D)
    shards/NNNNNN.json           the shard's entries and skips, written after its tensors:
                                 its presence marks the shard finished
    index.parquet                one row per usable entry; settings and skip counts in the
                                 file's metadata; written last

An entry is one pre-training clip or one SFT shot, so stories are still drawn at train
time: random concatenation of clips (pre-training) and windows of consecutive shots (SFT)
work as on the decode path, with the same story orders.

What is stored is the VAE posterior (mean and logvar, unscaled), not a sample: CogVideoX
training draws a fresh sample every step, and :func:`sample_latents` draws it from the
stored parameters exactly as ``mask2dit.encoding.encode_video`` does from the VAE's own
output, with the step's generator - so a precomputed step sees the same distribution
(and, for the same frames, the same draws) as an on-the-fly one. What precomputing gives
up: the frame window of each entry is drawn once (seeded by the precompute seed and the
entry) instead of once per story and epoch.

Size at the paper's shapes (49 frames at 480x720, 226 T5 tokens, bf16): mean and logvar
2 x 16 x 13 x 60 x 90 values (4.5 MB) plus text 226 x 4096 (1.9 MB), about 6.3 MB per
clip, so 1M clips take about 6.3 TB; the index is one Parquet row per entry.

Shape legend: B batch, n scenes, C latent channels, f latent frames of a scene, h/w latent
size, L text tokens per scene, D text width.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from infra.config import StorageConfig
from infra.errors import ConfigError, DataError
from infra.logging import get_logger
from infra.storage import filesystem, is_remote, join
from trainer.data.manifest import Clip, ShotGroup, SkipCounts

__all__ = [
    "INDEX",
    "SETTINGS",
    "Entry",
    "LatentIndex",
    "Settings",
    "ShardReader",
    "read_index",
    "sample_latents",
    "write_atomic",
]

log = get_logger("data.latents")

FORMAT = 1
SETTINGS = "precompute.json"
INDEX = "index.parquet"
SHARDS = "shards"
_META_KEY = b"m2d"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """What a precompute produced; the trainer checks it against the run's recipe."""

    manifest: str
    manifest_sha1: str
    stage: str
    model_source: str
    text_tokens: int
    frames: int
    height: int
    width: int
    num_scenes: int
    seed: int
    dtype: str
    shard_size: int
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def differences(self, other: Settings) -> list[str]:
        """``key: ours vs theirs`` for every setting that differs."""
        ours, theirs = asdict(self), asdict(other)
        return [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours if ours[k] != theirs[k]]


@dataclass(frozen=True)
class Entry:
    """One precomputed clip or shot: where its tensors are and what it came from."""

    key: str
    shard: str
    group: str  # SFT: the shot group (after splitting at bad shots); pre-training: ""
    shot: int  # position in the group (pre-training: 0)
    path: str
    caption: str
    num_frames: int
    fps: float
    width: int
    height: int
    start: float | None
    end: float | None
    frame_start: int
    frame_stride: int

    def clip(self) -> Clip:
        """The manifest clip this entry encodes."""
        return Clip(
            self.path,
            self.caption,
            self.num_frames,
            self.fps,
            self.width,
            self.height,
            self.start,
            self.end,
        )


@dataclass(frozen=True)
class LatentIndex:
    """A finished precompute: its settings, usable entries and skip counts."""

    uri: str
    settings: Settings
    entries: list[Entry]
    skips: SkipCounts

    def groups(self) -> list[ShotGroup]:
        """SFT shot groups in index order, shots in order."""
        by_group: dict[str, list[Entry]] = {}
        for entry in self.entries:
            by_group.setdefault(entry.group, []).append(entry)
        return [
            ShotGroup(name, tuple(e.clip() for e in sorted(shots, key=lambda e: e.shot)))
            for name, shots in by_group.items()
        ]


def write_atomic(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` so that ``uri`` is either absent or complete, never half-written.

    An object-store PUT is atomic already; a local file is written beside its target and
    renamed over it.
    """
    fs, path = filesystem(uri, storage)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def shard_uri(out: str, name: str, suffix: str) -> str:
    """``OUT/shards/NAME.SUFFIX``."""
    return join(out, SHARDS, f"{name}.{suffix}")


def write_index(
    out: str,
    settings: Settings,
    entries: list[Entry],
    skips: SkipCounts,
    storage: StorageConfig | None = None,
) -> None:
    """``OUT/index.parquet``: the entries as rows, settings and skips in its metadata."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("group", pa.string()),
            ("shot", pa.int32()),
            ("path", pa.string()),
            ("caption", pa.string()),
            ("num_frames", pa.int64()),
            ("fps", pa.float64()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("start", pa.float64()),
            ("end", pa.float64()),
            ("frame_start", pa.int64()),
            ("frame_stride", pa.int64()),
        ]
    )
    meta = {"settings": asdict(settings), "skips": skips.as_dict(), "entries": len(entries)}
    table = pa.Table.from_pylist([asdict(e) for e in entries], schema=schema)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(join(out, INDEX), buffer.getvalue(), storage)


def read_index(uri: str, storage: StorageConfig | None = None) -> LatentIndex:
    """The finished precompute at ``uri`` (its folder or its ``index.parquet``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = uri[: -len(INDEX)].rstrip("/") if uri.endswith(INDEX) else uri.rstrip("/")
    fs, path = filesystem(join(folder, INDEX), storage)
    try:
        data = fs.cat_file(path)
        table = pq.read_table(pa.BufferReader(data))
        meta = json.loads(table.schema.metadata[_META_KEY])
    except FileNotFoundError:
        raise DataError(
            f"{folder}: no {INDEX} there; run `m2d data precompute` to the end "
            "(a killed run resumes where it stopped)"
        ) from None
    except (pa.ArrowException, OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{folder}/{INDEX}: not a precompute index ({exc})") from None
    entries = [Entry(**row) for row in table.to_pylist()]
    settings = Settings.from_dict(meta["settings"])
    return LatentIndex(folder, settings, entries, SkipCounts(meta["skips"]))


class ShardReader:
    """Reads one entry's tensors with one ranged read per entry (local files or S3).

    Shard headers (a few KiB each) are cached, so a story costs one read per scene.
    """

    def __init__(self, folder: str, storage: StorageConfig | None = None) -> None:
        self.folder, self.storage = folder, storage
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def read(self, entry: Entry) -> dict[str, torch.Tensor]:
        """``{"mean", "logvar", "text"}`` of ``entry``."""
        uri = shard_uri(self.folder, entry.shard, "safetensors")
        fs, path = filesystem(uri, self.storage)
        base, header = self._header(fs, path, uri)
        names = {part: f"{entry.key}.{part}" for part in ("mean", "logvar", "text")}
        try:
            spans = [header[name]["data_offsets"] for name in names.values()]
        except KeyError:
            raise DataError(f"{uri}: no tensors for entry {entry.key}; precompute again") from None
        low, high = min(s[0] for s in spans), max(s[1] for s in spans)
        blob = fs.cat_file(path, start=base + low, end=base + high)
        return {part: _tensor(blob, header[name], low) for part, name in names.items()}

    def _header(self, fs: Any, path: str, uri: str) -> tuple[int, dict[str, Any]]:
        if path not in self._headers:
            try:
                (size,) = struct.unpack("<Q", fs.cat_file(path, start=0, end=8))
                header = json.loads(fs.cat_file(path, start=8, end=8 + size))
            except FileNotFoundError:
                raise DataError(f"{uri}: shard missing; precompute again to rewrite it") from None
            except (struct.error, ValueError) as exc:
                raise DataError(f"{uri}: not a safetensors shard ({exc})") from None
            self._headers[path] = (8 + size, header)
        return self._headers[path]


def _tensor(blob: bytes, info: Mapping[str, Any], offset: int) -> torch.Tensor:
    start, end = (o - offset for o in info["data_offsets"])
    flat = torch.frombuffer(bytearray(blob[start:end]), dtype=_DTYPES[info["dtype"]])
    return flat.reshape(info["shape"])


@torch.no_grad()
def sample_latents(
    vae: Any,
    mean_BCfhw: torch.Tensor,
    logvar_BCfhw: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Scaled latents (B, f, C, h, w) of one scene from its stored posterior.

    The same computation as ``mask2dit.encoding.encode_video`` after ``vae.encode``:
    diffusers' DiagonalGaussianDistribution over (mean, logvar) on the VAE's device and
    dtype, sampled with ``generator`` (or its mode), times ``scaling_factor``. A logvar
    of -inf everywhere (``mask2dit.toy.ToyVAE``: variance 0) samples the mean exactly, as
    that VAE's own posterior does (diffusers would clamp it to -30: noise of std 3e-7).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parameters = torch.cat([mean_BCfhw, logvar_BCfhw], dim=1)
    point_mass = bool(torch.isneginf(logvar_BCfhw).all())
    posterior = DiagonalGaussianDistribution(
        parameters.to(vae.device, vae.dtype), deterministic=point_mass
    )
    z_BCfhw = posterior.sample(generator) if sample else posterior.mode()
    return z_BCfhw.permute(0, 2, 1, 3, 4) * vae.config.scaling_factor


def check_recipe(index: LatentIndex, expected: Mapping[str, Any]) -> None:
    """A ConfigError naming every setting the run needs differently (frames, size...)."""
    have = asdict(index.settings)
    wrong = [f"{k}={have[k]!r} (run: {v!r})" for k, v in expected.items() if have[k] != v]
    if wrong:
        raise ConfigError(
            f"{index.uri}: latents were precomputed with {', '.join(wrong)}; precompute "
            "again for this recipe or unset the stage's *_latents data key"
        )
