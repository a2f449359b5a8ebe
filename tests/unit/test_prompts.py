"""Prompt files: every rejection names its line, paths resolve, videos and lengths are checked."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from transformers import ByT5Tokenizer

from infra.errors import DataError
from infra.prompts import (
    EVAL50,
    Story,
    check_context_videos,
    read_stories,
    truncation_warnings,
)
from infra.video import write_video

ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, *lines: str, name: str = "prompts.jsonl") -> str:
    path = folder / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def _line(**story) -> str:
    return json.dumps(story)


GOOD = _line(id="a", prompts=["one", "two"])

# --- reading ---------------------------------------------------------------------------


def test_stories_keep_file_order_and_their_line_numbers(tmp_path):
    uri = _write(
        tmp_path,
        _line(id="story_01", prompts=["Actor1 (a cat) sleeps.", "Actor1 (a cat) wakes."]),
        "",
        "   ",
        _line(id="b-2.x", prompts=["only scene"]),
    )
    assert read_stories(uri) == [
        Story("story_01", ("Actor1 (a cat) sleeps.", "Actor1 (a cat) wakes."), (), 1),
        Story("b-2.x", ("only scene",), (), 4),
    ]


def test_context_videos_resolve_against_the_prompts_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    videos = ["v/one.mp4", "../up.mp4", "/abs/two.mp4", "s3://bucket/three.mp4"]
    uri = _write(tmp_path / "sub", _line(id="s", prompts=["p"] * 5, context_videos=videos))
    (story,) = read_stories(uri)
    assert story.context_videos == (
        str(tmp_path / "sub" / "v" / "one.mp4"),
        str(tmp_path / "up.mp4"),
        "/abs/two.mp4",
        "s3://bucket/three.mp4",
    )


def test_a_relative_prompts_path_gives_absolute_context_paths(tmp_path, monkeypatch):
    _write(tmp_path, _line(id="s", prompts=["p", "q"], context_videos=["c.mp4"]))
    monkeypatch.chdir(tmp_path)
    (story,) = read_stories("prompts.jsonl")
    assert story.context_videos == (os.path.join(str(tmp_path), "c.mp4"),)


def test_file_uri_reads_through_fsspec(tmp_path):
    uri = _write(tmp_path, GOOD)
    assert read_stories(f"file://{uri}")[0].prompts == ("one", "two")


def test_object_store_style_uri_resolves_context_inside_the_bucket():
    # fsspec's in-memory filesystem stands in for s3: same "scheme://" path handling.
    folder = f"memory://m2d-test-{uuid.uuid4().hex}/prompts"
    fs, _ = fsspec.core.url_to_fs(folder)
    story = _line(id="s", prompts=["p", "q", "r"], context_videos=["v/a.mp4", "../b.mp4"])
    with fsspec.open(f"{folder}/eval.jsonl", "w") as handle:
        handle.write(story + "\n")
    try:
        (got,) = read_stories(f"{folder}/eval.jsonl")
    finally:
        fs.rm(folder.removeprefix("memory://"), recursive=True)
    root = folder.removesuffix("/prompts")
    assert got.context_videos == (f"{folder}/v/a.mp4", f"{root}/b.mp4")


# --- rejections ------------------------------------------------------------------------

BAD_LINES = {
    "invalid-json": ('{"id": "x", "prompts": ["a"]', "invalid JSON"),
    "not-an-object": ('["a", "b"]', "must be a JSON object, got list"),
    "missing-id": (_line(prompts=["a"]), "missing field.* id"),
    "missing-prompts": (_line(id="x"), "missing field.* prompts"),
    "unknown-field": (_line(id="x", prompts=["a"], seed=3), "unknown field.* seed"),
    "id-not-string": (_line(id=7, prompts=["a"]), "id must be"),
    "id-empty": (_line(id="", prompts=["a"]), "id must be"),
    "id-slash": (_line(id="a/b", prompts=["a"]), "id must be"),
    "id-space": (_line(id="a b", prompts=["a"]), "id must be"),
    "id-dotdot": (_line(id="..", prompts=["a"]), "id must be"),
    "prompts-string": (_line(id="x", prompts="a"), "prompts must be a non-empty list"),
    "prompts-empty": (_line(id="x", prompts=[]), "prompts must be a non-empty list"),
    "prompt-empty": (_line(id="x", prompts=["a", ""]), "scene 2 is empty"),
    "prompt-blank": (_line(id="x", prompts=["  "]), "scene 1 is empty"),
    "prompt-number": (_line(id="x", prompts=["a", 3]), "scene 2 is empty or not a string"),
    "context-string": (
        _line(id="x", prompts=["a", "b"], context_videos="v.mp4"),
        "context_videos must be a list",
    ),
    "context-null": (
        _line(id="x", prompts=["a", "b"], context_videos=None),
        "context_videos must be a list",
    ),
    "context-number": (
        _line(id="x", prompts=["a", "b"], context_videos=[1]),
        "context_videos must be a list",
    ),
    "context-as-many-as-prompts": (
        _line(id="x", prompts=["a", "b"], context_videos=["1.mp4", "2.mp4"]),
        "2 context video.* for 2 prompt",
    ),
    "duplicate-id": (_line(id="a", prompts=["z"]), r"duplicate id 'a' \(first on line 1\)"),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_a_bad_line_is_rejected_with_file_and_line_number(tmp_path, case):
    bad, problem = BAD_LINES[case]
    uri = _write(tmp_path, GOOD, "", bad, GOOD.replace('"a"', '"c"'))
    with pytest.raises(DataError) as info:
        read_stories(uri)
    message = str(info.value)
    assert message.startswith(f"{uri}:3: "), message
    assert re.search(problem, message), message
    assert "\n" not in message and "; " in message  # one line: problem; fix


def test_empty_file_is_rejected(tmp_path):
    for content in ("", "\n  \n"):
        uri = _write(tmp_path, content)
        with pytest.raises(DataError, match=f"^{re.escape(uri)}: .*no stories"):
            read_stories(uri)


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_unreadable_file_is_one_line_naming_it(tmp_path, kind):
    path = tmp_path / "p.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError) as info:
        read_stories(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


# --- context videos --------------------------------------------------------------------


def _video(path: Path, frames: int) -> str:
    write_video(str(path), torch.full((frames, 16, 16, 3), 90, dtype=torch.uint8), fps=8)
    return str(path)


def test_readable_long_enough_context_videos_pass(tmp_path):
    _video(tmp_path / "c1.mp4", 5)
    _video(tmp_path / "c2.mp4", 6)
    uri = _write(
        tmp_path, _line(id="s", prompts=["a", "b", "c"], context_videos=["c1.mp4", "c2.mp4"])
    )
    check_context_videos(read_stories(uri), min_frames=5)
    check_context_videos(read_stories(uri))


def test_a_short_context_video_names_line_scene_and_video(tmp_path):
    _video(tmp_path / "c1.mp4", 6)
    short = _video(tmp_path / "c2.mp4", 4)
    uri = _write(
        tmp_path,
        GOOD,
        _line(id="s", prompts=["a", "b", "c"], context_videos=["c1.mp4", "c2.mp4"]),
    )
    with pytest.raises(DataError) as info:
        check_context_videos(read_stories(uri), min_frames=5, prompts_uri=uri)
    message = str(info.value)
    assert message.startswith(f"{uri}:2: story s scene 2: context video {short} ")
    assert "fewer than 5 frames" in message
    # Exactly long enough passes: the check is not off by one.
    check_context_videos(read_stories(uri), min_frames=4)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "not found"), (b"", "empty"), (b"\x00not a video" * 50, "cannot be decoded")],
    ids=["missing", "zero-byte", "garbage"],
)
def test_an_unreadable_context_video_is_rejected(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "c.mp4").write_bytes(content)
    uri = _write(tmp_path, _line(id="s", prompts=["a", "b"], context_videos=["c.mp4"]))
    with pytest.raises(DataError, match=r"^line 1: story s scene 1: context video .*c\.mp4 "):
        check_context_videos(read_stories(uri))
    with pytest.raises(DataError, match=problem):
        check_context_videos(read_stories(uri))


def test_stories_without_context_need_no_io():
    check_context_videos([Story("s", ("a",), (), 1)], min_frames=49)


# --- truncation ------------------------------------------------------------------------


def test_truncation_warnings_count_tokens_as_the_tokenizer_does():
    tokenizer = ByT5Tokenizer()
    prompts = ("x" * 5, "y" * 19, "z" * 20, "w" * 40)  # ByT5: one token per byte, plus EOS
    counts = [len(tokenizer(p).input_ids) for p in prompts]
    assert counts == [6, 20, 21, 41]
    stories = [Story("s1", prompts[:2]), Story("s2", prompts[2:])]
    assert truncation_warnings(stories, tokenizer, 20) == [
        "s2 scene 1: prompt has 21 tokens, truncated to 20",
        "s2 scene 2: prompt has 41 tokens, truncated to 20",
    ]
    assert truncation_warnings(stories, tokenizer, 41) == []


def test_truncation_counts_bytes_not_characters():
    tokenizer = ByT5Tokenizer()
    prompt = "é" * 6  # 12 bytes in UTF-8 -> 13 ByT5 tokens
    assert len(tokenizer(prompt).input_ids) == 13
    assert truncation_warnings([Story("u", (prompt,))], tokenizer, 12) == [
        "u scene 1: prompt has 13 tokens, truncated to 12"
    ]


# --- the shipped evaluation stories ----------------------------------------------------

MENTION = re.compile(r"Actor(\d+) \(([^()]+)\)")


def test_eval50_has_50_stories_of_3_scenes():
    stories = read_stories(EVAL50)
    assert [s.id for s in stories] == [f"story_{i:02d}" for i in range(1, 51)]
    assert all(len(s.prompts) == 3 and not s.context_videos for s in stories)
    assert len({p for s in stories for p in s.prompts}) == 150


@pytest.mark.parametrize("story", read_stories(EVAL50), ids=lambda s: s.id)
def test_eval50_characters_are_described_verbatim_in_every_scene(story):
    descriptions: dict[str, str] = {}
    for prompt in story.prompts:
        # Every mention of an actor carries its description.
        assert len(re.findall(r"Actor\d", prompt)) == len(MENTION.findall(prompt)), prompt
        assert MENTION.findall(prompt), f"{story.id}: a scene without a character"
        for number, description in MENTION.findall(prompt):
            assert descriptions.setdefault(number, description) == description, (
                f"{story.id}: Actor{number} is described two ways"
            )
    # 1 to 3 characters, numbered from 1.
    assert sorted(descriptions) == [str(n) for n in range(1, len(descriptions) + 1)]
    assert 1 <= len(descriptions) <= 3
    assert all(len(p.split()) <= 120 for p in story.prompts)  # well under 226 T5 tokens


def test_eval50_characters_vary_across_stories():
    counts = {
        len({m[0] for p in s.prompts for m in MENTION.findall(p)}) for s in read_stories(EVAL50)
    }
    assert counts == {1, 2, 3}


def test_eval50_is_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["infra"]
    relative = Path(EVAL50).relative_to(ROOT / "infra").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def test_a_missing_prompts_file_names_the_nearest_shipped_set_or_neighbour(tmp_path):
    (tmp_path / "stories.jsonl").write_text("")
    for given, hint in [
        ("eval5", "did you mean eval50?"),
        (str(tmp_path / "storie.jsonl"), f"did you mean {tmp_path / 'stories.jsonl'}?"),
        (str(tmp_path / "other.txt"), "check the path"),
    ]:
        with pytest.raises(DataError) as caught:
            read_stories(given, None)
        assert str(caught.value).endswith(f"prompts file not found; {hint}"), given
