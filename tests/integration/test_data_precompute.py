"""The latent precompute job for real: Ray Data actors, local disk and a moto S3 server,
bad files, a resumed run, and a short training run that reads the latents it wrote.

Small on purpose (synthetic stories of 17 frames at 32x32, the `local` profile's 9-frame
recipe and tiny model): each job costs mostly Ray start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_runs import run_entry, run_job

from infra.config import ClusterProfile, StorageConfig, resolve_run
from infra.job_entry import spec_argv
from infra.job_specs import PrecomputeSpec, SynthSpec
from trainer.data.latents import ShardReader, read_index

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BAD_REASONS = {"missing": 1, "zero_byte": 1, "too_short": 1, "empty_caption": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Synthetic stories plus bad files, and manifests that use them.

    Pre-training: 16 good clips and a missing, a zero-byte, a truncated and an undecodable
    file, a clip too short for 9 frames and a row with an empty caption (which the manifest
    reader drops: 21 entries to encode, 5 shards of 5). SFT: 4 groups of
    4 shots; group 0 loses shot 1 (zero bytes), so no 3 consecutive shots remain; group 1
    loses its last shot (truncated) and keeps one window of shots 0-2.
    """
    out = tmp_path_factory.mktemp("corpus")
    spec = SynthSpec(out=str(out), stories=4, scenes=3, frames=17, height=32, width=32, seed=0)
    subprocess.run([sys.executable, "-m", "datajobs.synth", *spec_argv(spec)], check=True, cwd=ROOT)
    good = (out / "videos/story000/shot0.mp4").read_bytes()
    (out / "bad").mkdir()
    (out / "bad/empty.mp4").write_bytes(b"")
    (out / "bad/cut.mp4").write_bytes(good[: len(good) // 3])
    (out / "bad/noise.mp4").write_bytes(os.urandom(4096))
    rows = [json.loads(line) for line in (out / "pretrain.jsonl").read_text().splitlines()]
    bad = [
        {**rows[0], "path": "bad/missing.mp4"},
        {**rows[0], "path": "bad/empty.mp4"},
        {**rows[0], "path": "bad/cut.mp4"},
        {**rows[0], "path": "bad/noise.mp4"},
        {**rows[0], "num_frames": 8},
        {**rows[0], "caption": " "},
    ]
    write_jsonl(out / "pretrain_bad.jsonl", rows + bad)
    groups = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    groups[0]["shots"][1]["path"] = "bad/empty.mp4"
    groups[1]["shots"][3]["path"] = "bad/cut.mp4"
    write_jsonl(out / "sft_bad.jsonl", groups)
    return out


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def precompute(
    stage: str,
    manifest: str,
    out: str,
    *,
    endpoint_url: str | None = None,
    tracking: str | None = None,
    **options,
) -> subprocess.CompletedProcess:
    """The job on the `local` profile's recipe (tiny model, 16 tokens, 9 frames of 32x32),
    as `m2d data precompute` starts it."""
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {"storage": {"root": out, "endpoint_url": endpoint_url}}
    if tracking:
        overrides["tracking"] = {"uri": tracking, "experiment": "pc-it"}
    run = resolve_run(profile, "local", stage, overrides)
    spec = PrecomputeSpec(
        run=run, manifest=manifest, out=out, tracking=run.tracking if tracking else None, **options
    )
    return run_entry("datajobs.precompute", spec)


def assert_bad_counts(skips: dict[str, int]) -> None:
    skips = dict(skips)
    for reason, count in BAD_REASONS.items():
        assert skips.pop(reason) == count, reason
    # A cut-off mp4 or random bytes read as truncated or undecodable, depending on where
    # the cut falls; either way both are skipped.
    assert skips.pop("truncated", 0) + skips.pop("undecodable", 0) == 2
    assert not skips


@pytest.fixture(scope="module")
def local_pretrain(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pre") / "latents"
    args = {"stage": "pretrain", "manifest": str(corpus / "pretrain_bad.jsonl"), "out": str(out)}
    args.update(shard_size=5, num_actors=1)
    done = precompute(**args)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "args": args, "stdout": done.stdout}


def test_local_pretrain_skips_bad_files_and_counts_them(local_pretrain):
    summary = local_pretrain["stdout"].strip().splitlines()[-1]
    assert summary.startswith("precomputed 16 of 21 pretrain entries in 5 shards (5 encoded now)")
    index = read_index(str(local_pretrain["out"]))
    assert_bad_counts(index.skips.as_dict())
    assert len(index.entries) == 16 and all("bad/" not in e.path for e in index.entries)
    for reason in BAD_REASONS:
        assert f"{reason}=" in summary


def test_rerun_after_a_kill_encodes_only_the_unfinished_shards(local_pretrain):
    out = local_pretrain["out"]
    before = read_index(str(out))
    shards = out / "shards"
    untouched = [p for p in shards.iterdir() if p.name[:6] in ("000000", "000003", "000004")]
    kept = {p.name: p.stat().st_mtime_ns for p in untouched}
    # As a kill leaves it: shard 1's tensors without its sidecar, shard 2 not started, no index.
    (shards / "000001.json").unlink()
    for path in shards.glob("000002.*"):
        path.unlink()
    (out / "index.parquet").unlink()
    done = precompute(**local_pretrain["args"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "3 of 5 shards finished" in done.stdout
    assert "(2 encoded now)" in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if p.name in kept} == kept
    assert read_index(str(out)) == before


def test_sft_from_and_to_s3_with_counts_in_mlflow(corpus, s3_endpoint, s3_bucket, tmp_path):
    import s3fs
    from mlflow.tracking import MlflowClient

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    for name in ("sft_bad.jsonl", "videos", "bad"):
        fs.put(str(corpus / name), f"{s3_bucket}/corpus/{name}", recursive=True)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = f"s3://{s3_bucket}/latents/sft"
    manifest = f"s3://{s3_bucket}/corpus/sft_bad.jsonl"
    done = precompute(
        "sft",
        manifest,
        out,
        endpoint_url=s3_endpoint,
        tracking=tracking,
        shard_size=4,
        num_actors=2,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    storage = StorageConfig(root=out, endpoint_url=s3_endpoint)
    index = read_index(out, storage)
    tensors = ShardReader(out, storage).read(index.entries[0])  # ranged reads from S3
    assert tensors["mean"].shape == tensors["logvar"].shape and tensors["mean"].ndim == 4
    assert tensors["text"].shape[0] == 16 and torch.isfinite(tensors["mean"]).all()
    groups = {g.id: [shot.path.rsplit("/", 2)[-2:] for shot in g.shots] for g in index.groups()}
    # Group 0 lost shot 1 and with it every window; group 1 keeps shots 0-2.
    assert sorted(groups) == ["story001", "story002", "story003"]
    assert groups["story001"] == [["story001", f"shot{i}.mp4"] for i in range(3)]
    assert index.skips.as_dict() == {"group_too_short": 1, "truncated": 1, "zero_byte": 1} or (
        index.skips.as_dict() == {"group_too_short": 1, "undecodable": 1, "zero_byte": 1}
    )
    client = MlflowClient(tracking_uri=tracking)
    run_id = done.stdout.strip().rsplit("mlflow run ", 1)[1]
    metrics = client.get_run(run_id).data.metrics
    # Artifacts of a sqlite store go beside it, not into ./mlruns of the job's folder.
    assert str(tmp_path) in client.get_experiment_by_name("pc-it").artifact_location
    assert metrics["entries"] == 11 and metrics["skipped_zero_byte"] == 1
    assert metrics["skipped_group_too_short"] == 1 and metrics["skipped"] == 3
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/latents/sft")) == [
        "index.parquet",
        "precompute.json",
        "shards",
    ]


def test_training_reads_precomputed_latents_without_the_videos(local_pretrain, corpus, tmp_path):
    """Two steps of the `local` profile (one worker) from the latents alone: no manifest,
    videos moved away."""
    from mlflow.tracking import MlflowClient

    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = resolve_run(
        profile,
        "local",
        "pretrain",
        {
            "recipe": {"steps": 2, "warmup_steps": 1, "global_batch": 1},
            "workers": {"num_workers": 1},  # one worker: the data path, not DDP, is tested
            "fault_tolerance": {"checkpoint_every": 2, "max_failures": 0},
            "storage": {"root": str(tmp_path / "runs")},
            "tracking": {"uri": tracking, "experiment": "pc-train"},
            "data": {"pretrain": None, "sft": None, "pretrain_latents": str(local_pretrain["out"])},
        },
    )
    config = tmp_path / "runs" / "from-latents" / "run_config.json"
    config.parent.mkdir(parents=True)
    config.write_text(run.model_dump_json())
    shutil.move(corpus / "videos", corpus / "videos.away")
    try:
        done = run_job(str(config))
    finally:
        shutil.move(corpus / "videos.away", corpus / "videos")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("run from-latents finished: step 2/2"), summary
    state = json.loads((config.parent / "checkpoint_00000002" / "trainer_state.json").read_text())
    metrics = MlflowClient(tracking_uri=tracking).get_run(state["mlflow_run_id"]).data.metrics
    assert 0 < metrics["loss"] < 10
    # The precompute's skip counts travel with the latents into the run's metrics.
    assert metrics["data_skipped_missing"] == 1 and metrics["data_skipped_zero_byte"] == 1
