"""A sample-batch item's ``meta.json`` as the sampler writes it (``infra.run_folder``),
for tests that lay out items by hand (the eval job's, the oracle's, a rerun's)."""

from __future__ import annotations

from pathlib import Path

from infra.run_folder import ItemInputs, ItemMeta, ItemSource, write_item_meta


def item_meta(
    story: str,
    prompts: list[str],
    scene_frames: list[int],
    label: str = "ckpt",
    step: int = 0,
    mlflow_run_id: str | None = None,
    inputs: ItemInputs | None = None,
    context_scenes: int = 0,
) -> ItemMeta:
    """A finished item's meta: rendered in fixed mode (unless ``inputs`` say otherwise)
    from checkpoint ``label`` at ``step``."""
    inputs = inputs or ItemInputs(
        story=story,
        seed=0,
        noise_seed=0,
        mode="fixed",
        prompts=prompts,
        context_videos=[],
        checkpoint=f"/runs/{label}",
        scheduler="ddim",
        vae_tiling=False,
        params={},
    )
    return ItemMeta(
        inputs=inputs,
        checkpoint=ItemSource(
            label=label,
            uri=f"/runs/{label}",
            run=label,
            kind="training",
            step=step,
            mlflow_run_id=mlflow_run_id,
        ),
        seconds=0.0,
        scene_frames=scene_frames,
        context_scenes=context_scenes,
        truncated=[False] * len(scene_frames),
        written="2026-12-07T00:00:00Z",
    )


def write_meta(folder: Path, meta: ItemMeta) -> None:
    """``meta`` into the item folder ``folder``, as the sampler writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_item_meta(str(folder), None, meta)
