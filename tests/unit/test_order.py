"""Samplers: exact resume, disjoint shards, consecutive SFT windows, unrelated pretrain clips."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest
import torch

from infra.errors import DataError
from infra.video import write_video
from trainer.data.loader import StoryLoader, clip_frame_count, decode_clip
from trainer.data.manifest import Clip, ShotGroup
from trainer.data.order import PretrainOrder, SFTOrder, order_state


def clip(name: str) -> Clip:
    return Clip(f"/data/{name}.mp4", f"caption of {name}", 49, 8.0, 32, 32)


CLIPS = [clip(f"c{i:02d}") for i in range(20)]
# Groups of 3..8 shots; shot j of group g is "g{g}s{j}".
GROUPS = [ShotGroup(f"g{g}", tuple(clip(f"g{g}s{j}") for j in range(3 + g % 6))) for g in range(9)]


def make(kind: str, seed: int = 7, rank: int = 0, world_size: int = 1):
    if kind == "pretrain":
        return PretrainOrder(CLIPS, num_scenes=3, seed=seed, rank=rank, world_size=world_size)
    return SFTOrder(GROUPS, num_scenes=3, seed=seed, rank=rank, world_size=world_size)


def take(order, count: int):
    return [s for s in itertools.islice(order, count)]


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("cut", [0, 1, 5, 6, 7, 13, 20])
def test_resume_yields_exactly_the_uninterrupted_sequence(kind, cut):
    reference = take(make(kind, rank=1, world_size=2), 30)
    first = make(kind, rank=1, world_size=2)
    head = take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = make(kind, seed=999, rank=1, world_size=2)  # the saved seed wins
    resumed.load_state_dict(state)
    assert head + take(resumed, 30 - cut) == reference


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_ranks_share_an_epoch_without_overlap(kind):
    world_size = 3
    orders = [make(kind, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = len(orders[0])
    assert all(len(s) == per_rank for s in orders)
    epoch = [take(s, per_rank) for s in orders]
    ids = [story.id for stories in epoch for story in stories]
    assert len(ids) == len(set(ids)) == per_rank * world_size
    if kind == "pretrain":
        # 20 clips -> 6 stories of 3; 3 ranks x 2; every clip used at most once per epoch.
        used = [c.path for stories in epoch for story in stories for c in story.clips]
        assert per_rank == 2 and len(used) == len(set(used)) == 18
    else:
        # 9 groups -> 3 per rank, each group exactly once.
        groups = [story.id.split("@")[0] for stories in epoch for story in stories]
        assert per_rank == 3 and sorted(groups) == sorted(g.id for g in GROUPS)


def test_pretrain_stories_are_unrelated_random_clips_and_epochs_reshuffle():
    sampler = make("pretrain")
    epoch0, epoch1 = take(sampler, 6), take(sampler, 6)
    first = [c.path for story in epoch0 for c in story.clips]
    assert all(len(story.clips) == 3 for story in epoch0)
    assert len(set(first)) == 18 and set(first) <= {c.path for c in CLIPS}
    assert first != [c.path for c in CLIPS[:18]]  # shuffled, not manifest order
    assert first != [c.path for story in epoch1 for c in story.clips]  # new order per epoch
    assert sampler.state_dict()["epoch"] == 1


def test_sft_windows_are_consecutive_shots_of_one_group_at_varied_starts():
    sampler = make("sft")
    starts = set()
    for story in take(sampler, 9 * 6):
        group_id, rest = story.id.split("@")
        group = next(g for g in GROUPS if g.id == group_id)
        first = int(rest.split("/")[0])
        assert story.clips == group.shots[first : first + 3]
        starts.add((group_id, first))
    # Group g8 has 5 shots: windows 0..2 all occur over 6 epochs with this seed.
    assert {first for gid, first in starts if gid == "g8"} == {0, 1, 2}


def test_same_seed_same_order_other_seed_other_order():
    assert take(make("sft", seed=1), 9) == take(make("sft", seed=1), 9)
    assert take(make("pretrain", seed=1), 6) != take(make("pretrain", seed=2), 6)


def test_resume_on_another_world_size_continues_the_epoch_story_for_story():
    """Two ranks stop after a step each; one rank goes on with exactly the stories the
    two would have taken next, in the same order (global story k of the epoch)."""
    two = [make("pretrain", rank=r, world_size=2) for r in range(2)]
    seen = [s.id for sampler in two for s in take(sampler, 1)]  # global stories 0 and 1
    one = make("pretrain", world_size=1)
    one.load_state_dict(one.merged_state([json.loads(json.dumps(o.state_dict())) for o in two]))
    rest = [s.id for s in take(one, 4)]
    assert seen == ["pretrain/e0/0", "pretrain/e0/1"]
    assert rest == [f"pretrain/e0/{k}" for k in range(2, 6)]
    assert take(one, 1)[0].id == "pretrain/e1/0"  # the next epoch starts afresh


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 3), (3, 1), (2, 4)])
def test_with_the_same_global_batch_a_reshard_takes_the_uninterrupted_steps(old, new):
    """9 SFT groups on 2 ranks: an epoch of 4 steps of 2 stories, one group left out. Stopped
    after a step, the new ranks take, step by step, the stories the old ones would have
    taken, to the end of the epoch (leaving out what they would have) and into the next.
    (Where the new ranks cannot split the epoch's stories left evenly, they leave out a
    few more: an epoch of 9 on 1 rank goes on as 3 + 3 on 2.)"""
    global_batch = old * new  # whole on both sides

    def steps(orders, count):
        per_rank = global_batch // len(orders)
        return [sorted(s.id for o in orders for s in take(o, per_rank)) for _ in range(count)]

    uninterrupted = [make("sft", rank=r, world_size=old) for r in range(old)]
    stopped = [make("sft", rank=r, world_size=old) for r in range(old)]
    per_epoch = len(uninterrupted[0]) * old // global_batch
    expected = steps(uninterrupted, per_epoch + 1)
    before = steps(stopped, 1)
    merged = stopped[0].merged_state([o.state_dict() for o in stopped])
    resumed = [make("sft", rank=r, world_size=new) for r in range(new)]
    for order in resumed:
        order.load_state_dict(merged)
    assert before + steps(resumed, per_epoch) == expected


def _epoch(story_id: str) -> int:
    """The epoch in a story id: ``pretrain/e{epoch}/{k}`` or ``{group}@{first}/e{epoch}``."""
    return int(story_id.split("/")[1 if story_id.startswith("pretrain/") else -1][1:])


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3), (3, 2), (3, 4), (4, 1)])
@pytest.mark.parametrize("seed", range(6))
def test_a_reshard_repeats_and_skips_no_story_of_the_epoch(kind, old, new, seed):
    """Positions that differ (a rank that skipped a bad story took one more), cut anywhere,
    some ranks already in the next epoch: the old ranks' stories and the new ranks'
    stories to the end of the epoch are each story of the epoch at most once, and every
    story is taken but for the old and the new layout's remainders."""
    rng = random.Random(seed)
    orders = [make(kind, rank=r, world_size=old) for r in range(old)]
    per_rank = len(orders[0])
    base = rng.randrange(per_rank + 1)
    counts = [base + min(rng.choice([0, 0, 1, 2]), per_rank) for _ in range(old)]
    taken = [s.id for order, n in zip(orders, counts, strict=True) for s in take(order, n)]
    merged = orders[0].merged_state([json.loads(json.dumps(o.state_dict())) for o in orders])
    resumed = [make(kind, seed=999, rank=r, world_size=new) for r in range(new)]
    for order in resumed:
        order.load_state_dict(merged)
    epoch = merged["epoch"]
    for look_at in (epoch, epoch + 1):  # this epoch, then the next with what was taken early
        for order in resumed:
            taken.extend(s.id for s in _rest_of_epoch(order, look_at))
        ids = [t for t in taken if _epoch(t) == look_at]
        assert len(ids) == len(set(ids)), f"a story of epoch {look_at} was taken twice"
        total = make(kind).stories_per_epoch()
        assert total - (old - 1) - (new - 1) <= len(ids) <= total


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("seed", range(8))
def test_reshards_in_a_row_never_repeat_a_story(kind, seed):
    """2 -> 3 -> 1 -> 4 -> 2 ranks, each stop at uneven positions: within every epoch no
    story is taken twice, and no more than a layout's remainder is left out."""
    rng = random.Random(seed)
    worlds = [2, 3, 1, 4, 2]
    orders = [make(kind, rank=r, world_size=worlds[0]) for r in range(worlds[0])]
    taken: list[str] = []
    for world in worlds[1:]:
        per_rank = len(orders[0])
        base = rng.randrange(per_rank + 1)
        for order in orders:
            extra = min(rng.choice([0, 1, 2]), per_rank)
            taken.extend(s.id for s in take(order, base + extra))
        merged = orders[0].merged_state([json.loads(json.dumps(o.state_dict())) for o in orders])
        orders = [make(kind, rank=r, world_size=world) for r in range(world)]
        for order in orders:
            order.load_state_dict(merged)
    last = max(o.epoch for o in orders) + 1
    for order in orders:
        taken.extend(s.id for s in _rest_of_epoch(order, last))
    total = make(kind).stories_per_epoch()
    for epoch in range(last + 1):
        ids = [t for t in taken if _epoch(t) == epoch]
        assert len(ids) == len(set(ids)), f"a story of epoch {epoch} was taken twice"
    assert total - sum(worlds) < len([t for t in taken if _epoch(t) == last]) <= total


