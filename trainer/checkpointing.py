"""Checkpoints of a run: DeepSpeed shards of every rank plus what exact resume needs.

Each rank writes its part of the folder (layout in ``infra.checkpoint_layout``, which readers
use); Ray Train merges the folders every rank reports. Rank 0 also writes the whole
transformer weights file, so readers of the weights never touch the optimizer shards.

Task draws and noise are functions of (seed, step, rank), so with the data position and
the RNG states a resumed run takes exactly the steps the uninterrupted run takes.

A run resumed on another number of workers cannot read the ZeRO shards as they are (they
partition the optimizer states by the old world size): each node converts the checkpoint
once into DeepSpeed's universal form (``deepspeed.checkpoint.ds_to_universal``, the
optimizer states per parameter, whole) in a node-wide temporary folder, every rank loads
its new partition from it, and the data position is merged from every old rank's
(``StoryBatches.merged_state``). The checkpoint itself is only read.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from infra.checkpoint_layout import (
    DEEPSPEED_TAG,
    MODULE_PREFIX,
    WEIGHTS,
    complete_checkpoint,
    file_differs,
    recorded_files,
    write_file_list,
)
from infra.config import RunConfig, StorageConfig
from infra.errors import ConfigError, DataError
from infra.logging import get_logger
from infra.run_folder import (
    TRAINER_STATE,
    TrainerState,
    parse_trainer_state,
    read_trainer_state,
    write_run_config,
    write_trainer_state,
)
from infra.storage import RESUME_FIX, filesystem, retry_storage

__all__ = [
    "check_space",
    "checkpoint_bytes",
    "damaged_file",
    "load_checkpoint",
    "resumable",
    "resume_view",
    "save_checkpoint",
    "saved_world_size",
    "stored_checkpoint",
    "upload_checkpoint",
]

log = get_logger("trainer.checkpointing")

WEIGHTS_DIR = WEIGHTS.split("/", 1)[0]
#: Free space asked for beyond a checkpoint's size (file-system metadata, estimates).
SPACE_MARGIN = 1.25
UNIVERSAL_TAG = f"{DEEPSPEED_TAG}_universal"
# A file that belongs to one rank: its ZeRO shards, its data position and RNG states.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|^ranks/rank_(\d+)\.pt$")


def save_checkpoint(
    folder: Path,
    engine: Any,
    run: RunConfig,
    state: TrainerState,
    rank: int,
    data_state: dict[str, Any],
) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (a local temp dir); every
    rank calls it (ZeRO-3 gathers the weights file's parameters from all of them)."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    weights = _whole_weights(engine, rank)
    if rank == 0:
        path = folder / WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(weights, str(path), metadata={"format": "pt"})
    rank_file = folder / "ranks" / f"rank_{rank}.pt"
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"data": data_state, "rng": _rng_states()}, rank_file)
    if rank == 0:
        write_run_config(folder, None, run)
        write_trainer_state(folder, state)
    write_file_list(folder, rank)  # last: what the coordinator's manifest checks


def checkpoint_bytes(engine: Any, rank: int, world: int) -> tuple[int, int]:
    """(this rank's staged part, the whole checkpoint) in bytes, before one was written:
    the model states at their dtype and the fp32 weights file (rank 0), Adam's fp32 master
    weights and two moments split over the ranks."""
    params = sum(p.numel() for p in engine.module.parameters())
    size = next(engine.module.parameters()).element_size()
    whole = params * (size + 4 + 12)
    own = params * 12 // world + (params * (size + 4) if rank == 0 else 0)
    return own, whole


def check_space(needs: dict[str, int], step: int) -> None:
    """Refuse a checkpoint that a folder's disk cannot hold (``needs``: folder -> bytes,
    with a margin), before anything is written: a full disk mid-save would leave a torn
    checkpoint; refused here, the last complete one stays the run's."""
    for folder, need in needs.items():
        free = shutil.disk_usage(folder).free
        if free < need * SPACE_MARGIN:
            raise DataError(
                f"no space for the checkpoint of step {step}: {folder} has {_size(free)} "
                f"free, it needs about {_size(need * SPACE_MARGIN)}; free space there, then "
                "`m2d launch --resume RUN` continues from the last checkpoint"
            )


def _size(count: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.0f} KiB"


