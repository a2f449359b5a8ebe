"""A checkpoint counts only when complete: each rank's file list, the coordinator's
manifest written last, and the readers' check - on local folders laid out as a 2-rank
save leaves them (the kill during an upload to an S3 server: tests/integration)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from infra.checkpoint_layout import (
    check_checkpoint,
    complete_checkpoint,
    write_file_list,
    write_manifest,
)
from infra.run_folder import MANIFEST


def _rank_part(root: Path, rank: int, world_size: int | None = None) -> None:
    """What one rank's save writes (its own folder before Ray merges them); the trainer
    state names the world size where given."""
    part = root / f"part{rank}"
    (part / "deepspeed").mkdir(parents=True)
    (part / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(
        bytes(range(256)) * (rank + 3)
    )
    (part / "ranks").mkdir()
    (part / "ranks" / f"rank_{rank}.pt").write_bytes(b"position %d" % rank)
    if rank == 0:
        state = {"step": 4} if world_size is None else {"step": 4, "world_size": world_size}
        (part / "trainer_state.json").write_text(json.dumps(state))
    write_file_list(part, rank)


def _merged(
    tmp_path: Path, name: str = "checkpoint_00000004", ranks=(0, 1), world_size=None
) -> Path:
    """The checkpoint folder as storage holds it once these ranks' parts are uploaded."""
    folder = tmp_path / "run" / name
    for rank in ranks:
        _rank_part(tmp_path / name, rank, world_size)
        for path in (tmp_path / name / f"part{rank}").rglob("*"):
            if path.is_file():
                target = folder / path.relative_to(tmp_path / name / f"part{rank}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return folder


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    folder = _merged(tmp_path)
    assert write_manifest(str(folder), None, world_size=2) is None
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    assert set(files) == set(on_disk)  # the rank lists themselves included
    for name, path in on_disk.items():
        data = path.read_bytes()
        assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = check_checkpoint(str(folder), None, verify=True)
    assert state.complete and state.total_bytes == sum(
        len(p.read_bytes()) for p in on_disk.values()
    )


def test_no_manifest_while_a_rank_is_missing_or_short(tmp_path):
    folder = _merged(tmp_path, ranks=(0,))  # rank 1's upload never came
    assert write_manifest(str(folder), None, 2) == (
        "rank 1's file list ranks/files_rank_1.json is missing"
    )
    assert not (folder / MANIFEST).exists()
    other = _merged(tmp_path / "b")
    shard = other / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # a torn upload
    assert write_manifest(str(other), None, 2) == (
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is 100 bytes, listed as 1024"
    )
    assert not (other / MANIFEST).exists()
    assert (
        check_checkpoint(str(other), None).problem == "no manifest.json (the save did not finish)"
    )


def test_a_short_or_altered_file_after_the_manifest_is_caught(tmp_path):
    folder = _merged(tmp_path)
    assert write_manifest(str(folder), None, 2) is None
    position = folder / "ranks" / "rank_1.pt"
    position.write_bytes(b"position 9")  # same size, other bytes
    assert check_checkpoint(str(folder), None).complete  # sizes only: cheap
    assert check_checkpoint(str(folder), None, verify=True).problem == (
        "ranks/rank_1.pt differs from its sha256"
    )
    position.write_bytes(b"pos")
    assert check_checkpoint(str(folder), None).problem == (
        "ranks/rank_1.pt is 3 bytes, listed as 10"
    )
    position.unlink()
    assert check_checkpoint(str(folder), None).problem == "ranks/rank_1.pt is missing"


def test_readers_take_the_newest_complete_checkpoint_and_say_what_they_skipped(tmp_path):
    older = _merged(tmp_path, "checkpoint_00000002")
    assert write_manifest(str(older), None, 2) is None
    newer = _merged(tmp_path, "checkpoint_00000004", ranks=(0,))
    warnings: list[str] = []
    assert complete_checkpoint([str(older), str(newer)], None, warnings.append) == str(older)
    assert warnings == [
        f"checkpoint {newer} is incomplete (no manifest.json (the save did not finish)); "
        f"using {older}"
    ]
    (older / "trainer_state.json").unlink()
    warnings.clear()
    assert complete_checkpoint([str(older), str(newer)], None, warnings.append) is None
    assert len(warnings) == 2 and "trainer_state.json is missing" in warnings[1]


def test_a_run_from_before_manifests_uses_its_newest_unverified(tmp_path):
    first = _merged(tmp_path, "checkpoint_00000002")
    second = _merged(tmp_path, "checkpoint_00000004")
    for listed in [*first.glob("ranks/files_rank_*"), *second.glob("ranks/files_rank_*")]:
        listed.unlink()  # an m2d from before manifests listed no files either
    warnings: list[str] = []
    assert complete_checkpoint([str(first), str(second)], None, warnings.append) == str(second)
    assert len(warnings) == 1 and "older m2d" in warnings[0] and "unverified" in warnings[0]


def test_a_checkpoint_whose_manifest_was_never_written_counts_by_its_ranks_lists(tmp_path):
    """The coordinator could not write the manifest (a full disk at that moment): every
    rank's list is there and every file has its size, so the checkpoint is complete all the
    same; a newer torn one is skipped, never taken as 'a run from before manifests'."""
    older = _merged(tmp_path, "checkpoint_00000002", world_size=2)  # no manifest written
    newer = _merged(tmp_path, "checkpoint_00000004", world_size=2)
    shard = newer / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"")  # torn: cut to 0 bytes
    state = check_checkpoint(str(older), None, verify=True)
    assert state.complete and not state.manifest and state.listed
    assert state.total_bytes == sum(p.stat().st_size for p in older.rglob("*") if p.is_file())
    assert check_checkpoint(str(newer), None).problem == (
        "no manifest.json (the save did not finish): "
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is 0 bytes, listed as 1024"
    )
    warnings: list[str] = []
    assert complete_checkpoint([str(older), str(newer)], None, warnings.append) == str(older)
    assert len(warnings) == 1 and "unverified" not in warnings[0]
    assert f"checkpoint {newer} is incomplete" in warnings[0]

    # The ranks' lists carry the sha256 too: --verify reads a flipped byte of it.
    position = older / "ranks" / "rank_1.pt"
    position.write_bytes(b"position 7")
    assert check_checkpoint(str(older), None, verify=True).problem == (
        "ranks/rank_1.pt differs from its sha256"
    )
    # Without its lists' every rank there, it is not complete; nor is it a pre-manifest run.
    (older / "ranks" / "files_rank_1.json").unlink()
    assert complete_checkpoint([str(older), str(newer)], None, warnings.append) is None


