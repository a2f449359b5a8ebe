"""``m2d export RUN --out DIR|s3://...`` (``python -m trainer.export --spec EXPORT_SPEC``):
a training checkpoint as a diffusers CogVideoX transformer folder.

The checkpoint's weights file (older checkpoints: its ZeRO shards, consolidated with
DeepSpeed's own ``zero_to_fp32`` reader) is loaded (strictly) into a stock
``CogVideoXTransformer3DModel`` built from the run's model config, and written with
``save_pretrained`` (safetensors) - so plain diffusers loads it. ``--out`` is a new (or
empty) local folder or ``s3://`` prefix: an object-store export is written locally, then
uploaded, config.json last, and nothing already there is replaced.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from infra.checkpoint_layout import read_weights
from infra.config import StorageConfig
from infra.errors import StorageError, first_line
from infra.job_entry import job_main
from infra.job_specs import ExportSpec
from infra.model_store import resolve_model_folder
from infra.run_folder import read_run_config
from infra.storage import filesystem, is_remote
from mask2dit.components import load_transformer, transformer_config
from mask2dit.tiny import BUILT_IN_SOURCES


def checkpoint_config(checkpoint_uri: str, storage: StorageConfig | None) -> dict:
    """The stock transformer config of a checkpoint's run (its model source's)."""
    run = read_run_config(checkpoint_uri, storage, fix="give a checkpoint of a finished save")
    if run.model.source in BUILT_IN_SOURCES:
        return transformer_config(None, run.model.source)
    return transformer_config(resolve_model_folder(run.model.source, run.storage))


def export_checkpoint(checkpoint_uri: str, out: str, storage: StorageConfig | None) -> str:
    """Write the checkpoint's transformer to ``out`` (a folder or URI holding nothing yet).

    ``storage`` serves the checkpoint and, for an object-store ``out``, the upload. Only
    the checkpoint's run config and weights file are read.
    """
    out = str(out)
    _check_new(out, storage)
    config = checkpoint_config(checkpoint_uri, storage)
    model = load_transformer(config, read_weights(checkpoint_uri, storage))
    if not is_remote(out):
        model.save_pretrained(out, safe_serialization=True)
        return out
    with tempfile.TemporaryDirectory(prefix="m2d-export-") as tmp:
        folder = Path(tmp) / "export"
        model.save_pretrained(folder, safe_serialization=True)
        _upload(folder, out, storage)
    return out


def _check_new(out: str, storage: StorageConfig | None) -> None:
    fs, path = filesystem(out, storage)
    try:
        held = fs.exists(path) and (not fs.isdir(path) or bool(fs.ls(path, detail=False)))
    except OSError as exc:
        raise StorageError(f"--out {out}: cannot check it ({first_line(exc)})") from None
    if held:
        raise StorageError(f"{out} is not empty; export into a new folder (nothing overwritten)")


def _upload(folder: Path, out: str, storage: StorageConfig | None) -> None:
    """Upload ``folder``'s files under ``out``, ``config.json`` last: a reader that finds
    the config finds the weights."""
    fs, path = filesystem(out, storage)
    files = sorted(folder.iterdir(), key=lambda f: f.name == "config.json")
    try:
        for file in files:
            fs.put_file(str(file), f"{path.rstrip('/')}/{file.name}")
    except OSError as exc:
        raise StorageError(f"--out {out}: upload failed ({first_line(exc)})") from None


def main(argv: list[str] | None = None) -> int:
    """The job entry point: an ``ExportSpec`` in, the folder written."""
    return job_main(ExportSpec, _export, argv)


def _export(spec: ExportSpec) -> None:
    out = export_checkpoint(spec.checkpoint, spec.out, spec.storage)
    print(f"exported {spec.checkpoint} -> {out}")


if __name__ == "__main__":
    sys.exit(main())
