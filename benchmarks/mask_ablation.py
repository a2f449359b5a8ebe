"""The paper's mask ablation (docs/method.md §8) reproduced on the toy world with m2d's own
commands: ``data synth``, ``launch`` (pretrain, then SFT from it), ``sample-batch`` (fixed
and extend mode) and ``eval`` with the toy world's exact oracle. Writes docs/ablation.md.

    .venv/bin/python benchmarks/mask_ablation.py            # the whole experiment (make ablation)
    .venv/bin/python benchmarks/mask_ablation.py --quick    # a miniature: the pipeline only

Everything goes under ``--out`` (default ``experiments/mask-ablation``): the dataset, the
runs and their registry (``M2D_HOME=OUT/home``: ``M2D_HOME=OUT/home m2d runs`` lists
them), the samples, and the MLflow store ``OUT/mlflow.db``. Resumable: a finished step
is skipped, a run that stopped part-way is resumed (``m2d launch --resume``), and a
sample job keeps its finished items - a killed experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: keep it from shadowing ours.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

ROOT = Path(__file__).resolve().parents[1]

from evaluation.ablation import (  # noqa: E402
    EXTEND_METRICS,
    FIXED_METRICS,
    results_table,
    summarize,
    table_lines,
    targets,
)

M2D = [sys.executable, "-c", "from orchestrator.cli import main; main()"]

#: The policies trained, weakest cross-scene attention first. The paper's v1 is the
#: isolated end and v5 no mask; its v3 and v4 (docs/method.md §8) are not spelt out as
#: block rules there, so the two rules between v2 and full are ours, each opening one more
#: cross-scene block than v2 in the same direction (more cross-scene attention).
POLICIES: dict[str, str] = {
    "isolated": "isolated",
    "v2": "v2",
    "v2+text-sees-all-video": "text:own_text,own_video,other_video;"
    "video:own_text,own_video,other_video",
    "v2+video-sees-all-text": "text:own_text,own_video;"
    "video:own_text,other_text,own_video,other_video",
    "full": "full",
}


@dataclass(frozen=True)
class Row:
    """One row of the table: a mask policy and the training it gets. The mask ablation
    varies the policy under pre-training then SFT; the paper's training-settings ablation
    varies the training under v2 (``STAGE_ROWS``)."""

    name: str
    policy: str  # a key of POLICIES
    pretrain: bool = True
    sft: bool = True

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")


#: The paper's training-settings ablation, under v2: the pre-trained model sampled as it
#: is, and SFT from the model's own initial weights (``launch --from-base``: on the toy
#: model, its seeded random initialisation; in the paper, CogVideoX). The third setting,
#: both, is the v2 row of the mask ablation.
STAGE_ROWS = (
    Row("v2, pre-training only", "v2", sft=False),
    Row("v2, SFT only", "v2", pretrain=False),
)


@dataclass(frozen=True)
class Settings:
    """How big the experiment is (``--quick``: a miniature that checks the pipeline)."""

    stories: int = 400
    held_out: int = 50
    pretrain_steps: int = 1500
    sft_steps: int = 4500
    sample_steps: int = 25
    seeds: tuple[int, ...] = (0, 1)
    warmup_steps: int | None = None  # None: the toy profile's


QUICK = Settings(
    stories=8, held_out=3, pretrain_steps=4, sft_steps=4, sample_steps=2, seeds=(0,), warmup_steps=1
)


class Experiment:
    """The experiment's folder and the m2d commands it runs there."""

    def __init__(self, out: Path, settings: Settings, rows: list[Row]) -> None:
        self.out, self.settings, self.rows = out.resolve(), settings, rows
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(M2D_HOME=str(self.out / "home"), NO_COLOR="1")

    @property
    def data(self) -> Path:
        return self.out / "data"

    def m2d(self, *args: str) -> None:
        """One m2d command, its output passed through; a failure ends the experiment."""
        print(f"$ m2d {' '.join(args)}", flush=True)
        done = subprocess.run([*M2D, *args], cwd=ROOT, env=self.env)
        if done.returncode:
            raise SystemExit(f"m2d {args[0]} failed (exit {done.returncode}); rerun to resume")

    def common_sets(self) -> list[str]:
        sets = {
            "storage.root": str(self.out / "runs"),
            "tracking.uri": f"sqlite:///{self.out / 'mlflow.db'}",
            "tracking.experiment": "m2d-mask-ablation",
            "data.pretrain": str(self.data / "pretrain.jsonl"),
            "data.sft": str(self.data / "sft.jsonl"),
        }
        return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]

    # ------------------------------------------------------------------ steps

    def run(self) -> dict[tuple[str, int], dict]:
        """Every step, each skipped where it is done: the stories, every row's training
        for every seed, then the samples of all of them in one job per mode, scored. Per
        (row name, seed): the scored stories of each mode and the fixed mode's scene
        backgrounds."""
        self.synthesize()
        runs = {
            (row.name, seed): self.train(row, seed)
            for row in self.rows
            for seed in self.settings.seeds
        }
        samples = {
            mode: self.sample(list(dict.fromkeys(runs.values())), mode)
            for mode in ("fixed", "extend")
        }
        results = {}
        for key, run in runs.items():
            folders = {mode: sampled(root, run) for mode, root in samples.items()}
            results[key] = {
                **{mode: story_rows(folder) for mode, folder in folders.items()},
                "backgrounds": scene_backgrounds(folders["fixed"]),
            }
        return results

    def sampled_run(self, row: Row, seed: int) -> str:
        """The run whose last checkpoint ``row`` samples."""
        pre, sft = run_names(row, seed, self.settings)
        return sft if row.sft else pre

    def synthesize(self) -> None:
        if (self.data / "stories.jsonl").is_file():
            return
        s = self.settings
        self.m2d(
            "data",
            "synth",
            "--world",
            "toy",
            "--out",
            str(self.data),
            "--stories",
            str(s.stories),
            "--held-out",
            str(s.held_out),
        )

    def train(self, row: Row, seed: int) -> str:
        """Train ``row`` (pre-training, then SFT from it; or either alone); the name of the
        run whose last checkpoint the row samples."""
        pre, sft = run_names(row, seed, self.settings)
        recipe = ["--set", f"recipe.mask_policy={POLICIES[row.policy]}"]
        recipe += ["--set", f"recipe.seed={seed}"]
        if self.settings.warmup_steps is not None:
            recipe += ["--set", f"recipe.warmup_steps={self.settings.warmup_steps}"]
        if row.pretrain:
            self.launch("pretrain", pre, [], recipe, self.settings.pretrain_steps)
        if row.sft:
            source = ["--from", pre] if row.pretrain else ["--from-base"]
            self.launch("sft", sft, source, recipe, self.settings.sft_steps)
        return self.sampled_run(row, seed)

    def launch(self, stage: str, name: str, source: list[str], recipe: list[str], steps: int):
        """``m2d launch`` of one run, or ``--resume`` of one that stopped part-way; nothing
        for one that finished."""
        if self.finished(name):
            return
        if self.registered(name):
            self.m2d("launch", "--resume", name)
            return
        self.m2d(
            "launch",
            "--cluster",
            "toy",
            "--stage",
            stage,
            "--name",
            name,
            *source,
            *self.common_sets(),
            *recipe,
            "--set",
            f"recipe.steps={steps}",
            "--set",
            f"fault_tolerance.checkpoint_every={steps}",
        )

    def sample(self, runs: list[str], mode: str) -> Path:
        """The held-out stories rendered from each run's last checkpoint and scored, in one
        sample-batch job (one Ray Data pipeline; a rerun keeps every finished item):
        ``OUT/samples/MODE/RUN-stepN/``."""
        prompts = self.data / ("eval.jsonl" if mode == "fixed" else "eval_extend.jsonl")
        out = self.out / "samples" / mode
        if all(self.scored(out, run) for run in runs):
            return out
        checkpoints = [arg for run in runs for arg in ("--checkpoint", run)]
        self.m2d(
            "sample-batch",
            "--cluster",
            "toy",
            *checkpoints,
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--mode",
            mode,
            "--seeds",
            "0",
            "--steps",
            str(self.settings.sample_steps),
            "--guidance",
            "1.0",
            "--batch-size",
            "8",
            *self.common_sets(),
            "--eval",
            "--encoder",
            "evaluation.toy_oracle:oracle",
        )
        return out

    # ------------------------------------------------------------------ bookkeeping

    def scored(self, samples: Path, run: str) -> bool:
        """Whether every held-out story of ``run`` is rendered and scored under ``samples``."""
        tables = list(samples.glob(f"{run}-step*/stories.csv"))
        return len(tables) == 1 and len(story_rows(tables[0].parent)) == self.settings.held_out

    def registered(self, name: str) -> bool:
        return (self.out / "home" / "runs" / f"{name}.json").is_file()

    def finished(self, name: str) -> bool:
        path = self.out / "home" / "runs" / f"{name}.json"
        return path.is_file() and json.loads(path.read_text()).get("exit_code") == 0


