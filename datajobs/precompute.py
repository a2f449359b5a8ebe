"""``m2d data precompute --cluster NAME --stage STAGE --out URI`` (``python -m
datajobs.precompute --spec PRECOMPUTE_SPEC``): every clip of a stage's manifest through
the frozen CogVideoX VAE, every caption through T5, once.

The spec carries the stage's resolved run (profile + stage + ``--set``): its model, recipe
(frames, size, scenes, seed), precision and workers are what training would use. A Ray
Data pipeline runs ``num_actors`` encoder actors (each holding the frozen VAE and T5; on
GPUs when the profile's workers have them); each actor encodes whole shards of
``shard_size`` entries - pre-training clips, or SFT shots of every group - and writes them
(format: ``trainer.data.latents``). Frames are chosen as training does (the recipe's frames
at the largest stride up to 3, the 5%..95% span for pre-training clips, then resize and
center-crop to the recipe's size); the window of each entry is drawn once, seeded by the
recipe's seed and the entry.

Idempotent: a shard counts as finished once its ``.json`` sidecar exists, and finished
shards are skipped, so a killed job rerun with the same arguments resumes; the index is
written last. Bad samples are skipped and counted by reason (the manifest's and the video
reader's reasons); the counts are printed and, with tracking, logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from datajobs.shard_encoder import Item, ShardEncoder
from infra.config import StorageConfig
from infra.errors import ConfigError, DataError, M2DError, StorageError
from infra.job_entry import job_main
from infra.job_specs import PrecomputeSpec
from infra.logging import get_logger
from infra.ray_runtime import ray_session
from infra.storage import filesystem, is_remote, join
from mask2dit.tiny import BUILT_IN_SOURCES
from trainer.data.latents import SETTINGS, Entry, Settings, shard_uri, write_atomic, write_index
from trainer.data.manifest import SkipCounts, read_clips, read_shot_groups

__all__ = ["build_index", "main", "plan_items", "precompute", "prepare_out", "split_groups"]

log = get_logger("data.precompute")


# ---------------------------------------------------------------------------- planning


def manifest_sha1(uri: str, storage: StorageConfig | None) -> str:
    """Fingerprint of the manifest's bytes: a rerun on a changed manifest is refused."""
    fs, path = filesystem(uri, storage)
    try:
        return hashlib.sha1(fs.cat_file(path)).hexdigest()
    except FileNotFoundError:
        raise DataError(f"{uri}: manifest not found; check --manifest") from None


def plan_items(settings: Settings, storage: StorageConfig | None) -> tuple[list[Item], SkipCounts]:
    """Every entry to encode, in manifest order, and the manifest rows skipped."""
    if settings.stage == "pretrain":
        clips, skips = read_clips(settings.manifest, storage)
        return [Item(f"c{i:08d}", "", 0, clip) for i, clip in enumerate(clips)], skips
    groups, skips = read_shot_groups(settings.manifest, settings.num_scenes, storage)
    items = [
        Item(f"g{g:07d}s{s:04d}", group.id, s, shot)
        for g, group in enumerate(groups)
        for s, shot in enumerate(group.shots)
    ]
    return items, skips


def shard_tasks(items: list[Item], shard_size: int) -> list[tuple[str, list[Item]]]:
    """Consecutive runs of ``shard_size`` items, named by position (stable across reruns)."""
    return [
        (f"{n:06d}", items[start : start + shard_size])
        for n, start in enumerate(range(0, len(items), shard_size))
    ]


def prepare_out(out: str, settings: Settings, storage: StorageConfig | None) -> bool:
    """Claim ``out`` for these settings; True when it already holds this precompute.

    A folder with other settings, or one that is not a precompute's, is an error: nothing
    there is overwritten.
    """
    fs, path = filesystem(join(out, SETTINGS), storage)
    if fs.exists(path):
        existing = Settings.from_dict(json.loads(fs.cat_file(path)))
        differences = existing.differences(settings)
        if differences:
            raise ConfigError(
                f"{join(out, SETTINGS)}: {out} holds a precompute with other settings "
                f"({'; '.join(differences)}); rerun with those or choose another --out"
            )
        return True
    out_fs, out_path = filesystem(out, storage)
    if out_fs.exists(out_path) and out_fs.ls(out_path, detail=False):
        raise ConfigError(
            f"{out}: exists and is not a precompute folder (no {SETTINGS}); choose a new or "
            "empty --out, nothing there is overwritten"
        )
    try:
        write_atomic(join(out, SETTINGS), settings.to_json().encode(), storage)
    except OSError as exc:
        raise StorageError(f"{out}: cannot write there ({exc}); check --out") from None
    return False


