"""Checkpoints of a run: DeepSpeed shards of every rank plus what exact resume needs.

Each rank writes its part of the folder (layout in ``infra.checkpoint_layout``, which readers
use); Ray Train merges the folders every rank reports.

Task draws and noise are functions of (seed, step, rank), so with the data position and
the RNG states a resumed run takes exactly the steps the uninterrupted run takes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infra.checkpoint_layout import DEEPSPEED_TAG, RUN_CONFIG, TRAINER_STATE
from infra.config import RunConfig
from infra.errors import ConfigError

__all__ = ["TrainerState", "load_checkpoint", "save_checkpoint"]


@dataclass
class TrainerState:
    """The loop's position: the next optimizer step and the MLflow run it writes to."""

    step: int = 0
    world_size: int = 1
    mlflow_run_id: str | None = None


def save_checkpoint(
    folder: Path,
    engine: Any,
    run: RunConfig,
    state: TrainerState,
    rank: int,
    data_state: dict[str, Any],
) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (a local temp dir)."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
    rank_file = folder / "ranks" / f"rank_{rank}.pt"
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"data": data_state, "rng": _rng_states()}, rank_file)
    if rank == 0:
        (folder / RUN_CONFIG).write_text(json.dumps(run.model_dump(mode="json"), indent=2))
        (folder / TRAINER_STATE).write_text(json.dumps(state.__dict__, indent=2))


def load_checkpoint(
    folder: Path, engine: Any, rank: int, world_size: int
) -> tuple[TrainerState, dict]:
    """Restore the engine and RNGs from ``folder``; returns the state and the data position."""
    state = TrainerState(**json.loads((folder / TRAINER_STATE).read_text()))
    if state.world_size != world_size:
        raise ConfigError(
            f"checkpoint {folder} was written by {state.world_size} workers, this run has "
            f"{world_size}; resume with workers.num_workers: {state.world_size}"
        )
    load_path, _ = engine.load_checkpoint(
        str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ConfigError(f"checkpoint {folder} holds no DeepSpeed state under {DEEPSPEED_TAG}/")
    saved = torch.load(folder / "ranks" / f"rank_{rank}.pt", weights_only=False)
    _set_rng_states(saved["rng"])
    return state, saved["data"]


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
