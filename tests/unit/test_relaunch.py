"""`m2d relaunch RUN [--cluster OTHER] [--set ...]` (issue 29 point 5): a new run from the
configuration saved in RUN's folder - the same, or on another cluster with RUN's recipe,
model, data and starting weights - and RUN itself untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from infra.config import RunConfig
from orchestrator import profiles, runs
from orchestrator.cli import cli

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


@pytest.fixture
def earlier(tmp_path, monkeypatch) -> runs.RunRecord:
    """A finished SFT run of `local`, with a recipe of its own."""
    monkeypatch.setenv("M2D_HOME", str(tmp_path / "home"))
    overrides = {
        "storage": {"root": str(tmp_path / "runs")},
        "recipe": {"steps": 37, "seed": 5, "mask_policy": "isolated"},
        "data": {"sft": str(tmp_path / "sft.jsonl")},
    }
    run = runs.with_absolute_paths(
        profiles.resolve(profiles.load_profile(CLUSTERS / "local.yaml"), "sft", overrides)
    )
    run = run.model_copy(update={"init_from": str(tmp_path / "pre" / "checkpoint_00000010")})
    record = runs.RunRecord(
        name="earlier", cluster="local", stage="sft", run_dir=runs.run_dir(run, "earlier"),
        config_uri=runs.create_run_folder(run, "earlier"), kind="local", exit_code=0,
    )  # fmt: skip
    record.save()
    return record


def _shown(*args: str) -> RunConfig:
    done = CliRunner().invoke(cli, ["relaunch", "earlier", *args, "--dry-run"])
    assert done.exit_code == 0, done.output
    config = done.stdout.split("# Credentials", 1)[0]  # the YAML before the comment lines
    return RunConfig.model_validate(yaml.safe_load(config))


def test_a_relaunch_is_the_saved_run_with_its_changes(earlier):
    saved = runs.read_run_config(earlier)
    assert _shown() == saved
    changed = _shown("--set", "recipe.steps=80")
    assert changed.recipe.steps == 80
    assert changed.model_copy(update={"recipe": saved.recipe}) == saved


def test_on_another_cluster_it_keeps_what_it_trains_and_takes_where(earlier):
    saved = runs.read_run_config(earlier)
    other = runs.resolve_run(str(CLUSTERS), "a100x8", "sft")
    moved = _shown("--cluster", "a100x8", "--set", "recipe.global_batch=16")
    assert (moved.recipe.steps, moved.recipe.seed, moved.recipe.mask_policy) == (37, 5, "isolated")
    assert (moved.model, moved.data, moved.init_from) == (saved.model, saved.data, saved.init_from)
    assert (moved.cluster, moved.workers, moved.ray) == ("a100x8", other.workers, other.ray)
    assert (moved.storage, moved.tracking) == (other.storage, other.tracking)
    # 16 samples a step on 8 workers of 1: two micro-batches each.
    assert moved.deepspeed.gradient_accumulation == 2


def test_a_global_batch_the_other_cluster_cannot_split_is_one_line(earlier):
    done = CliRunner().invoke(cli, ["relaunch", "earlier", "--cluster", "a100x8", "--dry-run"])
    assert done.exit_code == 2, done.output
    assert "recipe.global_batch" in done.output and "Traceback" not in done.output


def test_a_relaunch_leaves_the_earlier_run_as_it_was(earlier, monkeypatch, tmp_path):
    """Not a dry run: the new run gets its own folder, record and provenance; the job start
    is stood in for (a real one is the launch tests' business)."""
    from orchestrator.commands import launch as launch_module

    before = Path(earlier.config_uri).read_text()
    started = []

    def start(record, run, follow) -> int:  # what submit.run_local does first
        record.save()
        started.append(record)
        return 0

    monkeypatch.setattr(launch_module, "_check_before_writing", lambda run, checks: None)
    monkeypatch.setattr(launch_module, "_start", start)
    done = CliRunner().invoke(cli, ["relaunch", "earlier", "--name", "again"])
    assert done.exit_code == 0, done.output
    assert "run again: like earlier" in done.output
    assert [r.name for r in started] == ["again"]
    again = runs.load_record("again")
    assert runs.read_run_config(again) == runs.read_run_config(earlier)
    assert (Path(again.run_dir) / "provenance.json").is_file()
    assert Path(earlier.config_uri).read_text() == before
    taken = CliRunner().invoke(cli, ["relaunch", "earlier", "--name", "again"])
    assert taken.exit_code == 2 and "a run of that name exists" in taken.output  # never over it
