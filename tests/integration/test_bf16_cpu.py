"""The GPU's dtype path, run on CPU (issue 16, point 4).

CPU workers honour ``precision: bf16``: the frozen VAE and T5, the latents, the noising,
the modulation and the loss stay float32 and the transformer's blocks run in bf16 under
DeepSpeed's bf16 ZeRO-2 engine with per-block activation checkpointing - the path a GPU
profile takes. And a GPU profile whose worker sees no CUDA device fails naming the node
instead of quietly training on its CPU.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

import mask2dit.blocks as blocks
import mask2dit.model as model_module
import trainer.loop as loop
from infra.config import ClusterProfile, resolve_run
from infra.errors import ConfigError
from infra.processes import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _run(**overrides):
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
    )
    settings = {
        "workers": {"num_workers": 1},
        "deepspeed": {"precision": "bf16", "activation_checkpointing": True, "zero_stage": 2},
        "data": {"synthetic": True, "prefetch": 0},
        "recipe": {"global_batch": 1, "warmup_steps": 0, "steps": 3},
    }
    for section, values in overrides.items():
        settings.setdefault(section, {}).update(values)
    return resolve_run(profile, "local", "pretrain", settings)


@pytest.fixture
def process_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_three_bf16_zero2_steps_with_checkpointing_on_cpu(process_group, monkeypatch):
    seen: dict[str, set] = {}

    def record(name, tensor):
        seen.setdefault(name, set()).add(tensor.dtype)

    # The same batch, noise and timestep every step, so the loss must fall as it learns.
    monkeypatch.setattr(loop, "step_seed", lambda *args: 1234)
    real_encode, real_block, real_modulation = (
        loop.encode_batch,
        blocks.block_forward,
        blocks.modulation,
    )

    def encode(*args, **kwargs):
        latents, scene_frames, text = real_encode(*args, **kwargs)
        record("latents", latents), record("text", text)
        return latents, scene_frames, text

    def block(block_module, video, text, *args):
        record("block input", video)
        return real_block(block_module, video, text, *args)

    def modulation(*args):
        out = real_modulation(*args)
        record("modulation", out[0])
        return out

    real_loss = loop.task_loss

    def task_loss(pred, target, *args):
        record("prediction", pred), record("target", target)
        out = real_loss(pred, target, *args)
        record("loss", out.loss)
        return out

    monkeypatch.setattr(loop, "encode_batch", encode)
    monkeypatch.setattr(model_module, "block_forward", block)
    monkeypatch.setattr(blocks, "modulation", modulation)
    monkeypatch.setattr(model_module, "modulation", modulation)
    monkeypatch.setattr(loop, "task_loss", task_loss)

    worker = loop.Worker(_run(), {}, rank=0, world=1)
    first = worker.batches.next()
    worker.batches.next = lambda: first
    losses = [worker.train_step()["loss"] for _ in range(3)]

    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] > losses[1] > losses[2], losses
    module = worker.engine.module
    assert worker.engine.bfloat16_enabled()
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert module.transformer.gradient_checkpointing
    assert {p.dtype for p in worker.parts.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in worker.parts.text_encoder.parameters()} == {torch.float32}
    assert seen == {
        "latents": {torch.float32},
        "text": {torch.float32},
        "modulation": {torch.float32},
        "block input": {torch.bfloat16},
        "prediction": {torch.bfloat16},
        "target": {torch.float32},
        "loss": {torch.float32},
    }
    # DeepSpeed keeps fp32 master weights of the bf16 model.
    masters = worker.engine.optimizer.single_partition_of_fp32_groups
    assert masters and all(m.dtype == torch.float32 for m in masters)


def test_a_gpu_profile_without_a_cuda_device_fails_naming_the_node():
    from trainer.engine import device_and_dtype

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = resolve_run(
        ClusterProfile.model_validate(
            yaml.safe_load((ROOT / "clusters" / "a100x8.yaml").read_text())
        ),
        "a100x8",
        "pretrain",
    )
    with pytest.raises(ConfigError) as raised:
        device_and_dtype(run)
    message = str(raised.value)
    assert f"node {platform.node()}" in message and "no CUDA device" in message
    assert "\n" not in message
    assert device_and_dtype(_run()) == (torch.device("cpu"), torch.bfloat16)
    assert device_and_dtype(_run(deepspeed={"precision": "fp32"}))[1] == torch.float32