def load_checkpoint(
    folder: Path, engine: Any, rank: int, world_size: int, local_rank: int = 0
) -> tuple[TrainerState, list[dict]]:
    """Restore the engine and RNGs from ``folder``; returns the saved state (its
    ``world_size`` is the run's that wrote it) and the data positions: this rank's own, or,
    written by another number of workers, those of every rank that wrote it."""
    state = read_trainer_state(str(folder), None)
    if state.world_size == world_size:
        _load_engine(engine, folder, DEEPSPEED_TAG)
        saved = torch.load(folder / "ranks" / f"rank_{rank}.pt", weights_only=False)
        _set_rng_states(saved["rng"])
        return state, [saved["data"]]
    with universal_view(folder, local_rank) as universal:
        _load_engine(engine, universal, UNIVERSAL_TAG, universal=True)
    ranks = [
        torch.load(folder / "ranks" / f"rank_{r}.pt", weights_only=False)
        for r in range(state.world_size)
    ]
    _set_rng_states(ranks[rank % state.world_size]["rng"])
    if rank == 0:
        log.info(
            "resumed a checkpoint of %d workers on %d (DeepSpeed universal checkpoint)",
            state.world_size,
            world_size,
        )
    return state, [saved["data"] for saved in ranks]


def resumable(
    checkpoint: Any,
    storage: StorageConfig,
    rank: int,
    retry_s: float = 0.0,
    below: str | None = None,
) -> Any:
    """The checkpoint to resume from: Ray's latest (a ``ray.train.Checkpoint``) if its
    manifest says it is complete, else the newest complete one before it, with a warning
    naming what the newer one lacks - Ray records a checkpoint once its upload returned,
    and what a full disk or a hand cut later is not in its record. ``below``: only
    checkpoints older than the one of that name (it turned out damaged). Rank 0 decides
    and tells every rank; a DataError when none is complete. Its reads are retried for
    ``retry_s`` seconds while the storage does not answer, as every resume read is."""
    parent, latest = checkpoint.path.rstrip("/").rsplit("/", 1)
    up_to = latest if below is None else None

    def decide():
        return _newest_complete(parent, storage, up_to, below)

    name = _decided(decide, storage, rank, retry_s)
    if name is None:
        raise DataError(
            f"{parent}: no complete checkpoint to resume from (the newest, {latest}, and "
            "every one before it fail their manifest); `m2d checkpoints RUN` shows why"
        )
    if name == latest:
        return checkpoint
    import ray.train

    return ray.train.Checkpoint(path=f"{parent}/{name}", filesystem=checkpoint.filesystem)


def stored_checkpoint(
    ray_storage: Any, storage: StorageConfig, rank: int, retry_s: float = 0.0
) -> Any | None:
    """The run's newest complete checkpoint found on storage (a ``ray.train.Checkpoint``),
    for a start where Ray Train's run snapshot offers none: it was set aside as torn
    (``trainer.job.set_aside_torn_snapshot``), or the last attempt died before Ray wrote
    it. None when the run has no complete checkpoint (a fresh run). ``ray_storage``: Ray
    Train's ``StorageContext``; rank 0 decides and tells every rank."""
    import ray.train

    folder = ray_storage.experiment_fs_path.rstrip("/")
    name = _decided(lambda: _newest_complete(folder, storage), storage, rank, retry_s)
    if name is None:
        return None
    log.info("rank %d: Ray Train offers no checkpoint; resuming from %s", rank, name)
    return ray.train.Checkpoint(path=f"{folder}/{name}", filesystem=ray_storage.storage_filesystem)


