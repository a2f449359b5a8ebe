"""The mask ablation's "agreement if independent" (benchmarks/mask_ablation.py): scenes
paired across different stories, so a policy whose backgrounds merely lean to a few - or
that starts every story from the same noise - is not credited with coordination."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mask_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("mask_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


NAVY, GRAY, RED = ("navy", "flat"), ("gray", "stripes"), ("maroon", "checker")


def test_a_background_fixed_by_position_agrees_as_much_shuffled(ablation):
    # Every story draws the same backgrounds at the same positions: whatever the stories,
    # pairs across stories agree as often as within them - here, never.
    stories = [[NAVY, GRAY, RED]] * 4
    assert ablation.independent_agreement(stories) == 0.0
    # ... and one background everywhere agrees shuffled too: no credit for coordination.
    assert ablation.independent_agreement([[NAVY] * 3] * 4) == 1.0


def test_coordinated_stories_agree_within_not_across(ablation):
    # Each story one background of its own (what v2 should learn), the three equally often.
    stories = [[b] * 3 for b in (NAVY, GRAY, RED)] * 2
    # Story pairs with the same background: 1 of the 5 others for each story.
    assert ablation.independent_agreement(stories) == pytest.approx(1 / 5)
    unreadable = [[(None, None)] * 3] * 3
    assert ablation.independent_agreement(unreadable) == 0.0
    assert ablation.independent_agreement([[NAVY] * 3]) is None  # one story: no pair
