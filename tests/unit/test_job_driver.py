"""The jobs' drivers: the model frameworks load in the train workers and sample actors only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(probe: str) -> list[str]:
    """The modules of ``heavy`` (a name the probe defines) loaded when the probe ends."""
    probe += "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys\n" + probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_job_driver_hands_workers_the_loop_without_importing_it():
    # The driver pickles the entry point for Ray (by value when run as __main__); the
    # model frameworks load in the workers only.
    probe = (
        "from ray import cloudpickle\n"
        "import trainer.job\n"
        "from ray.train.torch import TorchTrainer\n"
        "cloudpickle.loads(cloudpickle.dumps(trainer.job.train_worker))\n"
        "heavy = ('diffusers', 'transformers', 'deepspeed', 'trainer.loop', 'mask2dit.model')\n"
    )
    assert _loaded_after(probe) == []


def test_the_sample_job_driver_plans_without_the_model_frameworks(tmp_path):
    # The driver checks the prompts and describes an exported transformer folder (its
    # JSON only), plans the 50 evaluation items and ships the actor class to Ray; the
    # pipeline's imports (diffusers, transformers) happen in the actors.
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # never read here
    probe = (
        "from ray import cloudpickle\n"
        "from infra.config import ModelConfig, StageRecipe, StorageConfig\n"
        "from infra.job_specs import CheckpointSpec, SampleJobSpec\n"
        "import infra.prompts, sampler.job\n"
        "spec = SampleJobSpec(\n"
        f"    cluster='local', checkpoints=[CheckpointSpec(label='a', uri={str(folder)!r})],\n"
        f"    prompts=infra.prompts.EVAL50, out={str(tmp_path / 'out')!r},\n"
        "    model=ModelConfig(source='tiny'), recipe=StageRecipe(),\n"
        f"    storage=StorageConfig(root={str(tmp_path / 'store')!r}))\n"
        "plan = sampler.job.prepare(spec)\n"
        "assert plan.infos['a'].kind == 'transformer' and len(plan.todo) == 50, plan.todo\n"
        "cloudpickle.loads(cloudpickle.dumps(sampler.job.StoryRenderer))\n"
        "heavy = ('diffusers', 'transformers', 'sampler.models', 'mask2dit.sampling.pipeline')\n"
    )
    assert _loaded_after(probe) == []