def _decided(decide: Any, storage: StorageConfig, rank: int, retry_s: float) -> Any:
    """``decide()`` on rank 0 (retried while the storage does not answer), told to all."""
    found = [None]
    if rank == 0:
        found = [
            retry_storage(
                decide,
                f"rank {rank}'s check of the checkpoints' manifests on {storage.root}",
                retry_s,
                RESUME_FIX,
            )
        ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


def _newest_complete(
    folder: str, storage: StorageConfig, up_to: str | None = None, below: str | None = None
) -> str | None:
    """The folder name of the newest complete checkpoint in the run folder ``folder`` (a
    path on the run's storage: ``bucket/key`` of an object store, else local), up to the
    one named ``up_to`` (Ray's latest) and older than ``below`` where given."""
    scheme = storage.root.split("://", 1)[0] if "://" in storage.root else ""
    parent = f"{scheme}://{folder.lstrip('/')}" if scheme and scheme != "file" else folder
    fs, path = filesystem(parent, storage)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return None
    names = sorted(
        name
        for entry in entries
        if (name := entry.rstrip("/").rsplit("/", 1)[-1]).startswith("checkpoint_")
        and (up_to is None or name <= up_to)
        and (below is None or name < below)
    )
    chosen = complete_checkpoint([f"{parent}/{name}" for name in names], storage, log.warning)
    return None if chosen is None else chosen.rstrip("/").rsplit("/", 1)[-1]


def damaged_file(folder: Path, rank: int, local_rank: int, every_rank: bool = False) -> str | None:
    """A file of the checkpoint in ``folder`` (a ``resume_view``) whose bytes are not the
    ones recorded at its save (a flipped byte keeps the size, which is all the manifest
    check looks at), or None. Each rank hashes what it reads - its own shards and data
    position - and a node's local rank 0 the files its ranks share (every rank's, when the
    checkpoint is converted: ``every_rank``); streamed once each, from local disk. The
    weights file is not read to resume. Every rank gets the same answer."""
    recorded = recorded_files(folder)
    names = [
        name
        for name in recorded
        if not name.startswith(f"{WEIGHTS_DIR}/")
        and (folder / name).is_file()
        and (_owner(name) == rank or (local_rank == 0 and (every_rank or _owner(name) is None)))
    ]
    found = file_differs(folder, names, recorded)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)
        found = next((name for name in everyone if name), None)
    return found


def saved_world_size(checkpoint: Any, rank: int) -> int:
    """How many workers wrote ``checkpoint`` (a ``ray.train.Checkpoint``): one small read,
    by rank 0, which tells every rank. Through an object store the run's
    ``RetryingHandler`` retries it (its budget, then one ``StorageError``)."""
    found = [None]
    if rank == 0:
        fs, path = checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/{TRAINER_STATE}"
        with fs.open_input_stream(path) as handle:
            found = [parse_trainer_state(handle.read(), checkpoint.path).world_size]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    return found[0]


@contextlib.contextmanager
def universal_view(folder: Path, local_rank: int) -> Iterator[Path]:
    """A node-wide folder holding the checkpoint in ``folder`` in DeepSpeed's universal
    form (tag ``UNIVERSAL_TAG``), converted by the node's local rank 0; every rank enters
    it together, and it is removed when they leave."""
    key = hashlib.sha1(str((folder / TRAINER_STATE).resolve()).encode()).hexdigest()
    node = Path(tempfile.gettempdir()) / f"m2d-universal-{key}"
    if local_rank == 0:
        shutil.rmtree(node, ignore_errors=True)
        to_universal(folder / DEEPSPEED_TAG, node / UNIVERSAL_TAG)
    _barrier()
    try:
        yield node
    finally:
        _barrier()
        if local_rank == 0:
            shutil.rmtree(node, ignore_errors=True)


def to_universal(source: Path, target: Path) -> None:
    """Convert the DeepSpeed checkpoint folder ``source`` (one tag, every rank's shards)
    into the universal checkpoint ``target`` with DeepSpeed's own converter."""
    from deepspeed.checkpoint.ds_to_universal import main as convert

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        # One process: the converter's pools fork, which a Ray worker's threads forbid.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # m2d's checkpoints do not carry the Megatron-style parallelism info it asks for.
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # its prints and progress bars: to the log, not the console
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        convert(args)
    log.debug("ds_to_universal: %s", chatter.getvalue())


def _load_engine(engine: Any, folder: Path, tag: str, universal: bool = False) -> None:
    """``engine.load_checkpoint`` of ``folder/tag`` with optimizer and LR scheduler states;
    ``universal``: the tag is a universal checkpoint (DeepSpeed reads the switch from its
    config, which the checkpoint in hand decides, not the run)."""
    engine._config.load_universal_checkpoint = universal
    try:
        load_path, _ = engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise ConfigError(f"checkpoint {folder} holds no DeepSpeed state under {tag}/")


