"""The model configs a plan needs: three ``config.json`` files of ``model.source``.

A diffusers CogVideoX folder (local or ``s3://``) holds ``transformer/``, ``text_encoder/``
and ``vae/``, each with its ``config.json``; only those are read, never weights. The
built-in models' (``tiny``, ``toy``) configs come from ``mask2dit.tiny`` (torch-free).

Planning comes before renting: a source that cannot be read from here (a cluster's
``/mnt/shared`` path, a bucket without credentials) whose folder is named like a model m2d
ships the configs of (``SHIPPED``: CogVideoX-2b and -5b, as THUDM publishes them) is
planned with those, and the plan says so in one line.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from pathlib import Path

from infra.config import ModelConfig, StorageConfig
from infra.errors import ConfigError, StorageError, first_line
from infra.storage import filesystem
from mask2dit.tiny import BUILT_IN_SOURCES, built_in_configs
from orchestrator.plan.estimate import ModelConfigs

PARTS = ("transformer", "text_encoder", "vae")
#: The models whose configs ship with m2d, by folder name (case-insensitive).
SHIPPED = Path(__file__).with_name("model_configs")


def read_model_configs(
    model: ModelConfig, storage: StorageConfig | None, warn: Callable[[str], None] | None = None
) -> ModelConfigs:
    """The configs of ``model.source``; a one-line error names the file that is missing.
    Where it cannot be read and m2d ships the configs of a model of its name, those, with
    a line to ``warn`` saying so."""
    if model.source in BUILT_IN_SOURCES:  # as trainer.components.load_training_parts reads it
        return ModelConfigs(**built_in_configs(model.source))
    try:
        return _read(model, storage)
    except (ConfigError, StorageError) as exc:
        shipped = shipped_configs(model.source)
        if shipped is None or "is not JSON" in str(exc):
            raise
        if warn is not None:
            warn(f"{exc}; planning with the {shipped.name} configs m2d ships")
        return _read(model.model_copy(update={"source": str(shipped)}), None)


def shipped_configs(source: str) -> Path | None:
    """m2d's copy of the configs of the model ``source`` names (by its last folder)."""
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    found = [path for path in SHIPPED.iterdir() if path.name.lower() == name]
    return found[0] if found else None


def _read(model: ModelConfig, storage: StorageConfig | None) -> ModelConfigs:
    fs, root = filesystem(model.source, storage)
    found = {}
    for part in PARTS:
        path = posixpath.join(root.rstrip("/"), part, "config.json")
        where = f"model.source = {model.source}: {part}/config.json"
        try:
            with fs.open(path, "r") as handle:
                found[part] = json.load(handle)
        except FileNotFoundError:
            raise ConfigError(
                f"{where} not found; point model.source at a diffusers CogVideoX folder "
                "(or --set model.source=FOLDER)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not JSON ({exc.msg} at line {exc.lineno})") from None
        except Exception as exc:  # s3fs/botocore raise more than OSError when unreachable
            raise StorageError(f"{where}: cannot read it ({first_line(exc)})") from None
    return ModelConfigs(**found)
