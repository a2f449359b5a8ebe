"""Reading a training checkpoint: its layout, fetching it, its config, its full weights.

Shared by the trainer (which writes checkpoints, ``trainer.checkpointing``), the exporter and
the sampler (which only read them). Layout of one checkpoint folder:

    deepspeed/            ``engine.save_checkpoint(dir, tag="deepspeed")``: model states
                          (rank 0) and each rank's ZeRO optimizer shard
    weights/transformer.safetensors
                          the transformer's whole weights in the training precision, keys
                          as in stock CogVideoX (rank 0; gathered from the partitions
                          under ZeRO-3): what SFT initialisation, sampling and export read,
                          without the optimizer shards (about 6x its size in fp32 Adam)
    run_config.json       the resolved run config (rank 0; holds no secrets)
    trainer_state.json    step, world size, MLflow run id (rank 0)
    ranks/rank_R.pt       rank R's data position and RNG states
    ranks/files_rank_R.json
                          size and sha256 of every file rank R wrote (hashed on its disk)
    manifest.json         every file with its size and sha256: written last, by the job's
                          coordinator once every rank's files are on storage at their
                          sizes. Only a checkpoint with a manifest whose files all check
                          counts as complete (DeepSpeed's ``latest`` and Ray's own record
                          come before all shards are known to be there).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import StorageConfig
from infra.errors import ConfigError, DataError, StorageError, first_line
from infra.logging import get_logger
from infra.run_folder import (
    MANIFEST,
    TRAINER_STATE,
    FileRecord,
    Manifest,
    read_manifest,
    read_trainer_state,
    write_manifest_file,
)
from infra.storage import filesystem, is_remote

log = get_logger("infra.checkpoint_layout")

__all__ = [
    "DEEPSPEED_TAG",
    "MODULE_PREFIX",
    "WEIGHTS",
    "CheckpointState",
    "check_checkpoint",
    "complete_checkpoint",
    "consolidated_state_dict",
    "fetch_checkpoint",
    "file_differs",
    "read_weights",
    "recorded_files",
    "write_file_list",
    "write_manifest",
]

DEEPSPEED_TAG = "deepspeed"
WEIGHTS = "weights/transformer.safetensors"
RANK_FILES = "ranks/files_rank_{rank}.json"
_CHUNK = 8 << 20

# The engine wraps Mask2DiT, whose only submodule is the stock transformer.
MODULE_PREFIX = "transformer."


def fetch_checkpoint(uri: str, storage: StorageConfig | None, into: Path) -> Path:
    """A local folder holding checkpoint ``uri`` (copied from an object store if remote)."""
    if not is_remote(uri):
        folder = Path(uri.removeprefix("file://"))
    else:
        fs, path = filesystem(uri, storage)
        folder = into / "checkpoint"
        try:
            fs.get(f"{path.rstrip('/')}/", str(folder), recursive=True)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot download the checkpoint ({exc})") from None
    if not (folder / DEEPSPEED_TAG).is_dir():
        raise ConfigError(
            f"{uri}: not an m2d checkpoint (no {DEEPSPEED_TAG}/ folder); give a "
            "checkpoint_NNNNNNNN folder of a finished run"
        )
    return folder


def consolidated_state_dict(folder: Path) -> dict[str, Any]:
    """Full fp32 weights of the checkpoint's transformer, keys as in stock CogVideoX.

    ZeRO shards are merged by DeepSpeed's own ``zero_to_fp32`` reader (any ZeRO stage,
    any world size; it needs no process group).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    return {key.removeprefix(MODULE_PREFIX): value for key, value in state.items()}