def test_a_resume_hashes_what_each_rank_reads_and_names_a_flipped_byte(tmp_path):
    """``damaged_file``: each rank its own shards and data position, local rank 0 the
    shared files; a flipped byte (size unchanged) is named, the weights file not read."""
    from trainer.checkpointing import damaged_file

    folder = _merged(tmp_path, world_size=2)
    assert write_manifest(str(folder), None, 2) is None
    assert damaged_file(folder, rank=0, local_rank=0) is None
    assert damaged_file(folder, rank=1, local_rank=1) is None

    def flip(name: str) -> None:
        path = folder / name
        data = bytearray(path.read_bytes())
        data[3] ^= 0x10
        path.write_bytes(bytes(data))

    flip("ranks/rank_1.pt")  # rank 1's own data position
    assert damaged_file(folder, rank=1, local_rank=1) == "ranks/rank_1.pt"
    assert damaged_file(folder, rank=0, local_rank=0) is None  # not rank 0's to read
    assert damaged_file(folder, rank=0, local_rank=0, every_rank=True) == "ranks/rank_1.pt"
    flip("ranks/rank_1.pt")  # back
    flip("trainer_state.json")  # shared: the node's local rank 0 hashes it
    assert damaged_file(folder, rank=1, local_rank=1) is None
    assert damaged_file(folder, rank=1, local_rank=0) == "trainer_state.json"


def _listed(tmp_path: Path, *args: str):
    """`m2d checkpoints tampered ARGS` over the run folder ``tmp_path / "run"``."""
    from click.testing import CliRunner

    from orchestrator.cli import cli
    from orchestrator.runs import RunRecord

    run_dir = str(tmp_path / "run")
    RunRecord(
        "tampered",
        "local",
        "pretrain",
        run_dir,
        f"{run_dir}/run_config.json",
        "local",
        storage={"root": str(tmp_path)},
    ).save()
    return CliRunner().invoke(cli, ["checkpoints", "tampered", *args])


