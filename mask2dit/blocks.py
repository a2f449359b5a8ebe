"""Per-block pieces of the Mask²DiT forward: masked attention processor, per-run AdaLN.

A *run* is a maximal range of consecutive scenes that share one timestep in every sample
of the batch. Normal mode is one run (the stock broadcast); extension mode is two (context
at t = 0, target at t), however many context scenes there are.

Shape legend: B batch, L tokens, D model width, E time-embedding width, R runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from mask2dit.attention import SceneLayout, masked_attention
from mask2dit.policy import DEFAULT_POLICY, BlockRule

__all__ = [
    "MaskedCogVideoXAttnProcessor",
    "TimestepRuns",
    "adaln",
    "block_forward",
    "gated_add",
    "modulation",
    "timestep_runs",
]

Policy = str | BlockRule
RotaryEmb = tuple[torch.Tensor, torch.Tensor]


class MaskedCogVideoXAttnProcessor:
    """CogVideoX joint text-video attention under a scene mask policy.

    Follows diffusers' processor convention (install with ``set_attn_processor``). The
    projections, QK-norm and video-only RoPE are those of ``CogVideoXAttnProcessor2_0``;
    the softmax attention is ``masked_attention(layout, policy)``. Without a ``layout`` it
    is plain full attention, i.e. the stock processor. The structural mask never travels
    as ``attention_mask``: diffusers would reshape it per head (docs/method.md §9).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: RotaryEmb | None = None,
        layout: SceneLayout | None = None,
        policy: Policy = DEFAULT_POLICY,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError(
                "MaskedCogVideoXAttnProcessor takes no attention_mask; pass layout= and policy="
            )
        text_len = encoder_hidden_states.size(1)
        x_BLD = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, seq_len, _ = x_BLD.shape
        if layout is not None and (layout.seq_len, layout.text_len) != (seq_len, text_len):
            raise ValueError(
                f"layout has {layout.text_len} text / {layout.seq_len} total tokens, the "
                f"attention input has {text_len} / {seq_len}"
            )
        q, k, v = _project_qkv(attn, x_BLD)
        if image_rotary_emb is not None:
            # RoPE on video tokens only; text carries no position (docs/method.md §3).
            q = _rope_video_part(q, image_rotary_emb, text_len)
            if not attn.is_cross_attention:
                k = _rope_video_part(k, image_rotary_emb, text_len)
        if layout is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        else:
            out = masked_attention(q, k, v, layout, policy)
        out = out.transpose(1, 2).reshape(batch_size, seq_len, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([text_len, seq_len - text_len], dim=1)
        return video_out, text_out


def _project_qkv(attn: Attention, x_BLD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as (B, heads, L, head_dim), QK-normed as in the stock processor."""
    batch_size = x_BLD.shape[0]
    q, k, v = attn.to_q(x_BLD), attn.to_k(x_BLD), attn.to_v(x_BLD)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def _rope_video_part(x: torch.Tensor, rope: RotaryEmb, text_len: int) -> torch.Tensor:
    # cat instead of the stock in-place slice write: same values, no in-place op on a
    # tensor autograd may have saved (matters under activation checkpointing).
    return torch.cat([x[:, :, :text_len], apply_rotary_emb(x[:, :, text_len:], rope)], dim=2)


@dataclass(frozen=True)
class TimestepRuns:
    """Token slices of consecutive scenes that share a timestep in every sample."""

    text: tuple[slice, ...]
    video: tuple[slice, ...]


def timestep_runs(
    timesteps: torch.Tensor, layout: SceneLayout
) -> tuple[torch.Tensor, TimestepRuns]:
    """Group scenes into runs of equal timesteps; return (B, R) timesteps and the runs.

    ``timesteps`` is (B,) (one run) or (B, n). Grouping reads the values on the host once
    per forward; it keeps normal mode (R = 1) on the stock broadcast path and extension
    mode at R = 2 (context at 0, target at t) however many context scenes there are.
    """
    n = layout.num_scenes
    if timesteps.ndim == 1:
        starts = [0]
        timesteps = timesteps[:, None]
    else:
        host = timesteps.detach().cpu()
        starts = [0] + [i for i in range(1, n) if not torch.equal(host[:, i], host[:, i - 1])]
        timesteps = timesteps[:, starts]
    ends = [*starts[1:], n]
    text = tuple(
        slice(layout.text_slice(a).start, layout.text_slice(b - 1).stop)
        for a, b in zip(starts, ends, strict=True)
    )
    video = tuple(
        slice(
            layout.video_slice(a).start - layout.text_len,
            layout.video_slice(b - 1).stop - layout.text_len,
        )
        for a, b in zip(starts, ends, strict=True)
    )
    return timesteps, TimestepRuns(text=text, video=video)


def modulation(
    ada: torch.nn.Module, emb_BRE: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, ...]:
    """An AdaLN layer's shift/scale/gate vectors per run, each (B, R, D), in float32.

    Computed in float32 from weights of any dtype: under bf16 training the modulation
    keeps its precision (docs/planner.md); in fp32 every cast is a no-op.
    """
    batch_size, runs, _ = emb_BRE.shape
    out = linear_fp32(ada.linear, ada.silu(emb_BRE.flatten(0, 1).float()))
    return out.view(batch_size, runs, -1).chunk(chunks, dim=-1)


def linear_fp32(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 whatever the dtype of its weights.

    fp32 weights: the module's own call (hooks and all). Lower-precision weights are
    upcast for the product, so their gradient flows back in their own dtype.
    """
    if linear.weight.dtype == torch.float32:
        return linear(x.float())
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def adaln(
    x_BLD: torch.Tensor,
    norm: torch.nn.Module,
    shift_BRD: torch.Tensor,
    scale_BRD: torch.Tensor,
    slices: tuple[slice, ...],
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` with each run's vectors on its own token slice.

    The float32 modulation is applied in float32 and the result rounded once to x's dtype.
    """
    dtype = x_BLD.dtype
    x_BLD = norm(x_BLD)
    if len(slices) == 1:  # the stock broadcast, bit for bit
        out = x_BLD * (1 + scale_BRD[:, 0])[:, None, :] + shift_BRD[:, 0][:, None, :]
        return out.to(dtype)
    parts = [
        x_BLD[:, s] * (1 + scale_BRD[:, r])[:, None, :] + shift_BRD[:, r][:, None, :]
        for r, s in enumerate(slices)
    ]
    return torch.cat(parts, dim=1).to(dtype)


def gated_add(
    x_BLD: torch.Tensor, gate_BRD: torch.Tensor, y_BLD: torch.Tensor, slices: tuple[slice, ...]
) -> torch.Tensor:
    """``x + gate * y`` with each run's gate on its own token slice, in x's dtype."""
    if len(slices) == 1:
        return (x_BLD + gate_BRD[:, 0][:, None, :] * y_BLD).to(x_BLD.dtype)
    parts = [gate_BRD[:, r][:, None, :] * y_BLD[:, s] for r, s in enumerate(slices)]
    return (x_BLD + torch.cat(parts, dim=1)).to(x_BLD.dtype)


def block_forward(
    block: torch.nn.Module,
    video: torch.Tensor,
    text: torch.Tensor,
    emb_BRE: torch.Tensor,
    runs: TimestepRuns,
    rope: RotaryEmb | None,
    layout: SceneLayout,
    policy: Policy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CogVideoXBlock.forward`` with per-run modulation and the masked processor."""
    shift, scale, gate, t_shift, t_scale, t_gate = modulation(block.norm1, emb_BRE, 6)
    norm_video = adaln(video, block.norm1.norm, shift, scale, runs.video)
    norm_text = adaln(text, block.norm1.norm, t_shift, t_scale, runs.text)
    attn_video, attn_text = block.attn1(
        hidden_states=norm_video,
        encoder_hidden_states=norm_text,
        image_rotary_emb=rope,
        layout=layout,
        policy=policy,
    )
    video = gated_add(video, gate, attn_video, runs.video)
    text = gated_add(text, t_gate, attn_text, runs.text)

    shift, scale, gate, t_shift, t_scale, t_gate = modulation(block.norm2, emb_BRE, 6)
    norm_video = adaln(video, block.norm2.norm, shift, scale, runs.video)
    norm_text = adaln(text, block.norm2.norm, t_shift, t_scale, runs.text)
    text_len = text.shape[1]
    ff_out = block.ff(torch.cat([norm_text, norm_video], dim=1))
    video = gated_add(video, gate, ff_out[:, text_len:], runs.video)
    text = gated_add(text, t_gate, ff_out[:, :text_len], runs.text)
    return video, text
