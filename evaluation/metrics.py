"""The numbers a checkpoint is judged by: the paper's consistency scores and FVD.

Per story (docs/method.md §8), from one video embedding per scene and one
text embedding per prompt, in percent as the paper prints them:

- visual consistency: the mean cosine similarity over every pair of the story's scenes;
- semantic consistency: the mean cosine similarity of each scene with its own prompt;
- sequence consistency: the mean of the two.

Beyond the paper, visual consistency restricted to the scene pairs whose prompts name a
common character (``ActorK (...)`` in both) and to the pairs that share none - high on
both means the scenes look alike whatever is in them (a frozen background), not that a
character keeps its identity - and, for extension-mode stories, the similarity of the
generated scene to each context scene.

Over a set of stories: the mean with a percentile-bootstrap 95% interval (stories
resampled with replacement, seeded). FVD: the Fréchet distance between Gaussians fitted
to the features of generated and of real clips, in float64, the matrix square root taken
through symmetric eigendecompositions (``sqrt(S1) S2 sqrt(S1)`` is symmetric positive
semi-definite, so its eigenvalues are real and clipped at 0; no complex parts to drop).

Shape legend: S scenes, D embedding size, N clips. NumPy only: no torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np

from infra.errors import DataError

__all__ = [
    "StoryScores",
    "bootstrap_interval",
    "characters",
    "extension_consistency",
    "feature_statistics",
    "frechet_distance",
    "score_story",
    "summarize",
    "summarize_rows",
]

# A named character as the evaluation stories write one: "Actor2 (a tall woman in red)".
_CHARACTER = re.compile(r"\b(Actor\d+)\s*\(")


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise DataError("an embedding is all zeros: its cosine similarity is undefined")
    return rows / norms


def _percent(value: float) -> float:
    return 100.0 * float(value)


def characters(prompt: str) -> set[str]:
    """The named characters (``ActorK``) a prompt describes."""
    return set(_CHARACTER.findall(prompt))


@dataclass(frozen=True)
class StoryScores:
    """One story's scores in percent; the character splits are None where the story
    has no such pair of scenes, semantic and sequence where the encoder embeds no text."""

    story: str
    visual: float
    semantic: float | None
    sequence: float | None
    visual_shared_character: float | None
    visual_no_shared_character: float | None

    def row(self) -> dict[str, float | str | None]:
        return asdict(self)


def score_story(
    story: str,
    scenes_SD: np.ndarray,
    prompts_SD: np.ndarray | None,
    prompts: list[str],
) -> StoryScores:
    """The scores of one story from its scene and prompt embeddings (same order; no
    prompt embeddings: no semantic consistency)."""
    scenes = _unit(scenes_SD)
    texts = scenes if prompts_SD is None else _unit(prompts_SD)
    if len(scenes) < 2:
        raise DataError(f"story {story}: {len(scenes)} scene(s); consistency needs two or more")
    if not (len(scenes) == len(texts) == len(prompts)):
        raise DataError(
            f"story {story}: {len(scenes)} scenes but {len(prompts)} prompts; every scene "
            "needs its prompt"
        )
    similarity = scenes @ scenes.T
    pairs = list(combinations(range(len(scenes)), 2))
    shared = [(i, j) for i, j in pairs if characters(prompts[i]) & characters(prompts[j])]
    unshared = [pair for pair in pairs if pair not in shared]
    visual = _percent(np.mean([similarity[i, j] for i, j in pairs]))
    semantic = None if prompts_SD is None else _percent(np.mean(np.sum(scenes * texts, axis=1)))

    def over(chosen: list[tuple[int, int]]) -> float | None:
        return _percent(np.mean([similarity[i, j] for i, j in chosen])) if chosen else None

    return StoryScores(
        story=story,
        visual=visual,
        semantic=semantic,
        sequence=None if semantic is None else (visual + semantic) / 2,
        visual_shared_character=over(shared),
        visual_no_shared_character=over(unshared),
    )


def extension_consistency(generated_D: np.ndarray, context_SD: np.ndarray) -> list[float]:
    """Similarity (percent) of a generated scene to each of its context scenes."""
    generated, context = _unit(generated_D), _unit(np.atleast_2d(context_SD))
    return [_percent(value) for value in context @ generated]


def bootstrap_interval(
    values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        raise DataError("no values to summarise")
    means = np.random.default_rng(seed).choice(data, size=(resamples, data.size)).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(data.mean()), float(low), float(high)


def summarize(stories: list[StoryScores], seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric over the stories: mean, 95% interval and how many stories count."""
    return summarize_rows([story.row() for story in stories], seed=seed)


def summarize_rows(
    rows: list[dict[str, float | str | None]], seed: int = 0
) -> dict[str, dict[str, float]]:
    """:func:`summarize` of score rows by name (``StoryScores.row()``, or a story oracle's
    scores): every name but ``story``, in the order first met, over the rows where it
    is not None."""
    names = dict.fromkeys(name for row in rows for name in row if name != "story")
    summary = {}
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        if not values:
            continue
        mean, low, high = bootstrap_interval(values, seed=seed)
        summary[name] = {"mean": mean, "low": low, "high": high, "n": len(values)}
    return summary


def feature_statistics(
    features_ND: np.ndarray, what: str = "features"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of N clips' D-dimensional features.

    A set of N <= D clips has a singular covariance, from which no Fréchet distance is
    meaningful: refused, saying how many clips it takes.
    """
    features = np.asarray(features_ND, dtype=np.float64)
    count, dim = features.shape
    if count <= dim:
        raise DataError(
            f"{what}: {count} clips of {dim}-dimensional features; the Fréchet distance "
            f"needs more clips than dimensions ({dim + 1} at least)"
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = _sqrt_psd(sigma1)
    product = root @ sigma2 @ root
    cross = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
