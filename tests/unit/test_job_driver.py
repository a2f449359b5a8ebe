"""The training job's driver: the model frameworks load in the workers only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_job_driver_hands_workers_the_loop_without_importing_it():
    # The driver pickles the entry point for Ray (by value when run as __main__); the
    # model frameworks load in the workers only.
    probe = (
        "import json, sys\n"
        "from ray import cloudpickle\n"
        "import trainer.job\n"
        "from ray.train.torch import TorchTrainer\n"
        "cloudpickle.loads(cloudpickle.dumps(trainer.job.train_worker))\n"
        "heavy = ('diffusers', 'transformers', 'deepspeed', 'trainer.loop', 'mask2dit.model')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
