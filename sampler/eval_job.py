"""``m2d eval --cluster NAME --samples URI`` (``python -m sampler.eval_job --spec EVAL_SPEC``):
score the stories a sample-batch job rendered, with the paper's consistency metrics.

Every finished item of the sample-batch layout (``OUT/<checkpoint>/<story>/<seed>/``, its
``meta.json`` there) is scored by a pool of Ray Data actors, one encoder each: its scenes'
video embeddings and its prompts' text embeddings give ``evaluation.metrics.score_story``
(extension-mode items also the new scenes' similarity to their context scenes); a story
oracle (``evaluation.encoders.StoryOracle``, e.g. ``evaluation.toy_oracle:oracle``) scores
every frame of the scenes itself, and its named scores replace those. An item's
scores go to its folder as ``scores.json`` (with the encoder that made them: a rerun with
the same encoder reuses them); then per checkpoint ``OUT/<checkpoint>/metrics.json``
(means with bootstrap 95% intervals) and ``stories.csv`` (one row per item), and
``OUT/metrics.json`` for all of them. With tracking on, each checkpoint's metrics go to
its training run at the checkpoint's step (``eval/visual``, ``eval/visual_low`` ...: the
dashboard plots them against training steps) and to the sample-batch job's run.

With ``reference`` (a manifest of real clips), each checkpoint also gets its FVD: the
Fréchet distance between Gaussians fitted to the FVD features (``fvd_features``, VideoMAE
by default) of its generated scenes and of the reference clips. The reference statistics
are computed once (on the same actors) and cached on storage under
``{storage.root}/fvd_reference/``, keyed by the features' model and the manifest's bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evaluation.metrics import (
    StoryScores,
    extension_consistency,
    feature_statistics,
    frechet_distance,
    score_story,
    summarize_rows,
)
from evaluation.tiny import TINY
from infra.errors import DataError, first_line
from infra.job_entry import job_main
from infra.job_specs import EvalSpec
from infra.logging import get_logger
from infra.ray_runtime import ray_session
from infra.run_folder import (
    ITEM_META,
    ItemMeta,
    ItemScores,
    read_item_meta,
    read_item_scores,
    write_item_scores,
)
from infra.storage import filesystem, is_remote, join

log = get_logger("sampler.eval_job")

METRICS = "metrics.json"
STORIES_CSV = "stories.csv"


@dataclass(frozen=True)
class Scored:
    """One item's scores (or why it has none) and what it was rendered from."""

    label: str
    uri: str
    meta: ItemMeta
    scores: dict[str, Any] | None
    skipped: str | None = None
    fvd_features: list[list[float]] | None = None


def encoder_record(spec: EvalSpec) -> dict[str, Any]:
    """What an item's scores depend on: the encoder, and the FVD features' model."""
    fvd = {"name": spec.fvd_features, "path": spec.fvd_path} if spec.reference else None
    return {"name": spec.encoder, "path": spec.encoder_path, "fvd": fvd}


def find_items(spec: EvalSpec) -> list[tuple[str, str]]:
    """(checkpoint label, item URI) of every finished item under ``spec.samples``."""
    fs, root = filesystem(spec.samples, spec.storage)
    root = root.rstrip("/")
    try:
        metas = sorted(fs.glob(f"{root}/*/*/*/{ITEM_META}"))
    except OSError as exc:
        raise DataError(f"--samples {spec.samples}: cannot list it ({first_line(exc)})") from None
    if not metas:
        raise DataError(
            f"--samples {spec.samples}: no finished sample-batch item (no */*/*/{ITEM_META}); "
            "give the --out folder of `m2d sample-batch`"
        )
    base = spec.samples.rstrip("/")
    items = []
    for meta in metas:
        label, story, seed = meta[len(root) + 1 :].split("/")[:3]
        items.append((label, f"{base}/{label}/{story}/{seed}"))
    return items


