"""Memory, FLOPs, time and cost of a training run, per GPU, from configs alone.

Every formula is written out, with its assumptions, in docs/planner.md; the names there
(Ψ, P, L, D, ...) are the names here. Nothing is imported that needs a GPU, torch or a
running service: a plan costs a few JSON reads.

Units: ``*_bytes`` are bytes, ``*_gib`` GiB (2**30 bytes), FLOPs are counted as one
multiply-add = 2 FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from infra.config import RunConfig, deep_merge
from infra.deepspeed_config import deepspeed_config
from mask2dit.policy import KeySet, resolve_policy
from mask2dit.tiny import spatial_compression
from orchestrator.plan.shapes import (
    Shapes,
    numel,
    t5_encoder_shapes,
    transformer_shapes,
    vae_shapes,
)

GIB = 2**30

# DeepSpeed 0.19's defaults for what m2d's generated config leaves unset
# (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000
PARAM_PERSISTENCE_THRESHOLD = 100_000
MAX_LIVE_PARAMETERS = 1_000_000_000
# ZeRO-1/2 pad the flat parameter group to a multiple of this times the world size
# (stage_1_and_2.py: nccl_start_alignment_factor).
ZERO2_ALIGNMENT = 2

# What the formulas cannot see, stated once (docs/planner.md, "Allowances").
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers
FRAGMENTATION = 0.10  # caching-allocator fragmentation, as a share of what is allocated
# One block's gradient working set in backward, in units of D x L elements: the FF
# hidden's gradient in and out (4 + 4) and the residual stream's (2).
BACKWARD_WORKSET = 10
# Saved for backward per block, in units of D x L elements (docs/planner.md lists all 23).
SAVED_PER_BLOCK = 23
# The VAE encoder (inference) keeps about this many feature maps of its widest level live.
VAE_LIVE_MAPS = 4
VAE_FRAME_BATCH = 8  # diffusers' AutoencoderKLCogVideoX encodes 8 frames at a time (+2 cached)


@dataclass(frozen=True)
class Accelerator:
    """One GPU model: memory and dense bf16 peak."""

    name: str
    memory_gib: float
    peak_tflops: float


# Vendor data sheets (dense bf16/fp16 tensor TFLOP/s, without sparsity). Ray names GPUs
# by detected model (`A100`), so an unlabelled A100 is taken as the 80 GB part.
ACCELERATORS: dict[str, Accelerator] = {
    "A100": Accelerator("A100-80G", 80.0, 312.0),
    "A100-80G": Accelerator("A100-80G", 80.0, 312.0),
    "A100-40G": Accelerator("A100-40G", 40.0, 312.0),
    "H100": Accelerator("H100-80G", 80.0, 989.0),
    "H200": Accelerator("H200", 141.0 * 1e9 / GIB, 989.0),
    "L40S": Accelerator("L40S", 48.0 * 1e9 / GIB, 362.0),
    "A10G": Accelerator("A10G", 24.0 * 1e9 / GIB, 70.0),
}


@dataclass(frozen=True)
class ModelConfigs:
    """The ``config.json`` contents of a CogVideoX folder's three parts."""

    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]


@dataclass(frozen=True)
class Sequence:
    """The token layout of one training sample (docs/method.md §3)."""

    num_scenes: int
    text_per_scene: int
    video_per_scene: int
    latent_frames: int
    latent_height: int
    latent_width: int

    @property
    def text_tokens(self) -> int:
        return self.num_scenes * self.text_per_scene

    @property
    def video_tokens(self) -> int:
        return self.num_scenes * self.video_per_scene

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.video_tokens


