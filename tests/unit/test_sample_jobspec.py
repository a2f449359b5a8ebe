"""sample-batch without Ray: checkpoint references, options, item planning, user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sample_items import item_meta, write_meta

from infra.config import ModelConfig, StageRecipe, StorageConfig
from infra.errors import ConfigError, DataError
from infra.job_specs import CheckpointSpec, SampleJobSpec
from infra.prompts import Story
from orchestrator import runs
from orchestrator.cli import cli
from orchestrator.commands.sample import resolve_checkpoint
from sampler.batch import Item, inputs_record, item_uri, plan_items, sampling_params
from sampler.checkpoint_info import CheckpointInfo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """A run `r1` in a fresh registry, with checkpoints at steps 50 and 100."""
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "store" / "r1"
    for step in (50, 100):
        (run_dir / f"checkpoint_{step:08d}" / "deepspeed").mkdir(parents=True)
    record = runs.RunRecord(
        name="r1",
        cluster="local",
        stage="sft",
        run_dir=str(run_dir),
        config_uri=str(run_dir / "run_config.json"),
        kind="local",
        address="local",
        tracking_uri="sqlite:///x.db",
        experiment="m2d",
        storage={"root": str(tmp_path / "store")},
        exit_code=0,
    )
    record.save()
    return run_dir


def test_run_references_resolve_to_its_checkpoints(registry):
    latest = resolve_checkpoint("r1")
    assert latest.uri.endswith("checkpoint_00000100") and latest.label == "r1-step00000100"
    assert latest.run == "r1"
    assert resolve_checkpoint("r1:50").uri.endswith("checkpoint_00000050")
    with pytest.raises(ConfigError, match="no checkpoint at step 70; it has: 50, 100"):
        resolve_checkpoint("r1:70")
    with pytest.raises(ConfigError, match="no run or folder of that name"):
        resolve_checkpoint("r2")


def test_latest_stage_references_pick_the_newest_finished_run(registry):
    assert resolve_checkpoint("latest-sft", "local").run == "r1"
    with pytest.raises(ConfigError, match="no finished pretrain run of cluster 'local'"):
        resolve_checkpoint("latest-pretrain", "local")
    with pytest.raises(ConfigError, match="no finished sft run of cluster 'a100x8'"):
        resolve_checkpoint("latest-sft", "a100x8")


def test_folder_references_are_labelled_by_parent_and_name(registry):
    folder = resolve_checkpoint(str(registry / "checkpoint_00000050"))
    assert folder.label == "r1-checkpoint_00000050" and folder.run is None
    assert resolve_checkpoint("s3://bucket/exports/v1").label == "exports-v1"


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["sample-batch", "--cluster", "local", *args])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--steps", "0"], "--steps: Input should be greater than or equal to 1"),
        (["--size", "480by720"], "give HEIGHTxWIDTH"),
        (["--seeds", "0,x"], "give integers separated by commas"),
        (["--seeds", "1,1"], "seeds repeat"),
        (["--checkpoint", "r1"], "--checkpoint given twice"),
    ],
)
def test_bad_options_exit_2_with_one_line(registry, tmp_path, options, message):
    result = _invoke("--checkpoint", "r1", "--prompts", "eval50", "--out", str(tmp_path), *options)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_prompt_file_is_refused_by_line_before_any_model_loads(tmp_path, capsys):
    from sampler import job

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an exported transformer: never loaded here
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    prompts = tmp_path / "stories.jsonl"
    prompts.write_text('{"id": "a", "prompts": ["x"]}\n{"id": "b", "prompts": []}\n')
    spec = _spec(tmp_path, prompts=str(prompts))
    spec = spec.model_copy(update={"checkpoints": [CheckpointSpec(uri=str(folder), label="e")]})
    assert job.main(["--spec", spec.model_dump_json()]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {prompts}:2: ") and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_fixed_mode_refuses_context_videos(tmp_path, capsys):
    from sampler import job

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    prompts = tmp_path / "stories.jsonl"
    prompts.write_text('{"id": "a", "prompts": ["x", "y"], "context_videos": ["v.mp4"]}\n')
    spec = _spec(tmp_path, prompts=str(prompts))
    spec = spec.model_copy(update={"checkpoints": [CheckpointSpec(uri=str(folder), label="e")]})
    assert job.main(["--spec", spec.model_dump_json()]) == 2
    assert "story a has context_videos; render it with --mode extend" in capsys.readouterr().err


def _spec(tmp_path: Path, **changes) -> SampleJobSpec:
    fields = {"prompts": "p.jsonl", **changes}
    return SampleJobSpec(
        cluster="local",
        checkpoints=[CheckpointSpec(uri="/ckpt", label="c")],
        out=str(tmp_path / "out"),
        model=ModelConfig(source="tiny", text_tokens=16),
        recipe=StageRecipe(frames=9, height=32, width=32),
        storage=StorageConfig(root=str(tmp_path)),
        **fields,
    )


def test_finished_items_are_skipped_and_changed_inputs_refused(tmp_path):
    spec = _spec(tmp_path, seeds=[0, 1])
    info = CheckpointInfo("transformer", 0, None, spec.recipe, spec.model, spec.storage)
    params = {"c": sampling_params(spec, info)}
    stories = [Story("s", ("a", "b"))]
    todo, finished = plan_items(spec, stories, params)
    assert (todo, finished) == ([Item("c", "s", 0), Item("c", "s", 1)], [])

    done = Path(item_uri(spec.out, Item("c", "s", 1)))
    done.mkdir(parents=True)
    inputs = inputs_record(stories[0], 1, spec.checkpoints[0], spec, params["c"])
    write_meta(done, item_meta("s", ["a", "b"], [1, 1], "c", inputs=inputs))
    assert plan_items(spec, stories, params) == ([Item("c", "s", 0)], [Item("c", "s", 1)])
    assert plan_items(spec.model_copy(update={"overwrite": True}), stories, params)[1] == []

    other = _spec(tmp_path, seeds=[0, 1], steps=20)
    with pytest.raises(DataError, match=r"num_inference_steps: 50 there, 20 now.*--overwrite"):
        plan_items(other, stories, {"c": sampling_params(other, info)})
    for change, message in [
        ({"scheduler": "dpm"}, "scheduler: 'ddim' there, 'dpm' now"),
        ({"vae_tiling": True}, "vae_tiling: False there, True now"),
    ]:
        other = _spec(tmp_path, seeds=[0, 1], **change)
        with pytest.raises(DataError, match=message):
            plan_items(other, stories, params)
    # Slicing decodes the same pixels: the finished item stays finished.
    sliced = _spec(tmp_path, seeds=[0, 1], vae_slicing=True)
    assert plan_items(sliced, stories, params)[1] == [Item("c", "s", 1)]


def test_frames_must_decode_back_to_the_same_count(tmp_path):
    spec = _spec(tmp_path, frames=13)
    info = CheckpointInfo("transformer", 0, None, spec.recipe, spec.model, spec.storage)
    with pytest.raises(ConfigError, match="--frames 13"):
        sampling_params(spec, info)
    spec = _spec(tmp_path)
    assert sampling_params(spec, info).num_frames == 9  # the checkpoint's recipe