class ItemScorer:
    """Ray Data callable class: one encoder (or story oracle) per actor; a batch of items
    -> their scores (written into each item's folder)."""

    def __init__(self, spec_json: str) -> None:
        from evaluation.encoders import load_encoder, oracle_of, text_encoder_of

        self.spec = EvalSpec.model_validate_json(spec_json)
        self.encoder = load_encoder(self.spec.encoder, self.spec.encoder_path, self.spec.storage)
        self.oracle = oracle_of(self.encoder)
        self.text = text_encoder_of(self.encoder)
        self.fvd = None
        if self.spec.reference:
            self.fvd = load_encoder(self.spec.fvd_features, self.spec.fvd_path, self.spec.storage)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        skipped = [self._score(str(uri)) for uri in batch["uri"]]
        return {"uri": batch["uri"], "skipped": np.array(skipped, dtype=object)}

    def _score(self, uri: str) -> str:
        """Score one item into its ``scores.json``; '' or why it was skipped."""
        from infra.video import VideoError

        meta = read_item_meta(uri, self.spec.storage)
        try:
            scenes, fvd_features = self._read_scenes(uri, meta.scene_frames)
        except VideoError as exc:
            log.warning("skipped %s: %s", uri, exc)
            return exc.reason
        except DataError:
            return "too_short"
        prompts = list(meta.inputs.prompts)
        context = meta.context_scenes
        story, extension = meta.inputs.story, None
        if self.oracle is not None:
            found = self.oracle.score_story(scenes, prompts, context_scenes=context)
            scores = {"story": story, **found}
        else:
            scores, extension = self._consistency(story, scenes, prompts, context)
        record = ItemScores(
            encoder=encoder_record(self.spec),
            scores=scores,
            extension=extension,
            fvd_features=fvd_features if self.fvd is not None else None,
        )
        write_item_scores(uri, self.spec.storage, record)
        return ""

    def _read_scenes(self, uri: str, scene_frames: list[int]) -> tuple[list, list]:
        """Per scene what the scorer takes - an oracle every frame, an encoder its
        embedding - and the FVD features (lists) with a reference."""
        from infra.video import read_frames

        scenes, fvd_features = [], []
        for index, frames in enumerate(scene_frames):
            scene = f"{uri}/scene_{index:02d}.mp4"
            if self.oracle is None:
                scenes.append(clip_features(self.encoder, scene, int(frames), self.spec))
            elif int(frames) < 1:
                raise DataError(f"{scene}: no frames")
            else:
                scenes.append(read_frames(scene, list(range(int(frames))), self.spec.storage))
            if self.fvd is not None:
                fvd_features.append(clip_features(self.fvd, scene, int(frames), self.spec).tolist())
        return scenes, fvd_features

    def _consistency(
        self, story: str, embeddings: list, prompts: list[str], context: int
    ) -> tuple[dict[str, Any], list[float] | None]:
        """The paper's scores from the scenes' embeddings, and for an extension story each
        generated scene's mean similarity to the context scenes."""
        import numpy as np

        scenes = np.stack(embeddings)
        texts = self.text.embed_texts(prompts).numpy() if self.text is not None else None
        scores = score_story(story, scenes, texts, prompts).row()
        if not 0 < context < len(scenes):
            return scores, None
        extension = [
            float(np.mean(extension_consistency(scenes[i], scenes[:context])))
            for i in range(context, len(scenes))
        ]
        return scores, extension


def clip_features(encoder: Any, uri: str, frames: int, spec: EvalSpec):
    """``encoder``'s embedding (a NumPy vector) of the video at ``uri`` (``frames`` long),
    from frames spread evenly over it; DataError (VideoError) when it cannot be read."""
    from evaluation.encoders import uniform_frame_indices
    from infra.video import read_frames

    indices = uniform_frame_indices(frames, encoder.num_frames)
    frames_THWC = read_frames(uri, indices, spec.storage)
    return encoder.embed(frames_THWC.permute(0, 3, 1, 2)).numpy()


class ReferenceFeatures:
    """Ray Data callable class: the FVD features of real clips, one model per actor."""

    def __init__(self, spec_json: str) -> None:
        from evaluation.encoders import load_encoder

        self.spec = EvalSpec.model_validate_json(spec_json)
        self.fvd = load_encoder(self.spec.fvd_features, self.spec.fvd_path, self.spec.storage)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from infra.video import VideoError

        features, reasons = [], []
        for uri, frames in zip(batch["uri"], batch["num_frames"], strict=True):
            try:
                found = clip_features(self.fvd, str(uri), int(frames), self.spec)
                features.append(found.astype("float64").tobytes())
                reasons.append("")
            except VideoError as exc:
                features.append(b"")
                reasons.append(exc.reason)
            except DataError:
                features.append(b"")
                reasons.append("too_short")
        return {
            "features": np.array(features, dtype=object),
            "reason": np.array(reasons, dtype=object),
        }


def _reference_rows(spec: EvalSpec) -> tuple[list[dict[str, Any]], bytes]:
    """(rows {uri, num_frames} of the reference manifest, its bytes)."""
    assert spec.reference is not None
    fs, path = filesystem(spec.reference, spec.storage)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"--reference {spec.reference}: not found; give a JSONL manifest") from None
    base = spec.reference.rsplit("/", 1)[0]
    rows = []
    for number, line in enumerate(data.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            clip = row["path"]
            frames = int(row["num_frames"])
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"--reference {spec.reference}:{number}: not a JSON row with path and num_frames"
            ) from None
        absolute = is_remote(clip) or clip.startswith("/")
        rows.append({"uri": clip if absolute else join(base, clip), "num_frames": frames})
    return rows, data