#: What lies on the GPU, by kind (the JSON's ``breakdown_gib``); their sum is the peak.
MEMORY_KINDS = ("params", "grads", "optimizer", "activations", "frozen", "buffers", "overhead")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU by kind; ``peak`` is what must fit."""

    params: int
    grads: int
    optimizer: int
    activations: int
    frozen: int
    buffers: int
    overhead: int
    cpu: int = 0  # offloaded to the node's host memory, per worker

    @property
    def peak(self) -> int:
        return sum(getattr(self, kind) for kind in MEMORY_KINDS)

    def gib(self) -> dict[str, float]:
        return {kind: round(getattr(self, kind) / GIB, 3) for kind in MEMORY_KINDS}


@dataclass(frozen=True)
class Plan:
    """What `m2d plan` reports for one run."""

    run: RunConfig
    accelerator: Accelerator | None
    sequence: Sequence
    parameters: dict[str, int]
    memory: Memory
    # The transformer's activations with checkpointing on and off (whichever the run uses).
    activations_by_checkpointing: dict[bool, int]
    step_flops: float
    step_seconds: float | None
    suggestion: list[str] | None = None

    @property
    def memory_gib(self) -> float | None:
        if self.run.plan.gpu_memory_gib:
            return self.run.plan.gpu_memory_gib
        return self.accelerator.memory_gib if self.accelerator else None

    @property
    def fits(self) -> bool:
        limit = self.memory_gib
        return limit is None or self.memory.peak <= limit * GIB

    @property
    def gpus(self) -> int:
        return self.run.workers.num_workers

    @property
    def stage_hours(self) -> float | None:
        if self.step_seconds is None:
            return None
        return self.run.recipe.steps * self.step_seconds / 3600

    @property
    def stage_gpu_hours(self) -> float | None:
        hours = self.stage_hours
        return None if hours is None else hours * self.gpus

    @property
    def cost_usd(self) -> float | None:
        price, gpu_hours = self.run.plan.usd_per_gpu_hour, self.stage_gpu_hours
        return None if price is None or gpu_hours is None else price * gpu_hours


def accelerator_of(run: RunConfig) -> Accelerator | None:
    """The profile's GPU, from ``plan`` overrides or the table by ``workers.gpu_type``."""
    if not run.workers.gpus_per_worker:
        return None
    known = ACCELERATORS.get(run.workers.gpu_type or "A100")
    memory = run.plan.gpu_memory_gib or (known.memory_gib if known else None)
    peak = run.plan.peak_tflops or (known.peak_tflops if known else None)
    if memory is None or peak is None:
        return None
    return Accelerator(run.workers.gpu_type or "GPU", memory, peak)


def sequence_of(run: RunConfig, configs: ModelConfigs) -> Sequence:
    """Tokens of one sample at the recipe's shape (CogVideoX's VAE: 8x spatial, 4x
    temporal)."""
    tcfg, recipe = configs.transformer, run.recipe
    spatial = spatial_compression(configs.vae)
    temporal = tcfg.get("temporal_compression_ratio", 4)
    patch = tcfg.get("patch_size", 2)
    frames = (recipe.frames - 1) // temporal + 1
    height, width = recipe.height // spatial // patch, recipe.width // spatial // patch
    return Sequence(
        num_scenes=recipe.num_scenes,
        text_per_scene=run.model.text_tokens,
        video_per_scene=frames * height * width,
        latent_frames=frames,
        latent_height=height,
        latent_width=width,
    )


def compute_bytes(run: RunConfig) -> int:
    """Bytes per element of the trained weights and activations."""
    return 4 if run.deepspeed.precision == "fp32" else 2


def zero_partition(shapes: Shapes, world: int, stage: int) -> tuple[int, int]:
    """(elements of this rank's optimizer partition, elements of parameters it holds).

    ZeRO-2 flattens the group, pads it to a multiple of 2 x world and keeps the whole
    flat buffer; ZeRO-3 pads each tensor to a multiple of world on its own, keeps its
    1/world share, and keeps tensors of at most 1e5 elements whole on every rank
    ("persistent").
    """
    if stage == 2:
        align = ZERO2_ALIGNMENT * world
        padded = math.ceil(numel(shapes) / align) * align
        return padded // world, padded
    sizes = [math.prod(s) for s in shapes.values()]
    partition = sum(math.ceil(n / world) for n in sizes)
    persistent = sum(n for n in sizes if n <= PARAM_PERSISTENCE_THRESHOLD)
    return partition, partition + persistent