def _rest_of_epoch(order, epoch: int) -> list:
    """The stories ``order`` still takes in ``epoch`` (entering it if it is the next)."""
    stories = []
    while order.epoch < epoch or (order.epoch == epoch and order.position < order.per_rank):
        stories.append(next(order))
    return [s for s in stories if _epoch(s.id) == epoch]


def test_a_reshard_of_two_ranks_one_ahead_takes_the_gap_first():
    """Rank 0 skipped a bad story and took three (k = 0, 2, 4), rank 1 two (k = 1, 3): one
    rank takes k = 5, 6, ... and never 4 again."""
    two = [make("pretrain", rank=r, world_size=2) for r in range(2)]
    take(two[0], 3), take(two[1], 2)
    merged = two[0].merged_state([o.state_dict() for o in two])
    assert (merged["start"], merged["done"]) == (5, [])
    ahead = [make("pretrain", rank=r, world_size=2) for r in range(2)]
    take(ahead[0], 2), take(ahead[1], 3)  # k = 0, 2 and 1, 3, 5
    merged = ahead[0].merged_state([o.state_dict() for o in ahead])
    assert (merged["start"], merged["done"]) == (4, [5])
    one = make("pretrain")
    one.load_state_dict(merged)
    assert [s.id for s in take(one, 1)] == ["pretrain/e0/4"]
    assert one.position == len(one) == 1  # k = 5 is done: the epoch ends here
    assert [s.id for s in take(one, 1)] == ["pretrain/e1/0"]