def reference_statistics(spec: EvalSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    """Mean and covariance of the reference clips' FVD features, from the cache if there."""
    import numpy as np
    import ray.data

    rows, data = _reference_rows(spec)
    key = hashlib.sha256(
        json.dumps([spec.fvd_features, spec.fvd_path]).encode() + data
    ).hexdigest()[:24]
    root = spec.storage.root if spec.storage else spec.samples.rsplit("/", 1)[0]
    cached = join(root, f"fvd_reference/{key}.npz")
    fs, path = filesystem(cached, spec.storage)
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            saved = np.load(io.BytesIO(handle.read()))
            echo(f"reference statistics from {cached} ({int(saved['count'])} clips)")
            return {"mu": saved["mu"], "sigma": saved["sigma"], "count": int(saved["count"])}
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64) or 1)
    found = dataset.map_batches(
        ReferenceFeatures,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json()},
        batch_size=8,
        concurrency=min(spec.num_actors, len(rows)) or 1,
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor,
    )
    features = [
        np.frombuffer(r["features"], dtype=np.float64) for r in found.iter_rows() if r["features"]
    ]
    if not features:
        raise DataError(
            f"--reference {spec.reference}: none of its {len(rows)} clips could be read"
        )
    mu, sigma = feature_statistics(np.stack(features), what=f"--reference {spec.reference}")
    if len(features) < len(rows):
        echo(f"reference: {len(rows) - len(features)} of {len(rows)} clips skipped (unreadable)")
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, count=len(features))
    if not is_remote(cached):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    echo(f"reference statistics of {len(features)} clips cached in {cached}")
    return {"mu": mu, "sigma": sigma, "count": len(features)}


def score_items(spec: EvalSpec, todo: list[str]) -> dict[str, str]:
    """Score ``todo`` (item URIs) on the actor pool; why each skipped one was skipped."""
    import ray.data

    if not todo:
        return {}
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items([{"uri": uri} for uri in todo], override_num_blocks=len(todo))
    scored = dataset.map_batches(
        ItemScorer,
        fn_constructor_kwargs={"spec_json": spec.model_dump_json()},
        batch_size=1,
        concurrency=min(spec.num_actors, len(todo)),
        num_cpus=spec.cpus_per_actor,
        num_gpus=spec.gpus_per_actor,
    )
    return {row["uri"]: row["skipped"] for row in scored.iter_rows() if row["skipped"]}


def collect(spec: EvalSpec, items: list[tuple[str, str]], skipped: dict[str, str]) -> list[Scored]:
    found = []
    for label, uri in items:
        meta = read_item_meta(uri, spec.storage)
        record = read_item_scores(uri, spec.storage)
        usable = record is not None and uri not in skipped
        scores = record.scores if usable else None
        fvd = record.fvd_features if usable else None
        found.append(Scored(label, uri, meta, scores, skipped.get(uri), fvd))
    return found


def _fvd(scored: list[Scored], label: str, reference: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    scenes = [scene for item in scored for scene in item.fvd_features or []]
    mu, sigma = feature_statistics(np.asarray(scenes), what=f"{label}: generated scenes")
    value = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    return {"value": value, "generated": len(scenes), "reference": reference["count"]}


def _check_same_settings(scored: list[Scored], label: str) -> None:
    """One checkpoint's items must share their sampling settings: a mean over items of
    different step counts or sizes would be no one's number."""
    settings = {}
    for item in scored:
        inputs = item.meta.inputs
        key = json.dumps([inputs.mode, inputs.params, inputs.scheduler])
        settings.setdefault(key, item.uri)
    if len(settings) > 1:
        first, other = list(settings.values())[:2]
        raise DataError(
            f"{label}: its items were sampled with different settings ({first} and {other}); "
            "render them into separate --out folders and score each"
        )


def _summary(scored: list[Scored], spec: EvalSpec) -> dict[str, Any]:
    stories = [item.scores for item in scored if item.scores]
    skips: dict[str, int] = {}
    for item in scored:
        if item.skipped:
            skips[item.skipped] = skips.get(item.skipped, 0) + 1
    return {
        "checkpoint": scored[0].meta.checkpoint.model_dump(),
        "encoder": encoder_record(spec),
        "items": len(stories),
        "skipped": skips,
        "metrics": summarize_rows(stories, seed=spec.seed) if stories else {},
    }


def _csv(scored: list[Scored]) -> str:
    """One row per item: its scores (the paper's, or an oracle's), or why it has none."""
    named = dict.fromkeys(name for item in scored for name in item.scores or {})
    columns = list(named) or list(StoryScores.__dataclass_fields__)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["seed", *columns, "skipped"])
    writer.writeheader()
    for item in scored:
        inputs = item.meta.inputs
        row = dict(item.scores or {"story": inputs.story})
        writer.writerow({"seed": inputs.seed, **row, "skipped": item.skipped or ""})
    return out.getvalue()