def model_state_bytes(run: RunConfig, shapes: Shapes) -> tuple[int, int, int, int, int]:
    """(params, grads, optimizer, buffers, cpu) bytes per rank under the run's ZeRO."""
    ds, world, b = run.deepspeed, run.workers.num_workers, compute_bytes(run)
    zero = deepspeed_config(run)["zero_optimization"]
    partition, held = zero_partition(shapes, world, ds.zero_stage)
    params = held * b
    # Gradients: this rank's partition in the training dtype, and the fp32 copy the
    # optimizer step makes of it (none when training in fp32).
    grads_low, grads_fp32 = partition * b, (partition * 4 if b != 4 else 0)
    # AdamW's two moments and fp32 master weights: a copy of the partition, except that
    # ZeRO-3 steps an fp32 model's own partitions (stage3.py, _create_fp32_partitions).
    optimizer = (8 if ds.zero_stage == 3 and b == 4 else 12) * partition
    cpu = 0
    if ds.offload_optimizer == "cpu":
        # The step runs on the host: master weights, moments and fp32 gradients live
        # there, and reduced gradients are copied out as they arrive.
        cpu += optimizer + partition * 4
        optimizer, grads_low, grads_fp32 = 0, 0, 0
    buckets = REDUCE_BUCKET_SIZE * b * (2 if zero.get("overlap_comm") else 1)
    buffers = buckets if zero.get("contiguous_gradients") else 0
    if ds.zero_stage == 3:
        buffers += _live_parameters(shapes) * b
        if ds.offload_param == "cpu":  # the partitions go to the host, persistent ones stay
            cpu += partition * b
            params = (held - partition) * b
    return params, grads_low + grads_fp32, optimizer, buffers, cpu


def _live_parameters(shapes: Shapes) -> int:
    """ZeRO-3 gathers a block at a time, plus what it prefetches (bounded by DeepSpeed)."""
    block = sum(
        math.prod(s)
        for name, s in shapes.items()
        if name.startswith("transformer_blocks.0.") and math.prod(s) > PARAM_PERSISTENCE_THRESHOLD
    )
    return min(MAX_LIVE_PARAMETERS, block + min(PREFETCH_BUCKET_SIZE, block))


def saved_activation_elements(tcfg: dict[str, Any], seq: Sequence, checkpointing: bool) -> dict:
    """Elements (and fp32 statistics) saved for backward by one sample's forward.

    Returns ``{"low": elements in the compute dtype, "fp32": elements in fp32}``, the
    transformer's only (the loss and embeddings outside it are in ``outside``).
    """
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    heads, layers, tokens = tcfg["num_attention_heads"], tcfg["num_layers"], seq.tokens
    block_low = SAVED_PER_BLOCK * d * tokens
    # LayerNorm mean and rstd: norm1/norm2 on every token, QK-norm per head; attention's lse.
    block_fp32 = (2 * 2 + 2 * 2 * heads + heads) * tokens
    patch, channels = tcfg.get("patch_size", 2), tcfg.get("in_channels", 16)
    outside_low = (
        # norm_final's and norm_out's inputs, norm_out's scaled output, proj_out's input
        # (video tokens only: Mask2DiT.forward)
        4 * d * seq.video_tokens
        + tcfg.get("text_embed_dim", 4096) * seq.text_tokens  # text_proj's input
        + channels * patch * patch * seq.video_tokens  # patch_embed's input
    )
    outside_fp32 = 2 * 2 * seq.video_tokens  # norm_final's and norm_out's statistics
    if tcfg.get("use_rotary_positional_embeddings"):
        outside_fp32 += 2 * seq.video_tokens * tcfg["attention_head_dim"]  # RoPE cos, sin
    if checkpointing:
        # Each block keeps its inputs (the residual stream); backward recomputes one block.
        low = layers * d * tokens + block_low + outside_low
        fp32 = block_fp32 + outside_fp32
    else:
        low = layers * block_low + outside_low
        fp32 = layers * block_fp32 + outside_fp32
    return {"low": low, "fp32": fp32}