def finished_shards(out: str, storage: StorageConfig | None) -> set[str]:
    """Names of the shards whose sidecar exists."""
    fs, path = filesystem(join(out, "shards"), storage)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {os.path.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}


# ---------------------------------------------------------------------------- the job


def run_pending(
    pending: list[tuple[str, list[Item]]],
    settings: Settings,
    out: str,
    storage: StorageConfig | None,
    pool: Pool,
) -> None:
    """Encode the pending shards on a pool of Ray Data actors, printing progress."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    with ray_session():
        DataContext.get_current().enable_progress_bars = False
        rows = [
            {"name": n, "items": json.dumps([i.to_dict() for i in items])} for n, items in pending
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        storage_json = storage.model_dump() if storage else None
        encoded = dataset.map_batches(
            ShardEncoder,
            batch_size=1,
            compute=ActorPoolStrategy(size=max(1, min(pool.num_actors, len(rows)))),
            fn_constructor_kwargs={
                "settings": asdict(settings),
                "storage": storage_json,
                "out": out,
                "device": pool.device,
            },
            num_cpus=1,
            num_gpus=pool.gpus_per_actor,
        )
        try:
            for done, row in enumerate(encoded.iter_rows(), start=1):
                print(
                    f"shard {row['name']}: {row['kept']} encoded, {row['skipped']} skipped "
                    f"({done}/{len(rows)})",
                    flush=True,
                )
        except Exception as exc:
            raise _user_error(exc) or exc from None


def _user_error(error: BaseException | None) -> M2DError | None:
    """The M2DError (bad model folder, storage...) inside Ray's wrappers, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, M2DError):
            # Ray subclasses the user's error per task; rebuild our own class from the text.
            ours = next(c for c in type(error).__mro__ if c.__module__.startswith("infra."))
            return ours(str(error).strip().splitlines()[-1])
        seen.add(id(error))
        error = error.__cause__ or getattr(error, "cause", None) or error.__context__
    return None


def build_index(
    out: str,
    settings: Settings,
    names: list[str],
    read_skips: SkipCounts,
    storage: StorageConfig | None = None,
) -> tuple[list[Entry], SkipCounts]:
    """Gather every shard's sidecar into ``index.parquet``; (entries, all skips)."""
    entries, skips = [], read_skips
    for name in names:
        fs, path = filesystem(shard_uri(out, name, "json"), storage)
        sidecar = json.loads(fs.cat_file(path))
        entries += [Entry(**e) for e in sidecar["entries"]]
        skips = skips.merge(SkipCounts(sidecar["skips"]))
    if settings.stage == "sft":
        entries = split_groups(entries, settings.num_scenes, skips)
    if not entries:
        raise DataError(
            f"{settings.manifest}: no clip could be encoded (skipped: {skips}); fix the "
            "manifest's paths and files"
        )
    write_index(out, settings, entries, skips, storage)
    return entries, skips


def split_groups(entries: list[Entry], num_scenes: int, skips: SkipCounts) -> list[Entry]:
    """SFT groups cut where a shot failed, parts shorter than ``num_scenes`` dropped.

    As ``trainer.data.manifest.read_shot_groups`` does for bad rows: the shots on either
    side of a bad one are not consecutive. A group left with no part counts as
    ``group_too_short``.
    """
    by_group: dict[str, list[Entry]] = {}
    for entry in entries:
        by_group.setdefault(entry.group, []).append(entry)
    kept = []
    for group, shots in by_group.items():
        runs: list[list[Entry]] = []
        for entry in sorted(shots, key=lambda e: e.shot):
            if runs and runs[-1][-1].shot == entry.shot - 1:
                runs[-1].append(entry)
            else:
                runs.append([entry])
        long_runs = [run for run in runs if len(run) >= num_scenes]
        if not long_runs:
            skips.add("group_too_short")
        for part, run in enumerate(long_runs):
            name = group if len(long_runs) == 1 else f"{group}/{part}"
            kept += [_with_group(e, name) for e in run]
    return kept


def _with_group(entry: Entry, group: str) -> Entry:
    return Entry(**{**asdict(entry), "group": group})


