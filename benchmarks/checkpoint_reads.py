"""Bytes a checkpoint's readers take, before and after the weights file: SFT start, sampling
and export, and resume - measured on a real checkpoint of the tiny model, projected for
CogVideoX-5B on the ``a100x64`` layout (64 ranks, 8 per node, ZeRO-2, bf16).

Before, every SFT rank (and every sampler actor, and export) fetched the whole checkpoint
folder and merged its ZeRO shards; a resume from an object store copied the whole folder
to every node (Ray's ``Checkpoint.as_directory``). Now the weights file alone is read, by
rank 0 only at SFT start (broadcast to the others), and a resuming node takes the shared
files once and each rank only its own shards (``trainer.checkpointing.resume_view``).
``tests/integration/test_train.py`` counts these bytes per process through a proxy in
front of the S3 API server; this script states them as sizes.

    python benchmarks/checkpoint_reads.py                        # trains a 2-step tiny run
    python benchmarks/checkpoint_reads.py --checkpoint runs/NAME/checkpoint_00000200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.checkpoint_layout import WEIGHTS  # noqa: E402
from trainer.checkpointing import WEIGHTS_DIR, _owner  # noqa: E402

GB = 1e9


def train_tiny(root: Path) -> Path:
    """A 2-step ZeRO-2 run of the `local` profile on 2 workers; its checkpoint folder."""
    from infra.config import ClusterProfile, resolve_run
    from infra.job_entry import spec_argv
    from infra.job_specs import SynthSpec, TrainJobSpec

    data = root / "data"
    synth = SynthSpec(out=str(data), stories=2, scenes=3, frames=17, height=32, width=32)
    subprocess.run([sys.executable, "-m", "datajobs.synth", *spec_argv(synth)], check=True)
    profile = ClusterProfile.model_validate(
        yaml.safe_load((ROOT / "clusters/local.yaml").read_text())
    )
    run = resolve_run(
        profile,
        "local",
        "pretrain",
        {
            "recipe": {"steps": 2, "warmup_steps": 1},
            "fault_tolerance": {"checkpoint_every": 2, "max_failures": 0},
            "storage": {"root": str(root / "runs")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "reads"},
            "data": {"pretrain": str(data / "pretrain.jsonl")},
        },
    )
    folder = root / "runs" / "reads"
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(run.model_dump_json())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    spec = TrainJobSpec(config=str(folder / "run_config.json"))
    subprocess.run(
        [sys.executable, "-m", "trainer.job", *spec_argv(spec)],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    return folder / "checkpoint_00000002"


def measured(checkpoint: Path, ranks_per_node: int) -> dict[str, float]:
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in checkpoint.rglob("*")
        if p.is_file()
    }
    world = json.loads((checkpoint / "trainer_state.json").read_text())["world_size"]
    whole = sum(files.values())
    shared = sum(s for f, s in files.items() if _owner(f) is None and not f.startswith(WEIGHTS_DIR))
    own = [sum(s for f, s in files.items() if _owner(f) == r) for r in range(world)]
    return {
        "world": world,
        "whole": whole,
        "weights": files[WEIGHTS],
        "optimizer": sum(s for f, s in files.items() if "optim_states" in f),
        "sft_per_rank_before": whole,
        "sft_job_before": whole * world,
        "sft_job_after": files[WEIGHTS],
        "resume_node_before": whole,
        "resume_node_after": shared + sum(own[:ranks_per_node]),
    }


def projected_5b(ranks: int = 64, per_node: int = 8) -> dict[str, float]:
    """bf16 ZeRO-2 with Adam: model states 2P (rank 0's module), optimizer shards 12P in
    all (fp32 master, exp_avg, exp_avg_sq), weights file 2P, rank files ~0."""
    from orchestrator.plan.shapes import numel, transformer_shapes

    config = ROOT / "orchestrator/plan/model_configs/CogVideoX-5b/transformer/config.json"
    p = numel(transformer_shapes(json.loads(config.read_text())))
    whole = 2 * p + 12 * p + 2 * p
    return {
        "params": p,
        "sft_per_rank_before": 14 * p,  # the code then had no weights file
        "sft_job_before": 14 * p * ranks,
        "sft_job_after": 2 * p,
        "resume_node_before": whole,
        "resume_node_after": 2 * p + per_node * 12 * p / ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: train one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="m2d-reads-") as tmp:
        checkpoint = args.checkpoint or train_tiny(Path(tmp))
        tiny = measured(checkpoint, ranks_per_node=2)
    print(
        f"tiny checkpoint, {tiny['world']} ranks: {tiny['whole']:,} bytes in all, weights file "
        f"{tiny['weights']:,}, optimizer shards {tiny['optimizer']:,}"
    )
    print(
        f"  SFT start, whole job: before {tiny['sft_job_before']:,} B "
        f"({tiny['sft_per_rank_before']:,} per rank), after {tiny['sft_job_after']:,} B "
        f"(rank 0 only): {tiny['sft_job_before'] / tiny['sft_job_after']:.1f}x less"
    )
    print(
        f"  resume, per node: before {tiny['resume_node_before']:,} B, after "
        f"{tiny['resume_node_after']:,} B"
    )
    big = projected_5b()
    print(f"CogVideoX-5B ({big['params'] / 1e9:.2f}B params), 64 ranks, 8 per node, bf16 ZeRO-2:")
    print(
        f"  SFT start: before {big['sft_per_rank_before'] / GB:.0f} GB per rank, "
        f"{big['sft_job_before'] / GB:,.0f} GB in all; after {big['sft_job_after'] / GB:.1f} GB "
        f"once: {big['sft_job_before'] / big['sft_job_after']:.0f}x less"
    )
    print(
        f"  resume, per node: before {big['resume_node_before'] / GB:.0f} GB, after "
        f"{big['resume_node_after'] / GB:.1f} GB"
    )


if __name__ == "__main__":
    main()