def activation_bytes(
    run: RunConfig, configs: ModelConfigs, seq: Sequence, checkpointing: bool
) -> int:
    """Peak activation bytes of one micro-batch: what is saved for backward, and one
    block's gradient working set."""
    tcfg, b = configs.transformer, compute_bytes(run)
    saved = saved_activation_elements(tcfg, seq, checkpointing)
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    workset = BACKWARD_WORKSET * d * seq.tokens * b
    per_sample = saved["low"] * b + saved["fp32"] * 4 + workset
    return run.deepspeed.micro_batch_per_gpu * per_sample


def vae_encode_bytes(run: RunConfig, configs: ModelConfigs) -> int:
    """Working set of encoding one micro-batch's scenes with the VAE (widest level)."""
    widest = configs.vae.get("block_out_channels", (128,))[0]
    frames = min(run.recipe.frames, VAE_FRAME_BATCH + 2)
    pixels = frames * run.recipe.height * run.recipe.width
    return VAE_LIVE_MAPS * widest * pixels * 4 * run.deepspeed.micro_batch_per_gpu  # fp32


def visible_pairs(seq: Sequence, policy: str) -> int:
    """(query, key) pairs the mask policy lets attention compute, for one sample."""
    rule = resolve_policy(policy)

    def keys(sees: KeySet) -> int:
        return (
            sees.own_text * seq.text_per_scene
            + sees.other_text * (seq.text_tokens - seq.text_per_scene)
            + sees.own_video * seq.video_per_scene
            + sees.other_video * (seq.video_tokens - seq.video_per_scene)
        )

    per_scene = seq.text_per_scene * keys(rule.text_sees) + seq.video_per_scene * keys(
        rule.video_sees
    )
    return seq.num_scenes * per_scene


def forward_flops(run: RunConfig, tcfg: dict[str, Any], seq: Sequence) -> float:
    """The transformer's forward FLOPs for one sample under the run's mask."""
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    tokens, layers = seq.tokens, tcfg["num_layers"]
    projections = 2 * tokens * 4 * d * d  # q, k, v, out
    feed_forward = 2 * tokens * 8 * d * d  # d -> 4d -> d
    attention = 4 * d * visible_pairs(seq, run.recipe.mask_policy)  # QK^T and PV
    patch, channels = tcfg.get("patch_size", 2), tcfg.get("in_channels", 16)
    embed = 2 * seq.video_tokens * d * channels * patch * patch * 2  # patch_embed, proj_out
    embed += 2 * seq.text_tokens * d * tcfg.get("text_embed_dim", 4096)
    return layers * (projections + feed_forward + attention) + embed


def plan_run(run: RunConfig, configs: ModelConfigs) -> Plan:
    """The memory, FLOPs and time of ``run`` per GPU (see docs/planner.md)."""
    shapes = transformer_shapes(configs.transformer)
    seq = sequence_of(run, configs)
    params, grads, optimizer, buffers, cpu = model_state_bytes(run, shapes)
    by_checkpointing = {c: activation_bytes(run, configs, seq, c) for c in (True, False)}
    activations = by_checkpointing[run.deepspeed.activation_checkpointing]
    parameters = {
        "transformer": numel(shapes),
        "text_encoder": numel(t5_encoder_shapes(configs.text_encoder)),
        "vae": numel(vae_shapes(configs.vae)),
    }
    frozen = 0
    found = run.data.stage_input(run.stage)
    on_the_fly = found is None or not found[0].endswith("_latents")
    if on_the_fly and not run.data.synthetic:
        # Videos and prompts are encoded in the step: T5 and the VAE stay on the GPU, in
        # fp32 whatever the training precision (trainer/loop.py).
        frozen = (parameters["text_encoder"] + parameters["vae"]) * 4
        activations = max(activations, vae_encode_bytes(run, configs))
    allocated = params + grads + optimizer + activations + frozen + buffers
    on_gpu = run.workers.gpus_per_worker > 0
    overhead = int(FRAGMENTATION * allocated + (CUDA_CONTEXT_GIB * GIB if on_gpu else 0))
    memory = Memory(params, grads, optimizer, activations, frozen, buffers, overhead, cpu)
    accelerator = accelerator_of(run)
    step_flops = 3 * forward_flops(run, configs.transformer, seq) * run.recipe.global_batch
    peak = accelerator.peak_tflops if accelerator else run.plan.peak_tflops
    step_seconds = None
    if peak:
        step_seconds = step_flops / (run.workers.num_workers * peak * 1e12 * run.plan.mfu)
    return Plan(
        run=run,
        accelerator=accelerator,
        sequence=seq,
        parameters=parameters,
        memory=memory,
        activations_by_checkpointing=by_checkpointing,
        step_flops=step_flops,
        step_seconds=step_seconds,
    )


