"""The typed spec of every job the CLI starts (``infra.job_entry.job_main`` reads them): the data
jobs', export's, the training job's (it names the run's config) and sample-batch's.

Each job's options are declared once, as these fields (defaults and help), and become
click options in ``orchestrator/commands/`` (``spec_options``); the job reads the spec and
nothing else. Like run configs, specs hold no credentials: the job's processes read those
from their own environment.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from infra.config import (
    ModelConfig,
    RunConfig,
    StageRecipe,
    StorageConfig,
    TrackingConfig,
    _Strict,
)

__all__ = [
    "MAX_SYNTH_SHOT_BYTES",
    "CheckpointSpec",
    "EvalSpec",
    "ExportSpec",
    "FilterSpec",
    "ImportSpec",
    "InspectSpec",
    "PrecomputeSpec",
    "SampleJobSpec",
    "ShotsSpec",
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
    storage: StorageConfig | None = Field(None, description="The store of an s3:// --out.")

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
    scenes: int | None = Field(
        None,
        ge=1,
        description="Read as SFT groups of N scenes (default: 3 for a manifest of groups).",
    )
    check: bool = Field(
        False, description="Also open every video: count missing, empty, undecodable ones."
    )
    storage: StorageConfig | None = Field(None, description="The store of an s3:// manifest.")


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
    storage: StorageConfig | None = Field(None, description="The store of s3:// paths.")
    tracking_uri: str | None = Field(None, description="MLflow URI: log counts, histogram.")
    experiment: str = Field("m2d-data", description="MLflow experiment.")
    num_actors: int = Field(1, description="Encoder actors (one model each).")
    batch_size: int = Field(8, description="Shots per actor batch.")


class ImportSpec(_Strict):
    """``python -m datajobs.import_clips``: a captioned clip list (Panda-70M's layout) as a
    pre-training manifest."""

    clips: str = Field(description="Clip list (.csv/.jsonl): videoID, timestamp, caption.")
    videos: str | None = Field(
        None, description="Folder or s3:// prefix of VIDEOID.mp4 (default: the list's folder)."
    )
    suffix: str = Field(".mp4", description="File name ending of the videos.")
    out: str = Field(description="Pre-training manifest to write (.csv/.jsonl); never overwritten.")
    concurrency: int = Field(4, ge=1, description="Videos read at once (Ray tasks).")
    storage: StorageConfig | None = Field(None, description="The store of s3:// paths.")


class ShotsSpec(_Strict):
    """``python -m datajobs.shots``: the shots of long videos, one manifest row each."""

    videos: list[str] = Field(description="Videos, folders or s3:// prefixes of videos.")
    out: str = Field(description="Shot manifest to write (.csv/.jsonl); never overwritten.")
    detector: Literal["content", "adaptive"] = Field(
        "content", description="PySceneDetect detector: content or adaptive."
    )
    threshold: float | None = Field(
        None, gt=0, description="The detector's threshold (default: content 27, adaptive 3)."
    )
    verify: float = Field(
        0.45, ge=0, le=1, description="Min colour change across a cut, 0-1 (0: every proposal)."
    )
    min_shot: float = Field(1.0, gt=0, description="Drop shots shorter than this (seconds).")
    max_shot: float | None = Field(
        None, gt=0, description="Cut longer shots into windows of this length (seconds)."
    )
    num_actors: int = Field(2, ge=1, description="Detector actors (one video at a time each).")
    storage: StorageConfig | None = Field(None, description="The store of s3:// paths.")


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
    tracking: TrackingConfig | None = Field(
        None, description="Where the counts are logged (the run's MLflow); None: not at all."
    )


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


# -- m2d sample-batch (python -m sampler.job) ------------------------------------------

_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointSpec(_Strict):
    """One checkpoint to sample: a training checkpoint folder (DeepSpeed, with its
    run_config.json), an exported transformer folder (``m2d export``) or a whole diffusers
    CogVideoX folder; local path or URI."""

    uri: str = Field(description="Checkpoint folder, local path or s3:// URI.")
    label: str = Field(description="Its folder name under the output root.")
    run: str | None = Field(None, description="The m2d run it came from, if known.")

    @field_validator("label")
    @classmethod
    def _label(cls, value: str) -> str:
        if not _LABEL.match(value):
            raise ValueError(f"label {value!r}: use letters, digits, '_', '.', '-' only")
        return value


class SampleJobSpec(_Strict):
    """Every input of a sample-batch job. ``None`` for frames/height/width means: the
    checkpoint's training recipe (or ``recipe`` for folders that carry none)."""

    cluster: str = Field(description="The cluster profile it was resolved from.")
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    prompts: str = Field(description="Prompts JSONL (local path or URI).")
    out: str = Field(description="Output root (local path or s3:// URI).")
    mode: Literal["fixed", "extend"] = Field(
        "fixed", description="All scenes at once, or scene by scene from the ones before."
    )
    steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    noise: Literal["story", "shared"] = Field(
        "story",
        description="Initial noise of a (story, seed) item: drawn from both (independent "
        "across stories, the same for every checkpoint), or from the seed alone (every "
        "story starts from the same noise).",
    )
    frames: int | None = Field(None, ge=1, description="Pixel frames per new scene (8k+1).")
    height: int | None = Field(None, ge=16)
    width: int | None = Field(None, ge=16)
    negative_prompt: str = Field("", description="Negative prompt for every scene.")
    scheduler: Literal["ddim", "dpm"] = Field("ddim", description="CogVideoX's sampler.")
    overwrite: bool = Field(False, description="Render finished items again.")
    vae_tiling: bool = Field(False, description="Decode in overlapping tiles (less memory).")
    vae_slicing: bool = Field(False, description="Decode one sample at a time.")
    num_actors: int = Field(1, ge=1, description="Model replicas (one model per actor).")
    batch_size: int = Field(
        1,
        ge=1,
        description="Items (stories x seeds of a checkpoint) per model call; larger is "
        "faster where an actor's memory holds it.",
    )
    cpus_per_actor: int = Field(1, ge=1)
    gpus_per_actor: int = Field(0, ge=0, le=1)
    model: ModelConfig = Field(description="VAE, T5 and scheduler for transformer folders.")
    recipe: StageRecipe = Field(description="Defaults where a checkpoint has no run config.")
    storage: StorageConfig
    tracking: TrackingConfig | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds repeat; give each seed once")
        return value

    @model_validator(mode="after")
    def _labels(self) -> SampleJobSpec:
        labels = [checkpoint.label for checkpoint in self.checkpoints]
        if len(set(labels)) != len(labels):
            raise ValueError(f"checkpoint labels repeat: {labels}; give each checkpoint once")
        return self
