"""`m2d data import` (``datajobs.import_clips``) without Ray: the clip list read as
Panda-70M writes it, clips made from video headers, the manifest written and read back by
the training loader's own reader (``trainer.data.manifest.read_clips``)."""

from __future__ import annotations

import csv

import pytest
import torch

from datajobs.import_clips import Listed, clips_of, listed_clips, manifest_text, run
from infra.errors import DataError
from infra.job_specs import ImportSpec
from infra.video import VideoError, VideoInfo, probe_video, read_frames, write_video
from trainer.data.manifest import read_clips, read_table

# Two rows as Panda-70M's meta CSV has them: Python-literal lists in quoted cells.
PANDA_CSV = (
    "videoID,url,timestamp,caption,matching_score\n"
    "abc,https://youtu.be/abc,\"[['0:00:00.000', '0:00:02.500'], ['0:01:02.500', '0:01:09.000']]\","
    '"[\'a red ball rolls\', ""a dog\'s tail""]","[0.4, 0.5]"\n'
    "xyz,https://youtu.be/xyz,\"[['0:00:01.000', '0:00:04.000']]\",\"['a green cone']\",[0.3]\n"
)


def _listed(tmp_path, text: str, name: str = "clips.csv", videos: str | None = None):
    (tmp_path / name).write_text(text)
    rows, _ = read_table(str(tmp_path / name), None)
    return listed_clips(list(rows), str(tmp_path), videos or str(tmp_path), ".mp4")


def test_panda_70m_rows_become_one_clip_per_timestamp_pair(tmp_path):
    clips, skips = _listed(tmp_path, PANDA_CSV)
    assert skips.total == 0
    assert clips == [
        Listed(f"{tmp_path}/abc.mp4", 0.0, 2.5, "a red ball rolls"),
        Listed(f"{tmp_path}/abc.mp4", 62.5, 69.0, "a dog's tail"),
        Listed(f"{tmp_path}/xyz.mp4", 1.0, 4.0, "a green cone"),
    ]


def test_jsonl_lists_a_single_pair_a_path_column_and_a_videos_prefix(tmp_path):
    text = (
        '{"videoID": "a", "timestamp": [["0:00:01", "0:00:02"], [3, 4.5]], "caption": ["x", "y"]}\n'
        '{"path": "sub/b.webm", "timestamp": ["1:00:00.000", "1:00:01.000"], "caption": "z"}\n'
    )
    clips, skips = _listed(tmp_path, text, "clips.jsonl", videos="s3://bucket/raw")
    assert skips.total == 0
    assert clips == [
        Listed("s3://bucket/raw/a.mp4", 1.0, 2.0, "x"),
        Listed("s3://bucket/raw/a.mp4", 3.0, 4.5, "y"),
        Listed(f"{tmp_path}/sub/b.webm", 3600.0, 3601.0, "z"),
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("v,\"[['0:00:00', '0:00:01']]\",\"['one', 'two']\"", "row_caption_count"),
        ("v,\"[['0:00:00', 'later']]\",\"['one']\"", "row_bad_timestamp"),
        ("v,\"[['0:00:00', '-0:00:01']]\",\"['one']\"", "row_bad_timestamp"),
        ("v,\"[['0:00:00', '0:00:01'\",\"['one']\"", "row_unparsable"),
        ('v,"[]","[]"', "row_bad_timestamp"),
        (",\"[['0:00:00', '0:00:01']]\",\"['one']\"", "row_no_video"),
        ("../v,\"[['0:00:00', '0:00:01']]\",\"['one']\"", "row_no_video"),
    ],
)
def test_a_row_that_does_not_parse_is_counted_by_reason(tmp_path, row, reason):
    clips, skips = _listed(tmp_path, f"videoID,timestamp,caption\n{row}\n")
    assert clips == [] and skips.as_dict() == {reason: 1}