def run_names(row: Row, seed: int, settings: Settings) -> tuple[str, str]:
    """The pre-training and SFT runs of a row and seed; the step counts are in the names,
    so a rerun with another budget trains anew rather than reusing a shorter run. The rows
    of one policy share its pre-training run; SFT from the base model has a name of its own."""
    tag = row.policy.replace("+", "-")
    pre = f"abl-{tag}-s{seed}-pre{settings.pretrain_steps}"
    base = "" if row.pretrain else "base-"
    return pre, f"abl-{tag}-s{seed}-{base}sft{settings.sft_steps}"


def sampled(samples: Path, run: str) -> Path:
    """The folder of ``run``'s samples under a sample-batch output (``RUN-stepN``)."""
    found = sorted(samples.glob(f"{run}-step*"))
    if len(found) != 1:
        raise SystemExit(f"{samples}: expected one folder of {run}'s samples, found {len(found)}")
    return found[0]


def story_rows(samples: Path) -> list[dict]:
    """Every scored story of one checkpoint's samples (its stories.csv)."""
    import csv

    with (samples / "stories.csv").open() as handle:
        return list(csv.DictReader(handle))


def scene_backgrounds(samples: Path) -> list[list[tuple]]:
    """Per story of one checkpoint's samples, each scene's (background, texture) as the
    oracle reads it."""
    from evaluation.toy_oracle import read_scene
    from infra.video import read_frames

    stories = []
    for meta_path in sorted(samples.glob("*/*/meta.json")):
        frames = json.loads(meta_path.read_text())["scene_frames"]
        scenes = [
            read_frames(str(meta_path.parent / f"scene_{i:02d}.mp4"), list(range(count)))
            for i, count in enumerate(frames)
        ]
        stories.append([(r.background, r.texture) for r in map(read_scene, scenes)])
    return stories


