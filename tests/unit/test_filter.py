"""The similarity filter's pure parts: window logic, output manifest, X-CLIP encoder, CLI errors.

The job itself (Ray Data, S3, MLflow) runs in tests/integration/test_filter.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from datajobs.filter import (
    adjacent_similarities,
    filter_groups,
    kept_runs,
    main,
    manifest_text,
    window_count,
)
from evaluation.encoders import (
    VideoEncoder,
    check_encoder,
    encoder_names,
    load_encoder,
    local_folder,
    uniform_frame_indices,
)
from infra.errors import ConfigError, DataError
from trainer.data.manifest import Clip, ShotGroup, SkipCounts

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_xclip_config(num_frames: int = 4, image_size: int = 32):
    """A 1-layer X-CLIP with 16-wide towers: small enough to build in milliseconds."""
    from transformers import XCLIPConfig

    return XCLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
            "num_frames": num_frames,
            "mit_hidden_size": 16,
            "mit_intermediate_size": 32,
            "mit_num_hidden_layers": 1,
            "mit_num_attention_heads": 2,
        },
        projection_dim=16,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )


# ---------------------------------------------------------------- window logic


def test_runs_split_where_similarity_drops_below_the_threshold():
    # shots 0-1 | 2-3-4: the 1-2 link (0.5) fails; 0.7 itself passes (>=).
    sims = [0.9, 0.5, 0.8, 0.7]
    assert kept_runs(sims, 0.7, 2) == [range(0, 2), range(2, 5)]
    assert kept_runs(sims, 0.7, 3) == [range(2, 5)]
    assert kept_runs(sims, 0.71, 2) == [range(0, 2), range(2, 4)]
    assert kept_runs(sims, 0.95, 2) == []
    assert kept_runs(sims, 0.95, 1) == [range(i, i + 1) for i in range(5)]


def test_an_unusable_shot_is_dropped_and_cuts_its_group():
    # Shot 2 failed to decode: its links are None; shots 0-1 and 3-4-5 remain.
    sims = [0.9, None, None, 0.8, 0.9]
    usable = [True, True, False, True, True, True]
    assert kept_runs(sims, 0.7, 2, usable) == [range(0, 2), range(3, 6)]
    assert kept_runs(sims, 0.7, 1, usable) == [range(0, 2), range(3, 6)]
    assert kept_runs([math.nan], 0.0, 1) == [range(0, 1), range(1, 2)]
    with pytest.raises(ValueError, match="one entry per shot"):
        kept_runs([0.9], 0.7, 2, [True])


def _valid_windows(sims, usable, threshold, n):
    """Reference: every window start whose shots are usable and links all pass."""
    starts = []
    for start in range(len(usable) - n + 1):
        links = sims[start : start + n - 1]
        if all(usable[start : start + n]) and all(s is not None and s >= threshold for s in links):
            starts.append(start)
    return starts


@pytest.mark.parametrize("seed", range(40))
def test_output_groups_hold_exactly_the_valid_windows(seed):
    rng = random.Random(seed)
    count, n, threshold = rng.randint(1, 12), rng.randint(1, 4), rng.choice((0.6, 0.7, 0.8))
    usable = [rng.random() > 0.15 for _ in range(count)]
    sims = [
        round(rng.uniform(0.4, 1.0), 1) if usable[i] and usable[i + 1] else None
        for i in range(count - 1)
    ]
    runs = kept_runs(sims, threshold, n, usable)
    windows = [start for run in runs for start in range(run.start, run.stop - n + 1)]
    assert windows == _valid_windows(sims, usable, threshold, n)  # each once, in order
    assert sum(window_count(len(run), n) for run in runs) == len(windows)
    # Maximal: two kept runs never touch through a passing link.
    for a, b in itertools.pairwise(runs):
        assert a.stop < b.start or not (sims[a.stop - 1] or 0) >= threshold


def test_adjacent_cosine_similarities():
    e = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), None, torch.tensor([0.0, -2.0])]
    sims = adjacent_similarities(e)
    assert sims[0] == pytest.approx(math.sqrt(0.5)) and sims[1:] == [None, None]
    assert adjacent_similarities([e[0]]) == []


def _clip(name: str) -> Clip:
    return Clip(f"/data/videos/{name}.mp4", f"caption {name}", 17, 8.0, 32, 32)


def _unit(degrees: float) -> bytes:
    angle = math.radians(degrees)
    return torch.tensor([math.cos(angle), math.sin(angle)]).numpy().tobytes()


def test_filter_groups_cuts_groups_from_embeddings():
    # Angles 0, 30, 100, 110, 120 degrees: cosines 0.866, 0.342, 0.985, 0.985.
    a = ShotGroup("a", tuple(_clip(f"a{i}") for i in range(5)))
    # Group b: shot 1 is missing; the rest are identical (cosine 1).
    b = ShotGroup("b", tuple(_clip(f"b{i}") for i in range(4)))
    embedded = {f"0:{i}": (_unit(d), "") for i, d in enumerate((0, 30, 100, 110, 120))}
    embedded |= {"1:0": (_unit(0), ""), "1:1": (b"", "missing")}
    embedded |= {"1:2": (_unit(0), ""), "1:3": (_unit(0), "")}
    result = filter_groups([a, b], embedded, 0.7, 2)
    assert [(g["id"], [c.path[-6:-4] for c in g["shots"]]) for g in result.groups] == [
        ("a/0", ["a0", "a1"]),
        ("a/1", ["a2", "a3", "a4"]),
        ("b", ["b2", "b3"]),
    ]
    assert result.groups[1]["similarities"] == pytest.approx([0.98481, 0.98481], abs=1e-5)
    assert result.counts == {
        "groups_in": 2,
        "groups_out": 3,
        "windows_in": 7,
        "windows_kept": 4,
        "shots_in": 9,
        "shots_embedded": 8,
    }
    assert result.skips == SkipCounts({"missing": 1})
    assert sorted(result.similarities) == pytest.approx(
        sorted([0.866025, 0.342020, 0.984808, 0.984808, 1.0]), abs=1e-5
    )
    line = result.summary(0.7, 2)
    assert "groups in 2, out 3" in line and "kept 4 of 7" in line and "missing=1" in line


def test_manifest_text_paths_relative_to_the_output_when_inside_it():
    inside, outside = _clip("a"), Clip("s3://bucket/x.mp4", "c", 9, 8.0, 32, 32, 1.0, 2.0)
    groups = [{"id": "g", "shots": [inside, outside], "similarities": [0.9]}]
    jsonl = manifest_text(groups, "/data/filtered.jsonl")
    record = json.loads(jsonl)
    assert [s["path"] for s in record["shots"]] == ["videos/a.mp4", "s3://bucket/x.mp4"]
    assert record["shots"][1] | {} == {
        "path": "s3://bucket/x.mp4",
        "caption": "c",
        "num_frames": 9,
        "fps": 8.0,
        "width": 32,
        "height": 32,
        "start": 1.0,
        "end": 2.0,
    }
    assert "start" not in record["shots"][0]
    assert json.loads(manifest_text(groups, "/elsewhere/out.json"))[0]["shots"][0]["path"] == (
        "/data/videos/a.mp4"
    )
    remote = manifest_text(
        [{"id": "g", "shots": [outside], "similarities": []}], "s3://bucket/f.jsonl"
    )
    assert json.loads(remote)["shots"][0]["path"] == "x.mp4"


# ---------------------------------------------------------------- encoders


def test_uniform_frame_indices_take_segment_middles():
    assert uniform_frame_indices(17, 4) == [2, 6, 10, 14]  # (2i + 1) * 17 / 8
    assert uniform_frame_indices(8, 8) == list(range(8))
    assert uniform_frame_indices(9, 1) == [4]
    with pytest.raises(DataError, match="3 frames, the encoder needs 4"):
        uniform_frame_indices(3, 4)


@pytest.fixture(scope="module")
def xclip_folder(tmp_path_factory):
    """A tiny X-CLIP saved with save_pretrained, with an ImageNet-normalising processor."""
    from transformers import CLIPImageProcessorPil, XCLIPModel

    folder = tmp_path_factory.mktemp("xclip")
    torch.manual_seed(0)
    XCLIPModel(tiny_xclip_config()).save_pretrained(folder)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(folder)
    return folder


def _reference_embedding(folder, frames_TCHW_uint8, mean, std) -> torch.Tensor:
    """X-CLIP by hand: 32x32 frames need no resize or crop, only rescale and normalize."""
    from transformers import XCLIPModel

    model = XCLIPModel.from_pretrained(folder).eval()
    mean_C11, std_C11 = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    pixels = (frames_TCHW_uint8.float() / 255 - mean_C11) / std_C11
    with torch.no_grad():
        video = model.get_video_features(pixel_values=pixels[None])
    return video.pooler_output[0]


def test_xclip_encoder_matches_the_model_called_by_hand(xclip_folder):
    encoder = load_encoder("xclip", str(xclip_folder))
    assert isinstance(encoder, VideoEncoder) and encoder.name == "xclip"
    assert encoder.num_frames == 4 and "xclip" in encoder_names()
    frames = torch.randint(
        0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    got = encoder.embed(frames)
    want = _reference_embedding(xclip_folder, frames, IMAGENET_MEAN, IMAGENET_STD)
    assert got.shape == (16,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # Float frames in [0, 1] are the same pictures.
    torch.testing.assert_close(encoder.embed(frames.float() / 255), got)
    with pytest.raises(ValueError, match="takes 4 frames"):
        encoder.embed(frames[:3])


def test_xclip_without_a_processor_config_uses_clip_defaults(tmp_path, xclip_folder):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((xclip_folder / name).read_bytes())
    encoder = load_encoder("xclip", f"file://{tmp_path}")
    frames = torch.randint(
        0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    want = _reference_embedding(tmp_path, frames, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(encoder.embed(frames), want, atol=1e-5, rtol=1e-4)


def test_encoder_errors_name_the_problem(tmp_path):
    choices = "unknown video encoder 'viclip'; choose one of: clip, dinov2, videomae, xclip, or"
    with pytest.raises(ConfigError, match=choices):
        load_encoder("viclip", str(tmp_path))
    with pytest.raises(DataError, match="encoder folder not found"):
        local_folder(str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"no config\.json"):
        load_encoder("xclip", str(tmp_path))
    with pytest.raises(DataError, match=r"no config\.json"):
        check_encoder("xclip", str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(DataError, match="not an X-CLIP model \\(model_type 'clip'\\)"):
        check_encoder("xclip", str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(DataError, match=r"cannot read config\.json"):
        check_encoder("xclip", str(tmp_path))


# ---------------------------------------------------------------- command line


def _sft(tmp_path) -> str:
    shot = {"path": "a.mp4", "caption": "c", "num_frames": 9, "fps": 8, "width": 32, "height": 32}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"id": "g", "shots": [shot] * 3}) + "\n")
    return str(path)


def _options(tmp_path, **changes) -> dict[str, str]:
    (tmp_path / "config.json").write_text('{"model_type": "xclip"}')  # passes the cheap check
    return {
        "--manifest": _sft(tmp_path),
        "--encoder-path": str(tmp_path),
        "--out": str(tmp_path / "out.jsonl"),
        **changes,
    }


def _args(tmp_path, **changes) -> list[str]:
    """The job's --spec for these options (as `m2d data filter` builds it)."""
    options = _options(tmp_path, **changes)
    spec = {name.removeprefix("--").replace("-", "_"): value for name, value in options.items()}
    return ["--spec", json.dumps(spec)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--threshold": "1.5"}, "--threshold 1.5 is not a cosine similarity in [-1, 1]"),
        ({"--scenes": "0"}, "--scenes, --num-actors and --batch-size must be >= 1"),
        ({"--out": "out.csv"}, "--out out.csv: name it .json or .jsonl"),
        ({"--encoder": "viclip"}, "unknown video encoder 'viclip'"),
        ({"--encoder-path": "/nonexistent/enc"}, "/nonexistent/enc: no config.json; give a"),
        ({"--manifest": "/nonexistent/sft.jsonl"}, "/nonexistent/sft.jsonl: manifest not found"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, changes, message):
    assert main(_args(tmp_path, **changes)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_an_unreadable_manifest_names_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    assert main(_args(tmp_path, **{"--manifest": str(bad)})) == 2
    assert f"{bad}: not valid JSON" in capsys.readouterr().err


def test_existing_outputs_are_never_overwritten(tmp_path, capsys):
    (tmp_path / "out.jsonl").write_text("keep me")
    assert main(_args(tmp_path)) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "out.jsonl").read_text() == "keep me"
    (tmp_path / "out.jsonl").unlink()
    (tmp_path / "out.png").write_text("keep me too")
    assert main(_args(tmp_path)) == 2
    assert f"--histogram {tmp_path / 'out.png'} already exists" in capsys.readouterr().err


def test_m2d_data_filter_runs_the_job_and_reports_one_line(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    (tmp_path / "out.jsonl").write_text("keep me")
    options = _options(tmp_path, **{"--threshold": "0.8", "--num-actors": "2"})
    argv = ["data", "filter", *(item for pair in options.items() for item in pair)]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --out {tmp_path / 'out.jsonl'} already exists; remove it or choose another name"
    ]
