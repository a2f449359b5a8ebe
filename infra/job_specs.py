"""The typed specs of the small jobs the CLI starts (``infra.jobs.run_job`` reads them).

Each job's options are declared once, as click options in ``orchestrator/commands/``,
whose defaults are these fields' defaults (``default_of``); the job reads the spec and
nothing else. Like run configs, specs hold no credentials.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from infra.config import RunConfig, StorageConfig, TrackingConfig, _Strict

__all__ = [
    "MAX_SYNTH_SHOT_BYTES",
    "EvalSpec",
    "ExportSpec",
    "FilterSpec",
    "InspectSpec",
    "PrecomputeSpec",
    "SynthSpec",
    "TrainJobSpec",
    "default_of",
]


def default_of(spec_type: type[BaseModel], field: str) -> Any:
    """A spec field's default, for the click option that sets it."""
    return spec_type.model_fields[field].default


#: The largest shot ``data synth`` draws (float32 frames): 49 frames of 1080x1920 fit.
MAX_SYNTH_SHOT_BYTES = 2 << 30


class SynthSpec(_Strict):
    """``python -m datajobs.synth``: a small synthetic multi-scene dataset."""

    out: str = Field(description="New (or empty) folder or s3:// prefix.")
    world: Literal["characters", "toy"] = Field(
        "characters",
        description="characters: recurring coloured shapes, captioned as the paper's data; "
        "toy: a background no prompt names shared by a story's scenes, one named object per "
        "scene, and held-out evaluation stories (docs/ablation.md).",
    )
    stories: int = Field(12, ge=1, description="Stories (shot groups).")
    scenes: int = Field(3, ge=1, description="Scenes per training story.")
    shots: int | None = Field(None, ge=1, description="Shots per story (default scenes + 1).")
    frames: int | None = Field(None, ge=1, description="Frames per shot (default 17; toy world 5).")
    height: int | None = Field(None, description="Video height (even; default 32, toy 16).")
    width: int | None = Field(None, description="Video width (even; default 32, toy 16).")
    held_out: int = Field(
        50, ge=0, description="Toy world: evaluation stories, none seen in training."
    )
    fps: float = Field(8.0, gt=0, description="Frames per second.")
    seed: int = Field(0, description="Same seed, same dataset.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint of --out.")

    @field_validator("height", "width")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and (value < 2 or value % 2):
            raise ValueError(f"{value}: height and width must be even and >= 2 (yuv420p)")
        return value

    @model_validator(mode="after")
    def _fits_in_memory(self) -> SynthSpec:
        # A shot is drawn as float32 frames: refuse sizes no machine holds before drawing.
        need = self.frames * self.height * self.width * 3 * 4
        if need > MAX_SYNTH_SHOT_BYTES:
            raise ValueError(
                f"one {self.frames}-frame shot at {self.height}x{self.width} needs "
                f"{need / 2**30:.1f} GiB to draw; synthesize at most "
                f"{MAX_SYNTH_SHOT_BYTES / 2**30:.0f} GiB per shot (smaller --size or --frames)"
            )
        return self

    @model_validator(mode="after")
    def _enough_shots(self) -> SynthSpec:
        if self.shots is not None and self.shots < self.scenes:
            raise ValueError(f"shots ({self.shots}) must be at least scenes ({self.scenes})")
        # A toy story's scenes name different colours, shapes and motions: four of each.
        if self.world == "toy" and (self.shots or self.scenes) > 4:
            raise ValueError("a toy story has at most 4 scenes (4 colours, shapes, motions)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _world_defaults(cls, values: Any) -> Any:
        """Frames and size the world is drawn at, where the spec gives none."""
        if not isinstance(values, dict):
            return values
        defaults = _TOY_DEFAULTS if values.get("world") == "toy" else _CHARACTER_DEFAULTS
        return {**values, **{k: v for k, v in defaults.items() if values.get(k) is None}}


_CHARACTER_DEFAULTS = {"frames": 17, "height": 32, "width": 32}
# The toy model's scenes: 5 frames (its VAE passes frames through, and the sampler wants an
# odd latent count), 16x16 pixels.
_TOY_DEFAULTS = {"frames": 5, "height": 16, "width": 16}


class InspectSpec(_Strict):
    """``python -m datajobs.inspect_manifest``: what a manifest holds and what it skips."""

    manifest: str = Field(description="Manifest path or URI.")
    scenes: int | None = Field(None, ge=1, description="Read as SFT groups of N scenes.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint.")


class EvalSpec(_Strict):
    """``python -m sampler.eval_job``: score the stories a sample-batch job rendered."""

    samples: str = Field(description="The sample-batch output root (path or s3:// URI).")
    encoder: str = Field(
        "xclip",
        description="Registered video encoder, or MODULE:FUNCTION: a user's encoder or a "
        "story oracle (evaluation.toy_oracle:oracle scores toy-world stories exactly).",
    )
    encoder_path: str = Field(
        description="Encoder folder (save_pretrained), path or URI; a MODULE:FUNCTION "
        "without weights needs none."
    )
    overwrite: bool = Field(False, description="Score finished items again.")
    num_actors: int = Field(1, ge=1, description="Encoder actors (one model each).")
    cpus_per_actor: int = Field(1, ge=1)
    gpus_per_actor: int = Field(0, ge=0, le=1)
    seed: int = Field(0, description="Seed of the bootstrap intervals.")
    reference: str | None = Field(
        None,
        description="FVD: a manifest of real clips (JSONL rows with path and num_frames, "
        "paths relative to it), path or URI.",
    )
    fvd_features: str = Field("videomae", description="Registered encoder of the FVD features.")
    fvd_path: str | None = Field(
        None, description="Folder of the FVD features' model (save_pretrained), path or URI."
    )
    storage: StorageConfig | None = Field(None, description="The samples' store.")
    tracking: TrackingConfig | None = Field(None, description="MLflow: None logs nothing.")


class ExportSpec(_Strict):
    """``python -m trainer.export``: a training checkpoint as a diffusers folder."""

    checkpoint: str = Field(description="Checkpoint folder (path or URI).")
    out: str = Field(description="New diffusers folder or s3:// prefix.")
    storage: StorageConfig | None = Field(
        None, description="The run's store: the checkpoint's, and an s3:// --out's."
    )


class FilterSpec(_Strict):
    """``python -m datajobs.filter``: keep the SFT windows of similar adjacent scenes.
    Values are checked by the job (``check_spec``), which names the option to fix."""

    manifest: str = Field(description="SFT manifest (.json/.jsonl), path or URI.")
    encoder: str = Field("xclip", description="Registered video encoder.")
    encoder_path: str = Field(description="Encoder folder (save_pretrained), path or URI.")
    out: str = Field(description="Filtered manifest to write (.json/.jsonl); never overwritten.")
    scenes: int = Field(3, description="Scenes per SFT window (n).")
    threshold: float = Field(0.7, description="Min adjacent-scene cosine similarity.")
    min_frames: int = Field(1, description="Skip shots with fewer frames.")
    histogram: str | None = Field(None, description="Histogram PNG (default: OUT as .png).")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint.")
    tracking_uri: str | None = Field(None, description="MLflow URI: log counts, histogram.")
    experiment: str = Field("m2d-data", description="MLflow experiment.")
    num_actors: int = Field(1, description="Encoder actors (one model each).")
    batch_size: int = Field(8, description="Shots per actor batch.")


class PrecomputeSpec(_Strict):
    """``python -m datajobs.precompute``: a stage's latents and text embeddings, once.

    Model, recipe (frames, size, scenes, seed), precision, workers, storage and MLflow are
    the resolved run's (profile + stage + ``--set``), exactly what training would use."""

    run: RunConfig = Field(description="The resolved run of the stage encoded for.")
    manifest: str = Field(description="Its manifest (path or URI).")
    out: str = Field(description="Output folder or s3:// prefix (new, or this job's).")
    shard_size: int = Field(64, ge=1, description="Entries per shard.")
    num_actors: int | None = Field(
        None, ge=1, description="Encoder actors (default: the run's workers)."
    )
    tracking: bool = Field(True, description="Log the counts to the run's MLflow store.")


class TrainJobSpec(_Strict):
    """``python -m trainer.job``: train (or resume) the run whose folder holds ``config``.

    The run's ``run_config.json`` is the whole truth of what it trains (data, ``init_from``,
    everything); this spec only says where it is."""

    config: str = Field(description="URI of the run's run_config.json (path or s3://).")
    storage: StorageConfig | None = Field(
        None,
        description="How to reach the config: the run's storage settings (endpoint, region, "
        "credentials file; never keys).",
    )
