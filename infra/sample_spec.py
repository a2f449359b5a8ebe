"""What a ``m2d sample-batch`` job renders: the spec the CLI resolves and the job reads.

The orchestrator builds a ``SampleJobSpec`` from its options and the cluster profile
(torch-free) and hands it to ``python -m sampler.job --spec JSON``. Like a run config it
holds no credentials: the job's processes read those from their own environment.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from infra.config import (
    ModelConfig,
    StageRecipe,
    StorageConfig,
    TrackingConfig,
    _Strict,
)

__all__ = ["CheckpointSpec", "SampleJobSpec"]

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
