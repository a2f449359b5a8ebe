"""`m2d data synth` writes only into a new or empty folder."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import cli


def _files(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def _synth(out: Path):
    return CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--stories", "1"])


def test_synth_refuses_a_folder_with_a_users_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    before = _files(out)
    result = _synth(out)
    assert result.exit_code == 2, result.output
    assert f"--out {out} is not empty (notes.txt)" in result.output
    assert "Traceback" not in result.output
    assert _files(out) == before


def test_synth_twice_keeps_the_first_dataset(tmp_path):
    out = tmp_path / "data"
    first = _synth(out)
    assert first.exit_code == 0, first.output
    before = _files(out)
    assert out / "sft.jsonl" in before
    second = _synth(out)
    assert (
        second.exit_code == 2
        and "is not empty (pretrain.jsonl, sft.jsonl, videos)" in second.output
    )
    assert _files(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _synth(empty).exit_code == 0  # an empty folder is a new one
