"""Samples/s of the `local` training job against a plain single-process PyTorch loop.

The job: ``python -m trainer.job`` on the ``local`` profile - Ray Train, 2 CPU workers
(one intra-op thread each, ``workers.cpus_per_worker: 1``), DeepSpeed ZeRO-2, real mp4
stories from ``datajobs.synth`` decoded by ``trainer.data``, MLflow metrics of every
step (a sqlite store), one checkpoint at the end. Its steady state is read back from
MLflow: each step's ``loss`` carries the time rank 0 took it, right after the step's
all-reduce, so (last - first timestamp) / steps between them is the mean wall time of a
step with everything it costs: data, encoders, transformer, DeepSpeed, gloo, Ray
reports, MLflow writes. The first ``--skip`` steps and the last (the checkpoint) are
left out.

The reference: one process, ``torch.set_num_threads(1)``, the same components
(``trainer.components.load_training_parts`` of the profile's tiny model), the same batch
shapes (``micro_batch_per_gpu`` stories of ``num_scenes`` x ``frames`` at
``height`` x ``width``, in memory), the same step (VAE and T5 encoding, the task's
noise, Mask²DiT forward, v loss, backward, gradient clipping, ``torch.optim.AdamW`` with
the recipe's hyper-parameters). It runs before and after the job; both are printed.
For context it also runs as two copies side by side (the job's two workers share the
machine's cores with each other and with Ray's own processes), and the job's own
``trainer.loop.Worker`` runs in two plain processes over gloo (DeepSpeed, the mp4
reader, the metrics all-reduce; no Ray, MLflow or reports), which splits the job's
overhead into what DeepSpeed and data cost and what Ray and logging add.

At this tiny model a step is mostly fixed costs, so the number this benchmark stands for
is the job's fixed per-step overhead in ms: job step interval - plain step time (and the
per-worker throughput ratio, for context). The throughput target (>= 0.95x a plain
torchrun + DeepSpeed script) is measured at a model whose step is real work:
``benchmarks/train_vs_deepspeed.py``. Wall time on a shared machine moves with other
people's load, so CPU time is measured too: CPU seconds per sample of the plain process
against those of the job's worker processes and of its whole process tree (driver, Ray
daemons, controller, workers; sampled with psutil over the measured steps). The CPU
ratios barely move with foreign load and say what Ray, DeepSpeed, data and logging cost.

    python benchmarks/train_step.py                 # 60 job steps, 10 skipped
    python benchmarks/train_step.py --steps 100 --skip 20 --plain-steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from infra.config import ClusterProfile, RunConfig, resolve_run  # noqa: E402
from infra.job_entry import spec_argv  # noqa: E402
from infra.job_specs import SynthSpec, TrainJobSpec  # noqa: E402
from infra.processes import free_port  # noqa: E402


def local_run(
    root: Path, data: Path, steps: int, stage: str = "pretrain", prefetch: int | None = None
) -> RunConfig:
    """The `local` profile's run for ``stage`` with ``steps`` steps, one final checkpoint."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "recipe": {"steps": steps, "warmup_steps": min(10, steps)},
        "fault_tolerance": {"checkpoint_every": steps, "keep_checkpoints": 1, "max_failures": 0},
        "storage": {"root": str(root / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "bench"},
        "data": {"pretrain": str(data / "pretrain.jsonl"), "sft": str(data / "sft.jsonl")},
    }
    if prefetch is not None:
        overrides["data"]["prefetch"] = prefetch
    return resolve_run(profile, "local", stage, overrides)


def synth_data(out: Path, run: RunConfig) -> None:
    r = run.recipe
    spec = SynthSpec(
        out=str(out),
        stories=8,
        scenes=r.num_scenes,
        frames=2 * r.frames - 1,
        height=r.height,
        width=r.width,
        seed=0,
    )
    synth = [sys.executable, "-m", "datajobs.synth", *spec_argv(spec)]
    subprocess.run(synth, check=True, cwd=ROOT)


# ---------------------------------------------------------------------------- the job


