"""The evaluation metrics against answers known in advance: closed forms of the Fréchet
distance, an independent scipy computation, and embeddings built to score exactly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from evaluation.metrics import (
    bootstrap_interval,
    characters,
    extension_consistency,
    feature_statistics,
    frechet_distance,
    score_story,
    summarize,
)
from infra.errors import DataError


def _spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).standard_normal((200, 16))
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, np.diag(a), m2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(9 + 6.25 + 1 + 1 + 2.5**2)


def test_frechet_distance_equals_scipys_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    for dim in (2, 8, 64):
        s1, s2 = _spd(rng, dim), _spd(rng, dim)
        m1, m2 = rng.standard_normal(dim), rng.standard_normal(dim)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the textbook formula, independently
        reference = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-8)


def test_feature_statistics_are_float64_and_refuse_too_few_clips():
    features = np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))
    with pytest.raises(DataError, match=r"8 clips of 8-dimensional features.*9 at least"):
        feature_statistics(features[:8], what="reference set")


def _story(vectors, prompts=None):
    scenes = np.asarray(vectors, dtype=float)
    prompts = prompts or [f"scene {i}" for i in range(len(scenes))]
    return score_story("s", scenes, scenes, prompts)


def test_copies_of_one_scene_are_fully_consistent_and_unrelated_ones_are_not():
    same = _story([[1.0, 2.0, 3.0]] * 3)
    assert same.visual == pytest.approx(100.0) and same.semantic == pytest.approx(100.0)
    apart = _story(np.eye(3))
    assert apart.visual == pytest.approx(0.0) and apart.sequence == pytest.approx(50.0)
    # Scenes at 60 degrees from each other: cosine 0.5 for every pair.
    tilted = _story([[1, 0, 0], [0.5, np.sqrt(3) / 2, 0], [0.5, np.sqrt(3) / 6, np.sqrt(6) / 3]])
    assert tilted.visual == pytest.approx(50.0)


def test_semantic_consistency_is_each_scene_with_its_own_prompt():
    scenes = np.eye(3)
    texts = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # only scene 0 matches
    scores = score_story("s", scenes, texts, ["a", "b", "c"])
    assert scores.semantic == pytest.approx(100 / 3)
    assert scores.sequence == pytest.approx((scores.visual + scores.semantic) / 2)


def test_visual_consistency_split_by_shared_characters():
    prompts = [
        "Actor1 (a red fox) runs through snow",
        "Actor1 (a red fox) sleeps by Actor2 (an old owl)",
        "A quiet lake at dawn",
    ]
    assert characters(prompts[1]) == {"Actor1", "Actor2"} and not characters(prompts[2])
    scenes = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # only the fox scenes match
    scores = score_story("s", scenes, scenes, prompts)
    assert scores.visual_shared_character == pytest.approx(100.0)
    assert scores.visual_no_shared_character == pytest.approx(0.0)
    assert scores.visual == pytest.approx(100 / 3)
    none_shared = score_story("s", scenes, scenes, ["a", "b", "c"])
    assert none_shared.visual_shared_character is None


def test_extension_scores_the_new_scene_against_each_context_scene():
    got = extension_consistency(np.array([1.0, 0.0]), np.array([[2.0, 0.0], [1.0, 1.0]]))
    assert got == pytest.approx([100.0, 100 / np.sqrt(2)])


def test_bad_stories_are_refused_in_one_line():
    with pytest.raises(DataError, match="1 scene"):
        _story([[1.0, 0.0]])
    with pytest.raises(DataError, match="3 scenes but 2 prompts"):
        score_story("s", np.eye(3), np.eye(3), ["a", "b"])
    with pytest.raises(DataError, match="all zeros"):
        _story([[0.0, 0.0], [1.0, 0.0]])


def test_bootstrap_interval_holds_the_mean_and_is_seeded():
    values = list(np.random.default_rng(3).normal(60.0, 5.0, size=50))
    mean, low, high = bootstrap_interval(values, seed=7)
    assert low < mean < high and mean == pytest.approx(np.mean(values))
    # About 1.96 standard errors each side for a sample this size.
    half = 1.96 * np.std(values, ddof=1) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_interval(values, seed=7) == (mean, low, high)
    assert bootstrap_interval([42.0] * 5) == (42.0, 42.0, 42.0)


def test_summarize_counts_only_stories_that_have_the_metric():
    a = _story([[1.0, 0.0]] * 2, ["Actor1 (x) a", "Actor1 (x) b"])
    b = _story(np.eye(2))
    summary = summarize([a, b])
    assert summary["visual"]["n"] == 2 and summary["visual"]["mean"] == pytest.approx(50.0)
    assert summary["visual_shared_character"] == {
        "mean": 100.0,
        "low": 100.0,
        "high": 100.0,
        "n": 1,
    }
