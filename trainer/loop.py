"""The per-worker train loop that ``ray.train.torch.TorchTrainer`` runs.

``train_loop_per_worker(config)`` takes ``config = {"run": RunConfig JSON, "mlflow_run_id":
str | None}``: the run's config says everything it trains on (its ``data`` section) and
from (``init_from``: the weights a fresh run starts from, e.g. SFT from a pretrain
checkpoint; a resumed run loads its own checkpoint instead).

One optimizer step: for each micro-batch, encode the scene videos and captions with the
frozen VAE and T5, noise them for the step's task
(``mask2dit.tasks``), predict v with the Mask²DiT transformer inside DeepSpeed, and
backpropagate the task loss; DeepSpeed steps AdamW and the warm-up schedule at the
accumulation boundary. Metrics go to MLflow from rank 0 every step, and to
``ray.train.report`` (the driver's progress line) with each checkpoint and otherwise at
most every ``REPORT_INTERVAL_S``. Every ``fault_tolerance.checkpoint_every`` steps and
at the end all ranks save a checkpoint (``trainer.checkpointing``) and report it; a
(re)started worker group resumes from the latest reported checkpoint.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from infra.checkpoint_layout import read_weights
from infra.config import RunConfig
from infra.logging import get_logger, progress, set_rank
from infra.run_folder import TrainerState
from infra.storage import is_remote
from infra.tracking import MetricWriter, Tracker, fail_fast, spill
from mask2dit.tasks import TaskMix, prepare_training_batch, task_loss
from trainer.batches import StoryBatches, encode_batch, make_batches
from trainer.checkpointing import (
    check_space,
    checkpoint_bytes,
    damaged_file,
    load_checkpoint,
    resumable,
    resume_view,
    save_checkpoint,
    saved_world_size,
    stored_checkpoint,
    upload_checkpoint,
)
from trainer.components import TrainingParts, load_training_parts
from trainer.engine import build_engine, device_and_dtype
from trainer.validation import Validator

__all__ = ["Worker", "step_seed", "train_loop_per_worker"]

log = get_logger("trainer.loop")

_MASK63 = (1 << 63) - 1

# Ray Train V2 holds one unconsumed report per worker and its controller takes them at its
# polls, every 2 s by default (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; a local Ray's: 0.5 s,
# infra.ray_runtime): reporting every step caps a run at a step per poll. Steps between
# checkpoints are reported at most this often (MLflow gets every step).
REPORT_INTERVAL_S = 5.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: build, resume if a checkpoint exists, train to the end."""
    import ray.train

    context = ray.train.get_context()
    run = RunConfig.model_validate(config["run"])
    rank, world = context.get_world_rank(), context.get_world_size()
    set_rank(rank)
    log.info(
        "rank %d of %d: node_rank %d, local_rank %d of %d on this node",
        rank,
        world,
        context.get_node_rank(),
        context.get_local_rank(),
        context.get_local_world_size(),
    )
    worker = Worker(run, config, rank, world, context.get_local_rank())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:  # Ray's run snapshot has none: the storage may hold some
        retry_s = run.fault_tolerance.storage_retry_s
        checkpoint = stored_checkpoint(context.get_storage(), run.storage, rank, retry_s)
    worker.restore(checkpoint)
    worker.train()


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """Seed of the (step, rank, micro-batch) noise stream: independent of earlier draws.

    The loop passes a micro-batch's slot in the step (``micro * world + rank``) as ``rank``:
    that slot holds the same stories whatever the number of workers (one story per
    micro-batch), so a run resumed on another number of workers with the same global batch
    draws the same noise and tasks for them.
    """
    h = seed & _MASK63
    for key in (step, rank, micro):
        h = (h * 6364136223846793005 + key + 1442695040888963407) & _MASK63
    return h


