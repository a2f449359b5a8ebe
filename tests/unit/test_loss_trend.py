"""A training job ends with its loss trend: the mean loss of its first and last 20 steps,
from every step rank 0 logged to MLflow (a real sqlite store here), a restart's repeated
steps counted once."""

from __future__ import annotations

from infra.config import TrackingConfig
from infra.tracking import Tracker, loss_trend


def test_the_trend_compares_the_first_and_last_steps():
    assert loss_trend({step: 1.0 for step in range(39)}) is None  # too short to say
    losses = {step: 2.0 if step < 20 else 0.5 for step in range(100)}
    losses.update({step: 9.0 for step in range(50, 60)})  # the middle does not count
    assert loss_trend(losses) == (
        "loss 2.0000 -> 0.5000 (0.25x): the mean of the first and last 20 steps"
    )


def test_every_logged_step_counts_once_with_its_latest_value(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="trend")
    tracker = Tracker.start(tracking, "trend-test")
    rows = [(step, 1000 + step, {"loss": 4.0 if step <= 20 else 2.0}) for step in range(1, 41)]
    # A restart from the checkpoint at step 30 redoes steps 31-40, later, with other losses.
    rows += [(step, 5000 + step, {"loss": 1.0}) for step in range(31, 41)]
    tracker.log_rows(rows)
    history = tracker.metric_history("loss")
    assert sorted(history) == list(range(1, 41))
    assert history[35] == 1.0 and history[25] == 2.0
    # last 20 steps: 21-30 at 2.0 and 31-40 at 1.0
    assert loss_trend(history).startswith("loss 4.0000 -> 1.5000 (0.38x)")
