"""Scene layout, mask policies and masked attention for Mask²DiT (docs/method.md §3-§4).

One sample is the token sequence ``[T_1 .. T_n | V_1 .. V_n]``: all scene texts, then all
scene videos. A mask *policy* says, for text queries and for video queries, which of the
four key blocks (own text, other scenes' text, own video, other scenes' video) they see.

Tensor shape legend: B batch, H heads, L sequence length, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mask2dit.policy import DEFAULT_POLICY, BlockRule, resolve_policy

__all__ = ["SceneLayout", "build_attention_mask", "masked_attention"]


@dataclass(frozen=True)
class SceneLayout:
    """Token layout of one sample: ``[T_1 .. T_n | V_1 .. V_n]``.

    ``text_lens[i]`` / ``video_lens[i]`` are the token counts of scene i's text and video;
    ``tokens_per_frame`` is the number of video tokens in one latent frame (h * w patches).
    """

    text_lens: tuple[int, ...]
    video_lens: tuple[int, ...]
    tokens_per_frame: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_lens", tuple(int(x) for x in self.text_lens))
        object.__setattr__(self, "video_lens", tuple(int(x) for x in self.video_lens))
        if len(self.text_lens) < 1:
            raise ValueError("SceneLayout needs at least one scene (text_lens is empty)")
        if len(self.text_lens) != len(self.video_lens):
            raise ValueError(
                f"SceneLayout needs one text and one video length per scene, got "
                f"{len(self.text_lens)} text_lens and {len(self.video_lens)} video_lens"
            )
        if min(self.text_lens) < 1 or min(self.video_lens) < 1:
            raise ValueError(
                f"every scene needs >= 1 text and >= 1 video token, got "
                f"text_lens={self.text_lens}, video_lens={self.video_lens}"
            )
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        bad = [v for v in self.video_lens if v % self.tokens_per_frame]
        if bad:
            raise ValueError(
                f"video lengths {bad} are not divisible by tokens_per_frame="
                f"{self.tokens_per_frame} (a scene must hold whole latent frames)"
            )

    @classmethod
    def from_frames(
        cls, text_lens: Sequence[int], scene_frames: Sequence[int], tokens_per_frame: int
    ) -> SceneLayout:
        """Layout from per-scene latent frame counts instead of video token counts."""
        return cls(
            tuple(text_lens), tuple(f * tokens_per_frame for f in scene_frames), tokens_per_frame
        )

    @property
    def num_scenes(self) -> int:
        return len(self.text_lens)

    @property
    def text_len(self) -> int:
        """Total text tokens (all scenes)."""
        return sum(self.text_lens)

    @property
    def video_len(self) -> int:
        """Total video tokens (all scenes)."""
        return sum(self.video_lens)

    @property
    def seq_len(self) -> int:
        return self.text_len + self.video_len

    @property
    def scene_frames(self) -> tuple[int, ...]:
        """Latent frames per scene."""
        return tuple(v // self.tokens_per_frame for v in self.video_lens)

    def text_slice(self, i: int) -> slice:
        """Scene i's text tokens in the full sequence."""
        start = sum(self.text_lens[: self._check_scene(i)])
        return slice(start, start + self.text_lens[i])

    def video_slice(self, i: int) -> slice:
        """Scene i's video tokens in the full sequence."""
        start = self.text_len + sum(self.video_lens[: self._check_scene(i)])
        return slice(start, start + self.video_lens[i])

    def _check_scene(self, i: int) -> int:
        if not 0 <= i < self.num_scenes:
            raise IndexError(f"scene {i} out of range for {self.num_scenes} scenes")
        return i


def build_attention_mask(
    layout: SceneLayout, policy: str | BlockRule = DEFAULT_POLICY
) -> torch.Tensor:
    """Dense (L, L) bool mask, True where query row may attend key column.

    Reference only (tests, small L): at production L it is billions of entries.
    """
    rule = resolve_policy(policy)
    n, L = layout.num_scenes, layout.seq_len
    scene = torch.empty(L, dtype=torch.long)
    is_text = torch.zeros(L, dtype=torch.bool)
    for i in range(n):
        scene[layout.text_slice(i)] = i
        scene[layout.video_slice(i)] = i
        is_text[layout.text_slice(i)] = True
    same = scene[:, None] == scene[None, :]
    key_text = is_text[None, :]
    mask = torch.zeros(L, L, dtype=torch.bool)
    for q_is_text, ks in ((True, rule.text_sees), (False, rule.video_sees)):
        allowed = (
            (same & key_text & ks.own_text)
            | (~same & key_text & ks.other_text)
            | (same & ~key_text & ks.own_video)
            | (~same & ~key_text & ks.other_video)
        )
        rows = is_text if q_is_text else ~is_text
        mask[rows] = allowed[rows]
    return mask


# ---------------------------------------------------------------------------------------
# Grouped exact attention.
#
# Texts are contiguous ([T_1..T_n]) and so are videos ([V_1..V_n]), so every block rule
# splits into a few *terms*: (contiguous query range, contiguous key range) pairs whose key
# ranges are disjoint for any one query row. Each term runs one fused kernel that also
# returns its log-sum-exp (lse); the terms of a row merge exactly by lse. No L x L tensor
# and no per-scene copy of the video keys/values is ever made.
# ---------------------------------------------------------------------------------------