class Worker:
    """One DeepSpeed rank: components, engine, data, tasks and the loop state."""

    def __init__(
        self, run: RunConfig, config: dict[str, Any], rank: int, world: int, local_rank: int = 0
    ) -> None:
        self.run, self.rank, self.world, self.local_rank = run, rank, world, local_rank
        set_rank(rank)
        self.device, self.dtype = device_and_dtype(run)
        if self.device.type == "cpu":
            torch.set_num_threads(run.workers.cpus_per_worker)
        # The frozen VAE and T5, the latents, the noising and the loss stay in fp32 in every
        # precision; DeepSpeed trains the transformer in self.dtype (docs/planner.md).
        self.parts: TrainingParts = load_training_parts(
            run.model,
            run.storage,
            self.device,
            torch.float32,
            policy=run.recipe.mask_policy,
            seed=run.recipe.seed,
        )
        if run.init_from:
            self._init_weights(run.init_from)
        self.engine = build_engine(run, self.parts.transformer)
        self.batches: StoryBatches = make_batches(run, rank, world)
        recipe = run.recipe
        self.tasks = TaskMix(
            recipe.extension_prob, recipe.seed, per_sample=recipe.task_draw == "per_sample"
        )
        self.validator = (
            Validator(run, self.parts, rank, world) if recipe.validation.every else None
        )
        self.state = TrainerState(world_size=world, mlflow_run_id=config.get("mlflow_run_id"))
        self.tracker: Tracker | None = None
        self.writer: MetricWriter | None = None
        self.logged_through = 0  # the last step already in MLflow (restarts redo a few)
        self.pending: list[tuple[int, int, dict[str, float]]] = []  # (step, ms, metrics)
        self.last_report = time.monotonic()
        self.report_due = False  # the same on every rank: rank 0's clock, all-reduced

    def _init_weights(self, uri: str) -> None:
        """Start from another run's checkpoint (stage chaining: SFT from pretrain): rank 0
        reads its weights file - the model once per run, never the optimizer shards - and
        DeepSpeed's engine start broadcasts rank 0's parameters to every rank (ZeRO-2
        ``_broadcast_model``, ZeRO-3 partitioning alike), so the others read nothing."""
        if self.rank == 0:
            weights = read_weights(uri, self.run.storage)
            self.parts.transformer.transformer.load_state_dict(weights, strict=True)
            log.info("rank 0 initialised the transformer from %s", uri)

    def restore(self, checkpoint: Any) -> None:
        """Resume engine, data position, RNGs and step from a Ray checkpoint (if any),
        written by this number of workers or another: the newest complete one whose files
        are still the bytes recorded at its save (a damaged one is skipped with a warning,
        as an incomplete one is)."""
        if checkpoint is None:
            return
        retry_s = self.run.fault_tolerance.storage_retry_s
        run_id = self.state.mlflow_run_id
        rank, local_rank, below = self.rank, self.local_rank, None
        while True:
            chosen = resumable(checkpoint, self.run.storage, rank, retry_s, below)
            resharded = saved_world_size(chosen, rank) != self.world
            with resume_view(chosen, rank, local_rank, retry_s, resharded) as folder:
                damaged = damaged_file(folder, rank, local_rank, resharded)
                if damaged is None:
                    state, data = load_checkpoint(folder, self.engine, rank, self.world, local_rank)
            if damaged is None:
                break
            below = chosen.path.rstrip("/").rsplit("/", 1)[-1]
            if rank == 0:
                log.warning(
                    "checkpoint %s: %s is not the file recorded at its save (changed since); "
                    "resuming from the one before",
                    chosen.path,
                    damaged,
                )
        if resharded:
            self.batches.load_state_dict(self.batches.merged_state(data, self.rank))
        else:
            self.batches.load_state_dict(data[0])
        self.state = TrainerState(
            step=state.step, world_size=self.world, mlflow_run_id=run_id or state.mlflow_run_id
        )
        log.info("rank %d resumed at step %d", self.rank, self.state.step)

    def train(self) -> None:
        """Run optimizer steps until ``recipe.steps``, reporting and checkpointing."""
        if self.rank == 0 and self.state.mlflow_run_id:
            self.tracker = Tracker(self.run.tracking.uri, self.state.mlflow_run_id)
            if self.state.step:
                # A restart after a crash redoes the steps since the checkpoint, which the
                # lost attempt may have logged already: log each step once.
                self.logged_through = self._last_logged("loss")
            self.writer = MetricWriter(self.tracker, warn=log.warning)
        if self.validator is not None and self.state.step:
            # ... and validate each validation step once (every rank renders: all agree).
            found = [self._last_logged("validation_s") if self.tracker else 0]
            if self.world > 1:
                dist.broadcast_object_list(found, src=0)
            self.validator.validated_through = found[0]
        steps, every = self.run.recipe.steps, self.run.fault_tolerance.checkpoint_every
        if self.rank == 0:  # once per attempt: the console counts restarts
            progress(event="start", step=self.state.step, steps=steps)
        try:
            while self.state.step < steps:
                metrics = self.train_step()
                self.state.step += 1
                done = self.state.step
                if self.validator is not None:
                    self._validate(done, metrics["step_time_s"])
                self.report(metrics, checkpoint=done % every == 0 or done == steps)
        finally:
            self.batches.close()
            self._close_writer()

    def _validate(self, step: int, step_s: float) -> None:
        """Validate after ``step`` if it is a validation step (every rank together)."""
        self.validator.train_s += step_s
        if self.validator.due(step):
            self.validator.validate(self.engine.module, step, self.tracker)

    def _last_logged(self, key: str) -> int:
        """The last step MLflow holds of ``key``; a server that does not answer now: none
        (the restart's first steps may then be logged twice; `m2d runs sync` keeps once)."""
        try:
            with fail_fast(10):
                return self.tracker.last_step(key)
        except Exception as exc:  # MLflow raises MlflowException, requests' errors...
            log.warning("MLflow does not answer (%s): cannot tell what it holds", exc)
            return 0

    def _close_writer(self) -> None:
        """Send what the writer holds (30 s at most); what MLflow still did not take goes
        to the run folder, for `m2d runs sync RUN`."""
        if self.writer is None:
            return
        left = self.writer.close(flush_s=30)
        if left:
            import ray.train

            run_dir = f"{self.run.storage.root.rstrip('/')}/"
            run_dir += ray.train.get_context().get_experiment_name()
            where = spill(left, run_dir, self.run.storage)
            log.warning(
                "MLflow did not take %d metric value(s): kept in %s; `m2d runs sync RUN` "
                "sends them",
                len(left),
                where,
            )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation`` micro-batches; its metrics."""
        start = time.perf_counter()
        lr = float(self.engine.get_lr()[0])
        # One all-reduce for the step's numbers: loss, normal sum/n, extension sum/n,
        # samples, rank 0's seconds since its last report, then each rank's peak memory.
        totals = torch.zeros(7 + self.world, dtype=torch.float64)
        tokens = 0
        for micro in range(self.run.deepspeed.gradient_accumulation):
            loss, extension, batch_tokens = self._micro_step(micro)
            totals[:6] += _loss_totals(loss, extension)
            tokens += batch_tokens
        if self.rank == 0:
            totals[6] = time.monotonic() - self.last_report
        totals[7 + self.rank] = self._peak_memory_mib()
        totals = self._all_reduce(totals)
        self.report_due = totals[6].item() >= REPORT_INTERVAL_S
        elapsed = time.perf_counter() - start
        samples = totals[5].item()
        return {
            "step": self.state.step + 1,  # steps completed, as MLflow's step axis
            "loss": (totals[0] / samples).item(),
            "loss_normal": _ratio(totals[1], totals[2]),
            "loss_extension": _ratio(totals[3], totals[4]),
            "lr": lr,
            "grad_norm": _float(self.engine.get_global_grad_norm()),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens * self.world / elapsed,
            "step_time_s": elapsed,
            **_memory_metrics(totals[7:].tolist()),
        }

    def _micro_step(self, micro: int) -> tuple[Any, torch.Tensor, int]:
        """Forward and backward of one micro-batch: its TaskLoss, task mask, token count."""
        step, recipe = self.state.step, self.run.recipe
        # The micro-batch's slot in the step: in story order (trainer.data.order), with one
        # story per micro-batch, slot k holds the step's k-th story whatever the world size.
        slot = micro * self.world + self.rank
        generator = torch.Generator().manual_seed(step_seed(recipe.seed, step, slot))
        latents, scene_frames, text = encode_batch(
            self.parts, self.batches.next(), generator, self.run.model.text_tokens
        )
        batch_size = latents.shape[0]
        extension = self.tasks.draw(step, batch_size, rank=slot)
        batch = prepare_training_batch(
            latents, scene_frames, extension, self.parts.scheduler, generator
        )
        pred = self.engine(
            batch.noisy_latents.to(self.dtype), text.to(self.dtype), batch.timesteps, scene_frames
        )
        loss = task_loss(pred, batch.target, batch.loss_mask, batch.extension)
        self.engine.backward(loss.loss)
        self.engine.step()
        patch = self.parts.transformer.config.patch_size
        video_tokens = latents.shape[1] * (latents.shape[3] // patch) * (latents.shape[4] // patch)
        return loss, batch.extension.cpu(), batch_size * (video_tokens + text.shape[1])

    def _all_reduce(self, totals: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            on_device = totals.to(self.device)
            dist.all_reduce(on_device)
            return on_device.cpu()
        return totals

    def _peak_memory_mib(self) -> float:
        """This rank's peak memory in MiB: the GPU allocator's peak, or the max RSS."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def report(self, metrics: dict[str, float], checkpoint: bool = False) -> None:
        """``ray.train.report`` on every rank (with a checkpoint when asked); MLflow on rank 0."""
        import ray.train

        metrics = {k: v for k, v in metrics.items() if v is not None}
        if not checkpoint:
            self._track(metrics, flush=self.report_due)
            if self.report_due:
                ray.train.report(metrics)
                self.last_report = time.monotonic()
            return
        # Rank 0's view: the manifest's skipped rows plus the stories its loader skipped.
        counts = self.batches.skip_counts()
        skips = {f"data_skipped_{k}": float(v) for k, v in counts.items()}
        skips["data_skipped_total"] = float(sum(counts.values()))
        self._track({**metrics, **skips}, flush=True)  # in MLflow before the checkpoint
        self._check_space()
        with tempfile.TemporaryDirectory(prefix="m2d-ckpt-") as folder:
            save_checkpoint(
                Path(folder),
                self.engine,
                self.run,
                self.state,
                self.rank,
                self.batches.state_dict(),
            )
            ray.train.report(
                {**metrics, **skips},
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint_{self.state.step:08d}",
                checkpoint_upload_fn=self._upload,
            )
        self.last_report = time.monotonic()

    def _check_space(self) -> None:
        """Every rank: room for its part in the temp folder it stages in; rank 0 also for
        the whole checkpoint under a local storage root (on the same disk: both)."""
        own, whole = checkpoint_bytes(self.engine, self.rank, self.world)
        needs = {tempfile.gettempdir(): own}
        root = self.run.storage.root
        if self.rank == 0 and not is_remote(root):
            target = Path(root.removeprefix("file://"))
            while not target.exists():  # the run folder is made by the first upload
                target = target.parent
            if target.stat().st_dev == Path(tempfile.gettempdir()).stat().st_dev:
                needs = {str(target): own + whole}
            else:
                needs[str(target)] = whole
        check_space(needs, self.state.step)

    def _upload(self, checkpoint: Any, name: str) -> Any:
        import ray.train

        return upload_checkpoint(checkpoint, name, ray.train.get_context().get_storage())

    def _track(self, metrics: dict[str, float], flush: bool) -> None:
        """Queue this step's metrics for MLflow (rank 0); write the queue when ``flush``.

        One write per report interval, not per step: a write to a sqlite store costs tens
        of milliseconds, which rank 0 would add to every step and rank 1 wait out.
        """
        if self.tracker is None:
            return
        if self.state.step > self.logged_through:
            self.pending.append((self.state.step, int(time.time() * 1000), metrics))
        if flush and self.pending:
            self.writer.submit(self.pending)  # never waits on the server
            self.pending = []


def _loss_totals(loss: Any, extension: torch.Tensor) -> torch.Tensor:
    """(loss sum, normal sum, normal n, extension sum, extension n, samples) of a micro-batch."""
    n_ext = int(extension.sum())
    n_normal = extension.numel() - n_ext
    normal = 0.0 if loss.normal is None else loss.normal.item() * n_normal
    ext = 0.0 if loss.extension is None else loss.extension.item() * n_ext
    total = loss.loss.item() * extension.numel()
    return torch.tensor(
        [total, normal, n_normal, ext, n_ext, extension.numel()], dtype=torch.float64
    )


def _memory_metrics(peaks: list[float]) -> dict[str, float]:
    """Peak memory of every rank and the largest of them (MiB)."""
    memory = {f"peak_memory_mib_rank{rank}": peak for rank, peak in enumerate(peaks)}
    return {"peak_memory_mib": max(peaks), **memory}


def _ratio(total: torch.Tensor, count: torch.Tensor) -> float | None:
    return (total / count).item() if count.item() > 0 else None


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)