class TreeCPU(threading.Thread):
    """CPU seconds (user + system) of a process and all its descendants, sampled every
    second as (wall time, all processes, Ray Train worker processes). Walking ~30
    processes costs ~1% of a core at this rate (4% at 4 Hz: enough to slow the job)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples = pid, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = workers = 0.0
            for proc in tree:
                try:
                    times, name = proc.cpu_times(), proc.name()
                except psutil.Error:
                    continue
                total += times.user + times.system
                if name.startswith("ray::RayTrainWorker"):
                    workers += times.user + times.system
            self.samples.append((time.time(), total, workers))


def run_job(run: RunConfig, root: Path, sample_cpu: bool = True) -> dict[str, Any]:
    """Run the job in a subprocess, sampling its process tree's CPU time unless told not
    to (a comparison whose peer runs unsampled: the sampler's ~1% of a core is the job's
    loss)."""
    folder = root / "runs" / "bench"
    folder.mkdir(parents=True)
    config = folder / "run_config.json"
    config.write_text(run.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    job = subprocess.Popen(
        [sys.executable, "-m", "trainer.job", *spec_argv(TrainJobSpec(config=str(config)))],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    cpu = TreeCPU(job.pid)
    if sample_cpu:
        cpu.start()
    _, stderr = job.communicate()
    cpu.done.set()
    if job.returncode:
        sys.exit(f"the job failed (exit {job.returncode}):\n{stderr[-3000:]}")
    run_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    return {"run_id": run_id, "wall_s": time.monotonic() - started, "cpu": cpu.samples}


def job_cpu_per_step(samples: list, loss: list) -> tuple[float, float]:
    """CPU seconds per step of the whole job and of its workers, between two CPU samples
    inside the measured steps (steps counted by their loss timestamps)."""
    first, last = loss[0].timestamp / 1000, loss[-1].timestamp / 1000
    inside = [s for s in samples if first <= s[0] <= last]
    (t0, total0, workers0), (t1, total1, workers1) = inside[0], inside[-1]
    steps = sum(1 for m in loss if t0 < m.timestamp / 1000 <= t1)
    return (total1 - total0) / steps, (workers1 - workers0) / steps


def job_steady_state(run: RunConfig, job: dict[str, Any], skip: int) -> dict[str, float]:
    """Mean step interval (timestamps) and mean in-step time (step_time_s) after skip."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run.tracking.uri)
    loss = sorted(client.get_metric_history(job["run_id"], "loss"), key=lambda m: m.step)
    history = client.get_metric_history(job["run_id"], "step_time_s")
    step_time = {m.step: m.value for m in history}
    last = run.recipe.steps  # the checkpoint step: its report includes the save
    kept = [m for m in loss if skip < m.step < last]
    interval = (kept[-1].timestamp - kept[0].timestamp) / 1000 / (len(kept) - 1)
    in_step = [step_time[m.step] for m in kept[1:]]
    per_worker = run.deepspeed.micro_batch_per_gpu * run.deepspeed.gradient_accumulation
    steady = {}
    if job["cpu"]:
        cpu_all, cpu_workers = job_cpu_per_step(job["cpu"], kept)
        samples = per_worker * run.workers.num_workers
        steady = {
            "cpu_per_sample_all": cpu_all / samples,
            "cpu_per_sample_workers": cpu_workers / samples,
        }
    return {
        **steady,
        "steps_measured": len(kept) - 1,
        "interval_s": interval,
        "in_step_s": statistics.mean(in_step),
        "per_worker_samples_s": per_worker / interval,
    }


# ---------------------------------------------------------------------- the plain loop


