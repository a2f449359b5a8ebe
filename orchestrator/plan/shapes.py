"""Parameter shapes of the CogVideoX parts, from their ``config.json`` alone (no torch).

Each function returns ``{name: shape}`` with the names and shapes that diffusers and
transformers give the same model's ``named_parameters()``; tests build the stock models
on the ``meta`` device and compare the two dicts exactly. The planner sums them into
bytes and, under ZeRO-3, partitions each tensor on its own as DeepSpeed does.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from typing import Any

from mask2dit.tiny import TOY_VAE_CLASS

Shapes = dict[str, tuple[int, ...]]

# diffusers' defaults for keys a config.json may leave out (CogVideoXTransformer3DModel,
# AutoencoderKLCogVideoX) and transformers' for T5Config.
_TRANSFORMER_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "time_embed_dim": 512,
    "ofs_embed_dim": None,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "attention_bias": True,
    "patch_size": 2,
    "patch_size_t": None,
    "norm_elementwise_affine": True,
    "patch_bias": True,
}
_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 512),
    "latent_channels": 16,
    "layers_per_block": 3,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_T5_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "relu",
}


class UnsupportedConfig(ValueError):
    """A config key whose architecture the planner does not model."""


def numel(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Elements in all tensors of ``shapes``."""
    return sum(prod(shape) for shape in shapes.values())


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> Shapes:
    shapes: Shapes = {f"{name}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{name}.bias"] = (out_features,)
    return shapes


def _norm(name: str, channels: int, bias: bool = True) -> Shapes:
    shapes: Shapes = {f"{name}.weight": (channels,)}
    if bias:
        shapes[f"{name}.bias"] = (channels,)
    return shapes


def transformer_shapes(config: Mapping[str, Any]) -> Shapes:
    """``CogVideoXTransformer3DModel`` (CogVideoX 2B/5B layouts; not 1.5's patch_size_t)."""
    cfg = {**_TRANSFORMER_DEFAULTS, **config}
    for key in ("patch_size_t", "ofs_embed_dim"):  # CogVideoX 1.5's temporal patches, I2V
        if cfg[key]:
            raise UnsupportedConfig(f"{key} (CogVideoX 1.5) is not supported")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    head, time_dim, patch = cfg["attention_head_dim"], cfg["time_embed_dim"], cfg["patch_size"]
    affine, bias = cfg["norm_elementwise_affine"], cfg["attention_bias"]
    shapes: Shapes = {"patch_embed.proj.weight": (inner, cfg["in_channels"], patch, patch)}
    if cfg["patch_bias"]:
        shapes["patch_embed.proj.bias"] = (inner,)
    shapes |= _linear("patch_embed.text_proj", inner, cfg["text_embed_dim"])
    shapes |= _linear("time_embedding.linear_1", time_dim, inner)
    shapes |= _linear("time_embedding.linear_2", time_dim, time_dim)
    for i in range(cfg["num_layers"]):
        block = f"transformer_blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes |= _linear(f"{block}.{norm}.linear", 6 * inner, time_dim)
            if affine:
                shapes |= _norm(f"{block}.{norm}.norm", inner)
            if norm == "norm1":
                shapes |= _norm(f"{block}.attn1.norm_q", head)
                shapes |= _norm(f"{block}.attn1.norm_k", head)
                for proj in ("to_q", "to_k", "to_v"):
                    shapes |= _linear(f"{block}.attn1.{proj}", inner, inner, bias)
                shapes |= _linear(f"{block}.attn1.to_out.0", inner, inner)
        shapes |= _linear(f"{block}.ff.net.0.proj", 4 * inner, inner)
        shapes |= _linear(f"{block}.ff.net.2", inner, 4 * inner)
    if affine:
        shapes |= _norm("norm_final", inner)
    shapes |= _linear("norm_out.linear", 2 * inner, time_dim)
    if affine:
        shapes |= _norm("norm_out.norm", inner)
    shapes |= _linear("proj_out", patch * patch * cfg["out_channels"], inner)
    return shapes