@contextlib.contextmanager
def resume_view(
    checkpoint: Any, rank: int, local_rank: int, retry_s: float = 0.0, every_rank: bool = False
) -> Iterator[Path]:
    """A local folder holding what ``rank`` reads to resume from ``checkpoint`` (a
    ``ray.train.Checkpoint``); every rank enters it together.

    On local disk that is the checkpoint's own folder. From an object store, where Ray's
    ``as_directory`` would copy the whole checkpoint - every rank's optimizer shard - to
    each node, a node takes the shared files once (its local rank 0, into a node-wide
    folder) and each rank only its own shards, and not the weights file; ``every_rank``
    (a resume on another number of workers, which converts the checkpoint): the node
    takes every rank's files once. Reads that fail are retried for ``retry_s`` seconds
    (``infra.storage.retry_storage``).
    """
    import pyarrow.fs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield Path(root)
        return

    def retried(action, what):
        return retry_storage(action, f"rank {rank}'s read of {what}", retry_s, RESUME_FIX)

    selector = pyarrow.fs.FileSelector(root, recursive=True)
    listed = retried(lambda: fs.get_file_info(selector), f"{root}'s listing")
    files = [i.path[len(root) + 1 :] for i in listed if i.type == pyarrow.fs.FileType.File]
    wanted = [f for f in files if not f.startswith(f"{WEIGHTS_DIR}/")]
    shared = [f for f in wanted if every_rank or _owner(f) is None]
    node = Path(tempfile.gettempdir()) / f"m2d-resume-{hashlib.sha1(root.encode()).hexdigest()}"
    if local_rank == 0:
        shutil.rmtree(node, ignore_errors=True)
        retried(lambda: _download(fs, root, shared, node), root)
    _barrier()
    try:
        with tempfile.TemporaryDirectory(prefix="m2d-resume-") as mine:
            for name in shared:
                (Path(mine) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(mine) / name).symlink_to(node / name)
            own = [] if every_rank else [f for f in files if _owner(f) == rank]
            retried(lambda: _download(fs, root, own, Path(mine)), root)
            yield Path(mine)
    finally:
        _barrier()
        if local_rank == 0:
            shutil.rmtree(node, ignore_errors=True)


def upload_checkpoint(checkpoint: Any, name: str, storage: Any) -> Any:
    """Ray Train's ``checkpoint_upload_fn``: this rank's part of checkpoint ``name`` (the
    local ``checkpoint``) put on ``storage`` (Ray's ``StorageContext``) file by file, each
    put retried while the store fails (by the run's ``infra.arrow_storage.RetryingHandler``,
    which holds the budget); the stored ``ray.train.Checkpoint``.

    Ray's own upload (``pyarrow.fs.copy_files``) drops an error raised when a file written
    through a Python filesystem is closed, which is where an object store's put fails: a
    checkpoint with a file missing would be reported as saved. Local storage keeps Ray's
    own copy, whose errors do surface.
    """
    import pyarrow.fs
    import ray.train

    target = storage.storage_filesystem
    if not isinstance(target, pyarrow.fs.PyFileSystem):
        return storage.persist_current_checkpoint(checkpoint, name)
    handler, root = target.handler, storage.build_checkpoint_path_from_name(name)
    local = Path(checkpoint.path)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote = f"{root}/{path.relative_to(local).as_posix()}"
        handler.retried(
            f"the upload of {remote}",
            lambda path=path, remote=remote: handler.fs.put_file(str(path), remote),
        )
    return ray.train.Checkpoint(filesystem=target, path=root)


def _owner(name: str) -> int | None:
    """The rank a checkpoint file belongs to (``None``: every rank reads it)."""
    found = _RANK_FILE.search(name)
    return None if found is None else int(found.group(1) or found.group(2))


def _download(fs: Any, root: str, names: list[str], into: Path) -> None:
    import pyarrow.fs

    local = pyarrow.fs.LocalFileSystem()
    for name in names:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(
            f"{root}/{name}", str(into / name), source_filesystem=fs, destination_filesystem=local
        )


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _whole_weights(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The transformer's full weights on rank 0 (``None`` elsewhere), in the precision it
    trains in (fp32 runs: the optimizer's master weights exactly), keys as in stock
    CogVideoX. ZeRO-3 gathers them layer by layer, as DeepSpeed's ``save_16bit_model``
    does; below ZeRO-3 every rank holds them whole."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module_state_dict() if rank == 0 else None
    if state is None:
        return None
    return {k.removeprefix(MODULE_PREFIX): v.detach().cpu().contiguous() for k, v in state.items()}


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
