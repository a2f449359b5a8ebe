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
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from infra.config import RunConfig, StorageConfig
from infra.errors import ConfigError, StorageError, first_line
from infra.logging import get_logger
from infra.storage import filesystem, is_remote

log = get_logger("infra.checkpoint_layout")

__all__ = [
    "DEEPSPEED_TAG",
    "MODULE_PREFIX",
    "RUN_CONFIG",
    "TRAINER_STATE",
    "WEIGHTS",
    "consolidated_state_dict",
    "fetch_checkpoint",
    "is_checkpoint",
    "read_run_config",
    "read_trainer_state",
    "read_weights",
    "remote_run_config",
]

DEEPSPEED_TAG = "deepspeed"
RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "weights/transformer.safetensors"

# The engine wraps Mask2DiT, whose only submodule is the stock transformer.
MODULE_PREFIX = "transformer."


def is_checkpoint(folder: Path) -> bool:
    """Whether a local folder is an m2d training checkpoint."""
    return (folder / DEEPSPEED_TAG).is_dir() and (folder / RUN_CONFIG).is_file()


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


def read_run_config(folder: Path) -> RunConfig:
    """The resolved run config a checkpoint was written with."""
    return RunConfig.model_validate_json((folder / RUN_CONFIG).read_text())


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` (step, world size, MLflow run id)."""
    return json.loads((folder / TRAINER_STATE).read_text())


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

    A checkpoint written before the file existed is fetched whole and its ZeRO shards
    merged (with a warning saying so).
    """
    import safetensors.torch

    fs, path = filesystem(uri, storage)
    weights = f"{path.rstrip('/')}/{WEIGHTS}"
    try:
        found = fs.exists(weights)
        if found and not is_remote(uri):
            return safetensors.torch.load_file(weights)
        if found:
            with tempfile.TemporaryDirectory(prefix="m2d-weights-") as tmp:
                local = Path(tmp) / "transformer.safetensors"
                fs.get_file(weights, str(local))
                return safetensors.torch.load_file(local)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read {WEIGHTS} ({first_line(exc)})") from None
    log.warning("%s has no %s (written by an older m2d): merging its ZeRO shards", uri, WEIGHTS)
    with tempfile.TemporaryDirectory(prefix="m2d-weights-") as tmp:
        return consolidated_state_dict(fetch_checkpoint(uri, storage, Path(tmp)))


def remote_run_config(uri: str, storage: StorageConfig | None) -> RunConfig:
    """The run config of checkpoint ``uri`` (local or remote), read without fetching it."""
    fs, path = filesystem(uri, storage)
    try:
        return RunConfig.model_validate_json(fs.cat_file(f"{path.rstrip('/')}/{RUN_CONFIG}"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint {uri}: unreadable {RUN_CONFIG} ({first_line(exc)}); "
            "give a checkpoint of a finished save"
        ) from None
