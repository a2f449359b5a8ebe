"""The run folder's shared files (``infra.run_folder``): each read back as written, and
each problem one line naming the file and the fix."""

from __future__ import annotations

import pytest

from infra.config import StorageConfig
from infra.errors import DataError
from infra.run_folder import (
    FileRecord,
    Manifest,
    TrainerState,
    parse_trainer_state,
    read_manifest,
    read_run_config,
    read_trainer_state,
    write_manifest_file,
    write_run_config,
    write_trainer_state,
)
from infra.storage import filesystem
from orchestrator.runs import resolve_run


def test_the_run_config_reads_back_as_written_and_keeps_the_one_it_replaces(tmp_path):
    run = resolve_run(None, "local", "pretrain")
    uri = write_run_config(tmp_path, None, run)
    assert uri == f"{tmp_path}/run_config.json"
    assert read_run_config(str(tmp_path), None) == run
    longer = run.model_copy(update={"name": "other"})
    write_run_config(tmp_path, None, longer, kept="run_config.old.json")
    assert read_run_config(str(tmp_path), None) == longer
    assert (tmp_path / "run_config.old.json").read_text() == run.model_dump_json(indent=2)


def test_run_config_problems_are_one_line_naming_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError) as missing:
        read_run_config(str(tmp_path), None, fix="was the run folder moved?")
    assert str(missing.value) == f"{tmp_path}: no run_config.json there; was the run folder moved?"
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(DataError, match=rf"^{tmp_path}: unreadable run_config.json \(") as bad:
        read_run_config(str(tmp_path), None)
    assert "\n" not in str(bad.value)
    assert str(bad.value).endswith(
        "; give the folder of a run m2d launched (or one of its checkpoints)"
    )
    (tmp_path / "run_config.json").write_text('{"cluster": "x"}')
    with pytest.raises(DataError, match=r"unreadable run_config.json \(workers: Field required\)"):
        read_run_config(str(tmp_path), None)


def test_the_trainer_state_reads_back_and_names_what_is_wrong(tmp_path):
    state = TrainerState(step=12, world_size=4, mlflow_run_id="abc")
    write_trainer_state(tmp_path, state)
    assert read_trainer_state(str(tmp_path), None) == state
    assert parse_trainer_state((tmp_path / "trainer_state.json").read_bytes(), "x") == state
    fix = "use another checkpoint (`m2d checkpoints RUN` lists them)"
    (tmp_path / "trainer_state.json").write_text('{"step": 4}')  # no world size: no guess
    with pytest.raises(DataError) as no_world:
        read_trainer_state(str(tmp_path), None)
    assert str(no_world.value) == (
        f"{tmp_path}: unreadable trainer_state.json (world_size: Field required); {fix}"
    )
    (tmp_path / "trainer_state.json").unlink()
    with pytest.raises(DataError) as missing:
        read_trainer_state(str(tmp_path), None)
    assert str(missing.value) == f"{tmp_path}: no trainer_state.json there; {fix}"


def test_the_manifest_reads_back_and_a_missing_one_is_none(tmp_path):
    fs, path = filesystem(str(tmp_path))
    assert read_manifest(fs, path, "ckpt") is None  # a save that did not finish
    manifest = Manifest(world_size=2, files={"a.pt": FileRecord(size=3, sha256="ab")})
    write_manifest_file(fs, path, manifest)
    assert read_manifest(fs, path, "ckpt") == manifest
    (tmp_path / "manifest.json").write_text('{"world_size": 2, "files": {"a.pt": {"size": 3}}}')
    with pytest.raises(DataError) as bad:
        read_manifest(fs, path, "ckpt")
    assert str(bad.value).startswith(
        "ckpt: unreadable manifest.json (files.a.pt.sha256: Field required)"
    )


def test_readers_reach_an_object_store_with_the_runs_settings(monkeypatch):
    """The readers take the run's StorageConfig (endpoint) like every storage call."""
    seen = []
    import infra.run_folder as run_folder

    def fake_read(uri, storage):
        seen.append((uri, storage))
        return b'{"step": 2, "world_size": 1}'

    monkeypatch.setattr(run_folder, "_read", fake_read)
    storage = StorageConfig(root="s3://b/runs", endpoint_url="http://127.0.0.1:9000")
    assert read_trainer_state("s3://b/runs/r/checkpoint_00000002", storage).step == 2
    assert seen == [("s3://b/runs/r/checkpoint_00000002/trainer_state.json", storage)]


def test_an_items_meta_reads_back_and_a_foreign_one_is_named(tmp_path):
    from sample_items import item_meta, write_meta

    from infra.run_folder import parse_item_meta, read_item_meta

    item = tmp_path / "ckpt" / "s1" / "0"
    assert read_item_meta(str(item), None) is None  # not finished
    meta = item_meta("s1", ["a cat", "the cat sleeps"], [5, 5])
    write_meta(item, meta)
    assert read_item_meta(str(item), None) == meta
    assert parse_item_meta(meta.model_dump_json(), "row") == meta  # a row from an actor
    (item / "meta.json").write_text('{"inputs": {"story": "s1"}}')
    with pytest.raises(DataError) as foreign:
        read_item_meta(str(item), None)
    assert str(foreign.value) == (
        f"{item}: unreadable meta.json (inputs.seed: Field required); render it again "
        "(`m2d sample-batch ... --overwrite`) or write to a new --out"
    )


def test_an_items_scores_read_back_and_a_cut_one_is_scored_again(tmp_path):
    from infra.run_folder import ItemScores, read_item_scores, write_item_scores

    item = tmp_path / "item"
    item.mkdir()
    assert read_item_scores(str(item), None) is None
    scores = ItemScores(encoder={"name": "clip"}, scores={"visual": 91.5}, extension=[0.5])
    write_item_scores(str(item), None, scores)
    assert read_item_scores(str(item), None) == scores
    (item / "scores.json").write_text('{"encoder": {"name": "cl')  # cut short
    assert read_item_scores(str(item), None) is None
