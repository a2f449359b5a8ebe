"""Export a training checkpoint as a diffusers CogVideoX transformer folder.

ZeRO shards are consolidated with DeepSpeed's own ``zero_to_fp32`` reader, the weights are
loaded (strictly) into a stock ``CogVideoXTransformer3DModel`` built from the run's model
config, and written with ``save_pretrained`` (safetensors) - so plain diffusers loads it.

    python -m trainer.export --checkpoint URI --out DIR [--storage-json JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from infra.checkpoints import consolidated_state_dict, fetch_checkpoint, read_run_config
from infra.config import StorageConfig
from infra.errors import M2DError, StorageError
from infra.model_store import resolve_model_folder
from mask2dit.components import load_transformer, transformer_config


def checkpoint_config(checkpoint: Path) -> dict:
    """The stock transformer config of a checkpoint's run (its model source's)."""
    run = read_run_config(checkpoint)
    if run.model.source == "tiny":
        return transformer_config(None)
    return transformer_config(resolve_model_folder(run.model.source, run.storage))


def export_checkpoint(checkpoint_uri: str, out: Path, storage: StorageConfig | None) -> Path:
    """Write the checkpoint's transformer to ``out``; ``out`` must not hold anything yet."""
    if out.exists() and any(out.iterdir()):
        raise StorageError(f"{out} is not empty; export into a new folder (nothing overwritten)")
    with tempfile.TemporaryDirectory(prefix="m2d-export-") as tmp:
        local = fetch_checkpoint(checkpoint_uri, storage, Path(tmp))
        model = load_transformer(checkpoint_config(local), consolidated_state_dict(local))
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; user errors print one line and exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Checkpoint folder (path or URI).")
    parser.add_argument("--out", required=True, type=Path, help="New diffusers folder.")
    parser.add_argument("--storage-json", help="StorageConfig of the checkpoint's store.")
    args = parser.parse_args(argv)
    storage = StorageConfig(**json.loads(args.storage_json)) if args.storage_json else None
    try:
        out = export_checkpoint(args.checkpoint, args.out, storage)
    except M2DError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
