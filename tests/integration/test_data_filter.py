"""``m2d data filter`` for real: Ray Data actors, a tiny X-CLIP, local files, moto S3, MLflow.

The expected windows come from an independent reference: the test decodes every good
shot with PyAV itself, normalises the frames by hand and calls the same tiny X-CLIP
directly, then enumerates the windows of n shots whose adjacent similarities pass.
The threshold sits in the widest gap of the middle half of those similarities, so some
windows pass, some do not, and float noise cannot flip one.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from infra.config import StorageConfig
from infra.job_entry import spec_argv
from infra.job_specs import SynthSpec
from infra.storage import filesystem
from orchestrator.cli import cli
from trainer.data.manifest import read_shot_groups

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCENES = 3
FRAMES = 9  # per synthetic shot
ENCODER_FRAMES = 4
# Every kind of bad shot, each once; the byte-cut mp4 loses its index: undecodable.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPECTED_SKIPS = {
    "bad_fps": 1,
    "empty_caption": 1,
    "missing": 1,
    "too_short": 1,
    "truncated": 1,
    "undecodable": 2,
    "zero_byte": 1,
}


def tiny_xclip():
    """A 1-layer X-CLIP with 16-wide towers on 4 frames of 32x32 (as in the unit tests)."""
    from transformers import XCLIPConfig, XCLIPModel

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    tower["num_attention_heads"] = 2
    mit = {"mit_hidden_size": 16, "mit_intermediate_size": 32, "mit_num_hidden_layers": 1}
    vision = {**tower, **mit, "mit_num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    text = {**tower, "vocab_size": 64, "max_position_embeddings": 16}
    config = XCLIPConfig(
        text_config=text,
        vision_config={**vision, "num_frames": ENCODER_FRAMES},
        projection_dim=16,
        prompt_layers=1,
        prompt_num_attention_heads=2,
    )
    torch.manual_seed(0)
    return XCLIPModel(config)


def _shot(story: int, shot: int, **changes) -> dict:
    path = f"videos/story{story:03d}/shot{shot}.mp4"
    row = {"path": path, "caption": f"shot {story}.{shot}", "num_frames": FRAMES, "fps": 8.0}
    return {**row, "width": 32, "height": 32, **changes}


def _bad(name: str, **changes) -> dict:
    return _shot(0, 0, path=f"bad/{name}.mp4", **changes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Synthetic stories plus a manifest that mixes them with every kind of bad shot."""
    root = tmp_path_factory.mktemp("filter")
    data = root / "data"
    spec = SynthSpec(out=str(data), stories=4, scenes=SCENES, shots=5, frames=FRAMES, seed=3)
    synth = [sys.executable, "-m", "datajobs.synth", *spec_argv(spec)]
    subprocess.run(synth, check=True, cwd=ROOT)
    (data / "bad").mkdir()
    (data / "bad" / "zero.mp4").write_bytes(b"")
    (data / "bad" / "junk.mp4").write_bytes(b"\x00garbage" * 200)
    good = (data / "videos/story000/shot0.mp4").read_bytes()
    (data / "bad" / "cut.mp4").write_bytes(good[: len(good) // 2])
    shutil.copy(data / "videos/story000/shot0.mp4", data / "bad" / "short.mp4")
    groups = [json.loads(line) for line in (data / "sft.jsonl").read_text().splitlines()]
    groups.append(
        {
            "id": "broken",
            "shots": [
                *(_shot(0, s) for s in range(3)),
                _bad("absent"),
                *(_shot(1, s) for s in range(3)),
                _bad("zero"),
                *(_shot(2, s) for s in range(2)),
                _bad("junk"),
                *(_shot(2, s) for s in range(2, 5)),
                _bad("cut"),
                _shot(3, 0),
                _shot(3, 1, num_frames=40),  # the file has 9: truncated
                _shot(3, 2),
                _shot(3, 3),
                _bad("short", num_frames=2),  # fewer than the encoder's 4 frames
                _shot(3, 4),
            ],
        }
    )
    no_fps = {k: v for k, v in _shot(1, 4).items() if k != "fps"}
    rows = [_shot(1, 0), _shot(1, 1), _shot(1, 2, caption=" "), _shot(1, 3), _shot(1, 4)]
    groups.append({"id": "rows", "shots": [*rows, _shot(2, 0), no_fps]})
    (data / "mixed.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    return data


@pytest.fixture(scope="module")
def xclip_folder(tmp_path_factory) -> Path:
    """The tiny X-CLIP of the unit tests, with an ImageNet-normalising image processor."""
    from transformers import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("xclip")
    tiny_xclip().save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)
    return folder


def _decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _reference_embedding(model, frames: list[np.ndarray]) -> torch.Tensor:
    picked = [frames[(2 * i + 1) * FRAMES // (2 * ENCODER_FRAMES)] for i in range(ENCODER_FRAMES)]
    video_TCHW = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float() / 255
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    with torch.no_grad():
        output = model.get_video_features(pixel_values=((video_TCHW - mean) / std)[None])
    return output.pooler_output[0]


@pytest.fixture(scope="module")
def reference(dataset, xclip_folder) -> dict:
    """Expected windows (tuples of relative paths) and the threshold that splits them."""
    from transformers import XCLIPModel

    model = XCLIPModel.from_pretrained(xclip_folder).eval()
    good = {f"videos/story{t:03d}/shot{s}.mp4" for t in range(4) for s in range(5)}
    embeddings = {p: _reference_embedding(model, _decode_all(dataset / p)) for p in good}
    groups = [
        [_usable(shot, embeddings) for shot in json.loads(line)["shots"]]
        for line in (dataset / "mixed.jsonl").read_text().splitlines()
    ]
    sims = {}
    for a, b in (pair for group in groups for pair in itertools.pairwise(group)):
        if a and b:
            sims[a, b] = float(
                torch.nn.functional.cosine_similarity(embeddings[a], embeddings[b], 0)
            )
    threshold = _split_point(sorted(sims.values()))
    windows = []
    for group in groups:
        for start in range(len(group) - SCENES + 1):
            window = group[start : start + SCENES]
            if all(window) and all(sims[a, b] >= threshold for a, b in itertools.pairwise(window)):
                windows.append(tuple(window))
    assert 0 < len(windows) < sum(max(len(g) - SCENES + 1, 0) for g in groups)
    return {"threshold": threshold, "windows": sorted(windows), "pairs": len(sims)}


def _usable(shot: dict, embeddings: dict) -> str | None:
    """The shot's path if the job can use it (a good file whose row is complete)."""
    complete = shot.get("fps") and shot["caption"].strip() and shot["num_frames"] == FRAMES
    return shot["path"] if complete and shot["path"] in embeddings else None


def _split_point(values: list[float]) -> float:
    middle = range(len(values) // 4, 3 * len(values) // 4)
    i = max(middle, key=lambda k: values[k + 1] - values[k])
    assert values[i + 1] - values[i] > 1e-4, "no clear gap to put the threshold in"
    return (values[i] + values[i + 1]) / 2


def _windows_of(manifest: str, base: str, storage: StorageConfig | None = None) -> list[tuple]:
    """The windows of n shots in a written manifest, read back with the project's reader."""
    groups, skips = read_shot_groups(manifest, SCENES, storage)
    assert skips.total == 0
    return sorted(
        tuple(shot.path.removeprefix(base) for shot in group.shots[start : start + SCENES])
        for group in groups
        for start in range(len(group.shots) - SCENES + 1)
    )


def _summary(output: str) -> str:
    return output.strip().splitlines()[-1]


def _check_png(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_filter_on_s3_keeps_the_reference_windows_and_logs_to_mlflow(
    dataset, xclip_folder, reference, s3_endpoint, s3_bucket, mlflow_server, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    root = f"s3://{s3_bucket}"
    storage = StorageConfig(root=root, endpoint_url=s3_endpoint)
    fs, _ = filesystem(root, storage)
    fs.put(f"{dataset}/", f"{s3_bucket}/data/", recursive=True)
    fs.put(f"{xclip_folder}/", f"{s3_bucket}/models/xclip/", recursive=True)
    monkeypatch.setenv("M2D_ENCODER_CACHE", str(tmp_path / "cache"))
    out = f"{root}/filtered/sft.jsonl"
    argv = ["data", "filter", "--manifest", f"{root}/data/mixed.jsonl", "--out", out]
    argv += ["--encoder-path", f"{root}/models/xclip", "--endpoint-url", s3_endpoint]
    argv += ["--threshold", repr(reference["threshold"])]
    argv += ["--tracking-uri", mlflow_server, "--experiment", "filter-it"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert _windows_of(out, f"{root}/data/", storage) == reference["windows"]
    summary = _summary(result.output)
    assert f"kept {len(reference['windows'])} of " in summary
    skipped = ", ".join(f"{k}={v}" for k, v in EXPECTED_SKIPS.items())
    assert summary.endswith(f"skipped: {skipped}"), summary
    _check_png(fs.cat_file(f"{s3_bucket}/filtered/sft.png"))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the encoder came from S3

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("filter-it")
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    assert metrics["windows_kept"] == len(reference["windows"])
    assert metrics["shots_in"] - metrics["shots_embedded"] == 6  # the bad videos
    assert {k.removeprefix("skipped."): v for k, v in metrics.items() if "." in k} == (
        EXPECTED_SKIPS
    )
    assert run.data.params["threshold"] == repr(reference["threshold"])
    assert run.data.params["encoder_path"] == f"{root}/models/xclip"
    (artifact,) = client.list_artifacts(run.info.run_id)
    assert artifact.path == "similarities.png"
    _check_png(
        Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))).read_bytes()
    )
    # A second run refuses to overwrite the filtered manifest.
    again = CliRunner().invoke(cli, argv)
    assert again.exit_code == 2 and "already exists" in again.output