def test_clips_take_their_frames_from_the_video_header_and_skip_what_cannot_be():
    info = VideoInfo(fps=8.0, width=48, height=32, duration=10.0)
    listed = [
        Listed("a.mp4", 1.0, 3.5, "twenty frames"),
        Listed("a.mp4", 9.0, 10.1, "ends within a frame of the end"),
        Listed("a.mp4", 9.0, 10.5, "past the end"),
        Listed("a.mp4", 4.0, 4.0, "empty"),
        Listed("a.mp4", 4.0, 4.1, "shorter than a frame"),
        Listed("a.mp4", 1.0, 2.0, ""),
        Listed("gone.mp4", 1.0, 2.0, "missing video"),
    ]
    clips, skips = clips_of(listed, {"a.mp4": info, "gone.mp4": "missing"})
    assert [(c.caption, c.num_frames, c.start, c.end) for c in clips] == [
        ("twenty frames", 20, 1.0, 3.5),
        ("ends within a frame of the end", 8, 9.0, 10.1),
    ]
    assert {(c.fps, c.width, c.height) for c in clips} == {(8.0, 48, 32)}
    assert skips.as_dict() == {
        "clip_empty": 2,
        "clip_no_caption": 1,
        "clip_past_video_end": 1,
        "video_missing": 1,
    }


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_the_written_manifest_is_what_the_loader_reads(tmp_path, suffix):
    """Written by the job, read by the trainer's reader: the same clips, paths relative to
    the manifest's folder, and each clip's last frame decodes at its cut."""
    (tmp_path / "raw").mkdir()
    video = tmp_path / "raw" / "abc.mp4"
    write_video(str(video), torch.randint(0, 255, (80, 32, 48, 3), dtype=torch.uint8), 8.0)
    info = probe_video(str(video))
    assert info == VideoInfo(fps=8.0, width=48, height=32, duration=10.0)
    clips, _ = clips_of(
        [Listed(str(video), 0.0, 2.5, 'a "quoted", comma'), Listed(str(video), 6.0, 10.0, "b")],
        {str(video): info},
    )
    out = tmp_path / f"pretrain{suffix}"
    out.write_text(manifest_text(clips, str(out)))
    assert "raw/abc.mp4" in out.read_text() and str(tmp_path) not in out.read_text()
    read, skips = read_clips(str(out))
    assert read == clips and skips.total == 0
    for clip in read:
        frames = read_frames(clip.path, [0, clip.num_frames - 1], start=clip.start, end=clip.end)
        assert frames.shape == (2, 32, 48, 3)


def test_a_video_that_cannot_be_read_names_its_reason(tmp_path):
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "empty.mp4").write_bytes(b"")
    reasons = {}
    for name in ("text.mp4", "empty.mp4", "absent.mp4"):
        with pytest.raises(VideoError) as caught:
            probe_video(str(tmp_path / name))
        reasons[name] = caught.value.reason
        assert name in str(caught.value)
    assert reasons == {"text.mp4": "undecodable", "empty.mp4": "zero_byte", "absent.mp4": "missing"}


def test_the_output_must_be_new_and_a_manifest_format(tmp_path):
    """Refused before the clip list is read (it does not even exist here)."""
    (tmp_path / "old.csv").write_text("kept")
    spec = ImportSpec(clips=str(tmp_path / "clips.csv"), out=str(tmp_path / "old.csv"))
    with pytest.raises(DataError, match=r"old\.csv already exists"):
        run(spec, None)
    with pytest.raises(DataError, match=r"name it \.csv or \.jsonl"):
        run(spec.model_copy(update={"out": str(tmp_path / "new.parquet")}), None)
    assert (tmp_path / "old.csv").read_text() == "kept"


def test_panda_70m_csv_fixture_is_valid_csv():
    """The fixture above is what Python's csv module makes of Panda-70M's quoting."""
    rows = list(csv.DictReader(PANDA_CSV.splitlines()))
    assert rows[0]["caption"] == "['a red ball rolls', \"a dog's tail\"]"
