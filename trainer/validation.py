"""Validation during training: stories rendered from the current weights every N steps.

With ``recipe.validation.every`` > 0, after every N-th optimizer step the workers sample
the first ``stories`` stories of the prompt file, once per seed, with the engine's own
module (``engine.module``: no copy of the model; under ZeRO-3 every rank renders, so the
layer-by-layer parameter gathers line up), the frozen VAE and T5 the step uses, and a
fresh DDIM scheduler over the run's scheduler config. The renders are dealt round-robin
over the ranks; each rank scores its own with the configured encoder (if any) and hands
rank 0 a small preview and the scores. Rank 0 logs, at that step of the training run's
MLflow run: a contact sheet per render (``validation/STORY/seedN``, MLflow's images with
a step slider), the GIFs as artifacts (``validation/step_NNNNNNNN/``), the mean
consistency scores (``val_visual``, ``val_semantic``, ``val_sequence``, in percent as the
paper prints them) and the cost: ``validation_s`` and ``validation_overhead`` (that time
over the training time since the previous validation), all at once, not through the
buffered metric writer.

Renders draw from their own seeded generators, so validation changes no training step.
A restart redoes the steps since its checkpoint; a validation step MLflow already holds
is not rendered again (``validated_through``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from infra.config import RunConfig
from infra.logging import get_logger
from infra.previews import preview_frames, write_contact_sheet, write_gif
from infra.prompts import Story, prompt_file, read_stories
from infra.tracking import Tracker, fail_fast
from mask2dit.sampling.denoise import build_scheduler
from mask2dit.sampling.params import SamplingParams
from mask2dit.sampling.pipeline import MultiScenePipeline
from trainer.components import TrainingParts

__all__ = ["Render", "Validator"]

log = get_logger("trainer.validation")

_PREVIEW_SIDE = 160  # pixels: enough for a contact sheet, small to gather to rank 0
_FPS = 8


@dataclass
class Render:
    """One validation render as rank 0 receives it: previews (T, h, w, 3) per scene and
    the story's scores in percent (``None``: no encoder, or one without text)."""

    story: str
    seed: int
    scenes: list[np.ndarray]
    scores: dict[str, float | None]