def test_one_ranks_own_state_is_refused_on_another_world_size():
    two = [make("pretrain", rank=r, world_size=2) for r in range(2)]
    with pytest.raises(DataError, match="saved by 2 ranks"):
        make("pretrain").load_state_dict(two[0].state_dict())


def test_state_from_other_data_is_refused():
    state = make("pretrain").state_dict()
    other = PretrainOrder(CLIPS[:-3], num_scenes=3, seed=7)
    with pytest.raises(DataError, match="other data"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="other data"):
        make("sft").load_state_dict(state)


def test_too_little_data_for_the_ranks_is_a_data_error():
    with pytest.raises(DataError, match="cannot feed 8 ranks"):
        PretrainOrder(CLIPS[:6], num_scenes=3, seed=0, rank=0, world_size=8)


def test_a_state_saved_under_the_old_key_resumes():
    """Checkpoints written before the story order had its own name keep it under "sampler"."""
    first = PretrainOrder(CLIPS, num_scenes=3, seed=4)
    take(first, 2)
    saved = {"sampler": json.loads(json.dumps(first.state_dict())), "skips": {}}
    resumed = PretrainOrder(CLIPS, num_scenes=3, seed=4)
    resumed.load_state_dict(order_state(saved))
    assert take(resumed, 3) == take(first, 3)
    assert order_state({"order": {"a": 1}, "sampler": {"b": 2}}) == {"a": 1}


# --- StoryLoader: decoding real files in story order ---------------------------


