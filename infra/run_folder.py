"""The files of a run folder that more than one part of m2d reads, each a typed model with
one reader and one writer, and one error vocabulary: a ``DataError`` line naming the file,
what is wrong with it and the fix.

    {storage.root}/{run}/run_config.json      the resolved run config (the launcher writes
                                               it; a checkpoint keeps a copy)
    {storage.root}/{run}/checkpoint_NNNNNNNN/trainer_state.json
                                               step, world size, MLflow run id (rank 0)
    {storage.root}/{run}/checkpoint_NNNNNNNN/manifest.json
                                               every file of the checkpoint with its size and
                                               sha256 (the job's coordinator, last)

and in a ``sample-batch`` output folder, per item (``OUT/CHECKPOINT/STORY/SEED/``):

    meta.json      what the item was rendered from and how (the sampler, last: an item is
                   finished exactly when it is there)
    scores.json    the item's scores and the encoder that made them (the eval job)

A file is read through fsspec (``uri`` and the run's ``StorageConfig``) or, where a caller
has the bytes already (Ray's pyarrow filesystem, which retries an object store that does
not answer; a row from a Ray Data actor), parsed from them with the same model and the
same line.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.config import RunConfig, StorageConfig
from infra.errors import DataError, first_line
from infra.storage import filesystem, join

__all__ = [
    "ITEM_META",
    "ITEM_SCORES",
    "MANIFEST",
    "PROVENANCE",
    "RUN_CONFIG",
    "SOURCE_DIFF",
    "TRAINER_STATE",
    "FileRecord",
    "ItemInputs",
    "ItemMeta",
    "ItemScores",
    "ItemSource",
    "Manifest",
    "Provenance",
    "TrainerState",
    "parse_item_meta",
    "parse_manifest",
    "parse_trainer_state",
    "read_item_meta",
    "read_item_scores",
    "read_manifest",
    "read_provenance",
    "read_run_config",
    "read_trainer_state",
    "write_item_meta",
    "write_item_scores",
    "write_manifest_file",
    "write_provenance",
    "write_run_config",
    "write_trainer_state",
]

RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
ITEM_META = "meta.json"
ITEM_SCORES = "scores.json"
PROVENANCE = "provenance.json"
SOURCE_DIFF = "source.diff"

_CHECKPOINT_FIX = "use another checkpoint (`m2d checkpoints RUN` lists them)"


class TrainerState(BaseModel):
    """A checkpoint's place in its run: the next optimizer step, how many workers wrote
    it, the MLflow run it logs to."""

    model_config = ConfigDict(extra="ignore")

    step: int = 0
    world_size: int  # no default: what reads a checkpoint's shards must not guess it
    mlflow_run_id: str | None = None


class FileRecord(BaseModel):
    """One file of a checkpoint as its rank wrote it."""

    model_config = ConfigDict(extra="forbid")

    size: int
    sha256: str


class Manifest(BaseModel):
    """Every file of a complete checkpoint (the ranks' own lists included)."""

    model_config = ConfigDict(extra="forbid")

    world_size: int
    files: dict[str, FileRecord]


def _problem(where: str, name: str, exc: BaseException, fix: str) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{where}: no {name} there; {fix}")
    if isinstance(exc, ValidationError):
        why = exc.errors()[0]
        return DataError(
            f"{where}: unreadable {name} ({'.'.join(map(str, why['loc']))}: {why['msg']}); {fix}"
        )
    return DataError(f"{where}: unreadable {name} ({first_line(exc)}); {fix}")


def _read(uri: str, storage: StorageConfig | None) -> bytes:
    fs, path = filesystem(uri, storage)
    return fs.cat_file(path)


# -- run_config.json -----------------------------------------------------------------------


def read_run_config(folder: str, storage: StorageConfig | None, fix: str = "") -> RunConfig:
    """The run config in ``folder`` (a run folder or a checkpoint folder, local or remote).
    A DataError line naming the file and ``fix`` (by default: the file is the launcher's,
    so the folder was moved or cut) when it is missing or not a run config."""
    uri = join(folder, RUN_CONFIG)
    fix = fix or "give the folder of a run m2d launched (or one of its checkpoints)"
    try:
        return RunConfig.model_validate_json(_read(uri, storage))
    except (OSError, ValueError) as exc:
        raise _problem(folder, RUN_CONFIG, exc, fix) from None


def write_run_config(
    folder: str | Path, storage: StorageConfig | None, run: RunConfig, kept: str | None = None
) -> str:
    """Write ``run`` as the run config of ``folder``; ``kept``: first copy the one it
    replaces to that name beside it. Returns the file's URI."""
    uri = join(str(folder), RUN_CONFIG)
    fs, path = filesystem(uri, storage)
    if kept is not None:
        fs.copy(path, f"{path.rsplit('/', 1)[0]}/{kept}")
    with fs.open(path, "w") as handle:
        handle.write(run.model_dump_json(indent=2))
    return uri


# -- trainer_state.json --------------------------------------------------------------------


def parse_trainer_state(data: bytes | str, where: str) -> TrainerState:
    """The trainer state in ``data``, read from checkpoint ``where``."""
    try:
        return TrainerState.model_validate_json(data)
    except ValueError as exc:
        raise _problem(where, TRAINER_STATE, exc, _CHECKPOINT_FIX) from None


def read_trainer_state(checkpoint: str, storage: StorageConfig | None) -> TrainerState:
    """The trainer state of checkpoint folder ``checkpoint`` (local or remote)."""
    try:
        data = _read(join(checkpoint, TRAINER_STATE), storage)
    except OSError as exc:
        raise _problem(checkpoint, TRAINER_STATE, exc, _CHECKPOINT_FIX) from None
    return parse_trainer_state(data, checkpoint)


def write_trainer_state(folder: Path, state: TrainerState) -> None:
    """Write ``state`` into the local checkpoint part ``folder`` (rank 0's)."""
    (folder / TRAINER_STATE).write_text(state.model_dump_json(indent=2))


# -- manifest.json -------------------------------------------------------------------------


def parse_manifest(data: bytes | str, where: str) -> Manifest:
    """The manifest in ``data``, read from checkpoint ``where``."""
    try:
        return Manifest.model_validate_json(data)
    except ValueError as exc:
        raise _problem(where, MANIFEST, exc, _CHECKPOINT_FIX) from None


def read_manifest(fs: Any, path: str, where: str) -> Manifest | None:
    """The manifest of the checkpoint at ``path`` on ``fs`` (``where``: its URI, for the
    line); None when it has none (a save that did not finish)."""
    try:
        data = fs.cat_file(f"{path}/{MANIFEST}")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _problem(where, MANIFEST, exc, _CHECKPOINT_FIX) from None
    return parse_manifest(data, where)


def write_manifest_file(fs: Any, path: str, manifest: Manifest) -> None:
    """Write ``manifest`` into the checkpoint at ``path`` on ``fs``."""
    body = {"world_size": manifest.world_size, "files": manifest.model_dump()["files"]}
    with fs.open(f"{path}/{MANIFEST}", "w") as handle:
        handle.write(json.dumps(body, indent=1))


# -- a sample item's meta.json and scores.json ---------------------------------------------

_ITEM_FIX = "render it again (`m2d sample-batch ... --overwrite`) or write to a new --out"


class ItemInputs(BaseModel):
    """What an item's pixels depend on: a rerun renders the item again only when these
    differ (and then only with ``--overwrite``)."""

    model_config = ConfigDict(extra="forbid")

    story: str
    seed: int
    noise_seed: int
    mode: str
    prompts: list[str]
    context_videos: list[str]
    checkpoint: str
    scheduler: str
    vae_tiling: bool
    params: dict[str, Any]


class ItemSource(BaseModel):
    """The checkpoint an item was rendered from, as the sampler described it."""

    model_config = ConfigDict(extra="forbid")

    label: str
    uri: str
    run: str | None = None
    kind: str
    step: int
    mlflow_run_id: str | None = None


class ItemMeta(BaseModel):
    """A finished item: its inputs, its checkpoint, and what the render gave."""

    model_config = ConfigDict(extra="forbid")

    inputs: ItemInputs
    checkpoint: ItemSource
    seconds: float
    scene_frames: list[int]
    context_scenes: int
    truncated: list[bool]
    written: str


class ItemScores(BaseModel):
    """An item's scores (named by the encoder or oracle that made them)."""

    model_config = ConfigDict(extra="forbid")

    encoder: dict[str, Any]
    scores: dict[str, Any]
    extension: list[float] | None = None
    fvd_features: list[list[float]] | None = None


def parse_item_meta(data: bytes | str, where: str) -> ItemMeta:
    """The item meta in ``data``, of the item folder ``where``."""
    try:
        return ItemMeta.model_validate_json(data)
    except ValueError as exc:
        raise _problem(where, ITEM_META, exc, _ITEM_FIX) from None


def read_item_meta(item: str, storage: StorageConfig | None) -> ItemMeta | None:
    """The meta of the item folder ``item``; None while it has none (not finished)."""
    try:
        data = _read(join(item, ITEM_META), storage)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _problem(item, ITEM_META, exc, _ITEM_FIX) from None
    return parse_item_meta(data, item)


def write_item_meta(item: str, storage: StorageConfig | None, meta: ItemMeta) -> None:
    """Write ``meta`` into the item folder ``item`` whole (a local file, then one put):
    the item's last file, so it is finished exactly when this is there."""
    fs, path = filesystem(item, storage)
    with tempfile.TemporaryDirectory(prefix="m2d-meta-") as tmp:
        local = Path(tmp) / ITEM_META
        local.write_text(meta.model_dump_json(indent=2))
        fs.put_file(str(local), f"{path.rstrip('/')}/{ITEM_META}")


def read_item_scores(item: str, storage: StorageConfig | None) -> ItemScores | None:
    """The scores of the item folder ``item``; None when it has none - or one that is not
    a scores file (cut short, another tool's): such an item is scored again."""
    try:
        return ItemScores.model_validate_json(_read(join(item, ITEM_SCORES), storage))
    except (FileNotFoundError, ValueError):
        return None


def write_item_scores(item: str, storage: StorageConfig | None, scores: ItemScores) -> None:
    """Write ``scores`` into the item folder ``item``."""
    fs, path = filesystem(join(item, ITEM_SCORES), storage)
    with fs.open(path, "w") as handle:
        handle.write(scores.model_dump_json(indent=1))


# -- provenance.json -----------------------------------------------------------------------


class Provenance(BaseModel):
    """Where a run came from, written by the launcher when it creates the run folder (a
    resume adds nothing): the code (its commit; a dirty tree's diff is ``source.diff``
    beside it), the packages, the profile, the DeepSpeed config and the data manifests."""

    model_config = ConfigDict(extra="forbid")

    git_commit: str = Field(description="The launcher's checkout's commit; 'unknown' outside git.")
    git_dirty: bool = Field(description="Whether tracked files differed from it (source.diff).")
    packages: dict[str, str] = Field(description="Installed versions where the launch ran.")
    profile: str | None = Field(description="The cluster profile file the run resolved.")
    profile_sha256: str | None
    deepspeed: dict[str, Any] = Field(description="The DeepSpeed config the run trains with.")
    manifests: dict[str, str | None] = Field(
        description="data.KEY -> the manifest's sha256 (None: not readable from the launcher)."
    )
    python: str
    host: str
    launched_at: str


def read_provenance(folder: str, storage: StorageConfig | None) -> Provenance | None:
    """The provenance of run ``folder``; None for a run from before it was recorded."""
    uri = join(folder, PROVENANCE)
    try:
        return Provenance.model_validate_json(_read(uri, storage))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _problem(folder, PROVENANCE, exc, "it is the launcher's record; leave it") from None


def write_provenance(
    folder: str, storage: StorageConfig | None, provenance: Provenance, diff: str | None
) -> None:
    """Write ``provenance`` (and ``diff`` as source.diff) into run ``folder``."""
    fs, path = filesystem(folder, storage)
    if diff:
        fs.pipe_file(f"{path}/{SOURCE_DIFF}", diff.encode())
    fs.pipe_file(f"{path}/{PROVENANCE}", provenance.model_dump_json(indent=2).encode())