def plot(table: dict, path: Path) -> None:
    """Agreement (what no prompt says) against alignment (what each prompt says)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=100)
    for policy, row in table.items():
        a, b = row["fixed"].get("agreement"), row["fixed"].get("alignment")
        if a is None or b is None:
            continue
        axes.errorbar(
            b["mean"],
            a["mean"],
            xerr=[[b["mean"] - b["low"]], [b["high"] - b["mean"]]],
            yerr=[[a["mean"] - a["low"]], [a["high"] - a["mean"]]],
            fmt="o",
            capsize=3,
            label=policy,
        )
    from evaluation.toy_oracle import chance

    axes.axhline(chance(3)["agreement"], color="gray", linestyle=":", label="chance")
    axes.set_xlabel("own-prompt alignment (colour, shape and motion right)")
    axes.set_ylabel("cross-scene agreement of the unnamed background")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def contact_sheets(experiment: Experiment, rows: list[Row], folder: Path) -> dict:
    """One held-out story's contact sheet per row (seed 0's run), scaled up 8x."""
    from PIL import Image

    sheets = {}
    for row in rows:
        run = experiment.sampled_run(row, experiment.settings.seeds[0])
        found = sorted(sampled(experiment.out / "samples" / "fixed", run).glob("*/0/contact.png"))
        if not found:
            continue
        image = Image.open(found[0])
        image = image.resize((image.width * 8, image.height * 8), Image.NEAREST)
        target = folder / f"contact_{row.slug}.png"
        image.save(target)
        sheets[row.name] = (target, found[0].parent.parent.name)
    return sheets


def log_to_mlflow(experiment: Experiment, results: dict, table: dict) -> None:
    """One parent run for the experiment, a child per row and seed, in OUT/mlflow.db. A
    rerun logs into the same runs (found by the parent's ``m2d.ablation`` tag: the
    experiment's settings and rows), so a finished experiment run again adds no runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{experiment.out / 'mlflow.db'}")
    name = "m2d-mask-ablation"
    found = client.get_experiment_by_name(name)
    from infra.tracking import EXPERIMENT_KIND

    if found is None:  # one of model training: MLflow's UI opens it on its runs
        experiment_id = client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    else:
        experiment_id = found.experiment_id
    key = json.dumps([vars(experiment.settings), [r.name for r in experiment.rows]], default=list)
    parent = _run_tagged(client, experiment_id, "m2d.ablation", key) or client.create_run(
        experiment_id,
        run_name=f"mask-ablation-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"m2d.ablation": key},
    )
    rows = {row.name: row for row in experiment.rows}
    for name, summary in table.items():  # MLflow names allow no '+' or ',': the row's slug
        for metric, s in summary["fixed"].items():
            client.log_metric(parent.info.run_id, f"{rows[name].slug}/{metric}", s["mean"], step=0)
    for (name, seed), modes in results.items():
        row = rows[name]
        child = _run_tagged(
            client, experiment_id, "m2d.ablation.child", f"{parent.info.run_id}/{row.slug}-s{seed}"
        ) or client.create_run(
            experiment_id,
            run_name=f"{row.slug}-s{seed}",
            tags={
                "mlflow.parentRunId": parent.info.run_id,
                "m2d.ablation.child": f"{parent.info.run_id}/{row.slug}-s{seed}",
                "m2d.policy": POLICIES[row.policy],
                "m2d.stages": "+".join(s for s in ("pretrain", "sft") if getattr(row, s)),
                "m2d.training_run": experiment.sampled_run(row, seed),
            },
        )
        for mode, metrics in (("fixed", FIXED_METRICS), ("extend", EXTEND_METRICS)):
            for metric, s in summarize(modes[mode], metrics).items():
                client.log_metric(child.info.run_id, f"{mode}/{metric}", s["mean"], step=0)
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)


