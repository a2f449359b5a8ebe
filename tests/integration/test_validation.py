"""Validation during training: renders from the training weights, logged into the run."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip
from training_runs import EVERY, STEPS, make_run, mlflow_client, whole_weights

pytestmark = pytest.mark.integration


def test_validation_renders_from_the_training_weights_into_the_run_at_its_steps(
    s3_pretrain, mlflow_server, synth_data, tmp_path
):
    """Validation every 2 steps (2 renders: one story, two seeds, a tiny CLIP scoring
    them), the run stopped at step 3 and resumed: the training run holds a contact sheet
    per render and the scores and cost at steps 2, 4 and 6, each once, the GIFs beside;
    and the weights are the uninterrupted run's without validation, bit for bit (renders
    draw from their own generators, with the engine's own module)."""
    from trainer.job import fit, read_run_folder

    encoder = tiny_clip(tmp_path / "clip")
    folder = tmp_path / "runs" / "validated"
    folder.mkdir(parents=True)
    config = folder / "run_config.json"
    validation = {
        "every": 2,
        "stories": 1,
        "seeds": [0, 1],
        "sampling_steps": 2,
        "encoder": "clip",
        "encoder_path": str(encoder),
    }
    for steps in (EVERY, STEPS):
        run = make_run(
            {"root": str(tmp_path / "runs")},
            mlflow_server,
            recipe__steps=steps,
            recipe__validation=validation,
            data__pretrain=str(synth_data / "pretrain.jsonl"),
        )
        config.write_text(run.model_dump_json())
        outcome = fit(read_run_folder(str(config)))
        assert outcome.error is None
    client, run_id = mlflow_client(mlflow_server), outcome.tracker.run_id
    steps = [2, 4, 6]
    for key in ("validation_s", "validation_overhead", "val_visual", "val_semantic"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == steps, key
    visual = client.get_metric_history(run_id, "val_visual")
    assert all(-100 <= m.value <= 100 for m in visual)
    story = "story_01"
    images = outcome.tracker.logged_images()
    wanted = {(f"validation/{story}/seed{seed}", step): 1 for seed in (0, 1) for step in steps}
    assert {k: v for k, v in images.items() if k[0].startswith("validation/")} == wanted
    for step in steps:
        listed = client.list_artifacts(run_id, f"validation/step_{step:08d}")
        assert sorted(a.path.rsplit("/", 1)[-1] for a in listed) == [
            f"{story}_seed0.gif",
            f"{story}_seed0.png",
            f"{story}_seed1.gif",
            f"{story}_seed1.png",
        ]
    ours = whole_weights(folder / f"checkpoint_{STEPS:08d}")
    theirs = whole_weights(s3_pretrain["local"] / f"checkpoint_{STEPS:08d}")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
