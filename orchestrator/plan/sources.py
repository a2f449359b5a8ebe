"""The model configs a plan needs: three ``config.json`` files of ``model.source``.

A diffusers CogVideoX folder (local or ``s3://``) holds ``transformer/``, ``text_encoder/``
and ``vae/``, each with its ``config.json``; only those are read, never weights. The
built-in models' (``tiny``, ``toy``) configs come from ``mask2dit.tiny`` (torch-free).
"""

from __future__ import annotations

import json
import posixpath

from infra.config import ModelConfig, StorageConfig
from infra.errors import ConfigError, StorageError, first_line
from infra.storage import filesystem
from mask2dit.tiny import BUILT_IN_SOURCES, built_in_configs
from orchestrator.plan.estimate import ModelConfigs

PARTS = ("transformer", "text_encoder", "vae")


def read_model_configs(model: ModelConfig, storage: StorageConfig | None) -> ModelConfigs:
    """The configs of ``model.source``; a one-line error names the file that is missing."""
    if model.source in BUILT_IN_SOURCES:  # as trainer.components.load_training_parts reads it
        return ModelConfigs(**built_in_configs(model.source))
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
