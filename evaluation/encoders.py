"""Video encoders behind one small interface, shared by the data filter and evaluation.

A :class:`VideoEncoder` turns one clip into a 1-D embedding; cosine similarity between
embeddings says how alike two clips look (the SFT filter compares adjacent scenes, an
evaluation compares generated scenes). Encoders are registered by name and built with
:func:`load_encoder` from a local folder or an ``s3://`` URI; remote folders are copied
once into a local cache first (``M2D_ENCODER_CACHE``, default a temp folder).

Encoders:

- ``xclip``: transformers' X-CLIP (``XCLIPModel.get_video_features``). The folder is what
  ``save_pretrained`` writes. Frames go through the folder's image processor
  (``preprocessor_config.json``), as ``XCLIPProcessor`` sends video frames through its
  image processor; X-CLIP needs no tokenizer for video, so none is loaded. A folder
  without a processor config gets the image processor transformers maps X-CLIP to
  (``CLIPImageProcessor`` with its defaults) sized to ``vision_config.image_size``.
- ``clip``: transformers' CLIP, frame-averaged: each of ``num_frames`` frames through
  ``CLIPModel.get_image_features``, unit-normalised, then averaged.
- ``dinov2``: transformers' DINOv2 (``Dinov2Model``), frame-averaged like ``clip``: image
  features for subject consistency; it embeds no text.
- ``videomae``: transformers' VideoMAE (``VideoMAEModel``), the mean of its last hidden
  states over ``num_frames`` frames: the features of the content-debiased FVD (Ge et al.,
  CVPR 2024). Frames are resized (shorter side), centre-cropped and normalised with the
  folder's ``preprocessor_config.json`` mean and std (ImageNet's without one).

The folder ``tiny`` names a built-in tiny random-weight ``clip`` or ``videomae``
(``evaluation.tiny``): what `make demo` scores with, nothing downloaded, no meaning.

A user's own encoder (the paper's ViCLIP, which transformers does not ship) plugs in as
``MODULE:FUNCTION`` in place of a name: ``FUNCTION(uri, storage)`` returns an object with
``num_frames`` and ``embed`` (and ``embed_texts`` for semantic scores). The module must be
importable where the job runs (installed in the cluster's image, or on ``PYTHONPATH``).
Such a function may return a :class:`StoryOracle` instead: it scores a whole story from
its scenes' frames and prompts with scores of its own (``evaluation.toy_oracle:oracle``
reads the toy world's stories exactly); evaluation then reports those scores instead of
the embedding-based ones (:func:`oracle_of`).

Encoders that also embed text (``embed_texts``: X-CLIP's and CLIP's text towers, with the
folder's own tokenizer, loaded on first use) give evaluation its semantic consistency;
:func:`text_encoder_of` says whether one does.

Shape legend: T frames, C = 3 RGB channels, H height, W width, D embedding size.
torch and transformers load inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from infra.config import StorageConfig
from infra.errors import ConfigError, DataError, first_line
from infra.model_store import fetch_folder
from infra.storage import filesystem, is_remote

if TYPE_CHECKING:
    import torch

__all__ = [
    "StoryOracle",
    "TextVideoEncoder",
    "VideoEncoder",
    "check_encoder",
    "encoder_names",
    "load_encoder",
    "local_folder",
    "oracle_of",
    "register_encoder",
    "text_encoder_of",
    "uniform_frame_indices",
]


@runtime_checkable
class VideoEncoder(Protocol):
    """One clip in, one embedding out.

    ``num_frames`` is how many frames ``embed`` takes: sample that many from a clip
    (:func:`uniform_frame_indices`) before calling it.
    """

    name: str

    @property
    def num_frames(self) -> int: ...

    def embed(self, frames_TCHW: torch.Tensor) -> torch.Tensor:
        """The clip's embedding, float32 (D,). Frames are uint8, or float in [0, 1]."""
        ...


@runtime_checkable
class TextVideoEncoder(VideoEncoder, Protocol):
    """A video encoder whose text tower embeds prompts into the same space."""

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """One embedding per prompt, float32 (N, D)."""
        ...


def text_encoder_of(encoder: VideoEncoder | StoryOracle) -> TextVideoEncoder | None:
    """``encoder`` if it embeds text too, else None (then no semantic consistency)."""
    return encoder if isinstance(encoder, TextVideoEncoder) else None


@runtime_checkable
class StoryOracle(Protocol):
    """Scores a story directly from its frames, with named scores of its own (no
    embeddings): what a world whose truth is known, like the toy world, is judged by."""

    name: str

    def score_story(
        self, scenes_THWC: list[torch.Tensor], prompts: list[str], context_scenes: int = 0
    ) -> dict[str, float | None]:
        """Named scores of one story from every frame of each scene, uint8 (T, H, W, 3),
        and the scenes' prompts, same order; the first ``context_scenes`` scenes were
        given (extension), not generated. None: a score that does not apply."""
        ...


