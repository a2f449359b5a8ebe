"""Precomputed latents: batches equal the on-the-fly path's; shards, index and resume logic.

The precompute driver runs in-process here (its shard runner swapped for a loop over
``encode_shard``); tests/integration/test_precompute.py runs the real Ray Data job.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

from datajobs import precompute, shard_encoder
from datajobs.synth import synthesize
from infra.config import ClusterProfile, ModelConfig, resolve_run
from infra.errors import ConfigError, DataError
from infra.job_specs import PrecomputeSpec
from trainer.batches import EncodedBatch, ManifestStories, PrecomputedStories, encode_batch
from trainer.components import load_training_parts
from trainer.data import latents
from trainer.data.latents import Entry, Settings
from trainer.data.loader import SPANS, decode_clip
from trainer.data.manifest import SkipCounts, read_clips, read_shot_groups
from trainer.data.order import PretrainOrder, SFTOrder

ROOT = Path(__file__).resolve().parents[2]
FRAMES, SIZE, TOKENS, SCENES = 9, 32, 16, 3


@pytest.fixture(scope="module")
def parts():
    # One thread: on a loaded 2-core machine two threads make the tiny VAE ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_training_parts(ModelConfig(source="tiny", text_tokens=TOKENS))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), stories=4, scenes=SCENES, frames=17, height=32, width=32, seed=0)
    return out


def settings_for(manifest: Path, stage: str, shard_size: int = 4) -> Settings:
    return Settings(
        manifest=str(manifest),
        manifest_sha1=precompute.manifest_sha1(str(manifest), None),
        stage=stage,
        model_source="tiny",
        text_tokens=TOKENS,
        frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_scenes=SCENES,
        seed=7,
        dtype="fp32",
        shard_size=shard_size,
    )


def in_process(parts, calls: list | None = None):
    """A shard runner without Ray: encode each pending shard here, recording the names."""

    def runner(pending, settings, out, storage, pool):
        for name, items in pending:
            if calls is not None:
                calls.append(name)
            shard_encoder.encode_shard(parts, settings, out, name, items, storage)

    return runner


def run_precompute(parts, settings: Settings, out: Path, calls: list | None = None) -> dict:
    pool = precompute.Pool(1, "cpu", 0)
    return precompute.precompute(settings, str(out), None, pool, in_process(parts, calls))


@pytest.fixture(scope="module")
def pretrain_latents(parts, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "latents"
    run_precompute(parts, settings_for(dataset / "pretrain.jsonl", "pretrain"), out)
    return out


@pytest.fixture(scope="module")
def sft_latents(parts, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "latents"
    run_precompute(parts, settings_for(dataset / "sft.jsonl", "sft"), out)
    return out


def local_run(stage: str, micro_batch: int = 2, **data):
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "recipe": {"global_batch": 2 * micro_batch, "seed": 3},
        "deepspeed": {"micro_batch_per_gpu": micro_batch},
        "storage": {"root": "/tmp/unused"},
        "data": data,
    }
    return resolve_run(profile, "local", stage, overrides)


def reference_sampler(stage: str, manifest: Path, seed: int):
    """The decode path's sampler over the manifest, built independently of the index."""
    if stage == "pretrain":
        clips, _ = read_clips(str(manifest))
        return PretrainOrder(clips, SCENES, seed)
    groups, _ = read_shot_groups(str(manifest), SCENES)
    return SFTOrder(groups, SCENES, seed)