def write_results(
    spec: EvalSpec, scored: list[Scored], reference: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """metrics.json and stories.csv per checkpoint, OUT/metrics.json; the summaries."""
    fs, root = filesystem(spec.samples, spec.storage)
    root = root.rstrip("/")
    summaries = {}
    for label in sorted({item.label for item in scored}):
        mine = [item for item in scored if item.label == label]
        _check_same_settings(mine, label)
        summaries[label] = _summary(mine, spec)
        if reference is not None:
            summaries[label]["fvd"] = _fvd(mine, label, reference)
        with fs.open(f"{root}/{label}/{METRICS}", "w") as handle:
            handle.write(json.dumps(summaries[label], indent=1))
        with fs.open(f"{root}/{label}/{STORIES_CSV}", "w") as handle:
            handle.write(_csv(mine))
    with fs.open(f"{root}/{METRICS}", "w") as handle:
        handle.write(json.dumps(summaries, indent=1))
    return summaries


def mlflow_metrics(summary: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """``eval/visual``, ``eval/visual_low``, ``eval/visual_high`` ... of one checkpoint."""
    metrics = {}
    for name, values in summary["metrics"].items():
        metrics[f"{prefix}{name}"] = values["mean"]
        metrics[f"{prefix}{name}_low"] = values["low"]
        metrics[f"{prefix}{name}_high"] = values["high"]
    if "fvd" in summary:
        metrics[f"{prefix}fvd"] = summary["fvd"]["value"]
    return metrics


def log_to_mlflow(spec: EvalSpec, summaries: dict[str, dict[str, Any]], echo) -> None:
    """Each checkpoint's metrics at its step: into its training run, and into the
    sample-batch job's run (keys carry the checkpoint's label there)."""
    from infra.tracking import Tracker, sample_run_of

    assert spec.tracking is not None
    sample_run = sample_run_of(spec.tracking, spec.samples)
    for label, summary in summaries.items():
        step = int(summary["checkpoint"].get("step") or 0)
        training = summary["checkpoint"].get("mlflow_run_id")
        if training:
            Tracker(spec.tracking.uri, training).log_metrics(mlflow_metrics(summary), step=step)
            echo(f"{label}: metrics logged to training run {training} at step {step}")
        if sample_run is not None:
            sample_run.log_metrics(mlflow_metrics(summary, f"eval/{label}/"), step=step)
    if sample_run is not None:
        echo(f"metrics logged to the sample-batch run {sample_run.run_id}")


def run(spec: EvalSpec, echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Score every unscored item, write the results; the summaries by checkpoint."""
    from evaluation.encoders import check_encoder

    check_encoder(spec.encoder, spec.encoder_path, spec.storage)
    if spec.reference:
        if not spec.fvd_path:
            raise DataError("--reference needs --fvd-path: the FVD features' model folder")
        check_encoder(spec.fvd_features, spec.fvd_path, spec.storage)
    items = find_items(spec)
    todo = []
    for _, uri in items:
        record = read_item_scores(uri, spec.storage)
        if spec.overwrite or not record or record.encoder != encoder_record(spec):
            todo.append(uri)
    echo(f"{len(todo)} item(s) to score, {len(items) - len(todo)} already scored")
    if TINY in (spec.encoder_path, spec.fvd_path):
        echo(
            "note: tiny random-weight encoder(s) (--encoder-path/--fvd-path tiny): the scores "
            "show the pipeline working, not video quality"
        )
    skipped, reference = {}, None
    if todo or spec.reference:
        with ray_session(num_cpus=max(2, spec.num_actors * spec.cpus_per_actor)):
            if todo:
                skipped = score_items(spec, todo)
            if spec.reference:
                reference = reference_statistics(spec, echo)
    summaries = write_results(spec, collect(spec, items, skipped), reference)
    for label, summary in summaries.items():
        metrics = summary["metrics"]
        # The paper's three where there are; an oracle's scores are all its own.
        names = [name for name in ("visual", "semantic", "sequence") if name in metrics]
        shown = ", ".join(
            f"{name} {metrics[name]['mean']:.2f} [{metrics[name]['low']:.2f}, "
            f"{metrics[name]['high']:.2f}]"
            for name in names or metrics
        )
        fvd = f"; FVD {summary['fvd']['value']:.2f}" if "fvd" in summary else ""
        echo(f"{label}: {summary['items']} item(s); {shown or 'no scores'}{fvd}")
    if spec.tracking is not None:
        log_to_mlflow(spec, summaries, echo)
    return summaries


def main(argv: list[str] | None = None) -> int:
    return job_main(EvalSpec, lambda spec: run(spec) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