def oracle_of(encoder: VideoEncoder | StoryOracle) -> StoryOracle | None:
    """``encoder`` if it is a story oracle (it scores stories itself), else None."""
    return encoder if isinstance(encoder, StoryOracle) else None


class _EncoderClass(Protocol):
    """What a registered class provides: a cheap folder check and the loader."""

    @classmethod
    def check(cls, uri: str, storage: StorageConfig | None) -> None: ...

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None) -> VideoEncoder: ...


_REGISTRY: dict[str, _EncoderClass] = {}


def register_encoder(name: str) -> Callable[[type], type]:
    """Class decorator: register a class with ``check`` and ``from_pretrained`` classmethods."""

    def decorate(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return decorate


def encoder_names() -> list[str]:
    """The registered encoder names, sorted."""
    return sorted(_REGISTRY)


def check_encoder_name(name: str) -> None:
    """ConfigError naming the choices when ``name`` is neither a registered encoder nor a
    ``MODULE:FUNCTION`` that can be imported."""
    if ":" in name:
        _user_loader(name)
    elif name not in _REGISTRY:
        raise ConfigError(
            f"unknown video encoder {name!r}; choose one of: {', '.join(encoder_names())}, "
            "or give MODULE:FUNCTION"
        )


def _user_loader(name: str) -> Callable[[str, StorageConfig | None], VideoEncoder]:
    """The function a ``MODULE:FUNCTION`` encoder names."""
    import importlib

    module_name, _, function = name.partition(":")
    try:
        loader = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"encoder {name}: cannot import it ({first_line(exc)}); install the module or "
            "put it on PYTHONPATH where the job runs"
        ) from None
    if not callable(loader):
        raise ConfigError(f"encoder {name}: {function} is not a function")
    return loader


def check_encoder(name: str, uri: str, storage: StorageConfig | None = None) -> None:
    """Cheap checks before a job starts (the name, the folder's config); errors name the fix."""
    check_encoder_name(name)
    if ":" not in name:  # a user's encoder checks its folder when it loads
        _REGISTRY[name].check(_tiny_or(name, uri), storage)


def load_encoder(
    name: str, uri: str, storage: StorageConfig | None = None
) -> VideoEncoder | StoryOracle:
    """The encoder ``name`` (or ``MODULE:FUNCTION``'s, which may be a story oracle) loaded
    from the folder at ``uri`` (path or ``s3://``)."""
    check_encoder_name(name)
    uri = _tiny_or(name, uri)
    if ":" in name:
        encoder = _user_loader(name)(uri, storage)
        if not isinstance(encoder, VideoEncoder | StoryOracle):
            raise ConfigError(
                f"encoder {name}: returned {type(encoder).__name__}, which lacks num_frames "
                "or embed (an encoder), and score_story (an oracle)"
            )
        return encoder
    return _REGISTRY[name].from_pretrained(uri, storage)


def _tiny_or(name: str, uri: str) -> str:
    """``uri``, or for ``tiny`` the folder of the built-in tiny ``name`` encoder."""
    from evaluation.tiny import TINY, tiny_folder

    if uri != TINY:
        return uri
    try:
        return str(tiny_folder(name))
    except ValueError as exc:
        raise ConfigError(f"--encoder-path tiny: {exc}") from None


