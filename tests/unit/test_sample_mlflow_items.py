"""Which finished items a resumed sample-batch MLflow run holds already: an item counts once
its preview image is in the run (logged last, after its files), so an attempt killed
between an item's files and its image logs that image once, not twice."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image

from infra.config import TrackingConfig
from infra.tracking import Tracker
from sampler.batch import Item
from sampler.job import _image_key, _logged_items


def _plan(steps: dict[str, int], finished: list[Item]):
    infos = {label: SimpleNamespace(step=step) for label, step in steps.items()}
    return SimpleNamespace(infos=infos, finished=finished)


def _tracker(tmp_path) -> Tracker:
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="items")
    return Tracker.start(tracking, "sample-test")


def _log_image(tracker: Tracker, tmp_path, key: str, step: int) -> None:
    path = tmp_path / "contact.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    tracker.log_image(path, key=key, step=step)


def test_logged_images_counts_mlflow_image_artifacts_by_key_and_step(tmp_path):
    tracker = _tracker(tmp_path)
    for key, step in [("two_seed0", 7), ("two_seed0", 7), ("two_seed0", 0), ("a.b-c d", 3)]:
        _log_image(tracker, tmp_path, key, step)
    counts = tracker.logged_images()
    assert counts == {("two_seed0", 7): 2, ("two_seed0", 0): 1, ("a.b-c d", 3): 1}


def test_an_item_is_logged_when_its_image_is_in_the_run(tmp_path):
    tracker = _tracker(tmp_path)
    done, half = Item("ds-7", "two", 0), Item("ds-7", "two", 1)
    plan = _plan({"ds-7": 7}, [done, half])
    _log_image(tracker, tmp_path, *_image_key(plan, done))
    # ``half``'s files went in, then the attempt died before its image.
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "meta.json").write_text("{}")
    tracker.log_artifacts(tmp_path / "files", "samples/ds-7/two/1")
    assert _logged_items(tracker, plan) == {done}


def test_items_sharing_a_key_and_step_count_only_when_all_images_are_there(tmp_path):
    """Two checkpoints at the same step render the same story and seed: one image of the
    two is not enough to tell which item it belongs to, so both are logged again."""
    tracker = _tracker(tmp_path)
    a, b, other = Item("run-a", "two", 0), Item("run-b", "two", 0), Item("run-a", "two", 1)
    plan = _plan({"run-a": 100, "run-b": 100}, [a, b, other])
    _log_image(tracker, tmp_path, "two_seed0", 100)
    _log_image(tracker, tmp_path, "two_seed1", 100)
    assert _logged_items(tracker, plan) == {other}
    _log_image(tracker, tmp_path, "two_seed0", 100)
    assert _logged_items(tracker, plan) == {a, b, other}
