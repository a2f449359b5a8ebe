"""The DeepSpeed engine on a CPU worker: it trains, and it compiles nothing on the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# One process, a world of one over gloo: the `local` profile's engine, one step.
_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from infra.processes import free_port
port = free_port()
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
import yaml
from infra.config import ClusterProfile, resolve_run
from trainer.components import load_training_parts
from trainer.engine import build_engine
profile = ClusterProfile.model_validate(yaml.safe_load(open("clusters/local.yaml")))
run = resolve_run(profile, "local", "pretrain", {"workers": {"num_workers": 1},
                                                 "recipe": {"global_batch": 1, "warmup_steps": 0}})
parts = load_training_parts(run.model, None, "cpu", seed=0)
engine = build_engine(run, parts.transformer)
latents = torch.randn(1, 3, 4, 4, 4)
text = torch.randn(1, 16, parts.transformer.config.text_embed_dim)
before = [p.detach().clone() for p in engine.module.parameters()]
loss = engine(latents, text, torch.tensor([10]), [3]).square().mean()
engine.backward(loss)
engine.step()
moved = any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
import deepspeed.comm.comm as ds_comm
print(json.dumps({"moved": moved, "shm_op": ds_comm.cdb.shm_comm_op is not None}))
dist.destroy_process_group()
"""


def test_cpu_engine_steps_without_compiling_an_op(tmp_path):
    # A fresh extensions folder stands for a fresh machine: DeepSpeed's CPU backend
    # would compile its inference-only shared-memory all-reduce into it (about a minute).
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"moved": True, "shm_op": False}
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