def plain_loop(run: RunConfig, steps: int, warmup: int) -> dict[str, float]:
    """The same step without Ray, DeepSpeed, files or logging: mean step time, samples/s."""
    from mask2dit.tasks import TaskMix, prepare_training_batch, task_loss
    from trainer.components import load_training_parts
    from trainer.encode import encode_prompts, encode_videos

    torch.set_num_threads(1)
    r, batch = run.recipe, run.deepspeed.micro_batch_per_gpu
    parts = load_training_parts(run.model, None, "cpu", policy=r.mask_policy, seed=r.seed)
    model = parts.transformer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=r.learning_rate, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay
    )
    tasks = TaskMix(r.extension_prob, r.seed)
    g = torch.Generator().manual_seed(0)
    shape = (batch, r.frames, 3, r.height, r.width)
    stories = [
        [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) for _ in range(r.num_scenes)]
        for _ in range(8)
    ]
    captions = [[f"scene {s}: a character walks" for s in range(r.num_scenes)]] * batch

    def step(i: int) -> None:
        generator = torch.Generator().manual_seed(i)
        latents, scene_frames = encode_videos(parts.vae, stories[i % len(stories)], generator)
        text = encode_prompts(parts.tokenizer, parts.text_encoder, captions, run.model.text_tokens)
        extension = tasks.draw(i, latents.shape[0])
        b = prepare_training_batch(latents, scene_frames, extension, parts.scheduler, generator)
        pred = model(b.noisy_latents, text, b.timesteps, scene_frames)
        loss = task_loss(pred, b.target, b.loss_mask, b.extension)
        loss.loss.backward()
        if r.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(params, r.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.loss.item()

    for i in range(warmup):
        step(i)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(i)
    mean = (time.perf_counter() - start) / steps
    cpu = (time.process_time() - cpu_start) / steps
    return {"step_s": mean, "samples_s": batch / mean, "cpu_per_sample": cpu / batch}


def plain_in_subprocess(run: RunConfig, steps: int, warmup: int, copies: int = 1) -> dict:
    """The plain loop in fresh processes (nothing of the job's imports or threads).

    ``copies`` > 1 runs that many side by side (as the job's workers share the cores) and
    returns their mean samples/s.
    """
    call = f"t.plain_loop(run, {steps}, {warmup})"
    return _mean_of(_in_subprocesses(run, [call] * copies))


def workers_without_ray(run: RunConfig, steps: int, warmup: int) -> dict:
    """The job's own ``trainer.loop.Worker`` in ``num_workers`` plain processes over gloo:
    the DeepSpeed engine, the mp4 reader, the task draws and the metrics all-reduce of
    every step, without Ray, MLflow or reports. Rank 0's numbers."""
    port, world = free_port(), run.workers.num_workers
    calls = [
        f"t.worker_loop(run, {rank}, {world}, {port}, {steps}, {warmup})" for rank in range(world)
    ]
    return _in_subprocesses(run, calls)[0]


def workers_in_ray_tasks(run: RunConfig, steps: int, warmup: int) -> dict:
    """:func:`workers_without_ray`, but each rank a task of a local Ray (one CPU each):
    what running inside Ray's worker processes, beside its daemons, costs - without Ray
    Train's controller, reports or MLflow. Rank 0's numbers."""
    import ray

    from infra.ray_runtime import init_ray

    port, world = free_port(), run.workers.num_workers
    init_ray(num_cpus=world * run.workers.cpus_per_worker)
    try:
        loop = ray.remote(num_cpus=run.workers.cpus_per_worker)(_worker_loop_task)
        return ray.get([loop.remote(run, r, world, port, steps, warmup) for r in range(world)])[0]
    finally:
        ray.shutdown()


def _worker_loop_task(*args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    return train_step.worker_loop(*args)


def worker_loop(run: RunConfig, rank: int, world: int, port: int, steps: int, warmup: int) -> dict:
    """``Worker.train_step`` ``steps`` times after ``warmup``: mean step time, samples/s."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK="0")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from trainer.loop import Worker

    worker = Worker(run, {"run": run.model_dump(mode="json")}, rank, world)
    per_worker = run.deepspeed.micro_batch_per_gpu * run.deepspeed.gradient_accumulation
    try:
        for _ in range(warmup):
            worker.train_step()
            worker.state.step += 1
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            worker.train_step()
            worker.state.step += 1
        mean = (time.perf_counter() - start) / steps
        cpu = (time.process_time() - cpu_start) / steps
    finally:
        worker.batches.close()
        dist.destroy_process_group()
    return {"step_s": mean, "samples_s": per_worker / mean, "cpu_per_sample": cpu / per_worker}


def _in_subprocesses(run: RunConfig, calls: list[str]) -> list[dict]:
    """Each call (an expression over ``t`` = this module and ``run``) in its own fresh
    process, all at once; their JSON results."""
    setup = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import train_step as t; "
        "from infra.config import RunConfig; "
        f"run = RunConfig.model_validate_json({run.model_dump_json()!r}); "
    )
    with tempfile.TemporaryFile("w+") as errors:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", setup + f"print(json.dumps({call}))"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
            for call in calls
        ]
        outputs = [proc.communicate()[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            errors.seek(0)
            sys.exit(f"a benchmark process failed:\n{errors.read()[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def _mean_of(results: list[dict]) -> dict:
    return {key: statistics.mean(r[key] for r in results) for key in results[0]}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("pretrain", "sft"), default="pretrain")
    parser.add_argument("--steps", type=int, default=60, help="job steps")
    parser.add_argument("--skip", type=int, default=10, help="job steps left out (start-up)")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="data.prefetch (default: the profile's)"
    )
    parser.add_argument("--plain-steps", type=int, default=40)
    parser.add_argument("--plain-warmup", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="m2d-bench-") as scratch:
        root = Path(scratch)
        run = local_run(root, root / "data", args.steps, args.stage, args.prefetch)
        synth_data(root / "data", run)
        loads = [load_average()]
        before = plain_in_subprocess(run, args.plain_steps, args.plain_warmup)
        loads.append(load_average())
        job = run_job(run, root)
        loads.append(load_average())
        steady = job_steady_state(run, job, args.skip)
        after = plain_in_subprocess(run, args.plain_steps, args.plain_warmup)
        loads.append(load_average())
        pair = plain_in_subprocess(run, args.plain_steps, args.plain_warmup, copies=2)
        loads.append(load_average())
        bare = workers_without_ray(run, args.plain_steps, args.plain_warmup)
        loads.append(load_average())
    _print_table(run, args, before, after, pair, bare, job, steady, loads)


def _print_table(run, args, before, after, pair, bare, job, steady, loads) -> None:
    r, workers = run.recipe, run.workers.num_workers
    plain = (before["samples_s"] + after["samples_s"]) / 2
    print(
        f"stage {run.stage}: {workers} workers x {run.workers.cpus_per_worker} thread, ZeRO-"
        f"{run.deepspeed.zero_stage}, micro-batch {run.deepspeed.micro_batch_per_gpu}, "
        f"prefetch {run.data.prefetch}, "
        f"{r.num_scenes} scenes x {r.frames} frames at {r.height}x{r.width}, "
        f"text {run.model.text_tokens} tokens/scene"
    )
    print(
        f"job: {args.steps} steps in {job['wall_s']:.0f}s wall (start-up included); "
        f"steady state over {steady['steps_measured']} step intervals "
        f"(steps {args.skip + 1}..{args.steps - 1})"
    )
    ratio = steady["per_worker_samples_s"] / plain
    plain_cpu = (before["cpu_per_sample"] + after["cpu_per_sample"]) / 2
    rows = [
        (
            "plain loop step s (before / after job)",
            f"{before['step_s']:.4f} / {after['step_s']:.4f}",
        ),
        ("plain loop samples/s (mean)", f"{plain:.2f}"),
        ("job step interval s (mean)", f"{steady['interval_s']:.4f}"),
        ("job in-step time s (mean step_time_s)", f"{steady['in_step_s']:.4f}"),
        ("job samples/s per worker", f"{steady['per_worker_samples_s']:.2f}"),
        ("job samples/s all workers", f"{steady['per_worker_samples_s'] * workers:.2f}"),
        ("per-worker / plain", f"{ratio:.3f}"),
        (
            "job fixed overhead per step, ms (interval - plain step)",
            f"{(steady['interval_s'] - 1 / plain) * 1000:.0f}",
        ),
        ("2 plain loops side by side: samples/s each", f"{pair['samples_s']:.2f}"),
        (
            "per-worker / side-by-side plain",
            f"{steady['per_worker_samples_s'] / pair['samples_s']:.3f}",
        ),
        ("job's Worker without Ray (2 processes, gloo): step s", f"{bare['step_s']:.4f}"),
        ("Worker without Ray / plain", f"{bare['samples_s'] / plain:.3f}"),
        ("Worker without Ray / side-by-side plain", f"{bare['samples_s'] / pair['samples_s']:.3f}"),
        (
            "job per-worker / Worker without Ray",
            f"{steady['per_worker_samples_s'] / bare['samples_s']:.3f}",
        ),
        ("CPU s per sample: plain (mean of before/after)", f"{plain_cpu:.4f}"),
        ("CPU s per sample: Worker without Ray", f"{bare['cpu_per_sample']:.4f}"),
        ("CPU s per sample: job, worker processes", f"{steady['cpu_per_sample_workers']:.4f}"),
        ("CPU s per sample: job, whole process tree", f"{steady['cpu_per_sample_all']:.4f}"),
        ("CPU ratio plain / job workers", f"{plain_cpu / steady['cpu_per_sample_workers']:.3f}"),
        ("CPU ratio plain / job tree", f"{plain_cpu / steady['cpu_per_sample_all']:.3f}"),
        (
            "load average: start, plain, job, plain, pair, no-Ray",
            " ".join(f"{x:.1f}" for x in loads),
        ),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