class _Term(NamedTuple):
    rows: slice  # query positions in the full sequence
    keys: slice  # key positions in the full sequence


def _block_terms(q_slices: list[slice], k_slices: list[slice], own: bool, other: bool):
    """Terms for one (query kind, key kind) block pair of the rule."""
    whole_q = slice(q_slices[0].start, q_slices[-1].stop)
    whole_k = slice(k_slices[0].start, k_slices[-1].stop)
    if own and other:
        return [_Term(whole_q, whole_k)]  # one big call, e.g. all video vs all video
    if own:
        return [_Term(qs, ks) for qs, ks in zip(q_slices, k_slices, strict=True)]
    if other:  # keys before and after the scene's own block
        terms = []
        for qs, ks in zip(q_slices, k_slices, strict=True):
            terms += [
                _Term(qs, slice(whole_k.start, ks.start)),
                _Term(qs, slice(ks.stop, whole_k.stop)),
            ]
        return [t for t in terms if t.keys.stop > t.keys.start]
    return []


def _attention_terms(layout: SceneLayout, policy: str | BlockRule = DEFAULT_POLICY) -> list[_Term]:
    """The (query range, key range) terms that make up a policy on a layout.

    Whole-range terms come first for each query kind, so that the first term touching a
    row either covers all rows of its kind or exactly one scene (see ``_grouped_forward``).
    """
    rule = resolve_policy(policy)
    n = layout.num_scenes
    texts = [layout.text_slice(i) for i in range(n)]
    videos = [layout.video_slice(i) for i in range(n)]
    terms: list[_Term] = []
    for q_slices, ks in ((texts, rule.text_sees), (videos, rule.video_sees)):
        kind_terms = _block_terms(q_slices, texts, ks.own_text, ks.other_text)
        kind_terms += _block_terms(q_slices, videos, ks.own_video, ks.other_video)
        whole = slice(q_slices[0].start, q_slices[-1].stop)
        terms += sorted(kind_terms, key=lambda t: t.rows != whole)
    return terms


# --- kernels: forward(q, k, v, scale) -> (out, lse, aux); backward(dO, q, k, v, out, lse,
# aux, scale) -> (dq, dk, dv). backward receives the FINAL merged out and lse, which makes
# each term's gradients its exact share of the joint softmax (the ring-attention trick).

_FORCE_FALLBACK = False  # tests flip this to check the pure-torch kernels against the reference
_FALLBACK_CHUNK_ELEMS = 1 << 22  # score elements per query chunk in the fallback (16 MiB fp32)


def _cpu_forward(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, scale=scale
    )
    return out, lse, None


def _cpu_backward(d_out, q, k, v, out, lse, aux, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v, out, lse, 0.0, False, scale=scale
    )


def _cuda_forward(q, k, v, scale):
    # UNTESTED here (no GPU on the dev machine); written from the op schemas. The backward
    # needs the rng tensors of the forward call, so they travel as aux (tiny tensors).
    out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False, scale=scale
    )
    return out, lse, (seed, offset)


def _cuda_backward(d_out, q, k, v, out, lse, aux, scale):
    # cum_seq_q/k are None for dense (non-varlen) inputs, as the forward returns them
    args = (d_out, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, *aux)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(*args, scale=scale)


def _chunks(q_len: int, k_len: int):
    step = max(1, _FALLBACK_CHUNK_ELEMS // max(1, k_len))
    return (slice(s, min(s + step, q_len)) for s in range(0, q_len, step))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fallback_forward(q, k, v, scale):
    """Plain torch, chunked over query rows so memory stays O(chunk x Lk)."""
    acc = _acc_dtype(q.dtype)
    k_t, v_a = k.to(acc).transpose(-1, -2), v.to(acc)
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:-1], dtype=acc)
    for c in _chunks(q.shape[2], k.shape[2]):
        s = (q[:, :, c].to(acc) @ k_t) * scale
        lse[:, :, c] = torch.logsumexp(s, dim=-1)
        out[:, :, c] = (torch.exp(s - lse[:, :, c, None]) @ v_a).to(q.dtype)
    return out, lse, None


def _fallback_backward(d_out, q, k, v, out, lse, aux, scale):
    acc = _acc_dtype(q.dtype)
    k_a, v_a = k.to(acc), v.to(acc)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k, dtype=acc)
    dv = torch.zeros_like(v, dtype=acc)
    for c in _chunks(q.shape[2], k.shape[2]):
        q_c, do_c = q[:, :, c].to(acc), d_out[:, :, c].to(acc)
        p = torch.exp((q_c @ k_a.transpose(-1, -2)) * scale - lse[:, :, c, None].to(acc))
        dv += p.transpose(-1, -2) @ do_c
        delta = (do_c * out[:, :, c].to(acc)).sum(-1, keepdim=True)  # uses the FINAL out
        ds = p * (do_c @ v_a.transpose(-1, -2) - delta)
        dq[:, :, c] = ((ds @ k_a) * scale).to(q.dtype)
        dk += (ds.transpose(-1, -2) @ q_c) * scale
    return dq, dk.to(k.dtype), dv.to(v.dtype)