def numbered(k: int) -> torch.Tensor:
    """A 32x48 frame whose three gray strips spell k in base 8 (robust to compression)."""
    frame = torch.zeros(32, 48, 3, dtype=torch.uint8)
    for strip, digit in enumerate((k // 64, (k // 8) % 8, k % 8)):
        frame[:, strip * 16 : (strip + 1) * 16] = 32 * digit + 16
    return frame


def number_of(frame_CHW: torch.Tensor) -> int:
    digits = [int(frame_CHW[:, :, s * 16 + 4 : s * 16 + 12].float().mean()) // 32 for s in range(3)]
    return digits[0] * 64 + digits[1] * 8 + digits[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good numbered clips and one file of every bad kind, each with its manifest row."""
    root = tmp_path_factory.mktemp("corpus")
    good = torch.stack([numbered(k) for k in range(60)])
    for name in ("good0", "good1", "good2"):
        write_video(str(root / f"{name}.mp4"), good, fps=8)
    data = (root / "good0.mp4").read_bytes()
    (root / "zero.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "random.mp4").write_bytes(random.Random(1).randbytes(3000))
    (root / "text.mp4").write_text("hello")

    def good_clip(name: str, frames: int = 60) -> Clip:
        return Clip(str(root / f"{name}.mp4"), name, frames, 8.0, 48, 32)

    bad = {  # name -> (clip, the reason the loader must count)
        "missing": (good_clip("absent"), "missing"),
        "zero": (good_clip("zero"), "zero_byte"),
        "truncated_file": (good_clip("truncated"), "undecodable"),  # moov atom cut off
        "random": (good_clip("random"), "undecodable"),
        "text": (good_clip("text"), "undecodable"),
        "too_short": (good_clip("good0", frames=8), "too_short"),  # 8 < 9 frames asked
        "overstated": (good_clip("good1", frames=4000), "truncated"),  # the file ends early
    }
    return [good_clip(n) for n in ("good0", "good1", "good2")], bad


def bad_clips(bad) -> list[Clip]:
    return [clip for clip, _ in bad.values()]


def test_pretrain_loader_decodes_frames_at_the_recipes_indices(corpus):
    good, _ = corpus
    sampler = PretrainOrder(good, num_scenes=3, seed=0)
    decoded = next(StoryLoader(sampler, frames=9, height=32, width=48, stage="pretrain"))
    assert sorted(c.caption for c in decoded.story.clips) == ["good0", "good1", "good2"]
    for video in decoded.videos:
        assert video.shape == (9, 3, 32, 48) and video.dtype == torch.uint8
        numbers = [number_of(frame) for frame in video]
        # 60 frames, span [3, 57): stride 3 needs 25 frames, so starts lie in 3 .. 32.
        assert numbers == list(range(numbers[0], numbers[0] + 25, 3)) and 3 <= numbers[0] <= 32


def test_a_cut_clip_samples_inside_its_start_end(corpus):
    # good0 at 8 fps, seconds 2..6: file frames 16..47, 32 frames. Span [1.6, 30.4) of the
    # cut is frames [2, 30), 28 frames: 9 at stride 3 need 25, so it starts at cut frame 2..5.
    cut = dataclasses.replace(corpus[0][0], start=2.0, end=6.0)
    assert clip_frame_count(cut) == 32
    for seed in range(4):
        video = decode_clip(cut, 9, 32, 48, (0.05, 0.95), random.Random(seed))
        numbers = [number_of(frame) for frame in video]
        assert 18 <= numbers[0] <= 21 and numbers == list(range(numbers[0], numbers[0] + 25, 3))


def test_sft_loader_uses_the_whole_shot_and_resizes(corpus):
    good, _ = corpus
    sampler = SFTOrder([ShotGroup("g", tuple(good))], num_scenes=2, seed=0)
    decoded = next(StoryLoader(sampler, frames=49, height=16, width=16, stage="sft"))
    assert len(decoded.videos) == 2
    assert all(v.shape == (49, 3, 16, 16) for v in decoded.videos)  # stride 1 over 60 frames


def test_bad_data_of_every_kind_is_skipped_and_counted(corpus):
    good, bad = corpus
    sampler = PretrainOrder([*good, *bad_clips(bad)], num_scenes=1, seed=3)
    loader = StoryLoader(sampler, frames=9, height=32, width=48, stage="pretrain")
    stories = take(loader, 4)  # 3 good per epoch: the 4th finishes epoch 0 for certain
    assert all(d.story.clips[0] in good for d in stories)
    counts = loader.skips.as_dict()
    assert set(counts) == {reason for _, reason in bad.values()}
    assert counts["undecodable"] >= 3 and loader.skips.total >= len(bad)
    assert loader.state_dict()["skips"] == counts


def test_sft_stories_with_a_bad_shot_of_every_kind_are_skipped(corpus):
    good, bad = corpus
    groups = [ShotGroup("ok", tuple(good[:2]))]
    groups += [ShotGroup(name, (good[0], clip)) for name, (clip, _) in bad.items()]
    loader = StoryLoader(SFTOrder(groups, 2, seed=0), frames=9, height=8, width=8, stage="sft")
    # One usable story per epoch: the second one ends epoch 0, which held every bad group.
    assert {d.story.id.split("@")[0] for d in take(loader, 2)} == {"ok"}
    assert set(loader.skips.as_dict()) == {reason for _, reason in bad.values()}
    assert loader.skips.total >= len(bad)


def test_an_all_broken_dataset_is_an_error_not_an_endless_loop(corpus):
    _, bad = corpus
    sampler = PretrainOrder(bad_clips(bad), num_scenes=1, seed=0)
    loader = StoryLoader(sampler, 9, 32, 48, "pretrain", max_consecutive_skips=20)
    with pytest.raises(DataError, match="20 stories in a row"):
        next(loader)


def test_loader_resume_is_exact_including_frame_choice(corpus):
    good, bad = corpus
    clips = [*good, bad["missing"][0]]

    def loader():
        return StoryLoader(PretrainOrder(clips, 1, seed=5), 9, 32, 48, "pretrain", seed=11)

    reference = [(d.story.id, [v.clone() for v in d.videos]) for d in take(loader(), 7)]
    first = loader()
    take(first, 4)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [(d.story.id, d.videos) for d in take(resumed, 3)]
    assert [r[0] for r in rest] == [r[0] for r in reference[4:]]
    for (_, videos), (_, expected) in zip(rest, reference[4:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(videos, expected, strict=True))