def uniform_frame_indices(total_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over a clip: the middle of equal segments.

    Raises DataError when the clip has fewer than ``count`` frames.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    if total_frames < count:
        raise DataError(f"clip has {total_frames} frames, the encoder needs {count}")
    return [(2 * i + 1) * total_frames // (2 * count) for i in range(count)]


def local_folder(
    uri: str, storage: StorageConfig | None = None, cache_dir: str | None = None
) -> Path:
    """The local folder of ``uri``: the path itself, or a cached copy of an ``s3://`` folder
    (``infra.model_store.fetch_folder``; cache ``M2D_ENCODER_CACHE``)."""
    if not is_remote(uri):
        folder = Path(uri.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise DataError(f"{uri}: encoder folder not found; give a local folder or s3:// URI")
        return folder
    cache = cache_dir or os.environ.get(
        "M2D_ENCODER_CACHE", os.path.join(tempfile.gettempdir(), "m2d-encoders")
    )
    return fetch_folder(uri, storage, cache)


def _as_uint8(frames_TCHW: torch.Tensor) -> torch.Tensor:
    import torch

    if frames_TCHW.ndim != 4 or frames_TCHW.shape[1] != 3:
        raise ValueError(f"expected frames shaped (T, 3, H, W), got {tuple(frames_TCHW.shape)}")
    if frames_TCHW.dtype == torch.uint8:
        return frames_TCHW
    return (frames_TCHW.float() * 255).round().clamp(0, 255).to(torch.uint8)


@register_encoder("xclip")
class XCLIPEncoder:
    """transformers' X-CLIP video tower: ``get_video_features`` of ``num_frames`` frames."""

    name = "xclip"

    def __init__(self, model, image_processor) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.folder: Path | None = None

    @classmethod
    def check(cls, uri: str, storage: StorageConfig | None = None) -> None:
        """The folder holds an X-CLIP ``config.json`` (read without loading transformers)."""
        _check_model_type(uri, storage, "xclip", "an X-CLIP")

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None = None) -> XCLIPEncoder:
        """Load a ``save_pretrained`` folder (local or ``s3://``) on the best device."""
        from transformers import XCLIPModel

        folder, model = _load_model(XCLIPModel, uri, storage)
        encoder = cls(model, _image_processor(folder, model.config.vision_config.image_size))
        encoder.folder = folder
        return encoder

    @property
    def num_frames(self) -> int:
        """Frames per clip: the size of the model's frame position table."""
        return int(self.model.config.vision_config.num_frames)

    def embed(self, frames_TCHW: torch.Tensor) -> torch.Tensor:
        """The clip's X-CLIP video embedding, float32 (projection_dim,)."""
        import torch

        frames = _as_uint8(frames_TCHW)
        if frames.shape[0] != self.num_frames:
            raise ValueError(f"X-CLIP takes {self.num_frames} frames, got {frames.shape[0]}")
        pixels = self.image_processor(
            images=list(frames), input_data_format="channels_first", return_tensors="pt"
        )["pixel_values"]
        parameter = next(self.model.parameters())
        pixels_BTCHW = pixels.unsqueeze(0).to(parameter.device, parameter.dtype)
        with torch.inference_mode():
            output = self.model.get_video_features(pixel_values=pixels_BTCHW)
        # transformers 5 returns a ModelOutput whose pooler_output is the video embedding.
        features = getattr(output, "pooler_output", output)
        return features[0].float().cpu()

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """X-CLIP's text tower (``get_text_features``), float32 (N, projection_dim)."""
        return _text_features(self, prompts)


@register_encoder("clip")
class CLIPFrameEncoder:
    """transformers' CLIP image tower over ``num_frames`` frames, unit-normalised per frame
    and averaged; its text tower for prompts."""

    name = "clip"
    num_frames = 8

    def __init__(self, model, image_processor, folder: Path | None = None) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.folder = folder

    @classmethod
    def check(cls, uri: str, storage: StorageConfig | None = None) -> None:
        """The folder holds a CLIP ``config.json`` (read without loading transformers)."""
        _check_model_type(uri, storage, "clip", "a CLIP")

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None = None) -> CLIPFrameEncoder:
        from transformers import CLIPModel

        folder, model = _load_model(CLIPModel, uri, storage)
        return cls(model, _image_processor(folder, model.config.vision_config.image_size), folder)

    def embed(self, frames_TCHW: torch.Tensor) -> torch.Tensor:
        """The mean of the frames' unit CLIP image embeddings, float32 (projection_dim,)."""
        import torch

        frames = _as_uint8(frames_TCHW)
        pixels = self.image_processor(
            images=list(frames), input_data_format="channels_first", return_tensors="pt"
        )["pixel_values"]
        parameter = next(self.model.parameters())
        with torch.inference_mode():
            output = self.model.get_image_features(
                pixel_values=pixels.to(parameter.device, parameter.dtype)
            )
        return _mean_of_unit(getattr(output, "pooler_output", output))

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's text tower (``get_text_features``), float32 (N, projection_dim)."""
        return _text_features(self, prompts)


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalisation(folder: Path) -> tuple[list[float], list[float]]:
    """The image mean and std of the folder's processor config, else ImageNet's."""
    config = folder / "preprocessor_config.json"
    found = json.loads(config.read_text()) if config.is_file() else {}
    return list(found.get("image_mean", _IMAGENET_MEAN)), list(
        found.get("image_std", _IMAGENET_STD)
    )


def _pixels(frames_TCHW: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Float frames (T, 3, size, size): shorter side resized to ``size``, centre crop,
    normalised."""
    import torch
    import torch.nn.functional as F

    frames = _as_uint8(frames_TCHW).float() / 255
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(
        frames,
        size=(max(size, round(height * scale)), max(size, round(width * scale))),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    mean_ = torch.tensor(mean).view(1, 3, 1, 1)
    std_ = torch.tensor(std).view(1, 3, 1, 1)
    return (cropped - mean_) / std_


@register_encoder("dinov2")
class Dinov2FrameEncoder:
    """transformers' DINOv2 over ``num_frames`` frames: each frame's pooled (CLS)
    features, unit-normalised, averaged. Image features only: no text tower."""

    name = "dinov2"
    num_frames = 8

    def __init__(self, model, mean, std) -> None:
        self.model, self.mean, self.std = model.eval(), mean, std

    @classmethod
    def check(cls, uri: str, storage: StorageConfig | None = None) -> None:
        _check_model_type(uri, storage, "dinov2", "a DINOv2")

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None = None) -> Dinov2FrameEncoder:
        from transformers import Dinov2Model

        folder, model = _load_model(Dinov2Model, uri, storage)
        return cls(model, *_normalisation(folder))

    def embed(self, frames_TCHW: torch.Tensor) -> torch.Tensor:
        import torch

        pixels = _pixels(frames_TCHW, self.model.config.image_size, self.mean, self.std)
        parameter = next(self.model.parameters())
        with torch.inference_mode():
            output = self.model(pixel_values=pixels.to(parameter.device, parameter.dtype))
        return _mean_of_unit(output.pooler_output)


@register_encoder("videomae")
class VideoMAEEncoder:
    """transformers' VideoMAE: the mean of the last hidden states of ``num_frames`` frames
    (the content-debiased FVD's features)."""

    name = "videomae"

    def __init__(self, model, mean, std) -> None:
        self.model, self.mean, self.std = model.eval(), mean, std

    @classmethod
    def check(cls, uri: str, storage: StorageConfig | None = None) -> None:
        _check_model_type(uri, storage, "videomae", "a VideoMAE")

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None = None) -> VideoMAEEncoder:
        from transformers import VideoMAEModel

        folder, model = _load_model(VideoMAEModel, uri, storage)
        return cls(model, *_normalisation(folder))

    @property
    def num_frames(self) -> int:
        return int(self.model.config.num_frames)

    def embed(self, frames_TCHW: torch.Tensor) -> torch.Tensor:
        import torch

        if frames_TCHW.shape[0] != self.num_frames:
            raise ValueError(f"VideoMAE takes {self.num_frames} frames, got {frames_TCHW.shape[0]}")
        pixels = _pixels(frames_TCHW, self.model.config.image_size, self.mean, self.std)
        parameter = next(self.model.parameters())
        with torch.inference_mode():
            output = self.model(
                pixel_values=pixels.unsqueeze(0).to(parameter.device, parameter.dtype)
            )
        return output.last_hidden_state.mean(dim=1)[0].float().cpu()


def _mean_of_unit(features_TD: torch.Tensor) -> torch.Tensor:
    """The mean of per-frame features, each unit-normalised first, float32 on the CPU."""
    features = features_TD.float()
    return (features / features.norm(dim=-1, keepdim=True)).mean(dim=0).cpu()


def _check_model_type(uri: str, storage: StorageConfig | None, kind: str, what: str) -> None:
    """The folder at ``uri`` holds a ``config.json`` of ``model_type`` ``kind``."""
    fs, path = filesystem(uri, storage)
    try:
        config = json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
    except FileNotFoundError:
        raise DataError(
            f"{uri}: no config.json; give a folder written by save_pretrained"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != kind:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise DataError(f"{uri}: config.json is not {what} model (model_type {found!r})")


def _load_model(model_class, uri: str, storage: StorageConfig | None):
    """(local folder, model on the best device) of a ``save_pretrained`` folder."""
    import torch

    folder = local_folder(uri, storage)
    if not (folder / "config.json").is_file():
        raise DataError(f"{uri}: no config.json; save the model with save_pretrained")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return folder, model_class.from_pretrained(folder).to(device)


def _text_features(encoder, prompts: list[str]) -> torch.Tensor:
    """The text tower's features of ``prompts`` with the folder's tokenizer (loaded once),
    cut to the tower's length."""
    import torch
    from transformers import AutoTokenizer

    if getattr(encoder, "tokenizer", None) is None:
        try:
            encoder.tokenizer = AutoTokenizer.from_pretrained(encoder.folder)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{encoder.folder}: no tokenizer for the text tower ({first_line(exc)}); save "
                "the model's tokenizer into the folder with save_pretrained"
            ) from None
    length = encoder.model.config.text_config.max_position_embeddings
    tokens = encoder.tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=length,
        return_tensors="pt",
    )  # fmt: skip
    device = next(encoder.model.parameters()).device
    with torch.inference_mode():
        output = encoder.model.get_text_features(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
        )
    return getattr(output, "pooler_output", output).float().cpu()


def _image_processor(folder: Path, image_size: int):
    """The folder's image processor, else transformers' X-CLIP default sized to the model."""
    from transformers import AutoImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(folder)
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # an older transformers names the PIL processor plainly
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
