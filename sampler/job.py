"""``m2d sample-batch ...`` (``python -m sampler.job --spec SAMPLE_JOB_SPEC``): Ray Data
over (checkpoint x story x seed) with an actor pool.

The driver checks everything a user can get wrong - the prompts file, context videos,
checkpoints, frame counts, earlier outputs - before any model loads, then runs one Ray
Data pass per checkpoint: ``map_batches`` with a pool of ``StoryRenderer`` actors, each
holding one model, rendering up to ``--batch-size`` items per call (stories and seeds in
one model batch, ``sampler.batch.render_stories``) and writing their files itself. The
driver streams the finished rows: a progress record each (``infra.logging.progress``, which
the console shows as items done of all, with an ETA) and, with a tracking URI, the MLflow
run (previews as images at the checkpoint's training step, files as artifacts). Exit
status: 0 done, 2 a user error (one line), 1 anything else.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.errors import ConfigError, DataError
from infra.job_entry import job_main
from infra.job_specs import CheckpointSpec, SampleJobSpec
from infra.logging import get_logger, progress
from infra.processes import pid_alive
from infra.prompts import Story, check_context_videos, prompt_file, read_stories
from infra.ray_runtime import ray_session
from infra.run_folder import ItemMeta, ItemSource, parse_item_meta
from infra.storage import filesystem, is_remote
from mask2dit.sampling.params import SamplingParams
from sampler.batch import (
    Item,
    inputs_record,
    item_uri,
    noise_seed,
    plan_items,
    render_stories,
    sampling_params,
    write_item,
)
from sampler.checkpoint_info import CheckpointInfo, describe_checkpoint

__all__ = ["LOCK_FILE", "SamplePlan", "StoryRenderer", "claim_output", "main", "prepare", "run"]

log = get_logger(__name__)

LOCK_FILE = ".m2d-sample.lock"  # in a local output folder: "host pid" of the job writing it


class SamplePlan:
    """The checked inputs of a job: stories, each checkpoint's facts and parameters,
    and the items still to render."""

    def __init__(self, spec: SampleJobSpec) -> None:
        self.spec = spec
        self.stories: list[Story] = read_stories(spec.prompts, spec.storage)
        self.infos: dict[str, CheckpointInfo] = {
            c.label: describe_checkpoint(spec, c) for c in spec.checkpoints
        }
        self.params: dict[str, SamplingParams] = {
            label: sampling_params(spec, info) for label, info in self.infos.items()
        }
        self.todo, self.finished = plan_items(spec, self.stories, self.params)


def prepare(spec: SampleJobSpec) -> SamplePlan:
    """Validate the job's inputs (no model loads); raises M2DError with one line."""
    plan = SamplePlan(spec)
    if spec.mode == "fixed":
        for story in plan.stories:
            if story.context_videos:
                raise DataError(
                    f"{spec.prompts}:{story.line}: story {story.id} has context_videos; "
                    "render it with --mode extend"
                )
    frames = max(params.num_frames for params in plan.params.values())
    check_context_videos(plan.stories, spec.storage, min_frames=frames, prompts_uri=spec.prompts)
    return plan


@dataclass(frozen=True)
class RenderWork:
    """What the driver planned for one checkpoint's actors, handed to each whole (Ray
    pickles it): they read no spec file, prompt file or checkpoint description again."""

    spec: SampleJobSpec
    checkpoint: CheckpointSpec
    info: CheckpointInfo
    params: SamplingParams
    stories: dict[str, Story]  # the stories of this checkpoint's items, by id

    @classmethod
    def of(cls, plan: SamplePlan, label: str, items: list[Item]) -> RenderWork:
        checkpoint = next(c for c in plan.spec.checkpoints if c.label == label)
        wanted = {item.story for item in items}
        stories = {story.id: story for story in plan.stories if story.id in wanted}
        return cls(plan.spec, checkpoint, plan.infos[label], plan.params[label], stories)