class Validator:
    """Renders, scores and logs the validation set of one worker's run."""

    def __init__(self, run: RunConfig, parts: TrainingParts, rank: int, world: int) -> None:
        config = run.recipe.validation
        self.run, self.config, self.rank, self.world = run, config, rank, world
        self.parts = parts
        stories = read_stories(prompt_file(config.prompts), run.storage)[: config.stories]
        self.items = [(story, seed) for story in stories for seed in config.seeds]
        recipe = run.recipe
        self.params = SamplingParams(
            num_inference_steps=config.sampling_steps,
            guidance_scale=config.guidance_scale,
            text_tokens=run.model.text_tokens,
            num_frames=recipe.frames - (recipe.frames - 1) % 8,  # the VAE's 8k + 1
            height=recipe.height,
            width=recipe.width,
        )
        self.encoder = None
        if config.encoder:
            from evaluation.encoders import load_encoder

            self.encoder = load_encoder(config.encoder, config.encoder_path, run.storage)
        self.validated_through = 0
        self.train_s = 0.0  # training time since the previous validation

    def due(self, step: int) -> bool:
        """Whether ``step`` (steps completed) is a validation step not yet in MLflow."""
        every = self.config.every
        return every > 0 and step % every == 0 and step > self.validated_through

    def validate(self, module: torch.nn.Module, step: int, tracker: Tracker | None) -> None:
        """Render this rank's share with ``module`` (every rank calls it together); rank 0
        logs the renders and the metrics at ``step``."""
        start = time.perf_counter()
        pipeline = MultiScenePipeline(
            module,
            self.parts.vae,
            self.parts.text_encoder,
            self.parts.tokenizer,
            build_scheduler("ddim", self.parts.scheduler.config),
        )
        mine = self.items[self.rank :: self.world]
        # Every rank renders as many times (ZeRO-3's gathers are collective): a rank with
        # one fewer renders its first again and drops it.
        rounds = -(-len(self.items) // self.world)
        renders = []
        was_training = module.training
        module.eval()
        try:
            for index in range(rounds):
                story, seed = (mine or self.items)[index % max(len(mine), 1)]
                render = self._render(pipeline, story, seed)
                if index < len(mine):
                    renders.append(render)
        finally:
            module.train(was_training)
        gathered = _gather(renders, self.world)
        seconds = time.perf_counter() - start
        metrics = {
            "validation_s": seconds,
            "validation_overhead": seconds / self.train_s if self.train_s else 0.0,
        }
        self.validated_through, self.train_s = step, 0.0
        if self.rank != 0:
            return
        everything = [render for rank in gathered for render in rank]
        metrics.update(_mean_scores(everything))
        log.info("validation at step %d: %d render(s) in %.1f s", step, len(self.items), seconds)
        if tracker is not None:
            _log_validation(tracker, everything, metrics, step)

    def _render(self, pipeline: MultiScenePipeline, story: Story, seed: int) -> Render:
        generator = torch.Generator().manual_seed(seed)
        output = pipeline.generate(story.prompts, self.params, generator=generator)
        scenes = [frames.numpy() for frames in output.frames]
        previews = [preview_frames(s, _PREVIEW_SIDE) for s in scenes]
        return Render(story.id, seed, previews, self._scores(story, scenes))

    def _scores(self, story: Story, scenes: list[np.ndarray]) -> dict[str, float | None]:
        if self.encoder is None or len(scenes) < 2:
            return {}
        from evaluation.encoders import text_encoder_of, uniform_frame_indices
        from evaluation.metrics import score_story

        embeddings = []
        for frames_THWC in scenes:
            indices = uniform_frame_indices(frames_THWC.shape[0], self.encoder.num_frames)
            clip = torch.from_numpy(frames_THWC[indices]).permute(0, 3, 1, 2)
            embeddings.append(self.encoder.embed(clip).numpy())
        texts = text_encoder_of(self.encoder)
        prompts = list(story.prompts)
        prompt_embeddings = None if texts is None else texts.embed_texts(prompts).numpy()
        scores = score_story(story.id, np.stack(embeddings), prompt_embeddings, prompts)
        return {"visual": scores.visual, "semantic": scores.semantic, "sequence": scores.sequence}


def _log_validation(tracker: Tracker, renders: list[Render], metrics: dict, step: int) -> None:
    """Contact sheets (images at ``step``), GIFs (artifacts), then the metrics, into the
    run, at once rather than through the buffered metric writer: ``validation_s`` in MLflow
    is what tells a restart the step was validated. A contact sheet the run holds already
    at ``step`` (an attempt killed between the images and the metrics) is not logged
    again; the GIFs go to the same paths, so they replace themselves. A store that does
    not answer costs one warning, never the run."""
    try:
        with fail_fast(10), tempfile.TemporaryDirectory(prefix="m2d-val-") as tmp:
            held = tracker.logged_images()
            folder = Path(tmp)
            for render in renders:
                name = f"{render.story}_seed{render.seed}"
                write_gif(render.scenes, str(folder / f"{name}.gif"), fps=_FPS)
                sheet = folder / f"{name}.png"
                write_contact_sheet(render.scenes, str(sheet))
                key = f"validation/{render.story}/seed{render.seed}"
                if not held[key, step]:
                    tracker.log_image(sheet, key=key, step=step)
            tracker.log_artifacts(folder, f"validation/step_{step:08d}")
            tracker.log_metrics(metrics, step)
    except Exception as exc:  # MLflow, requests and the store each raise their own
        log.warning("validation images of step %d not logged: %s", step, exc)


def _gather(renders: list[Render], world: int) -> list[list[Render]]:
    """Every rank's renders on rank 0 (elsewhere: nothing)."""
    if world == 1:
        return [renders]
    gathered: list[Any] = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(renders, gathered, dst=0)
    return gathered if gathered is not None else []


def _mean_scores(renders: list[Render]) -> dict[str, float]:
    """Mean of each score over the renders that have it, as ``val_<score>``."""
    means = {}
    for key in ("visual", "semantic", "sequence"):
        values = [r.scores[key] for r in renders if r.scores.get(key) is not None]
        if values:
            means[f"val_{key}"] = float(np.mean(values))
    return means
