"""The mask ablation's analysis (evaluation/ablation.py): "agreement if independent" pairs
scenes across different stories, so a policy whose backgrounds merely lean to a few - or
that starts every story from the same noise - is not credited with coordination; the
table summarizes every seed's stories; each target is met or missed by its margin."""

from __future__ import annotations

import pytest

from evaluation import ablation

NAVY, GRAY, RED = ("navy", "flat"), ("gray", "stripes"), ("maroon", "checker")


def test_a_background_fixed_by_position_agrees_as_much_shuffled():
    # Every story draws the same backgrounds at the same positions: whatever the stories,
    # pairs across stories agree as often as within them - here, never.
    stories = [[NAVY, GRAY, RED]] * 4
    assert ablation.independent_agreement(stories) == 0.0
    # ... and one background everywhere agrees shuffled too: no credit for coordination.
    assert ablation.independent_agreement([[NAVY] * 3] * 4) == 1.0


def test_coordinated_stories_agree_within_not_across():
    # Each story one background of its own (what v2 should learn), the three equally often.
    stories = [[b] * 3 for b in (NAVY, GRAY, RED)] * 2
    # Story pairs with the same background: 1 of the 5 others for each story.
    assert ablation.independent_agreement(stories) == pytest.approx(1 / 5)
    unreadable = [[(None, None)] * 3] * 3
    assert ablation.independent_agreement(unreadable) == 0.0
    assert ablation.independent_agreement([[NAVY] * 3]) is None  # one story: no pair


def _result(agreements: list[float], alignment: float = 0.5, leakage: float = 0.0) -> dict:
    fixed = [
        {"story": f"s{i}", "agreement": a, "alignment": alignment, "leakage": leakage}
        for i, a in enumerate(agreements)
    ]
    extend = [{"story": "s0", "context_agreement": 1.0, "alignment": alignment}]
    return {"fixed": fixed, "extend": extend, "backgrounds": [[NAVY] * 3, [GRAY] * 3]}


def test_the_table_pools_every_seeds_stories_and_keeps_each_seeds_mean():
    results = {("v2", 0): _result([1.0, 1.0]), ("v2", 1): _result([0.0, 0.0])}
    row = ablation.results_table(results, ["v2"])["v2"]
    assert row["stories"] == 4
    assert row["fixed"]["agreement"]["mean"] == 0.5
    assert {s: v["agreement"]["mean"] for s, v in row["per_seed"].items()} == {0: 1.0, 1: 0.0}
    # Stories navy, gray (seed 0), navy, gray (seed 1): each matches 1 of the 3 others.
    assert row["independent"] == pytest.approx(1 / 3)
    lines = ablation.table_lines({"v2": row})
    assert lines[2].startswith("| v2 | 4 | 0.50 [0.00, 1.00] | 0.33 | 0.50 [0.50, 0.50] |")
    assert lines[-1] == "- v2: seed 0: 1.00 / 0.50, seed 1: 0.00 / 0.50"


def test_each_target_is_met_or_missed_by_its_margin_and_unmeasured_ones_say_so():
    results = {
        ("isolated", 0): _result([0.1, 0.1], alignment=0.3),
        ("v2", 0): _result([0.9, 1.0], alignment=0.3),
        ("full", 0): _result([1.0, 1.0], alignment=0.25),
    }
    lines = ablation.targets(ablation.results_table(results, ["isolated", "v2", "full"]))
    assert lines == [
        "- v2 cross-scene agreement >= 0.95: 0.950, met (margin +0.000)",
        "- isolated agreement <= 0.35: 0.100, met (margin +0.250)",
        "- v2 own-prompt alignment >= full + 0.10: 0.300, MISSED (margin -0.050)",
        # Equal leakage is no difference: "above" is strict.
        "- leakage under full above v2's: 0.000, MISSED (margin +0.000)",
        "- v2 extended scene agrees with its context >= 0.9: 1.000, met (margin +0.100)",
    ]
    only_v2 = ablation.targets(ablation.results_table({("v2", 0): _result([1.0])}, ["v2"]))
    assert "- isolated agreement <= 0.35: not measured" in only_v2