class StoryRenderer:
    """A Ray Data actor: one checkpoint's pipeline, rendering ``batch_size`` rows (items)
    per call."""

    def __init__(self, work: RenderWork) -> None:
        import torch

        from sampler.models import load_pipeline  # diffusers and transformers: actors only

        self.spec = work.spec
        torch.set_num_threads(self.spec.cpus_per_actor)
        device = "cuda" if self.spec.gpus_per_actor and torch.cuda.is_available() else "cpu"
        self.pipeline = load_pipeline(self.spec, work.checkpoint, work.info, device)
        self.checkpoint, self.info = work.checkpoint, work.info
        self.params = work.params
        self.stories = work.stories

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Render a batch of rows (up to ``batch_size`` items) in shared model calls."""
        started = time.perf_counter()
        items = [
            (str(story), int(seed))
            for story, seed in zip(batch["story"], batch["seed"], strict=True)
        ]
        outputs = render_stories(
            self.pipeline,
            [
                (self.stories[story], noise_seed(story, seed, self.spec.noise))
                for story, seed in items
            ],
            self.params,
            self.spec.mode,
            self.spec.storage,
        )
        seconds = (time.perf_counter() - started) / len(items)  # each item's share
        rows = [
            self.write(story, seed, output, seconds)
            for (story, seed), output in zip(items, outputs, strict=True)
        ]
        return {key: [row[key] for row in rows] for key in rows[0]}

    def write(self, story_id: str, seed: int, output, seconds: float) -> dict[str, Any]:
        story = self.stories[story_id]
        inputs = inputs_record(story, seed, self.checkpoint, self.spec, self.params)
        source = ItemSource(
            label=self.checkpoint.label,
            uri=self.checkpoint.uri,
            run=self.checkpoint.run,
            kind=self.info.kind,
            step=self.info.step,
            mlflow_run_id=self.info.mlflow_run_id,
        )
        item = Item(self.checkpoint.label, story_id, seed)
        written = write_item(
            self.spec.out, item, output, inputs, source, seconds, self.spec.storage
        )
        return {"story": story_id, "seed": seed, "meta": written.model_dump_json()}


#: How long a sample job waits for its whole actor pool (models load in the actors).
ACTOR_START_S = 600


def _rendered(plan: SamplePlan, label: str, items: list[Item]) -> Iterator[dict[str, Any]]:
    """Rows of finished items of one checkpoint, as the actor pool completes them."""
    import ray.data

    spec = plan.spec
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is below
    # The whole pool is up before the first item is handed out, so every replica asked
    # for renders its share: by default Ray Data starts actors asynchronously and hands
    # items to the first one ready, which on a busy cluster renders a short list alone.
    context.wait_for_min_actors_s = ACTOR_START_S
    actors = min(spec.num_actors, len(items))
    rows = [{"story": item.story, "seed": item.seed} for item in items]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    rendered = dataset.map_batches(
        StoryRenderer,
        fn_constructor_kwargs={"work": RenderWork.of(plan, label, items)},
        batch_size=spec.batch_size,
        concurrency=actors,
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor,
    )
    try:
        yield from rendered.iter_rows()
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"the cluster did not start {actors} sampling actor(s) ({spec.cpus_per_actor} "
            f"CPU, {spec.gpus_per_actor} GPU each) within {ACTOR_START_S} s; ask for fewer "
            "with --num-actors, or free the cluster's resources"
        ) from None


def run(spec: SampleJobSpec, echo: Callable[[str], None] = print) -> SamplePlan:
    """Render every unfinished item; returns the plan (its ``todo`` is what was done)."""
    with claim_output(spec.out):  # before planning: what is finished is read under it
        return _run(prepare(spec), echo)


def _run(plan: SamplePlan, echo: Callable[[str], None]) -> SamplePlan:
    spec = plan.spec
    echo(
        f"{len(plan.todo)} item(s) to render, {len(plan.finished)} already finished, "
        f"{spec.num_actors} actor(s); output {spec.out}"
    )
    tracker = _open_tracker(plan, echo) if spec.tracking else None
    if tracker is not None:  # this job's MLflow run shows all its items, earlier ones too
        logged = _logged_items(tracker, plan)
        for item in plan.finished:
            if item not in logged:
                _log_item(tracker, plan, item)
    progress(event="start", step=0, steps=len(plan.todo), unit="item")
    done = 0
    cpus = max(2, spec.num_actors * spec.cpus_per_actor)
    try:
        with ray_session(num_cpus=cpus) if plan.todo else contextlib.nullcontext():
            for checkpoint in spec.checkpoints:
                items = [item for item in plan.todo if item.checkpoint == checkpoint.label]
                for row in _rendered(plan, checkpoint.label, items) if items else ():
                    where = f"{checkpoint.label}/{row['story']}/{row['seed']}"
                    _warn_truncated(parse_item_meta(row["meta"], where), echo)
                    if tracker is not None:
                        _log_item(tracker, plan, Item(checkpoint.label, row["story"], row["seed"]))
                    done += 1
                    progress(step=done, unit="item", item=where)
    except BaseException as exc:
        if tracker is not None:
            stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))  # Ctrl-C, SIGTERM
            tracker.finish("KILLED" if stopped else "FAILED")
        raise
    if tracker is not None:
        tracker.log_metrics({"items_rendered": len(plan.todo)}, step=0)
        tracker.finish()
    return plan


@contextlib.contextmanager
def claim_output(out: str) -> Iterator[None]:
    """One job at a time writes a local output folder (a second would render the same
    items again and join the first one's MLflow run). The claim is ``LOCK_FILE`` holding
    this host and pid; one left by a job that is gone (killed) is taken over. Object-store
    outputs are not claimed: they have no exclusive create to build one on.
    """
    if is_remote(out):
        yield
        return
    folder = Path(out.removeprefix("file://")).absolute()
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    lock, mine = folder / LOCK_FILE, f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            with open(lock, "x") as handle:
                handle.write(mine)
            break
        except FileExistsError:
            _check_stale_claim(lock, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == mine:
                lock.unlink()
        with contextlib.suppress(OSError):  # a job refused before writing leaves no folder
            for empty in created:
                empty.rmdir()


def _check_stale_claim(lock: Path, out: str) -> None:
    """Remove ``lock`` if its job is gone; raise if it may still be writing."""
    try:
        host, pid = lock.read_text().split()
        alive = host != socket.gethostname() or pid_alive(int(pid))
    except FileNotFoundError:
        return  # released meanwhile: try again
    except ValueError:
        host = pid = "?"
        alive = True
    if alive:
        raise DataError(
            f"{out}: another sample-batch job (host {host}, pid {pid}) is writing there; "
            f"wait for it, choose another --out, or delete {lock} if that job is gone"
        )
    log.info("taking over %s from pid %s, which is gone", lock, pid)
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()


def _warn_truncated(meta: ItemMeta, echo: Callable[[str], None]) -> None:
    scenes = [str(scene) for scene, cut in enumerate(meta.truncated) if cut]
    if scenes:
        tokens = meta.inputs.params["text_tokens"]
        echo(
            f"warning: {meta.inputs.story}: prompt(s) of scene(s) {', '.join(scenes)} "
            f"longer than {tokens} tokens, truncated"
        )


def _open_tracker(plan: SamplePlan, echo: Callable[[str], None]):
    """The job's MLflow run: the one an interrupted run of the same job left unfinished
    (the same output and parameters), else a new one."""
    from infra.tracking import Tracker, flatten

    spec = plan.spec
    tags = {"cluster": spec.cluster, "stage": "sample", "m2d.out": spec.out}
    for label, info in plan.infos.items():
        tags[f"source.{label}.step"] = str(info.step)
        if info.mlflow_run_id:
            tags[f"source.{label}.mlflow_run_id"] = info.mlflow_run_id
    sources = sorted({i.mlflow_run_id for i in plan.infos.values() if i.mlflow_run_id})
    if sources:
        tags["m2d.source_runs"] = ",".join(sources)
    params = flatten(spec.model_dump(mode="json", exclude={"checkpoints", "storage"}))
    params.update({f"checkpoint.{c.label}": c.uri for c in spec.checkpoints})
    tracker = Tracker.find_unfinished(spec.tracking, tags, params)
    if tracker is not None:
        tracker.reopen()
        echo(f"MLflow run (resumed): {tracker.url}")
        return tracker
    name = f"sample-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker.start(spec.tracking, name, tags=tags, params=params)
    echo(f"MLflow run: {tracker.url}")
    return tracker


def _logged_items(tracker, plan: SamplePlan) -> set[Item]:
    """Finished items an interrupted attempt logged already: those whose preview image is
    in the run (an item's image goes in last, after its files).

    Items that share an image key and step (the same story and seed from checkpoints at
    the same step) count as logged only when all their images are there; short of that,
    they are all logged again - a duplicate image at worst, never a missing item.
    """
    images = tracker.logged_images()
    groups: dict[tuple[str, int], list[Item]] = {}
    for item in plan.finished:
        groups.setdefault(_image_key(plan, item), []).append(item)
    return {item for key, items in groups.items() if images[key] >= len(items) for item in items}


def _image_key(plan: SamplePlan, item: Item) -> tuple[str, int]:
    return f"{item.story}_seed{item.seed}", plan.infos[item.checkpoint].step


def _log_item(tracker, plan: SamplePlan, item: Item) -> None:
    """The item's files as artifacts, then its contact sheet as an image at the
    checkpoint's step (the dashboard's slider compares checkpoints): the image, logged
    last, marks the item as logged (``_logged_items``)."""
    spec = plan.spec
    fs, path = filesystem(item_uri(spec.out, item), spec.storage)
    folder = f"{item.checkpoint}/{item.story}/{item.seed}"
    key, step = _image_key(plan, item)
    with tempfile.TemporaryDirectory(prefix="m2d-mlflow-") as tmp:
        local = Path(tmp) / "item"
        fs.get(f"{path}/", str(local), recursive=True)
        tracker.log_artifacts(local, f"samples/{folder}")
        tracker.log_image(local / "contact.png", key=key, step=step)


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``SampleJobSpec`` in, every unfinished item rendered."""
    return job_main(SampleJobSpec, _main, argv)


def _main(spec: SampleJobSpec) -> None:
    spec = spec.model_copy(update={"prompts": prompt_file(spec.prompts)})
    plan = run(spec, echo=lambda line: print(line, flush=True))
    print(f"done: {len(plan.todo)} rendered, {len(plan.finished)} skipped (finished before)")


if __name__ == "__main__":
    sys.exit(main())
