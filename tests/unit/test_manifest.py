"""Manifests (three table formats, SFT groups, bad rows by reason) and the synthetic dataset."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from datajobs.synth import COLORS, synthesize
from datajobs.synth import main as synth_main
from infra.errors import DataError
from infra.video import read_frames
from trainer.data.manifest import Clip, ShotGroup, SkipCounts, read_clips, read_shot_groups

GOOD = {"path": "a.mp4", "caption": "Actor1 (a red square) waves.", "num_frames": 60, "fps": 24}
GOOD = {**GOOD, "width": 64, "height": 48}


def row(**changes):
    return {**GOOD, **changes}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_rows_become_clips_with_paths_relative_to_the_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    uri = write_jsonl(
        tmp_path / "sub" / "m.jsonl",
        [row(), row(path="../b.mp4", start=1.5, end=4), row(path="s3://bucket/c.mp4")],
    )
    clips, skips = read_clips(uri)
    assert clips == [
        Clip(str(tmp_path / "sub" / "a.mp4"), GOOD["caption"], 60, 24.0, 64, 48),
        Clip(str(tmp_path / "b.mp4"), GOOD["caption"], 60, 24.0, 64, 48, 1.5, 4.0),
        Clip("s3://bucket/c.mp4", GOOD["caption"], 60, 24.0, 64, 48),
    ]
    assert skips.total == 0


def test_csv_and_parquet_read_the_same_clips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [row(start=None, end=None), row(path="b.mp4", start=0.5, end=2.0)]
    with (tmp_path / "m.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [*GOOD, "start", "end"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    from_csv, _ = read_clips(str(tmp_path / "m.csv"))
    from_parquet, _ = read_clips(str(tmp_path / "m.parquet"))
    assert from_csv == from_parquet
    assert from_csv[0].start is None and from_csv[1].start == 0.5 and from_csv[1].end == 2.0
    assert isinstance(from_csv[0].num_frames, int) and from_csv[0].path.endswith("/a.mp4")


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    lines = [json.dumps(r) for r in (row(), row(caption=""), row(caption="   "), row(path=""))]
    lines += [json.dumps(r) for r in (row(caption=None), row(num_frames="many"), row(fps=0))]
    lines += [json.dumps(r) for r in (row(num_frames=12.5), row(start=3, end=2), row(width=-4))]
    lines += ["{not json", json.dumps(["a", "list"])]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    clips, skips = read_clips(str(tmp_path / "m.jsonl"))
    assert len(clips) == 1
    assert skips.as_dict() == {
        "bad_fps": 1,
        "bad_num_frames": 2,
        "bad_row": 2,
        "bad_start_end": 1,
        "bad_width": 1,
        "empty_caption": 3,
        "missing_path": 1,
    }


def test_csv_without_a_required_column_names_it(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption,num_frames,fps,width\na.mp4,hi,10,8,32\n")
    with pytest.raises(DataError, match=r"m\.csv: missing required column\(s\) height"):
        read_clips(str(tmp_path / "m.csv"))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("gone.jsonl", None, "not found"),
        ("m.txt", "x", "unknown manifest format"),
        ("m.parquet", "not parquet at all", "cannot read the Parquet"),
        ("m.csv", b"\xff\xfe\x00binary", "not UTF-8"),
        ("m.jsonl", json.dumps(row(caption="")) + "\n", "no usable rows"),
    ],
)
def test_unreadable_manifests_are_data_errors_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        read_clips(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def shot(i: int, **changes):
    return row(**{"path": f"s{i}.mp4", "caption": f"shot {i}", **changes})


def test_shot_groups_keep_order_and_drop_short_groups(tmp_path):
    uri = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"id": "long", "shots": [shot(i) for i in range(5)]},
            {"id": "short", "shots": [shot(i) for i in range(2)]},
            {"id": "exact", "shots": [shot(i) for i in range(3)]},
            {"id": "noshots"},
        ],
    )
    groups, skips = read_shot_groups(uri, num_scenes=3)
    assert [g.id for g in groups] == ["long", "exact"]
    assert [s.caption for s in groups[0].shots] == [f"shot {i}" for i in range(5)]
    assert isinstance(groups[0], ShotGroup) and groups[0].shots[0].path == str(tmp_path / "s0.mp4")
    assert skips.as_dict() == {"bad_group": 1, "group_too_short": 1}


def test_a_bad_shot_splits_its_group_so_windows_stay_consecutive(tmp_path):
    shots = [shot(0), shot(1), shot(2), shot(3, caption=""), shot(4), shot(5), shot(6)]
    shots += [shot(7, fps="x"), shot(8)]
    uri = write_jsonl(tmp_path / "sft.jsonl", [{"id": "g", "shots": shots}])
    groups, skips = read_shot_groups(uri, num_scenes=3)
    assert [(g.id, [s.caption for s in g.shots]) for g in groups] == [
        ("g/0", ["shot 0", "shot 1", "shot 2"]),
        ("g/1", ["shot 4", "shot 5", "shot 6"]),
    ]
    assert skips.as_dict() == {"bad_fps": 1, "empty_caption": 1}


def test_sft_json_list_or_groups_object(tmp_path):
    groups = [{"id": "g", "shots": [shot(i) for i in range(3)]}]
    (tmp_path / "a.json").write_text(json.dumps(groups))
    (tmp_path / "b.json").write_text(json.dumps({"groups": groups}))
    assert read_shot_groups(str(tmp_path / "a.json"), 3) == read_shot_groups(
        str(tmp_path / "b.json"), 3
    )
    (tmp_path / "c.json").write_text("{broken")
    with pytest.raises(DataError, match=r"c\.json: not valid JSON"):
        read_shot_groups(str(tmp_path / "c.json"), 3)
    with pytest.raises(DataError, match="no group has 4 usable"):
        read_shot_groups(str(tmp_path / "a.json"), 4)


def test_skip_counts_add_merge_and_serialise():
    a, b = SkipCounts(), SkipCounts({"missing": 2})
    a.add("missing")
    a.add("zero_byte", 3)
    merged = a.merge(b)
    # merge leaves both inputs alone, so calling it again never double counts.
    assert a.as_dict() == {"missing": 1, "zero_byte": 3} and b.as_dict() == {"missing": 2}
    assert merged.as_dict() == {"missing": 3, "zero_byte": 3} and a.merge(b) == merged
    assert merged.total == 6 and merged["other"] == 0
    assert SkipCounts(json.loads(json.dumps(merged.as_dict()))) == merged
    assert str(merged) == "missing=3, zero_byte=3" and str(SkipCounts()) == "none"


# --- the synthetic dataset: real files, both manifests, recurring characters ----------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(str(out), stories=4, scenes=3, frames=9, height=32, width=48, seed=0)
    return out


def test_synth_writes_both_manifests_over_real_videos(synth_dir):
    clips, skips = read_clips(str(synth_dir / "pretrain.jsonl"))
    groups, group_skips = read_shot_groups(str(synth_dir / "sft.jsonl"), num_scenes=3)
    assert len(clips) == 16 and len(groups) == 4 and skips.total == group_skips.total == 0
    assert all(len(g.shots) == 4 for g in groups)  # scenes + 1 shots: windows can move
    assert [s for g in groups for s in g.shots] == clips
    frames = read_frames(clips[5].path, list(range(9)))
    assert frames.shape == (9, 32, 48, 3) and (clips[5].width, clips[5].height) == (48, 32)


def test_synth_characters_recur_in_every_shot_of_a_story(synth_dir):
    groups, _ = read_shot_groups(str(synth_dir / "sft.jsonl"), num_scenes=3)
    for group in groups:
        casts = [re.findall(r"Actor\d \((an? \w+ \w+)\)", shot.caption) for shot in group.shots]
        assert casts[0] and all(cast == casts[0] for cast in casts)
        for shot in group.shots:
            frame = read_frames(shot.path, [0])[0].int()
            for description in casts[0]:
                color = torch.tensor(COLORS[description.split()[1]])
                # The actor's color is on screen (up to compression error).
                assert ((frame - color).abs().max(dim=-1).values <= 40).any(), description


def test_synth_is_deterministic_in_its_seed(synth_dir, tmp_path):
    synthesize(str(tmp_path / "same"), stories=4, scenes=3, frames=9, height=32, width=48)
    synthesize(str(tmp_path / "other"), stories=4, scenes=3, frames=9, height=32, width=48, seed=1)
    same = (tmp_path / "same" / "sft.jsonl").read_text()
    assert same == (synth_dir / "sft.jsonl").read_text()
    assert same != (tmp_path / "other" / "sft.jsonl").read_text()
    shot = "videos/story002/shot3.mp4"
    assert torch.equal(
        read_frames(str(synth_dir / shot), [0, 8]),
        read_frames(str(tmp_path / "same" / shot), [0, 8]),
    )


def test_m2d_data_synth_and_inspect_run_the_jobs(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        cli, ["data", "synth", "--out", str(out), "--stories", "2", "--frames", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 stories, 8 shots" in result.output
    assert len(read_clips(str(out / "pretrain.jsonl"))[0]) == 8
    missing = runner.invoke(cli, ["data", "inspect", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "manifest not found" in missing.output
    assert missing.output.count("\n") == 1


def test_inspect_reads_an_sft_manifest_as_groups_and_check_opens_every_video(tmp_path):
    """`m2d data inspect data/synth/sft.jsonl` (the README's line) needed --scenes 3, and a
    manifest whose videos were missing or empty read "skipped: none"."""
    from click.testing import CliRunner

    from orchestrator.cli import cli

    runner = CliRunner()
    out = tmp_path / "synth"
    made = runner.invoke(cli, ["data", "synth", "--out", str(out), "--stories", "2"])
    assert made.exit_code == 0, made.output
    sft = runner.invoke(cli, ["data", "inspect", str(out / "sft.jsonl")])
    assert sft.exit_code == 0, sft.output
    assert "read as groups of 3 scenes" in sft.output and "2 groups, 8 shots" in sft.output
    assert "videos not opened (--check opens each one)" in sft.output
    (out / "videos" / "story000" / "shot1.mp4").unlink()
    (out / "videos" / "story000" / "shot2.mp4").write_bytes(b"")
    (out / "videos" / "story001" / "shot0.mp4").write_bytes(b"not a video")
    for manifest in ("sft.jsonl", "pretrain.jsonl"):
        checked = runner.invoke(cli, ["data", "inspect", str(out / manifest), "--check"])
        assert checked.exit_code == 0, checked.output
        assert "videos checked: 8; unusable: missing=1, undecodable=1, zero_byte=1" in (
            checked.output
        )


def test_synth_main_refuses_odd_sizes_with_one_line(tmp_path, capsys):
    code = synth_main(["--spec", json.dumps({"out": str(tmp_path), "height": 31})])
    assert code == 2 and "even" in capsys.readouterr().err
