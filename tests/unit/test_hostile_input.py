"""Hostile input (issue 27 point 7, and the special files of point 6): YAML that would
recurse forever or expand to a billion values, and files that never end, are refused in
one line - quickly, and before anything is built from them. The CLI's answers to the
same files are cases of tests/corpus/cli.yaml."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from infra import safe_yaml
from infra.errors import ConfigError, DataError
from infra.prompts import read_stories
from orchestrator import profiles
from trainer.data.manifest import read_clips

BOMB = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x]",
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers: &w {nested: *w}", ":1: an alias refers to a value that contains it"),
        ("a: 1\nworkers: &w [1, *w]", ":2: an alias refers to a value that contains it"),
        ("workers: &w {<<: *w, num_workers: 2}", ":1: an alias refers to a value"),
        (BOMB, "more than 100000 values once its aliases are expanded"),
        ("x: " + "[" * 40 + "]" * 40, ":1: nested more than 32 levels deep"),
        ("x: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("x: !!python/object/apply:os.system [echo]", ":1: YAML syntax error: could not"),
        ("a: 1\nb: [1", ":2: YAML syntax error"),
    ],
)
def test_hostile_documents_are_one_line_and_quick(text, message):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message) as refused:
        safe_yaml.compose(text, "p.yaml")
    assert time.monotonic() - started < 2.0  # not after expanding or recursing for long
    assert str(refused.value).startswith("p.yaml") and "\n" not in str(refused.value)


def test_what_yaml_allows_still_loads_as_safe_load_does():
    text = (
        "base: &base {steps: 10, lr: 1.0e-4}\nsft:\n  <<: *base\n  steps: 20\nlist: [*base, *base]"
    )
    data, node = safe_yaml.compose(text, "p.yaml")
    assert data == yaml.safe_load(text)
    assert node.start_mark.line == 0
    # The bomb's little sister: 9 x 9 values stay well under the limit.
    assert len(safe_yaml.compose(BOMB.split("\nc:")[0], "p.yaml")[0]["b"]) == 9


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1", "--set k: YAML syntax error: expected"),
        ("*a", "--set k: YAML syntax error: found undefined alias"),
        ("!!python/name:os.system", "--set k: YAML syntax error: could not determine"),
    ],
)
def test_set_values_are_refused_with_the_key_and_a_hint(raw, message):
    with pytest.raises(ConfigError, match=message) as refused:
        safe_yaml.value(raw, "--set k")
    assert str(refused.value).endswith("quote a string that holds YAML characters")


def test_set_values_parse_as_yaml():
    assert safe_yaml.value("[1, 2]", "--set k") == [1, 2]
    assert safe_yaml.value("1e-4", "--set k") == "1e-4"  # YAML 1.1, as yaml.safe_load
    assert safe_yaml.value("", "--set k") == ""


def test_a_fifo_or_an_oversized_profile_is_refused_unread(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it to read would block for ever
    with pytest.raises(ConfigError, match=r"fifo\.yaml: not a regular file"):
        profiles.load_profile(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * safe_yaml.MAX_BYTES)
    with pytest.raises(ConfigError, match=r"big.yaml: \d+ bytes; a profile is at most"):
        profiles.load_profile(big)


def test_a_fifo_as_manifest_or_prompts_file_is_refused_unread(tmp_path):
    for name, read in (("clips.jsonl", read_clips), ("stories.jsonl", read_stories)):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with pytest.raises(DataError, match=f"{name}: not a regular file"):
            read(str(fifo))


def test_a_story_line_too_large_or_deep_is_named(tmp_path):
    stories = tmp_path / "stories.jsonl"
    stories.write_text('{"id": "a", "prompts": ["x"]}\n' + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(DataError, match=r"stories\.jsonl:2: a value too large or nested"):
        read_stories(str(stories))
