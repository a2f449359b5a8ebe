"""Two jobs that open the same new MLflow experiment at once both start; the experiments m2d
opens are marked as model training, so MLflow's UI opens them on their runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS

from infra.config import TrackingConfig
from infra.tracking import _experiment_id

TRACKING = TrackingConfig(uri="http://127.0.0.1:5000", experiment="shared")


class RacingClient:
    """An MLflow client for which another job creates the experiment between our look and
    our create (as two jobs started together do)."""

    def __init__(self, error_code: int = RESOURCE_ALREADY_EXISTS) -> None:
        self.looks, self.error_code = 0, error_code

    def get_experiment_by_name(self, name: str):
        self.looks += 1
        return None if self.looks == 1 else SimpleNamespace(experiment_id="7")

    def create_experiment(self, name: str, artifact_location=None, tags=None) -> str:
        raise MlflowException(f"Experiment(name={name}) already exists.", self.error_code)


def test_the_loser_of_the_create_race_uses_the_winners_experiment():
    assert _experiment_id(RacingClient(), TRACKING) == "7"


def test_other_create_errors_are_not_swallowed():
    with pytest.raises(MlflowException):
        _experiment_id(RacingClient(INVALID_PARAMETER_VALUE), TRACKING)


def test_an_experiment_m2d_opens_is_one_of_model_training(tmp_path):
    """MLflow 3's UI opens an experiment of no kind on its GenAI traces ("no data"); one of
    kind custom_model_development on its runs. New experiments get the kind, and one made
    before (without it) gets it when m2d next opens it; a kind a user chose stays."""
    from mlflow.tracking import MlflowClient

    from infra.tracking import EXPERIMENT_KIND, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    Tracker.start(TrackingConfig(uri=uri, experiment="new"), "r1")
    assert client.get_experiment_by_name("new").tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    old = client.create_experiment("old")
    Tracker.start(TrackingConfig(uri=uri, experiment="old"), "r2")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND[0]: "genai_development"})
    Tracker.start(TrackingConfig(uri=uri, experiment="chosen"), "r3")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND[0]] == "genai_development"


def test_an_sft_run_is_linked_to_the_run_it_starts_from_not_nested(tmp_path):
    """Nesting (mlflow.parentRunId) folds the SFT run under the pretrain one in MLflow's
    runs table; a tag and a note with a link keep the lineage and the run in view."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from infra.run_folder import TrainerState, write_trainer_state
    from infra.tracking import STARTED_FROM, Tracker, open_run
    from orchestrator import profiles

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pretrain = Tracker.start(TrackingConfig(uri=uri, experiment="m2d"), "pre-run")
    checkpoint = tmp_path / "pre" / "checkpoint_00000004"
    checkpoint.mkdir(parents=True)
    write_trainer_state(checkpoint, TrainerState(world_size=1, mlflow_run_id=pretrain.run_id))
    clusters = Path(__file__).resolve().parents[2] / "clusters"
    run = profiles.resolve(
        profiles.load_profile(clusters / "local.yaml"),
        "sft",
        {"tracking": {"uri": uri, "experiment": "m2d"}, "storage": {"root": str(tmp_path)}},
    ).model_copy(update={"init_from": str(checkpoint)})
    (tmp_path / "sft").mkdir()
    sft = open_run(run, str(tmp_path / "sft"), "sft-run", {})
    tags = MlflowClient(uri).get_run(sft.run_id).data.tags
    assert tags[STARTED_FROM] == pretrain.run_id and "mlflow.parentRunId" not in tags
    experiment = MlflowClient(uri).get_experiment_by_name("m2d").experiment_id
    link = f"[pre-run](#/experiments/{experiment}/runs/{pretrain.run_id})"
    assert tags["mlflow.note.content"] == f"Started from {link}, checkpoint `{checkpoint}`."