def precompute(
    settings: Settings,
    out: str,
    storage: StorageConfig | None,
    pool: Pool,
    runner: Callable[..., None] | None = None,
) -> dict:
    """The whole job: claim ``out``, encode pending shards, write the index; a summary.

    ``runner(pending, settings, out, storage, pool)`` encodes the pending shards
    (default: :func:`run_pending`, on Ray Data).
    """
    resumed = prepare_out(out, settings, storage)
    items, read_skips = plan_items(settings, storage)
    tasks = shard_tasks(items, settings.shard_size)
    finished = finished_shards(out, storage)
    pending = [(name, shard) for name, shard in tasks if name not in finished]
    if resumed:
        print(f"resuming {out}: {len(tasks) - len(pending)} of {len(tasks)} shards finished")
    if pending:
        (runner or run_pending)(pending, settings, out, storage, pool)
    entries, skips = build_index(out, settings, [n for n, _ in tasks], read_skips, storage)
    return {
        "items": len(items),
        "entries": len(entries),
        "shards": len(tasks),
        "encoded_shards": len(pending),
        "skips": skips,
    }


def log_to_mlflow(uri: str, experiment: str, settings: Settings, summary: dict) -> str:
    """One MLflow run with the settings as params and the counts as metrics; its id."""
    from infra.config import TrackingConfig
    from infra.tracking import Tracker, flatten

    tracker = Tracker.start(
        TrackingConfig(uri=uri, experiment=experiment),
        f"precompute-{settings.stage}",
        tags={"job": "precompute", "stage": settings.stage},
        params=flatten(asdict(settings)),
    )
    metrics = {k: summary[k] for k in ("items", "entries", "shards", "encoded_shards")}
    metrics.update({f"skipped_{k}": v for k, v in summary["skips"].as_dict().items()})
    metrics["skipped"] = summary["skips"].total
    tracker.log_metrics(metrics, step=0)
    tracker.finish()
    return tracker.run_id


def settings_from(spec: PrecomputeSpec) -> Settings:
    """What the job encodes with, from the spec's run; a ConfigError names what to fix."""
    run = spec.run
    source = run.model.source
    if source not in BUILT_IN_SOURCES and not is_remote(source) and not os.path.isdir(source):
        raise ConfigError(
            f"model.source {source}: no such folder; give a built-in model "
            f"({', '.join(BUILT_IN_SOURCES)}) or a diffusers CogVideoX folder (path or s3://)"
        )
    recipe, gpu = run.recipe, run.workers.gpus_per_worker > 0
    return Settings(
        manifest=spec.manifest,
        manifest_sha1=manifest_sha1(spec.manifest, run.storage),
        stage=run.stage,
        model_source=source,
        text_tokens=run.model.text_tokens,
        frames=recipe.frames,
        height=recipe.height,
        width=recipe.width,
        num_scenes=recipe.num_scenes,
        seed=recipe.seed,
        dtype=run.deepspeed.precision if gpu else "fp32",
        shard_size=spec.shard_size,
    )


@dataclass(frozen=True)
class Pool:
    """The encoder actors: how many, and where they run."""

    num_actors: int
    device: str
    gpus_per_actor: float


def pool_of(spec: PrecomputeSpec) -> Pool:
    """One actor per worker of the run (unless the spec says), on its GPU if it has one."""
    workers = spec.run.workers
    gpu = workers.gpus_per_worker > 0
    return Pool(spec.num_actors or workers.num_workers, "cuda" if gpu else "cpu", 1 if gpu else 0)


def main(argv: list[str] | None = None) -> int:
    """The job entry point: a ``PrecomputeSpec`` in, the shards and index written."""
    return job_main(PrecomputeSpec, _main, argv)


def _main(spec: PrecomputeSpec) -> None:
    run = spec.run
    settings = settings_from(spec)
    summary = precompute(settings, spec.out, run.storage, pool_of(spec))
    run_id = None
    if spec.tracking is not None:
        run_id = log_to_mlflow(spec.tracking.uri, spec.tracking.experiment, settings, summary)
    mlflow = f", mlflow run {run_id}" if run_id else ""
    print(
        f"precomputed {summary['entries']} of {summary['items']} {run.stage} entries in "
        f"{summary['shards']} shards ({summary['encoded_shards']} encoded now) to {spec.out}; "
        f"skipped: {summary['skips']}{mlflow}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
