"""Webhook notifications (issue 29 point 6): each post one JSON object with the run, the
event and the MLflow link; no webhook set, no post; a webhook that fails or never answers
costs one warning - without its URL, a secret - and never raises."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from webhook import Receiver

from infra.notify import Notifier
from orchestrator import profiles

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"


def _run(**notify):
    loaded = profiles.load_profile(CLUSTERS / "local.yaml")
    return profiles.resolve(loaded, "sft", {"notify": {"webhook_env": "M2D_HOOK", **notify}})


def test_a_post_is_one_json_object_naming_the_run_and_the_event(monkeypatch):
    with Receiver() as hook:
        monkeypatch.setenv("M2D_HOOK", hook.url)
        notifier = Notifier(_run(), "r1", "http://mlflow/#/runs/1")
        notifier.post("checkpoint", step=50, checkpoint="/runs/r1/checkpoint_00000050")
        notifier.post("finished", step=100)
    first, second = hook.posts
    assert first.pop("time").endswith("Z")
    assert first == {
        "run": "r1",
        "stage": "sft",
        "cluster": "local",
        "mlflow": "http://mlflow/#/runs/1",
        "event": "checkpoint",
        "step": 50,
        "checkpoint": "/runs/r1/checkpoint_00000050",
    }
    assert (second["event"], second["step"]) == ("finished", 100)


def test_no_webhook_no_post(monkeypatch):
    with Receiver() as hook:
        monkeypatch.delenv("M2D_HOOK", raising=False)
        Notifier(_run(), "r1").post("started")
        monkeypatch.setenv("M2D_HOOK", "")
        Notifier(_run(), "r1").post("started")
        loaded = profiles.load_profile(CLUSTERS / "local.yaml")
        monkeypatch.setenv("M2D_HOOK", hook.url)
        Notifier(profiles.resolve(loaded, "sft", {}), "r1").post("started")
    assert hook.posts == []


@pytest.mark.parametrize("answer", [{"status": 500}, {"silent": True}])
def test_a_failing_webhook_costs_a_warning_not_the_run(monkeypatch, caplog, answer):
    with Receiver(**answer) as hook:
        monkeypatch.setenv("M2D_HOOK", hook.url)
        notifier = Notifier(_run(timeout_s=0.5), "r1")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="m2d.notify"):
            notifier.post("failed", error="RuntimeError: x")
        assert time.monotonic() - started < 5
    assert len(hook.posts) == 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "m2d.notify"]
    assert len(warnings) == 1 and "did not take the 'failed' post" in warnings[0]
    assert "SECRET-TOKEN" not in warnings[0] and "127.0.0.1" not in warnings[0]