def _run_tagged(client, experiment_id: str, tag: str, value: str):
    """The run of the experiment whose ``tag`` is ``value``, or None."""
    quoted = value.replace("'", "\\'")
    found = client.search_runs([experiment_id], f"tags.`{tag}` = '{quoted}'", max_results=1)
    return found[0] if found else None


#: What follows this line in docs/ablation.md is written by hand and kept by a rerun.
NOTES_MARKER = "<!-- Notes below are written by hand; benchmarks/mask_ablation.py keeps them. -->"


def kept_notes(doc: Path) -> str:
    """The hand-written notes of an earlier report (from ``NOTES_MARKER`` on), or the
    marker alone."""
    text = doc.read_text() if doc.is_file() else ""
    found = text.find(NOTES_MARKER)
    return "\n" + (text[found:] if found >= 0 else NOTES_MARKER + "\n")


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def render(experiment, table, sheets, how: tuple[list[str], float, str]) -> str:
    argv, started, commit = how
    s = experiment.settings
    lines = [
        "# The mask ablation on the toy world",
        "",
        f"Run {time.strftime('%Y-%m-%d', time.gmtime())}, started at commit {commit}, "
        f"{(time.monotonic() - started) / 60:.0f} minutes on this machine:",
        "",
        f"    .venv/bin/python benchmarks/mask_ablation.py {' '.join(argv)}".rstrip(),
        "",
        f"{s.stories} training stories, {s.held_out} held-out ones; per policy and seed "
        f"({', '.join(map(str, s.seeds))}): {s.pretrain_steps} pre-training steps, then "
        f"{s.sft_steps} SFT steps from them (p = 0.5 extension); {s.sample_steps} DDIM "
        "steps, no guidance, each story from its own noise (`--noise story`). Each cell: "
        "mean [95% bootstrap interval] over the held-out stories of every seed; 'agreement "
        "if independent' pairs scenes of different stories (the policy's own background "
        "frequencies, no coordination). What the world is and why only cross-scene attention can "
        "make the unnamed background agree: `evaluation/toy_world.py`; how the oracle "
        "scores: `evaluation/toy_oracle.py`.",
        *(
            [
                "",
                "The rows 'v2, pre-training only' (v2's pre-training run, sampled as it is) "
                "and 'v2, SFT only' (SFT under v2 from the toy model's own seeded initial "
                f"weights, `m2d launch --from-base`, {s.sft_steps} steps) are the paper's "
                "training-settings ablation; its third setting, both, is the v2 row.",
            ]
            if any(not (row.pretrain and row.sft) for row in experiment.rows)
            else []
        ),
        "",
        *table_lines(table),
    ]
    lines += ["", "## Targets (issue 28)", "", *targets(table), "", "## Plot", ""]
    lines += ["![agreement against alignment](ablation/plot.png)", "", "## One story per row"]
    lines.append("")
    for policy, (path, story) in sheets.items():
        lines.append(f"{policy} (story {story}): ![{policy}](ablation/{path.name})")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "mask-ablation"))
    parser.add_argument("--quick", action="store_true", help="a miniature: the pipeline only")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--training-settings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the training-settings ablation under v2 (pre-training only, SFT only)",
    )
    parser.add_argument("--seeds", help="comma-separated training seeds (default 0,1)")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 1500)")
    parser.add_argument("--sft-steps", type=int, help="SFT steps (default 4500)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ablation.md"))
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; valid: {', '.join(POLICIES)}")
    settings = QUICK if args.quick else Settings()
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    for field in ("pretrain_steps", "sft_steps"):
        if getattr(args, field) is not None:
            settings = replace(settings, **{field: getattr(args, field)})
    rows = [Row(policy, policy) for policy in policies]
    if args.training_settings:
        rows += STAGE_ROWS
    experiment = Experiment(Path(args.out), settings, rows)
    started, commit = time.monotonic(), _commit()
    results = experiment.run()
    table = results_table(results, [row.name for row in rows])
    doc = Path(args.doc)
    figures = doc.parent / "ablation"
    figures.mkdir(parents=True, exist_ok=True)
    plot(table, figures / "plot.png")
    sheets = contact_sheets(experiment, rows, figures)
    log_to_mlflow(experiment, results, table)
    notes = kept_notes(doc)
    doc.write_text(
        render(experiment, table, sheets, (argv or sys.argv[1:], started, commit)) + notes
    )
    print(f"done in {time.monotonic() - started:.0f} s: {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