# Changes `plan` may suggest, with what each costs in step time (docs/planner.md,
# "Suggestions"): recomputation redoes a forward (4/3 of 3 forwards); ZeRO-3 gathers the
# parameters twice per step; offloading moves the step (or the parameters) over PCIe.
_SLOWDOWN = {
    "deepspeed.activation_checkpointing=true": 4 / 3,
    "deepspeed.zero_stage=3": 1.1,
    "deepspeed.offload_optimizer=cpu": 1.3,
    "deepspeed.offload_param=cpu": 2.0,
}


def plan_with_suggestion(run: RunConfig, configs: ModelConfigs) -> Plan:
    """``plan_run``, and when it does not fit, the cheapest change that does."""
    found = plan_run(run, configs)
    if found.fits:
        return found
    return dataclasses.replace(found, suggestion=suggest(run, configs))


def suggest(run: RunConfig, configs: ModelConfigs) -> list[str] | None:
    """The cheapest ``--set`` changes (fewest GPU-hours, then fewest changes) that fit."""
    options = _candidates(run)
    best: tuple[float, int, list[str]] | None = None
    for size in range(1, len(options) + 1):
        for combo in itertools.combinations(options, size):
            changed = _with(run, [a for change in combo for a in change])
            if changed is None:
                continue
            plan = plan_run(changed, configs)
            if not plan.fits:
                continue
            slowdown = math.prod(_SLOWDOWN.get(a, 1.0) for change in combo for a in change)
            cost = (plan.stage_gpu_hours or 1.0) * slowdown
            assignments = [a for change in combo for a in change]
            if best is None or (cost, len(assignments)) < best[:2]:
                best = (cost, len(assignments), assignments)
        if best is not None:
            return best[2]
    return None


def _candidates(run: RunConfig) -> list[list[str]]:
    ds, workers = run.deepspeed, run.workers
    options: list[list[str]] = []
    if not ds.activation_checkpointing:
        options.append(["deepspeed.activation_checkpointing=true"])
    if ds.micro_batch_per_gpu > 1 and ds.micro_batch_per_gpu % 2 == 0:
        options.append(
            [
                f"deepspeed.micro_batch_per_gpu={ds.micro_batch_per_gpu // 2}",
                f"deepspeed.gradient_accumulation={ds.gradient_accumulation * 2}",
            ]
        )
    if workers.gpus_per_worker and ds.gradient_accumulation % 2 == 0:
        options.append(
            [
                f"workers.nodes={workers.nodes * 2}",
                f"workers.num_workers={workers.num_workers * 2}",
                f"deepspeed.gradient_accumulation={ds.gradient_accumulation // 2}",
            ]
        )
    if ds.zero_stage == 2:
        options.append(["deepspeed.zero_stage=3"])
    if workers.gpus_per_worker and ds.offload_optimizer == "none":
        options.append(["deepspeed.offload_optimizer=cpu"])
    if workers.gpus_per_worker and ds.offload_param == "none":
        # Parameter offload needs ZeRO-3; the combination search adds it when missing.
        options.append(["deepspeed.offload_param=cpu"])
    return options


def _with(run: RunConfig, assignments: list[str]) -> RunConfig | None:
    """``run`` with ``--set`` assignments applied, or None if that is not a valid run."""
    from orchestrator.profiles import parse_overrides

    try:
        return RunConfig.model_validate(deep_merge(run.model_dump(), parse_overrides(assignments)))
    except ValueError:
        return None
