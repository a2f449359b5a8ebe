"""The toy model's frozen parts: an exactly invertible pixel "VAE" and a word-level T5.

The toy world (``evaluation.toy_world``: 16x16-pixel scenes, prompts such as "a red
square moves left") is small enough to learn on 2 CPU cores, but a learned CogVideoX VAE
and a real T5 would cost most of that budget and blur what is measured. These parts
remove that cost and nothing else:

- ``ToyVAE`` folds each ``r x r`` block of pixels into channels (pixel-unshuffle) and
  back (pixel-shuffle). It has no learned weights, loses nothing (decode(encode(x)) == x
  exactly) and adds no prior: its latents *are* the pixels, rearranged and scaled. So the
  transformer still has to generate every pixel of every scene - backgrounds, textures,
  objects and their motion - and a score on decoded frames is a score on what the
  transformer made, with no decoder that could fix or spoil it.
- ``word_tokenizer`` gives each word of the world's vocabulary its own token id, and
  ``word_text_encoder`` is a 1-layer ``T5EncoderModel`` whose token embeddings are
  orthogonal rows, so distinct words have distinct, equally far apart embeddings. It is
  frozen and random, as the real T5 is frozen: the transformer learns to read it.

Both are stock diffusers / transformers classes or built from them, saved with
``save_pretrained`` and loaded by ``mask2dit.components.load_parts`` like the real ones.
The vocabulary is an argument: this package never imports the toy world.

Shape legend: B batch, C pixel channels, T frames, H/W pixels, r spatial factor,
h/w latent size (H / r, W / r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

__all__ = ["SPECIAL_TOKENS", "ToyVAE", "word_text_encoder", "word_tokenizer"]

#: T5's own ids for its special tokens (``T5Config``'s pad 0 and eos 1 defaults).
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "</s>", "<unk>")


class ToyVAE(ModelMixin, ConfigMixin):
    """Pixel-unshuffle as a VAE: (B, C, T, H, W) -> (B, C r², T, H/r, W/r) and back, exactly.

    It answers what the project's code asks of ``AutoencoderKLCogVideoX``:
    ``encode(x).latent_dist`` (``sample``, ``mode``, ``parameters``), ``decode(z).sample``,
    ``config.scaling_factor``, ``config.temporal_compression_ratio`` and the memory
    switches (no-ops: there is nothing to tile or slice). Frames pass through one to one
    (temporal ratio 1), so a scene of T frames has T latent frames.

    The posterior is a point mass: logvar is -inf (variance 0), so ``sample`` returns the
    mean exactly (it still draws its noise, so a generator advances as with the real
    VAE). The real VAE's posterior spread is what its encoder leaves uncertain; a
    rearrangement leaves nothing uncertain, and a zero spread keeps decode(sample(x)) == x
    (an extension's context scenes come back pixel for pixel).

    There are no parameters: callers read ``vae.device`` and ``vae.dtype``, which come
    from one empty buffer that ``.to()`` moves and casts. It is also all that the weights
    file holds (diffusers loads no model without one).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        spatial_compression_ratio: int = 2,
        temporal_compression_ratio: int = 1,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_compression_ratio < 1:
            raise ValueError(
                f"spatial_compression_ratio must be >= 1, not {spatial_compression_ratio}"
            )
        if temporal_compression_ratio != 1:
            raise ValueError("ToyVAE keeps every frame: temporal_compression_ratio must be 1")
        self.register_buffer("placement", torch.zeros(0))

    @property
    def latent_channels(self) -> int:
        """Channels of a latent: each pixel channel once per position of an r x r block."""
        return self.config.in_channels * self.config.spatial_compression_ratio**2

    def encode(
        self, x_BCTHW: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """The posterior of pixels (B, C, T, H, W): a point mass at their unshuffled values."""
        r = self.config.spatial_compression_ratio
        batch, channels, frames, height, width = x_BCTHW.shape
        if channels != self.config.in_channels or height % r or width % r:
            raise ValueError(
                f"ToyVAE takes {self.config.in_channels} channels at a size divisible by {r}, "
                f"got shape {tuple(x_BCTHW.shape)}"
            )
        mean = F.pixel_unshuffle(_frames_first(x_BCTHW), r)
        mean = _channels_first(mean, batch, frames)
        logvar = torch.full_like(mean, -math.inf)  # variance 0: the latent is the mean
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z_BCThw: torch.Tensor, return_dict: bool = True
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Pixels (B, C, T, H, W) of latents (B, C r², T, h, w): the inverse of ``encode``."""
        if z_BCThw.shape[1] != self.latent_channels:
            raise ValueError(
                f"ToyVAE decodes {self.latent_channels}-channel latents, got shape "
                f"{tuple(z_BCThw.shape)}"
            )
        batch, _, frames = z_BCThw.shape[:3]
        pixels = F.pixel_shuffle(_frames_first(z_BCThw), self.config.spatial_compression_ratio)
        pixels = _channels_first(pixels, batch, frames)
        return DecoderOutput(sample=pixels) if return_dict else (pixels,)

    # The stock VAE's memory switches, which the sampler sets: a pixel rearrangement holds
    # no activations worth tiling or slicing.
    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """No-op (the stock VAE decodes large frames in overlapping tiles)."""

    def disable_tiling(self) -> None:
        """No-op."""

    def enable_slicing(self) -> None:
        """No-op (the stock VAE decodes one sample at a time)."""

    def disable_slicing(self) -> None:
        """No-op."""


def _frames_first(x_BCThw: torch.Tensor) -> torch.Tensor:
    """(B, C, T, h, w) -> (B T, C, h, w): the 2D (un)shuffle sees one frame at a time."""
    batch, channels, frames, height, width = x_BCThw.shape
    return x_BCThw.transpose(1, 2).reshape(batch * frames, channels, height, width)


def _channels_first(x: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """(B T, C, h, w) -> (B, C, T, h, w)."""
    return x.reshape(batch, frames, *x.shape[1:]).transpose(1, 2)


def word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A tokenizer with one id per word of ``vocabulary`` (after T5's pad, eos and unk).

    Words are split on whitespace and punctuation and lower-cased; an unknown word is
    ``<unk>``; every text ends with ``</s>`` as T5's does. Saved with ``save_pretrained``
    and loaded back by ``AutoTokenizer``.
    """
    words = [word.lower() for word in vocabulary]
    if len(set(words)) != len(words) or set(words) & set(SPECIAL_TOKENS):
        raise ValueError(f"the vocabulary must be distinct words, got {list(vocabulary)}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    pad, eos, unk = SPECIAL_TOKENS
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, unk_token=unk
    )


def word_text_encoder(config: dict[str, Any], num_tokens: int, seed: int) -> T5EncoderModel:
    """A ``T5EncoderModel`` from ``config`` (``T5Config`` keywords) for ``num_tokens`` ids.

    Weights are drawn from ``seed`` (the global RNG is left alone); then the token
    embeddings are made orthogonal rows of T5's usual norm, so no two words start out
    alike. ``config["vocab_size"]`` may exceed ``num_tokens`` (a fixed size the planner
    can read); the rows past ``num_tokens`` are never looked up.
    """
    t5 = T5Config(**config)
    if num_tokens > t5.vocab_size:
        raise ValueError(f"{num_tokens} tokens do not fit the T5's vocab_size {t5.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(t5)
        with torch.no_grad():
            # T5 draws each entry from N(0, 1), so rows have norm ~sqrt(d_model).
            torch.nn.init.orthogonal_(model.shared.weight, gain=math.sqrt(t5.d_model))
    return model