def test_checkpoints_verify_fails_on_a_flipped_byte_and_lists_the_rest(tmp_path):
    good = _merged(tmp_path, "checkpoint_00000004")
    flipped = _merged(tmp_path, "checkpoint_00000008")
    in_progress = _merged(tmp_path, "checkpoint_00000012")
    for folder in (good, flipped):
        assert write_manifest(str(folder), None, 2) is None
    shard = flipped / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[17] ^= 0x01  # one bit, size unchanged
    shard.write_bytes(bytes(data))

    sizes_only = _listed(tmp_path)
    assert sizes_only.exit_code == 0, sizes_only.output  # sizes match: nothing seen
    verified = _listed(tmp_path, "--verify")
    assert verified.exit_code == 1, verified.output
    header, *lines = verified.output.splitlines()
    assert header.split() == ["checkpoint", "state", "size", "/", "problem"]
    assert lines[0].startswith("checkpoint_00000004  verified")
    assert lines[1] == (
        "checkpoint_00000008  incomplete  "
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt differs from its sha256"
    )
    assert lines[2].startswith("checkpoint_00000012  incomplete  no manifest.json")
    assert lines[3] == (
        "Error: 1 checkpoint(s) of tampered differ from their manifest: checkpoint_00000008 "
        "(deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt differs from its sha256)"
    )
    assert in_progress.exists()


def test_weights_are_checked_against_the_manifest_where_they_are_read(tmp_path):
    """Export, sampling and SFT init read the weights file through ``read_weights``: a byte
    flipped after the save (size unchanged) is refused in one line, not loaded."""
    import pytest
    import safetensors.torch
    import torch

    from infra.checkpoint_layout import WEIGHTS, read_weights
    from infra.errors import DataError

    folder = tmp_path / "run" / "checkpoint_00000004"  # a one-rank save
    weights = folder / WEIGHTS
    weights.parent.mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.arange(64, dtype=torch.float32)}, weights)
    (folder / "trainer_state.json").write_text('{"step": 4}')
    write_file_list(folder, 0)
    assert write_manifest(str(folder), None, world_size=1) is None
    assert torch.equal(read_weights(str(folder), None)["w"], torch.arange(64.0))

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # inside the last float: still a valid safetensors file
    weights.write_bytes(bytes(data))
    assert safetensors.torch.load_file(weights)["w"][-1] != 63.0  # it would load
    with pytest.raises(DataError, match=f"{folder}: {WEIGHTS} differs from the sha256"):
        read_weights(str(folder), None)
    # A checkpoint without a manifest (an older m2d's) is read as before.
    (folder / MANIFEST).unlink()
    assert read_weights(str(folder), None)["w"][-1] != 63.0


def test_a_resume_takes_the_newest_complete_checkpoint_not_rays_latest(tmp_path, caplog):
    """Ray hands the trainer the last checkpoint it recorded; a file of it cut afterwards
    (a full disk, a hand) makes the resume take the one before, with a warning."""
    import pytest
    import ray.train

    from infra.config import StorageConfig
    from infra.errors import DataError
    from trainer.checkpointing import resumable

    run = tmp_path / "runs" / "r"
    for step in (2, 4):
        folder = run / f"checkpoint_{step:08d}"
        (folder / "deepspeed").mkdir(parents=True)
        (folder / "deepspeed" / "model.pt").write_bytes(b"w" * 100 * step)
        write_file_list(folder, 0)
        assert write_manifest(str(folder), None, world_size=1) is None
    storage = StorageConfig(root=str(tmp_path / "runs"))
    latest = ray.train.Checkpoint.from_directory(str(run / "checkpoint_00000004"))
    assert resumable(latest, storage, rank=0) is latest  # complete: Ray's own

    (run / "checkpoint_00000004" / "deepspeed" / "model.pt").write_bytes(b"w" * 10)  # cut
    chosen = resumable(latest, storage, rank=0)
    assert chosen.path == str(run / "checkpoint_00000002")
    assert "checkpoint_00000004 is incomplete (deepspeed/model.pt is 10 bytes" in caplog.text

    # A flipped byte of the latest (its resume read finds it): the one before it.
    assert resumable(latest, storage, rank=0, below="checkpoint_00000004").path == str(
        run / "checkpoint_00000002"
    )

    (run / "checkpoint_00000002" / MANIFEST).unlink()  # and the one before has no manifest
    with pytest.raises(DataError, match="no complete checkpoint to resume from"):
        resumable(latest, storage, rank=0)


