"""trainer.batches.PrefetchedBatches: reading ahead changes neither the batches nor resume.

The reference is the same source read without prefetching: the prefetched stream must
hand out the same batches in the same order, its ``state_dict`` must be the position
of the batches handed out (not of those read ahead), and a source error must reach the
consumer at the batch where it happened.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from datajobs.synth import synthesize
from infra.config import ClusterProfile, resolve_run
from infra.errors import DataError
from trainer.batches import ManifestStories, PrefetchedBatches, make_batches

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(str(out), stories=3, scenes=3, frames=17, height=32, width=32, seed=0)
    return out / "pretrain.jsonl"


def local_run(manifest: Path, prefetch: int):
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    overrides = {
        "storage": {"root": "/tmp/unused"},
        "data": {"pretrain": str(manifest), "prefetch": prefetch},
    }
    return resolve_run(profile, "local", "pretrain", overrides)


def batches_equal(a, b) -> bool:
    (videos_a, captions_a), (videos_b, captions_b) = a, b
    return captions_a == captions_b and all(
        torch.equal(x, y) for x, y in zip(videos_a, videos_b, strict=True)
    )


def test_prefetch_setting_chooses_the_reader(manifest):
    plain, ahead = local_run(manifest, 0), local_run(manifest, 3)
    assert isinstance(make_batches(plain, 0, 1), ManifestStories)
    prefetched = make_batches(ahead, 0, 1)
    assert isinstance(prefetched, PrefetchedBatches) and prefetched.depth == 3
    prefetched.close()


def test_same_batches_and_the_position_of_what_was_handed_out(manifest):
    run = local_run(manifest, 0)
    reference = ManifestStories(run, str(manifest), 1, 2)
    expected = [reference.next() for _ in range(7)]
    positions = []
    prefetched = PrefetchedBatches(ManifestStories(run, str(manifest), 1, 2), 3, 1)
    try:
        for i in range(4):
            assert batches_equal(prefetched.next(), expected[i])
            positions.append(prefetched.state_dict())
        # The reader is ahead by up to 3 batches, the position is not.
        resumed = ManifestStories(run, str(manifest), 1, 2)
        resumed.load_state_dict(positions[-1])
        assert batches_equal(resumed.next(), expected[4])
    finally:
        prefetched.close()
    # Positions are those of the unprefetched reader after the same batches.
    replay = ManifestStories(run, str(manifest), 1, 2)
    for position in positions:
        replay.next()
        assert position == replay.state_dict()


def test_restored_before_reading_resumes_there(manifest):
    run = local_run(manifest, 0)
    reference = ManifestStories(run, str(manifest), 0, 1)
    expected = [reference.next() for _ in range(5)]
    first = ManifestStories(run, str(manifest), 0, 1)
    for _ in range(3):
        first.next()
    prefetched = PrefetchedBatches(ManifestStories(run, str(manifest), 0, 1), 2, 1)
    prefetched.load_state_dict(first.state_dict())
    assert prefetched.state_dict() == first.state_dict()
    try:
        assert batches_equal(prefetched.next(), expected[3])
        assert batches_equal(prefetched.next(), expected[4])
        with pytest.raises(RuntimeError, match="restore before next"):
            prefetched.load_state_dict(first.state_dict())
    finally:
        prefetched.close()


class FailingSource:
    """Batches 0, 1, ... then a DataError at ``fail_at``; counts a skip per batch."""

    def __init__(self, fail_at: int) -> None:
        self.index, self.fail_at, self.closed = 0, fail_at, False

    def next(self):
        if self.index == self.fail_at:
            raise DataError("nothing in the manifest decodes")
        self.index += 1
        return self.index - 1

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]

    def skip_counts(self):
        return {"missing": self.index}

    def close(self):
        self.closed = True


def test_source_error_reaches_the_step_that_needs_the_batch():
    source = FailingSource(fail_at=2)
    prefetched = PrefetchedBatches(source, 4, 1)
    assert [prefetched.next(), prefetched.next()] == [0, 1]
    assert prefetched.skip_counts() == {"missing": 2}
    with pytest.raises(DataError, match="nothing in the manifest decodes"):
        prefetched.next()
    prefetched.close()
    assert source.closed
    assert prefetched.thread is not None and not prefetched.thread.is_alive()


def test_close_stops_a_reader_blocked_on_a_full_queue():
    prefetched = PrefetchedBatches(FailingSource(fail_at=10**9), 1, 1)
    assert prefetched.next() == 0
    prefetched.close()
    assert not prefetched.thread.is_alive()
    assert "m2d-prefetch" not in {t.name for t in threading.enumerate()}