def t5_encoder_shapes(config: Mapping[str, Any]) -> Shapes:
    """``T5EncoderModel`` (the encoder of T5 / T5 v1.1; CogVideoX ships T5-XXL's)."""
    cfg = {**_T5_DEFAULTS, **config}
    d_model, inner, d_ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    gated = str(cfg["feed_forward_proj"]).startswith("gated-")
    shapes: Shapes = {"shared.weight": (cfg["vocab_size"], d_model)}
    for i in range(cfg["num_layers"]):
        attention = f"encoder.block.{i}.layer.0.SelfAttention"
        for proj in ("q", "k", "v"):
            shapes[f"{attention}.{proj}.weight"] = (inner, d_model)
        shapes[f"{attention}.o.weight"] = (d_model, inner)
        if i == 0:
            buckets = cfg["relative_attention_num_buckets"]
            shapes[f"{attention}.relative_attention_bias.weight"] = (buckets, cfg["num_heads"])
        shapes[f"encoder.block.{i}.layer.0.layer_norm.weight"] = (d_model,)
        dense = f"encoder.block.{i}.layer.1.DenseReluDense"
        for wi in ("wi_0", "wi_1") if gated else ("wi",):
            shapes[f"{dense}.{wi}.weight"] = (d_ff, d_model)
        shapes[f"{dense}.wo.weight"] = (d_model, d_ff)
        shapes[f"encoder.block.{i}.layer.1.layer_norm.weight"] = (d_model,)
    shapes["encoder.final_layer_norm.weight"] = (d_model,)
    return shapes


def _conv(name: str, out_channels: int, in_channels: int, kernel: tuple[int, ...]) -> Shapes:
    return {f"{name}.weight": (out_channels, in_channels, *kernel), f"{name}.bias": (out_channels,)}


def _resnet(name: str, in_channels: int, out_channels: int, latent: int | None) -> Shapes:
    """CogVideoXResnetBlock3D; ``latent`` channels condition the decoder's spatial norms."""
    shapes: Shapes = {}
    for norm, channels in (("norm1", in_channels), ("norm2", out_channels)):
        if latent is None:
            shapes |= _norm(f"{name}.{norm}", channels)
        else:
            shapes |= _norm(f"{name}.{norm}.norm_layer", channels)
            shapes |= _conv(f"{name}.{norm}.conv_y.conv", channels, latent, (1, 1, 1))
            shapes |= _conv(f"{name}.{norm}.conv_b.conv", channels, latent, (1, 1, 1))
    shapes |= _conv(f"{name}.conv1.conv", out_channels, in_channels, (3, 3, 3))
    shapes |= _conv(f"{name}.conv2.conv", out_channels, out_channels, (3, 3, 3))
    if in_channels != out_channels:
        shapes |= _conv(f"{name}.conv_shortcut", out_channels, in_channels, (1, 1, 1))
    return shapes


def vae_shapes(config: Mapping[str, Any]) -> Shapes:
    """``AutoencoderKLCogVideoX`` (both CogVideoX VAEs share this layout); the toy model's
    ``ToyVAE`` has no parameters."""
    if config.get("_class_name") == TOY_VAE_CLASS:
        return {}
    cfg = {**_VAE_DEFAULTS, **config}
    channels, latent = list(cfg["block_out_channels"]), cfg["latent_channels"]
    layers = cfg["layers_per_block"]
    shapes = _conv("encoder.conv_in.conv", channels[0], cfg["in_channels"], (3, 3, 3))
    previous = channels[0]
    for i, out in enumerate(channels):
        for j in range(layers):
            name = f"encoder.down_blocks.{i}.resnets.{j}"
            shapes |= _resnet(name, previous if j == 0 else out, out, None)
        if i < len(channels) - 1:
            shapes |= _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out, (3, 3))
        previous = out
    for j in range(2):
        shapes |= _resnet(f"encoder.mid_block.resnets.{j}", channels[-1], channels[-1], None)
    shapes |= _norm("encoder.norm_out", channels[-1])
    shapes |= _conv("encoder.conv_out.conv", 2 * latent, channels[-1], (3, 3, 3))
    if cfg["use_quant_conv"]:
        shapes |= _conv("quant_conv", 2 * latent, 2 * latent, (1, 1, 1))
    if cfg["use_post_quant_conv"]:
        shapes |= _conv("post_quant_conv", latent, latent, (1, 1, 1))
    reversed_channels = channels[::-1]
    shapes |= _conv("decoder.conv_in.conv", reversed_channels[0], latent, (3, 3, 3))
    for j in range(2):
        name = f"decoder.mid_block.resnets.{j}"
        shapes |= _resnet(name, reversed_channels[0], reversed_channels[0], latent)
    previous = reversed_channels[0]
    for i, out in enumerate(reversed_channels):
        for j in range(layers + 1):
            name = f"decoder.up_blocks.{i}.resnets.{j}"
            shapes |= _resnet(name, previous if j == 0 else out, out, latent)
        if i < len(channels) - 1:
            shapes |= _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", out, out, (3, 3))
        previous = out
    shapes |= _norm("decoder.norm_out.norm_layer", reversed_channels[-1])
    shapes |= _conv("decoder.norm_out.conv_y.conv", reversed_channels[-1], latent, (1, 1, 1))
    shapes |= _conv("decoder.norm_out.conv_b.conv", reversed_channels[-1], latent, (1, 1, 1))
    shapes |= _conv("decoder.conv_out.conv", cfg["out_channels"], reversed_channels[-1], (3, 3, 3))
    return shapes