def test_a_start_without_rays_snapshot_finds_the_newest_complete_checkpoint(tmp_path):
    """Ray's run snapshot set aside (or never written): the workers look at the run
    folder themselves; a fresh run finds nothing, a torn newest is passed over."""
    from types import SimpleNamespace

    import pyarrow.fs

    from infra.config import StorageConfig
    from trainer.checkpointing import stored_checkpoint

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    storage = StorageConfig(root=str(tmp_path / "runs"))
    ray_storage = SimpleNamespace(
        experiment_fs_path=str(run), storage_filesystem=pyarrow.fs.LocalFileSystem()
    )
    assert stored_checkpoint(ray_storage, storage, rank=0) is None  # a fresh run
    for step in (2, 4):
        folder = run / f"checkpoint_{step:08d}"
        (folder / "deepspeed").mkdir(parents=True)
        (folder / "deepspeed" / "model.pt").write_bytes(b"w" * 100)
        write_file_list(folder, 0)
        assert write_manifest(str(folder), None, world_size=1) is None
    (run / "checkpoint_00000004" / "deepspeed" / "model.pt").write_bytes(b"")
    found = stored_checkpoint(ray_storage, storage, rank=0)
    assert found.path == str(run / "checkpoint_00000002")
    assert isinstance(found.filesystem, pyarrow.fs.LocalFileSystem)


def test_a_torn_ray_snapshot_is_set_aside_and_a_sound_one_kept(tmp_path):
    import json as json_
    from types import SimpleNamespace

    from trainer.job import RAY_SNAPSHOT, set_aside_torn_snapshot

    run = tmp_path / "runs" / "r"
    (run / "checkpoint_00000002").mkdir(parents=True)
    folder = SimpleNamespace(uri=str(run), run=SimpleNamespace(storage=None))
    assert set_aside_torn_snapshot(folder) is None  # none there: nothing to do
    sound = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000002"}]}
    snapshot = run / RAY_SNAPSHOT
    snapshot.write_text(json_.dumps(sound))
    assert set_aside_torn_snapshot(folder) is None and snapshot.exists()
    for torn in (
        b"",
        b'{"checkpoint_results": [{"checkpoi',
        json_.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000004"}]}  # gone
        ).encode(),
    ):
        snapshot.write_bytes(torn)
        aside = set_aside_torn_snapshot(folder)
        assert aside is not None and not snapshot.exists()
        assert Path(aside).read_bytes() == torn  # kept, renamed
        Path(aside).unlink()


def test_a_checkpoint_the_disk_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import pytest
    import torch

    from infra.errors import DataError
    from trainer import checkpointing

    engine = SimpleNamespace(module=torch.nn.Linear(100, 10, dtype=torch.bfloat16))  # 1010
    own0, whole = checkpointing.checkpoint_bytes(engine, rank=0, world=2)
    own1, _ = checkpointing.checkpoint_bytes(engine, rank=1, world=2)
    assert whole == 1010 * (2 + 4 + 12)  # bf16 states, fp32 weights file, Adam's 12 bytes
    assert (own0, own1) == (1010 * 6 + 1010 * 6, 1010 * 6)
    assert own0 + own1 == whole

    free = {"value": 10_000}
    real = shutil.disk_usage
    monkeypatch.setattr(
        checkpointing.shutil,
        "disk_usage",
        lambda path: real(path)._replace(free=free["value"]),
    )
    checkpointing.check_space({str(tmp_path): 8_000}, step=8)  # 10000 with the margin
    free["value"] = 9_999
    with pytest.raises(DataError) as refused:
        checkpointing.check_space({str(tmp_path): 8_000}, step=8)
    assert str(refused.value).startswith(f"no space for the checkpoint of step 8: {tmp_path}")
    assert "`m2d launch --resume RUN` continues from the last checkpoint" in str(refused.value)