_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _select_kernels(q: torch.Tensor):
    flash_head_dim = q.shape[-1] % 8 == 0 and q.shape[-1] <= 256  # FlashAttention-2 limits
    if _FORCE_FALLBACK:
        return _fallback_forward, _fallback_backward
    # On the meta device the CPU kernel's meta function gives the shapes (production-size
    # forwards without memory: tests/unit/test_production_shapes.py).
    if q.device.type in ("cpu", "meta") and q.dtype in _CPU_FLASH_DTYPES:
        return _cpu_forward, _cpu_backward
    if q.device.type == "cuda" and q.dtype in _CUDA_FLASH_DTYPES and flash_head_dim:
        return _cuda_forward, _cuda_backward
    # fp32 on CUDA, other devices: exact but slower. (The efficient-attention kernel would
    # serve CUDA fp32 but pads its lse; production runs bf16.)
    return _fallback_forward, _fallback_backward


# --- merging ---------------------------------------------------------------------------


def _merge(out, lse, rows: slice, out_t, lse_t) -> None:
    """Fold one term's (out_t, lse_t) into rows of (out, lse) exactly, in float32 or wider.

    With d = lse_t - lse_old the new term's share of the row's softmax mass is sigmoid(d),
    so out <- lerp(out, out_t, sigmoid(d)) and lse <- lse_old + softplus(d). Few ops and
    in place: each op is a parallel region, which costs on a busy CPU.
    """
    out_rows, lse_rows = out[:, :, rows], lse[:, :, rows]
    d = lse_t - lse_rows
    share = torch.sigmoid(d).unsqueeze(-1)
    if out.dtype == lse.dtype:
        out_rows.lerp_(out_t, share)
    else:  # low-precision output: merge in float32, round once
        out_rows.copy_(torch.lerp(out_rows.to(lse.dtype), out_t.to(lse.dtype), share))
    lse_rows.add_(F.softplus(d))


def _grouped_forward(q, k, v, terms, scale, forward):
    """Run every term and merge per row. Returns (out, lse, per-term aux)."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:-1], dtype=_acc_dtype(q.dtype))
    done: list[slice] = []
    auxes = []
    for t in terms:
        out_t, lse_t, aux = forward(q[:, :, t.rows], k[:, :, t.keys], v[:, :, t.keys], scale)
        auxes.append(aux)
        lse_t = lse_t.to(lse.dtype)
        seen = [d for d in done if d.start < t.rows.stop and t.rows.start < d.stop]
        if not seen:  # first term on these rows: write, no merge
            out[:, :, t.rows] = out_t
            lse[:, :, t.rows] = lse_t
            done.append(t.rows)
        else:
            # _attention_terms' ordering guarantees earlier terms covered all these rows
            assert any(d.start <= t.rows.start and t.rows.stop <= d.stop for d in seen)
            _merge(out, lse, t.rows, out_t, lse_t)
    return out, lse, auxes


class _MaskedAttention(torch.autograd.Function):
    """Autograd over the whole grouped attention: saves q, k, v, final out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, terms, scale, kernels):
        out, lse, auxes = _grouped_forward(q, k, v, terms, scale, kernels[0])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.terms, ctx.scale, ctx.backward_kernel, ctx.auxes = terms, scale, kernels[1], auxes
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        d_out = d_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for t, aux in zip(ctx.terms, ctx.auxes, strict=True):
            r, c = t.rows, t.keys
            # lse slices must be contiguous for the fused kernels (as in torch's ring attention)
            sliced = (d_out[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r])
            lse_r = lse[:, :, r].contiguous()
            dq_t, dk_t, dv_t = ctx.backward_kernel(*sliced, lse_r, aux, ctx.scale)
            dq[:, :, r] += dq_t
            dk[:, :, c] += dk_t
            dv[:, :, c] += dv_t
        return dq, dk, dv, None, None, None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SceneLayout,
    policy: str | BlockRule = DEFAULT_POLICY,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of q/k/v (B, H, L, D), tokens in layout order, under a mask policy.

    Equal (to float rounding) to dense attention with ``build_attention_mask(layout, policy)``
    but computed as a few fused-kernel calls merged by log-sum-exp: memory is linear in L.
    ``scale`` defaults to 1/sqrt(D) as in ``F.scaled_dot_product_attention``. Returns
    (B, H, L, D) in q's dtype.
    """
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (B, H, L, D), got {q.shape}, {k.shape}, {v.shape}")
    if not (q.shape[2] == k.shape[2] == v.shape[2] == layout.seq_len):
        raise ValueError(
            f"sequence length {q.shape[2]}/{k.shape[2]}/{v.shape[2]} does not match "
            f"layout.seq_len={layout.seq_len}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    terms = _attention_terms(layout, policy)
    kernels = _select_kernels(q)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _MaskedAttention.apply(q, k, v, terms, scale, kernels)
    return _grouped_forward(q, k, v, terms, scale, kernels[0])[0]
