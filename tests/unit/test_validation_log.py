"""Logging one validation step into MLflow when an earlier attempt at the same step was
killed after its contact sheets went in and before its ``validation_s`` did: the restart
re-validates the step and must not put the same image in the run twice."""

from __future__ import annotations

import numpy as np

from infra.config import TrackingConfig
from infra.tracking import Tracker
from trainer.validation import Render, _log_validation


def _renders() -> list[Render]:
    frames = np.full((2, 8, 8, 3), 120, dtype=np.uint8)
    return [Render("story_01", seed, [frames, frames], {}) for seed in (0, 1)]


def _tracker(tmp_path) -> Tracker:
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="val")
    return Tracker.start(tracking, "train-test")


def test_a_step_logs_its_images_gifs_and_metrics(tmp_path):
    tracker = _tracker(tmp_path)
    _log_validation(tracker, _renders(), {"validation_s": 1.5}, step=3)
    keys = [f"validation/story_01/seed{seed}" for seed in (0, 1)]
    assert tracker.logged_images() == {(key, 3): 1 for key in keys}
    gifs = tracker.client.list_artifacts(tracker.run_id, "validation/step_00000003")
    assert sorted(
        entry.path.rsplit("/", 1)[1] for entry in gifs if entry.path.endswith(".gif")
    ) == [
        "story_01_seed0.gif",
        "story_01_seed1.gif",
    ]
    history = tracker.client.get_metric_history(tracker.run_id, "validation_s")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]


def test_a_restart_logs_only_the_images_the_killed_attempt_did_not(tmp_path):
    tracker = _tracker(tmp_path)
    first, second = _renders()
    # The killed attempt logged seed 0's sheet, then died before seed 1's and the metrics.
    _log_validation(tracker, [first], {}, step=3)
    _log_validation(tracker, [first, second], {"validation_s": 2.0}, step=3)
    keys = [f"validation/story_01/seed{seed}" for seed in (0, 1)]
    assert tracker.logged_images() == {(key, 3): 1 for key in keys}
    # The same story at the next validation step is a new image, not a duplicate.
    _log_validation(tracker, [first, second], {"validation_s": 2.0}, step=6)
    assert tracker.logged_images() == {(key, step): 1 for key in keys for step in (3, 6)}
