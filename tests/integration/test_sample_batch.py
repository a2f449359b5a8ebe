"""`m2d sample-batch` for real: Ray Data actor pool, DeepSpeed and exported checkpoints,
mp4 outputs, meta.json, MLflow previews, kill-and-resume, both modes.

The training checkpoint is a real DeepSpeed checkpoint written by the trainer's own
``save_checkpoint`` from a one-process gloo engine whose tiny transformer has known,
perturbed weights - the reference the sampled videos are checked against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
import torch
from m2d_cli import local_env
from ray_session import ray_session, wait_gone, wait_job

from infra.config import ModelConfig, StageRecipe, StorageConfig
from infra.job_entry import spec_argv
from infra.job_specs import CheckpointSpec, ExportSpec, SampleJobSpec
from infra.processes import free_port
from infra.video import write_video
from mask2dit.components import tiny_parts
from mask2dit.sampling.params import SamplingParams
from sampler.batch import LATENTS, noise_seed, read_latents
from sampler.job import LOCK_FILE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
SEED_OFFSET = 0  # recipe.seed of the local profile: the tiny VAE/T5 draw from it
CHECKPOINT_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, yaml
    from pathlib import Path
    from infra.config import ClusterProfile, resolve_run
    from infra.run_folder import TrainerState
    from trainer.checkpointing import save_checkpoint
    from trainer.components import load_training_parts
    from trainer.engine import build_engine

    out, port = Path(sys.argv[1]), sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo")
    profile = ClusterProfile.model_validate(yaml.safe_load(open("clusters/local.yaml")))
    run = resolve_run(profile, "local", "sft", {
        "workers": {"num_workers": 1},
        "deepspeed": {"micro_batch_per_gpu": 1, "gradient_accumulation": 1},
        "recipe": {"global_batch": 1},
        "storage": {"root": str(out)},
    })
    parts = load_training_parts(run.model, seed=run.recipe.seed)
    generator = torch.Generator().manual_seed(123)  # weights no init would give
    with torch.no_grad():
        for p in parts.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    torch.save(parts.transformer.transformer.state_dict(), out / "weights.pt")
    engine = build_engine(run, parts.transformer)
    state = TrainerState(step=7, world_size=1, mlflow_run_id="train-run-id")
    save_checkpoint(out / "checkpoint_00000007", engine, run, state, 0, {})
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A DeepSpeed checkpoint (step 7) plus the exact weights it holds (weights.pt)."""
    out = tmp_path_factory.mktemp("trained")
    subprocess.run(
        [sys.executable, "-c", CHECKPOINT_SCRIPT, str(out), str(free_port())],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """The same checkpoint through `python -m trainer.export` (a stock diffusers folder)."""
    out = tmp_path_factory.mktemp("exported") / "pretty-export"
    checkpoint = str(trained / "checkpoint_00000007")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.export",
            *spec_argv(ExportSpec(checkpoint=checkpoint, out=str(out))),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return out


def write_prompts(path: Path, stories: list[dict]) -> Path:
    path.write_text("".join(json.dumps(story) + "\n" for story in stories))
    return path


def spec_for(tmp: Path, checkpoints: list[CheckpointSpec], prompts: Path, **changes) -> Path:
    spec = SampleJobSpec(
        cluster="local",
        checkpoints=checkpoints,
        prompts=str(prompts),
        out=str(tmp / "out"),
        steps=STEPS,
        model=ModelConfig(source="tiny", text_tokens=16),
        recipe=StageRecipe(frames=9, height=32, width=32, seed=SEED_OFFSET),
        storage=StorageConfig(root=str(tmp / "store")),
        **changes,
    )
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    path.write_text(spec.model_dump_json())
    return path


def start_job(spec: Path) -> subprocess.Popen:
    env = local_env()
    return subprocess.Popen(
        [sys.executable, "-m", "sampler.job", "--spec", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_job(spec: Path) -> subprocess.CompletedProcess:
    process = start_job(spec)
    output, _ = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def encoded(frames: np.ndarray, tmp: Path) -> np.ndarray:
    """``frames`` after the same mp4 round trip the job's outputs took (the codec is lossy
    but deterministic, so equal frames come back equal)."""
    path = tmp / f"reference-{time.monotonic_ns()}.mp4"
    write_video(str(path), torch.from_numpy(frames), fps=8)
    return decode(path).astype(float)


def reference_pipeline(trained: Path):
    """A pipeline over the known weights, built in-process: the independent reference."""
    from mask2dit.sampling.pipeline import MultiScenePipeline

    parts = tiny_parts(SEED_OFFSET)
    parts.transformer.load_state_dict(torch.load(trained / "weights.pt"))
    params = SamplingParams(
        num_inference_steps=STEPS, text_tokens=16, num_frames=9, height=32, width=32, policy="v2"
    )
    return MultiScenePipeline.from_parts(parts), params


def reference_output(trained: Path, prompts: list[str], seed: int, state=None):
    """The reference pipeline's story (``state``: other weights, for the negative check)."""
    pipe, params = reference_pipeline(trained)
    if state is not None:
        pipe.transformer.transformer.load_state_dict(state)
    return pipe.generate(prompts, params, generator=torch.Generator().manual_seed(seed))


# The job's latents must equal the reference's up to float rounding. Measured: weights
# perturbed by one float32 rounding step (5 draws) move these latents by at most 5e-6 -
# the scale at which other CPU kernels or thread counts round differently. Another seed
# moves them by ~0.9 on average, the checkpoint's weights left out by up to 1.3.
LATENT_TOLERANCE = 1e-3
# The mp4s are checked through the same encoder, loosely: a one-grey-level change of one
# pixel moved the decoded scenes by up to 2.8 grey levels on average (30 draws), which is
# how one CPU's rounding showed up as a mean difference of 2.03; another seed moves them
# by 21-29.
MP4_TOLERANCE = 4.0


def check_latents(folder: Path, expected) -> float:
    """The item's latents against the reference's; returns the largest difference."""
    latents, scene_frames = read_latents(str(folder / LATENTS))
    assert scene_frames == expected.scene_frames
    return (latents - expected.latents).abs().max().item()


STORIES = [
    {"id": "two", "prompts": ["Actor1 (a red ball) rolls", "Actor1 (a red ball) stops"]},
    {"id": "three", "prompts": ["a blue sky", "a green field", "a grey road at night"]},
]


def test_fixed_mode_killed_and_resumed_with_mlflow(trained, exported, tmp_path, mlflow_server):
    prompts = write_prompts(tmp_path / "stories.jsonl", STORIES)
    checkpoints = [
        CheckpointSpec(uri=str(trained / "checkpoint_00000007"), label="ds-7"),
        CheckpointSpec(uri=str(exported), label="export"),
    ]
    tracking = {"uri": mlflow_server, "experiment": f"samples-{os.getpid()}"}
    # Two items per model call (a story's two seeds): each still equals its render alone.
    spec = spec_for(tmp_path, checkpoints, prompts, seeds=[0, 1], tracking=tracking, batch_size=2)
    out = tmp_path / "out"

    process = start_job(spec)
    deadline = time.monotonic() + 400
    # A second job on the same output is refused while the first one runs.
    while not (out / LOCK_FILE).exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the job never claimed its output"
        time.sleep(0.2)
    second = run_job(spec)
    assert second.returncode == 2, second.stdout[-3000:]
    assert f"pid {process.pid}) is writing there" in second.stdout
    # Kill the job (its whole process group) as soon as a first item is finished.
    while not list(out.glob("*/*/*/meta.json")) and process.poll() is None:
        assert time.monotonic() < deadline, "no item finished in time"
        time.sleep(0.5)
    session = ray_session(psutil.Process(process.pid))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Ray's own processes run in sessions of their own; orphaned, they notice the dead
    # driver and exit, possibly finishing the item in hand first: once they are gone,
    # nothing writes there any more.
    wait_gone(session)
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/*/*/meta.json")}
    assert 1 <= len(first) < 8

    done = run_job(spec)  # takes over the killed job's claim
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{8 - len(first)} item(s) to render, {len(first)} already finished" in done.stdout
    assert not (out / LOCK_FILE).exists()
    for path, (mtime, content) in first.items():  # finished items were not redone
        assert (path.stat().st_mtime_ns, path.read_bytes()) == (mtime, content)

    expected = {"two": 2, "three": 3}
    for label in ("ds-7", "export"):
        for story, scenes in expected.items():
            for seed in (0, 1):
                folder = out / label / story / str(seed)
                meta = json.loads((folder / "meta.json").read_text())
                assert meta["inputs"]["seed"] == seed and meta["inputs"]["story"] == story
                assert meta["inputs"]["params"]["num_inference_steps"] == STEPS
                assert meta["scene_frames"] == [9] * scenes
                for index in range(scenes):
                    assert decode(folder / f"scene_{index:02d}.mp4").shape == (9, 32, 32, 3)
                assert decode(folder / "story.mp4").shape == (9 * scenes, 32, 32, 3)
    assert json.loads((out / "ds-7/two/0/meta.json").read_text())["checkpoint"]["step"] == 7

    # The samples are the reference pipeline's, one story per call: the latents up to
    # rounding, the mp4s through the same encoder.
    # Item (three, seed 1) starts from the noise of its story and seed (--noise story).
    expected = reference_output(trained, STORIES[1]["prompts"], noise_seed("three", 1, "story"))
    reference = [encoded(frames.numpy(), tmp_path) for frames in expected.frames]
    for label in ("ds-7", "export"):
        folder = out / label / "three" / "1"
        assert check_latents(folder, expected) < LATENT_TOLERANCE, label
        for index, frames in enumerate(reference):
            got = decode(folder / f"scene_{index:02d}.mp4").astype(float)
            assert np.abs(got - frames).mean() < MP4_TOLERANCE, (label, index)
    # Not blind: another seed, or the weights without the checkpoint's, fail both checks.
    assert check_latents(out / "ds-7" / "three" / "0", expected) > 100 * LATENT_TOLERANCE
    untrained = reference_output(
        trained,
        STORIES[1]["prompts"],
        noise_seed("three", 1, "story"),
        tiny_parts(SEED_OFFSET).transformer.state_dict(),
    )
    assert (untrained.latents - expected.latents).abs().max() > 100 * LATENT_TOLERANCE
    other = decode(out / "ds-7" / "three" / "0" / "scene_00.mp4").astype(float)
    assert np.abs(other - reference[0]).mean() > 10.0

    check_mlflow(mlflow_server, tracking["experiment"])


def check_mlflow(uri: str, experiment: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    # The killed job's run was resumed by the rerun, not left RUNNING beside a new one.
    assert [r.info.status for r in found] == ["FINISHED"]
    run = found[0]
    assert run.data.tags["source.ds-7.mlflow_run_id"] == "train-run-id"
    assert run.data.params["steps"] == str(STEPS)
    artifacts = _artifact_paths(client, run.info.run_id)
    for label in ("ds-7", "export"):
        for name in ("preview.gif", "contact.png", "story.mp4", "scene_00.mp4", "meta.json"):
            assert f"samples/{label}/two/1/{name}" in artifacts, (label, name)
    images = [p for p in artifacts if p.startswith("images/") and p.endswith(".png")]
    logged = sorted(p.split("+timestamp+")[0] for p in images)  # images/KEY+step+STEP
    # Each item's contact sheet once, at its checkpoint's step: 2 stories x 2 seeds for
    # ds-7 (step 7) and for the export (step 0), including the items that the killed
    # attempt had logged before it died.
    expected = [
        f"images/{story}_seed{seed}+step+{step}"
        for story in ("three", "two")
        for seed in (0, 1)
        for step in (0, 7)
    ]
    assert logged == expected


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def sample_batch(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`m2d sample-batch --cluster local ARGS` as a user types it."""
    env = local_env(M2D_HOME=str(tmp_path / "home"))
    command = [str(Path(sys.executable).parent / "m2d"), "sample-batch", "--cluster", "local"]
    return subprocess.run(
        [*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_extend_mode_on_a_ray_cluster_matches_the_reference(trained, tmp_path, ray_head):
    """Through the Jobs API: context-video and chained stories equal the in-process
    pipeline's; a rerun with other settings is refused before anything starts."""
    from ray.job_submission import JobSubmissionClient

    generator = torch.Generator().manual_seed(5)
    context = torch.randint(0, 256, (12, 32, 32, 3), generator=generator, dtype=torch.uint8)
    write_video(str(tmp_path / "context.mp4"), context, fps=8)
    stories = [
        {"id": "ctx", "prompts": ["a", "b", "c"], "context_videos": ["context.mp4"]},
        {"id": "chain", "prompts": ["a cat", "the cat sleeps"]},
    ]
    prompts = write_prompts(tmp_path / "stories.jsonl", stories)
    args = ["--checkpoint", str(trained / "checkpoint_00000007"), "--prompts", str(prompts)]
    args += ["--out", str(tmp_path / "o"), "--mode", "extend", "--steps", str(STEPS)]
    args += ["--noise", "shared"]  # every story from seed 0's noise, as the reference below
    submitted = sample_batch(tmp_path, *args, "--no-tracking", "--set", f"ray.address={ray_head}")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("submitted sample-batch job ")[1].split()[0]
    status = wait_job(ray_head, job_id, timeout=400)
    assert status == "SUCCEEDED", JobSubmissionClient(ray_head).get_job_logs(job_id)[-3000:]

    (folder,) = (tmp_path / "o").glob("*-checkpoint_00000007")
    meta = json.loads((folder / "ctx/0/meta.json").read_text())
    assert meta["context_scenes"] == 1 and meta["scene_frames"] == [9, 9, 9]
    assert meta["checkpoint"]["kind"] == "training" and meta["checkpoint"]["step"] == 7
    chain = json.loads((folder / "chain/0/meta.json").read_text())
    assert chain["scene_frames"] == [9, 9] and chain["inputs"]["mode"] == "extend"

    # Every scene is the in-process pipeline's extension of the same context frames.
    from infra.video import read_frames

    pipe, params = reference_pipeline(trained)
    frames = read_frames(str(tmp_path / "context.mp4"), list(range(9)))
    expected = pipe.extend(
        ["a", "b", "c"], [frames], params, generator=torch.Generator().manual_seed(0)
    )
    assert check_latents(folder / "ctx" / "0", expected) < LATENT_TOLERANCE
    for index, scene in enumerate(expected.frames):
        got = decode(folder / f"ctx/0/scene_{index:02d}.mp4").astype(float)
        assert np.abs(got - encoded(scene.numpy(), tmp_path)).mean() < MP4_TOLERANCE, index

    refused = sample_batch(tmp_path, *args, "--no-tracking", "--guidance", "3")
    assert refused.returncode == 2
    assert "guidance_scale" in refused.stderr and "--overwrite" in refused.stderr


def test_sample_batch_then_eval_scores_what_it_rendered(trained, tmp_path):
    """`--eval` chains `m2d eval` on the same output: every rendered item gets its scores,
    the checkpoint its metrics.json; scoring options without --eval are refused."""
    from tiny_models import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    scenes = ["Actor1 (a fox) runs", "Actor1 (a fox) sleeps"]
    stories = [{"id": f"s{i}", "prompts": scenes} for i in range(2)]
    prompts = write_prompts(tmp_path / "stories.jsonl", stories)
    args = ["--checkpoint", str(trained / "checkpoint_00000007"), "--prompts", str(prompts)]
    args += ["--out", str(tmp_path / "o"), "--steps", str(STEPS), "--no-tracking"]
    scoring = ["--encoder", "clip", "--encoder-path", str(clip)]
    refused = sample_batch(tmp_path, *args, *scoring)
    assert refused.returncode == 2 and "add --eval" in refused.stderr
    done = sample_batch(tmp_path, *args, "--eval", *scoring, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (folder,) = (tmp_path / "o").glob("*-checkpoint_00000007")
    assert sorted(p.parent.parent.name for p in folder.glob("*/0/scores.json")) == ["s0", "s1"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["items"] == 2 and metrics["checkpoint"]["step"] == 7
    assert "2 item(s) to score, 0 already scored" in done.stdout