def read_weights(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    """The transformer weights of checkpoint ``uri`` (local or remote), keys as in stock
    CogVideoX: its weights file alone - the model's bytes, not the optimizer's.

    Where the checkpoint's manifest lists the file, its sha256 is checked as it is read
    (a byte flipped after the save is a DataError naming the checkpoint, never weights
    used). A checkpoint written before the file existed is fetched whole and its ZeRO
    shards merged (with a warning saying so).
    """
    import safetensors.torch

    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    weights = f"{path}/{WEIGHTS}"
    try:
        found = fs.exists(weights)
        if found:
            with tempfile.TemporaryDirectory(prefix="m2d-weights-") as tmp:
                local = Path(weights) if not is_remote(uri) else Path(tmp) / "weights"
                if is_remote(uri):
                    fs.get_file(weights, str(local))
                _check_sha256(uri, local, _listed_sha256(fs, path, WEIGHTS))
                return safetensors.torch.load_file(local)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read {WEIGHTS} ({first_line(exc)})") from None
    log.warning("%s has no %s (written by an older m2d): merging its ZeRO shards", uri, WEIGHTS)
    with tempfile.TemporaryDirectory(prefix="m2d-weights-") as tmp:
        return consolidated_state_dict(fetch_checkpoint(uri, storage, Path(tmp)))


def _listed_sha256(fs: Any, path: str, name: str) -> str | None:
    """The sha256 the checkpoint's manifest records for ``name`` (None: no manifest, or
    one that does not list it)."""
    try:
        manifest = read_manifest(fs, path, path)
    except DataError:
        return None
    listed = manifest.files.get(name) if manifest else None
    return listed.sha256 if listed else None


def _check_sha256(uri: str, local: Path, expected: str | None) -> None:
    if expected is None:
        return
    with local.open("rb") as handle:
        if _sha256(handle) != expected:
            raise DataError(
                f"{uri}: {WEIGHTS} differs from the sha256 its {MANIFEST} records (changed "
                "after the save); use an earlier checkpoint (`m2d checkpoints RUN --verify` "
                "names every damaged one)"
            )


# -- completeness: each rank's file list, the coordinator's manifest, the readers' check ----


def _sha256(handle: Any) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def write_file_list(folder: Path, rank: int) -> None:
    """Record size and sha256 of every file in ``folder`` (this rank's part of a
    checkpoint, on local disk before the upload) in ``ranks/files_rank_R.json``."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            files[path.relative_to(folder).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": _sha256(handle),
            }
    target = folder / RANK_FILES.format(rank=rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(files, indent=1))


def _sizes(fs: Any, path: str) -> dict[str, int]:
    """Relative name -> size of every file under ``path`` on ``fs``."""
    fs.invalidate_cache(path)
    found = fs.find(path, detail=True)
    return {name[len(path) + 1 :]: int(info["size"]) for name, info in found.items()}


def write_manifest(uri: str, storage: StorageConfig | None, world_size: int) -> str | None:
    """Write ``manifest.json`` of checkpoint ``uri`` once every rank's files are there at
    the sizes their lists give; the problem (and no manifest) otherwise."""
    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    files, problem = _listed_files(fs, path, world_size, _sizes(fs, path))
    if problem:
        return problem
    manifest = Manifest(world_size=world_size, files=dict(sorted(files.items())))
    write_manifest_file(fs, path, manifest)
    return None


def _listed_files(
    fs: Any, path: str, world_size: int, sizes: dict[str, int]
) -> tuple[dict[str, FileRecord], str | None]:
    """Every file the ranks' lists name (the lists themselves included), with size and
    sha256, and the first problem: a list missing, a listed file missing or of another size."""
    files: dict[str, FileRecord] = {}
    for rank in range(world_size):
        name = RANK_FILES.format(rank=rank)
        if name not in sizes:
            return files, f"rank {rank}'s file list {name} is missing"
        listed = fs.cat_file(f"{path}/{name}")
        files[name] = FileRecord(size=len(listed), sha256=hashlib.sha256(listed).hexdigest())
        files.update({k: FileRecord(**v) for k, v in json.loads(listed).items()})
    return files, _size_check(files, sizes)


def _size_problem(name: str, want: int, have: int | None) -> str:
    if have is None:
        return f"{name} is missing"
    return f"{name} is {have} bytes, listed as {want}"


@dataclass(frozen=True)
class CheckpointState:
    """What a check of one checkpoint found: ``problem`` is None when it is complete.
    ``manifest``: its manifest was written; ``listed``: its ranks listed their files (every
    m2d that writes manifests does), so it was written by a manifest-era m2d even when the
    manifest itself is missing."""

    uri: str
    problem: str | None
    manifest: bool
    total_bytes: int = 0
    listed: bool = False

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def damaged(self) -> bool:
        """Its manifest was written, and its files no longer match it."""
        return self.manifest and self.problem is not None


def check_checkpoint(
    uri: str, storage: StorageConfig | None, verify: bool = False
) -> CheckpointState:
    """Whether checkpoint ``uri`` is complete: its manifest is there and every file it
    lists is there at its size (``verify``: and has its sha256, which reads every byte).

    A checkpoint whose manifest was never written (the save cut short, or the coordinator
    unable to write it: a full disk) is complete all the same when every rank's file list
    is there and every file they list has its size - the check the coordinator makes
    before writing the manifest - so a full disk at that moment does not cost the run its
    last complete checkpoint.
    """
    fs, path = filesystem(uri, storage)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # a listing cached before the save would hide its files
    try:
        found = read_manifest(fs, path, uri)
    except DataError as exc:
        problem = str(exc).removeprefix(f"{uri}: ").split("; ", 1)[0]
        return CheckpointState(uri, problem, True, listed=True)
    sizes = _sizes(fs, path)
    if found is not None:
        files, manifest = found.files, True
        problem = _size_check(files, sizes)
    else:
        listed = any(name.startswith(RANK_FILES.split("{", 1)[0]) for name in sizes)
        files, problem = _without_manifest(fs, path, uri, storage, sizes)
        if files is None:
            return CheckpointState(uri, problem, False, listed=listed)
        problem, manifest = None, False
    total = sum(info.size for info in files.values())
    if problem is None and verify:
        for name, info in files.items():
            with fs.open(f"{path}/{name}", "rb") as handle:
                if _sha256(handle) != info.sha256:
                    problem = f"{name} differs from its sha256"
                    break
    return CheckpointState(uri, problem, manifest, total if problem is None else 0, True)


def _size_check(files: dict[str, FileRecord], sizes: dict[str, int]) -> str | None:
    for name, info in files.items():
        if sizes.get(name) != info.size:
            return _size_problem(name, info.size, sizes.get(name))
    return None


def _without_manifest(
    fs: Any, path: str, uri: str, storage: StorageConfig | None, sizes: dict[str, int]
) -> tuple[dict[str, FileRecord] | None, str]:
    """(the files the ranks' lists name, '') when every list is there and its files have
    their sizes; (None, why not) otherwise - files None also when no rank listed its files
    (a save cut before any list, or a checkpoint of an m2d from before manifests)."""
    unfinished = f"no {MANIFEST} (the save did not finish)"
    if TRAINER_STATE not in sizes:
        return None, unfinished
    try:
        world_size = read_trainer_state(uri, storage).world_size
    except DataError:
        return None, unfinished
    files, problem = _listed_files(fs, path, world_size, sizes)
    if problem:
        return None, f"{unfinished}: {problem}"
    return files, ""


def recorded_files(folder: Path) -> dict[str, FileRecord]:
    """Size and sha256 of every file of the checkpoint in local ``folder``, as recorded at
    the save: its manifest, else (a manifest never written) the ranks' own lists; {} for a
    checkpoint of an m2d from before both."""
    fs, path = filesystem(str(folder))
    manifest = read_manifest(fs, path, str(folder))
    if manifest is not None:
        return manifest.files
    files: dict[str, FileRecord] = {}
    for listed in sorted((folder / RANK_FILES).parent.glob("files_rank_*.json")):
        files.update({k: FileRecord(**v) for k, v in json.loads(listed.read_text()).items()})
    return files


def file_differs(folder: Path, names: list[str], recorded: dict[str, FileRecord]) -> str | None:
    """The first of ``names`` (files of the checkpoint in local ``folder``) whose sha256 is
    not the one ``recorded`` at the save, streamed once each; None when all match (a name
    with no record is not checked)."""
    for name in names:
        if name in recorded:
            with (folder / name).open("rb") as handle:
                if _sha256(handle) != recorded[name].sha256:
                    return name
    return None


def complete_checkpoint(
    uris: list[str], storage: StorageConfig | None, warn: Callable[[str], None]
) -> str | None:
    """The newest of ``uris`` (oldest first) that is complete, each newer one skipped
    with a warning saying what is wrong with it; None if none is.

    A run none of whose checkpoints has a manifest was written before m2d wrote them: its
    newest is used, with a warning that it is unverified.
    """
    skipped = []
    for uri in reversed(uris):
        state = check_checkpoint(uri, storage)
        if state.complete:
            for newer in skipped:
                warn(f"checkpoint {newer.uri} is incomplete ({newer.problem}); using {uri}")
            return uri
        skipped.append(state)
    if skipped and not any(state.manifest or state.listed for state in skipped):
        warn(
            f"no checkpoint of {uris[-1].rsplit('/', 1)[0]} has a {MANIFEST} (written by an "
            f"older m2d): using the newest, {uris[-1]}, unverified"
        )
        return uris[-1]
    for state in skipped:
        warn(f"checkpoint {state.uri} is incomplete ({state.problem})")
    return None
