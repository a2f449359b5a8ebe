"""Storage retries: ``infra.storage.retry_storage`` and the pyarrow filesystem Ray Train
writes through (``infra.arrow_storage.RetryingHandler``), over a local fsspec filesystem
that fails its first calls the way an unreachable object store does."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs
import pytest
from fsspec.implementations.local import LocalFileSystem

import infra.storage
from infra.arrow_storage import RetryingHandler
from infra.errors import StorageError
from infra.storage import retry_storage


class Unreachable(Exception):
    """What botocore raises when nothing answers (not an OSError)."""


class Flaky(LocalFileSystem):
    """A local filesystem whose next ``failures`` calls of the put/cat/info kind fail."""

    cachable = False

    def __init__(self, failures: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.failures, self.calls = failures, 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise Unreachable("Could not connect to the endpoint URL")

    def put_file(self, lpath, rpath, **kwargs):
        self._maybe_fail()
        return super().put_file(lpath, rpath, **kwargs)

    def info(self, path, **kwargs):
        self._maybe_fail()
        return super().info(path, **kwargs)


class FlakyReads(Flaky):
    """Its opens fail too, and its ``isfile`` says False while they do, as s3fs' does when
    the store does not answer (the local filesystem's own asks ``os.path``)."""

    def isfile(self, path):
        try:
            return self.info(path)["type"] == "file"
        except Exception:
            return False

    def _open(self, path, mode="rb", **kwargs):
        self._maybe_fail()
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def no_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(infra.storage.time, "sleep", slept.append)
    return slept


def test_a_failure_is_retried_with_a_doubling_backoff(no_waits):
    attempts = iter([Unreachable("down"), Unreachable("down"), Unreachable("down"), None])

    def action():
        if error := next(attempts):
            raise error
        return "done"

    assert retry_storage(action, "the upload of x", 300, "fix it") == "done"
    assert no_waits == [1.0, 2.0, 4.0]


def test_past_the_budget_it_is_one_storage_error_line(no_waits):
    def down():
        raise Unreachable("Could not connect to the endpoint URL: http://s3\nmore detail")

    with pytest.raises(StorageError) as raised:
        retry_storage(down, "the upload of x on s3://b/runs", 0, "resume it later")
    message = str(raised.value)
    assert message == (
        "the upload of x on s3://b/runs failed for 0 s (Unreachable: Could not connect to "
        "the endpoint URL: http://s3); resume it later"
    )
    assert not no_waits


@pytest.mark.parametrize("answer", [PermissionError("denied"), FileNotFoundError("gone")])
def test_answers_are_not_outages(no_waits, answer):
    def action():
        raise answer

    with pytest.raises(type(answer)):
        retry_storage(action, "the read of x", 300, "fix it")
    assert not no_waits


def test_a_write_through_the_handler_survives_failures_and_it_pickles(tmp_path, no_waits):
    flaky = Flaky(failures=2)
    handler = RetryingHandler(flaky, 60, "s3://bucket/runs")
    fs = pyarrow.fs.PyFileSystem(handler)
    with fs.open_output_stream(str(tmp_path / "snapshot.json")) as out:  # as Ray writes
        out.write(b'{"checkpoints": []}')
    assert (tmp_path / "snapshot.json").read_bytes() == b'{"checkpoints": []}'
    assert flaky.calls == 3 and no_waits == [1.0, 2.0]
    info = fs.get_file_info(str(tmp_path / "snapshot.json"))
    assert info.size == len(b'{"checkpoints": []}')

    again = pickle.loads(pickle.dumps(handler))  # Ray sends it to the controller
    assert (again.retry_s, again.root) == (60, "s3://bucket/runs")


def test_the_handler_gives_up_after_its_budget_naming_the_storage(tmp_path, no_waits):
    fs = pyarrow.fs.PyFileSystem(RetryingHandler(Flaky(failures=10**6), 0, "s3://bucket/runs"))
    out = fs.open_output_stream(str(tmp_path / "snapshot.json"))
    out.write(b"{}")
    with pytest.raises(StorageError, match=r"on s3://bucket/runs failed for 0 s \(Unreachable"):
        out.close()
    assert not (tmp_path / "snapshot.json").exists()
    assert not list(tmp_path.glob("m2d-put-*"))


def test_a_read_through_the_handler_waits_out_an_outage_not_taken_for_a_missing_file(
    tmp_path, no_waits
):
    (tmp_path / "trainer_state.json").write_text('{"world_size": 2}')
    flaky = FlakyReads(failures=2)
    fs = pyarrow.fs.PyFileSystem(RetryingHandler(flaky, 60, "s3://bucket/runs"))
    with fs.open_input_stream(str(tmp_path / "trainer_state.json")) as handle:
        assert handle.read() == b'{"world_size": 2}'
    assert no_waits == [1.0, 2.0]
    with pytest.raises(FileNotFoundError):  # an answer: raised at once
        fs.open_input_file(str(tmp_path / "missing.json"))
    assert no_waits == [1.0, 2.0]


class _Storage:
    """The two things of Ray Train's StorageContext that an upload uses."""

    def __init__(self, fs: pyarrow.fs.FileSystem, root: Path) -> None:
        self.storage_filesystem, self.root = fs, root

    def build_checkpoint_path_from_name(self, name: str) -> str:
        return str(self.root / name)


def _local_checkpoint(tmp_path: Path):
    import ray.train

    local = tmp_path / "local"
    (local / "deepspeed").mkdir(parents=True)
    (local / "deepspeed" / "shard.pt").write_bytes(b"x" * 1000)
    (local / "trainer_state.json").write_text("{}")
    return ray.train.Checkpoint.from_directory(str(local))


def test_a_checkpoint_upload_retries_each_file_and_a_lasting_failure_is_raised(tmp_path, no_waits):
    from trainer.checkpointing import upload_checkpoint

    checkpoint = _local_checkpoint(tmp_path)
    flaky = Flaky(failures=1, auto_mkdir=True)
    storage = _Storage(pyarrow.fs.PyFileSystem(RetryingHandler(flaky, 60, "s3://b")), tmp_path)
    stored = upload_checkpoint(checkpoint, "checkpoint_00000003", storage)
    assert stored.path == str(tmp_path / "checkpoint_00000003")
    assert (tmp_path / "checkpoint_00000003" / "deepspeed" / "shard.pt").stat().st_size == 1000
    assert (tmp_path / "checkpoint_00000003" / "trainer_state.json").read_text() == "{}"
    assert no_waits == [1.0]

    # pyarrow's copy_files (Ray's own upload) would report this one as saved.
    down = Flaky(failures=10**6, auto_mkdir=True)
    storage = _Storage(pyarrow.fs.PyFileSystem(RetryingHandler(down, 0, "s3://b")), tmp_path)
    with pytest.raises(
        StorageError, match=r"the upload of .*checkpoint_00000006/deepspeed/shard\.pt"
    ):
        upload_checkpoint(checkpoint, "checkpoint_00000006", storage)
