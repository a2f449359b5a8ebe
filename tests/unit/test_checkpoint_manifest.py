"""A checkpoint counts only when complete: each rank's file list, the coordinator's
manifest written last, and the readers' check - on local folders laid out as a 2-rank
save leaves them (the kill during an upload to an S3 server: tests/integration)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from infra.checkpoint_layout import (
    MANIFEST,
    check_checkpoint,
    complete_checkpoint,
    write_file_list,
    write_manifest,
)


def _rank_part(root: Path, rank: int) -> None:
    """What one rank's save writes (its own folder before Ray merges them)."""
    part = root / f"part{rank}"
    (part / "deepspeed").mkdir(parents=True)
    (part / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(
        bytes(range(256)) * (rank + 3)
    )
    (part / "ranks").mkdir()
    (part / "ranks" / f"rank_{rank}.pt").write_bytes(b"position %d" % rank)
    if rank == 0:
        (part / "trainer_state.json").write_text('{"step": 4}')
    write_file_list(part, rank)


def _merged(tmp_path: Path, name: str = "checkpoint_00000004", ranks=(0, 1)) -> Path:
    """The checkpoint folder as storage holds it once these ranks' parts are uploaded."""
    folder = tmp_path / "run" / name
    for rank in ranks:
        _rank_part(tmp_path / name, rank)
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
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt is 100 bytes, the manifest says 1024"
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
        "ranks/rank_1.pt is 3 bytes, the manifest says 10"
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
    warnings: list[str] = []
    assert complete_checkpoint([str(first), str(second)], None, warnings.append) == str(second)
    assert len(warnings) == 1 and "older m2d" in warnings[0] and "unverified" in warnings[0]


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
    lines = verified.output.splitlines()
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

    (run / "checkpoint_00000002" / MANIFEST).unlink()  # and the one before has no manifest
    with pytest.raises(DataError, match="no complete checkpoint to resume from"):
        resumable(latest, storage, rank=0)


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