def reference_inputs(parts, index, stories, generator_seed: int):
    """The on-the-fly path for the same stories: decode each clip at the window the
    precompute drew for it (seeded by its key), then encode with the VAE and T5."""
    keys = {e.clip(): e.key for e in index.entries}
    span = SPANS[index.settings.stage]
    videos = []
    for scene in range(SCENES):
        clips = []
        for story in stories:
            rng = random.Random(f"frames:{index.settings.seed}:{keys[story.clips[scene]]}")
            clips.append(decode_clip(story.clips[scene], FRAMES, SIZE, SIZE, span, rng))
        videos.append(torch.stack(clips))
    captions = [[clip.caption for clip in story.clips] for story in stories]
    generator = torch.Generator().manual_seed(generator_seed)
    return encode_batch(parts, (videos, captions), generator, TOKENS)


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_precomputed_batches_equal_the_on_the_fly_batches(
    stage, parts, dataset, pretrain_latents, sft_latents
):
    uri = str(pretrain_latents if stage == "pretrain" else sft_latents)
    manifest = dataset / f"{stage}.jsonl"
    run = local_run(stage, **{stage: str(manifest), f"{stage}_latents": uri})
    pre = PrecomputedStories(run, uri, rank=0, world_size=1)
    decoded = ManifestStories(run, str(manifest), rank=0, world_size=1)
    sampler = reference_sampler(stage, manifest, run.recipe.seed)
    for step in range(3):
        batch = pre.next()
        assert isinstance(batch, EncodedBatch)
        stories = [next(sampler) for _ in range(2)]
        # Same story order, same seed: the same stories, in the same order.
        assert (
            batch.captions == decoded.next()[1] == [[c.caption for c in s.clips] for s in stories]
        )
        got = encode_batch(parts, batch, torch.Generator().manual_seed(step), TOKENS)
        want = reference_inputs(parts, pre.index, stories, generator_seed=step)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert got[1] == want[1] == [(FRAMES - 1) // 4 + 1] * SCENES
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


def test_frame_windows_follow_the_recipe(pretrain_latents, sft_latents):
    # 17-frame clips: pre-training uses frames [ceil(0.85), floor(16.15)) = [1, 16), where 9
    # frames fit at stride 1 only (stride 2 needs 17), starting at 1..7; SFT shots use
    # all 17 frames, where stride 2 fits exactly (start 0).
    for entry in latents.read_index(str(pretrain_latents)).entries:
        assert entry.frame_stride == 1 and 1 <= entry.frame_start <= 7
    for entry in latents.read_index(str(sft_latents)).entries:
        assert (entry.frame_stride, entry.frame_start) == (2, 0)


def test_stored_posterior_is_the_vae_posterior(parts, pretrain_latents):
    index = latents.read_index(str(pretrain_latents))
    entry = index.entries[0]
    stored = latents.ShardReader(index.uri).read(entry)
    rng = random.Random(f"frames:7:{entry.key}")
    video = decode_clip(entry.clip(), FRAMES, SIZE, SIZE, SPANS["pretrain"], rng)
    pixels = video[None].transpose(1, 2).float() / 127.5 - 1.0
    dist = parts.vae.encode(pixels).latent_dist
    torch.testing.assert_close(stored["mean"], dist.mean[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored["logvar"], dist.logvar[0], rtol=1e-5, atol=1e-6)
    assert stored["text"].shape == (TOKENS, parts.text_encoder.config.d_model)


def test_resume_and_ranks_follow_the_story_order(dataset, pretrain_latents):
    uri = str(pretrain_latents)
    run = local_run("pretrain", micro_batch=1, pretrain_latents=uri)
    straight = PrecomputedStories(run, uri, 0, 1)
    expected = [straight.next().captions for _ in range(4)]
    first = PrecomputedStories(run, uri, 0, 1)
    first.next(), first.next()
    resumed = PrecomputedStories(run, uri, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.next().captions for _ in range(2)] == expected[2:]
    rank0, rank1 = PrecomputedStories(run, uri, 0, 2), PrecomputedStories(run, uri, 1, 2)
    clips0 = {c for _ in range(2) for c in rank0.next().captions[0]}
    clips1 = {c for _ in range(2) for c in rank1.next().captions[0]}
    assert len(clips0) == len(clips1) == 2 * SCENES and not clips0 & clips1


def test_rerun_skips_finished_shards_and_redoes_missing_ones(parts, dataset, tmp_path):
    out = tmp_path / "latents"
    settings = settings_for(dataset / "pretrain.jsonl", "pretrain", shard_size=5)
    calls: list[str] = []
    first = run_precompute(parts, settings, out, calls)
    assert calls == ["000000", "000001", "000002", "000003"]  # 16 clips, 5 per shard
    assert first["entries"] == first["items"] == 16
    shards = out / "shards"
    index_bytes = (out / "index.parquet").read_bytes()
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.iterdir()}
    calls.clear()
    run_precompute(parts, settings, out, calls)
    assert calls == []  # everything finished: nothing encoded

    # A job killed after writing shard 2's tensors but before its sidecar, and before the
    # index: only that shard is encoded again.
    (shards / "000002.json").unlink()
    (out / "index.parquet").unlink()
    second = run_precompute(parts, settings, out, calls)
    assert calls == ["000002"] and second["encoded_shards"] == 1
    for name, (mtime, data) in kept.items():
        path = shards / name
        if not name.startswith("000002"):
            assert path.stat().st_mtime_ns == mtime
        assert path.read_bytes() == data
    assert not [p for p in shards.iterdir() if ".tmp-" in p.name]
    assert (out / "index.parquet").read_bytes() == index_bytes


def test_out_folder_with_other_settings_or_other_files_is_refused(parts, dataset, tmp_path):
    settings = settings_for(dataset / "pretrain.jsonl", "pretrain")
    out = tmp_path / "latents"
    precompute.prepare_out(str(out), settings, None)
    other = Settings(**{**settings.__dict__, "frames": 13})
    with pytest.raises(ConfigError, match=r"frames: 13 vs 9|frames: 9 vs 13"):
        precompute.prepare_out(str(out), other, None)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a precompute folder"):
        precompute.prepare_out(str(user), settings, None)
    assert (user / "notes.txt").read_text() == "keep me"


def test_bad_clips_are_skipped_and_counted_by_reason(parts, dataset, tmp_path):
    rows = [json.loads(line) for line in (dataset / "pretrain.jsonl").read_text().splitlines()]
    good = str(dataset / rows[0]["path"])
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = Path(good).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    bad = [
        {**rows[0], "path": str(tmp_path / "missing.mp4")},
        {**rows[0], "path": str(tmp_path / "empty.mp4")},
        {**rows[0], "path": str(tmp_path / "cut.mp4")},
        {**rows[0], "path": good, "num_frames": 8},  # fewer than 9 usable frames
        {**rows[0], "caption": ""},  # dropped by the manifest reader
    ]
    manifest = tmp_path / "pretrain.jsonl"
    lines = [{**r, "path": str(dataset / r["path"])} for r in rows[1:4]] + bad
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = run_precompute(parts, settings_for(manifest, "pretrain"), tmp_path / "out")
    counts = summary["skips"].as_dict()
    assert counts.pop("missing") == counts.pop("zero_byte") == counts.pop("too_short") == 1
    assert counts.pop("empty_caption") == 1
    assert counts.pop("truncated", 0) + counts.pop("undecodable", 0) == 1 and not counts
    assert summary["entries"] == 3
    assert latents.read_index(str(tmp_path / "out")).skips == summary["skips"]


def entry(group: str, shot: int, key: str | None = None) -> Entry:
    clip = {"path": "p", "caption": "c", "num_frames": 9, "fps": 8.0, "width": 32, "height": 32}
    return Entry(
        key or f"{group}{shot}",
        "000000",
        group,
        shot,
        **clip,
        start=None,
        end=None,
        frame_start=0,
        frame_stride=1,
    )


def test_sft_groups_split_at_failed_shots_as_the_manifest_reader_does():
    entries = [entry("a", s) for s in (0, 1, 2, 4, 5, 6)]  # shot 3 failed
    entries += [entry("b", s) for s in (0, 1, 3)]  # no 3 consecutive shots left
    entries += [entry("c", s) for s in (0, 2, 3, 4)]  # one usable part
    skips = SkipCounts()
    kept = precompute.split_groups(entries, 3, skips)
    groups = {}
    for e in kept:
        groups.setdefault(e.group, []).append(e.shot)
    assert groups == {"a/0": [0, 1, 2], "a/1": [4, 5, 6], "c": [2, 3, 4]}
    assert skips.as_dict() == {"group_too_short": 1}


def test_latents_made_for_another_recipe_are_refused(pretrain_latents):
    uri = str(pretrain_latents)
    run = local_run("pretrain", micro_batch=1, pretrain_latents=uri)
    run = run.model_copy(update={"recipe": run.recipe.model_copy(update={"frames": 13})})
    with pytest.raises(ConfigError, match=r"frames=9 \(run: 13\)"):
        PrecomputedStories(run, uri, 0, 1)
    with pytest.raises(DataError, match=r"no index\.parquet"):
        latents.read_index(str(pretrain_latents.parent / "nowhere"))


def test_shard_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {
        "k.mean": torch.randn(2, 3, 4),
        "k.logvar": torch.randn(2, 3, 4),
        "k.text": torch.randn(5, 6).to(torch.bfloat16),
        "j.mean": torch.randn(1),
    }
    os.makedirs(tmp_path / "shards")
    save_file(tensors, str(tmp_path / "shards" / "000000.safetensors"))
    got = latents.ShardReader(str(tmp_path)).read(entry("", 0, key="k"))
    want = load_file(str(tmp_path / "shards" / "000000.safetensors"))
    for part in ("mean", "logvar", "text"):
        assert torch.equal(got[part], want[f"k.{part}"])


def test_cli_passes_the_profile_recipe_to_the_job(dataset):
    from orchestrator.commands.data_precompute import job_spec

    run = local_run("sft", micro_batch=1)
    manifest = str(dataset / "sft.jsonl")
    written = job_spec(run, manifest, "s3://b/latents", 8, None, tracking=run.tracking)
    spec = PrecomputeSpec.model_validate_json(written.model_dump_json())  # as the job reads it
    settings = precompute.settings_from(spec)
    assert (settings.stage, settings.model_source, settings.manifest) == ("sft", "tiny", manifest)
    assert (settings.frames, settings.height, settings.width) == (9, 32, 32)
    assert (settings.num_scenes, settings.seed, settings.shard_size) == (3, 3, 8)
    assert (settings.text_tokens, settings.dtype) == (16, "fp32")
    assert precompute.pool_of(spec) == precompute.Pool(2, "cpu", 0)
    assert spec.tracking == run.tracking
    assert job_spec(run, manifest, "out").tracking is None


def test_cli_user_errors_are_one_line_with_exit_2(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    runner = CliRunner()
    args = ["data", "precompute", "--cluster", "nope", "--stage", "sft", "--out", str(tmp_path)]
    done = runner.invoke(cli, args)
    assert done.exit_code == 2 and "unknown cluster 'nope'" in done.output
    assert "Traceback" not in done.output


def test_the_job_checks_its_spec_before_any_work(dataset, tmp_path, capsys):
    good = {
        "run": json.loads(local_run("pretrain").model_dump_json()),
        "manifest": str(dataset / "pretrain.jsonl"),
        "out": str(tmp_path / "out"),
    }

    def fails(change) -> str:
        spec = json.loads(json.dumps(good))
        change(spec)
        assert precompute.main(["--spec", json.dumps(spec)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    assert "4k+1" in fails(lambda spec: spec["run"]["recipe"].update(frames=10))
    assert "multiple of 16" in fails(lambda spec: spec["run"]["recipe"].update(height=30))
    missing = fails(lambda spec: spec.update(manifest=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl: manifest not found" in missing
    no_model = str(tmp_path / "no-model")
    assert "no-model: no such folder" in fails(
        lambda spec: spec["run"]["model"].update(source=no_model)
    )
    assert not (tmp_path / "out").exists()
