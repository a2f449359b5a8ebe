"""Shot detection (``datajobs.shots``) without Ray: cuts of synthesized videos whose cut
frames are known (``datajobs.cut_synth``), each distractor alone inside one shot, shots
cut into windows, the inputs refused before any work."""

from __future__ import annotations

import pytest

from datajobs.cut_synth import cut_video
from datajobs.shots import VideoShots, check_spec, detect, list_videos, shot_rows
from infra.errors import DataError
from infra.job_specs import ShotsSpec
from trainer.data.manifest import SkipCounts

SPEC = ShotsSpec(videos=["unused"], out="unused.csv")


def _matched(found: list[int], truth: list[int]) -> int:
    return sum(1 for cut in found if any(abs(cut - real) <= 1 for real in truth))


def test_cuts_of_videos_with_fades_flashes_and_fast_motion(tmp_path):
    """24 videos, 168 hard cuts, a distractor in about three shots of four: the cuts found
    within one frame of a real one (precision) and the real ones found (recall). The
    benchmark measures more videos (docs/benchmarks.md); this holds the floor."""
    found_total = matched = real = 0
    for seed in range(24):
        uri = str(tmp_path / f"v{seed}.mp4")
        truth = cut_video(uri, seed)
        found = detect(uri, SPEC, None).cuts
        found_total, real = found_total + len(found), real + len(truth)
        matched += _matched(found, truth)
    precision, recall = matched / found_total, matched / real
    print(f"precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.97, (precision, recall)


@pytest.mark.parametrize("seed", range(40))
def test_one_shot_has_no_cut_whatever_happens_in_it(tmp_path, seed):
    """A single shot - with whichever distractor its seed draws - is never cut."""
    uri = str(tmp_path / "one.mp4")
    assert cut_video(uri, seed, shots=1) == []
    found = detect(uri, SPEC, None)
    assert found.cuts == [], found.cuts
    assert found.frames >= 24 and (found.width, found.height) == (96, 64)


def test_the_check_is_what_removes_a_flash(tmp_path):
    seeds = [seed for seed in range(40) if _distractor_of(seed) == "flash"]
    proposals = 0
    for seed in seeds[:3]:
        uri = str(tmp_path / f"flash{seed}.mp4")
        cut_video(uri, seed, shots=1)
        proposals += len(detect(uri, SPEC.model_copy(update={"verify": 0.0}), None).cuts)
        assert detect(uri, SPEC, None).cuts == []
    assert proposals >= 3  # into and out of the flash, at least one per video


def _distractor_of(seed: int) -> str:
    import random

    from datajobs.cut_synth import DISTRACTORS

    rng = random.Random(seed)
    [rng.randrange(40, 216) for _ in range(3)]  # the colour, drawn first
    rng.randrange(24, 72)
    return rng.choice(DISTRACTORS)


def test_shots_are_bounded_by_cuts_dropped_when_short_and_windowed_when_long():
    found = VideoShots("v.mp4", fps=10.0, width=8, height=6, frames=100, cuts=[5, 30, 95])
    skips = SkipCounts()
    rows = shot_rows(found, min_shot=1.0, max_shot=2.0, skips=skips)
    spans = [(row["start"], row["end"], row["num_frames"]) for row in rows]
    # 0-5: too short; 5-30: 2 s + 0.5 s remainder (dropped); 30-95: 3 windows + 0.5 s
    # remainder (dropped); 95-100: too short.
    assert spans == [(0.5, 2.5, 20), (3.0, 5.0, 20), (5.0, 7.0, 20), (7.0, 9.0, 20)]
    assert skips.as_dict() == {"shot_too_short": 2, "window_remainder_too_short": 2}
    whole = shot_rows(found, min_shot=0.1, max_shot=None, skips=SkipCounts())
    assert [row["num_frames"] for row in whole] == [5, 25, 65, 5]
    assert {(row["fps"], row["width"], row["height"]) for row in whole} == {(10.0, 8, 6)}


def test_videos_are_listed_from_files_and_folders(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.mp4", "a/y.MOV", "a/notes.txt", "z.webm"):
        (tmp_path / name).write_bytes(b"x")
    listed = list_videos([str(tmp_path / "a"), str(tmp_path / "z.webm")], None)
    assert listed == [
        str(tmp_path / "a/x.mp4"),
        str(tmp_path / "a/y.MOV"),
        str(tmp_path / "z.webm"),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no videos in it"):
        list_videos([str(tmp_path / "empty")], None)
    with pytest.raises(DataError, match="neither a video"):
        list_videos([str(tmp_path / "a" / "notes.txt")], None)


def test_the_output_must_be_new_a_manifest_and_windows_no_shorter_than_shots(tmp_path):
    (tmp_path / "old.csv").write_text("kept")
    with pytest.raises(DataError, match="already exists"):
        check_spec(SPEC.model_copy(update={"out": str(tmp_path / "old.csv")}), None)
    with pytest.raises(DataError, match="name it"):
        check_spec(SPEC.model_copy(update={"out": str(tmp_path / "shots.txt")}), None)
    with pytest.raises(DataError, match="below --min-shot"):
        check_spec(SPEC.model_copy(update={"out": str(tmp_path / "n.csv"), "max_shot": 0.5}), None)
    assert (tmp_path / "old.csv").read_text() == "kept"
