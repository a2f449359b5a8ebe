"""Tests for mask2dit.attention against an independent dense reference.

The reference is plain softmax(q k^T * scale + mask bias) v in float64 with the mask from
``build_attention_mask``; the mask itself is checked against literal matrices written from
docs/method.md §4.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mask2dit.attention as attn
from mask2dit.attention import SceneLayout, build_attention_mask, masked_attention
from mask2dit.policy import POLICIES, BlockRule, KeySet, resolve_policy

V2_STRING = "text:own_text,own_video;video:own_text,own_video,other_video"
CUSTOM_RULES = [
    # "other" blocks only: exercises the before/after key terms
    "text:own_text,other_video;video:own_video,other_text",
    # text sees all text, video sees everything
    "text:own_text,other_text;video:own_text,other_text,own_video,other_video",
]
ALL_POLICIES = [*sorted(POLICIES), *CUSTOM_RULES]


def random_layout(n: int, seed: int) -> SceneLayout:
    rng = random.Random(seed)
    return SceneLayout(
        [rng.randint(1, 7) for _ in range(n)], [2 * rng.randint(1, 6) for _ in range(n)], 2
    )


def reference_attention(q, k, v, layout, policy, scale=None):
    """Dense masked softmax attention, written independently of the module's kernels."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = build_attention_mask(layout, policy)
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1) @ v


def qkv(layout, seed=0, batch=2, heads=2, head_dim=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, layout.seq_len, head_dim)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3)]


def check_against_reference(layout, policy, seed, scale=None, atol=1e-5):
    """Values and q/k/v gradients of masked_attention (float32) vs the float64 reference."""
    q, k, v = (x.requires_grad_() for x in qkv(layout, seed))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, layout, policy, scale=scale)
    ref = reference_attention(q64, k64, v64, layout, policy, scale=scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, (q, k, v), grad)
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        # float32 sums over <= ~60 keys; observed error ~2e-6, well inside 1e-5
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=0, msg=f"d{name}")


# --- SceneLayout ----------------------------------------------------------------------


def test_layout_properties():
    layout = SceneLayout([3, 2], [8, 4], tokens_per_frame=4)
    assert layout.text_lens == (3, 2) and layout.video_lens == (8, 4)
    assert (layout.num_scenes, layout.text_len, layout.video_len, layout.seq_len) == (2, 5, 12, 17)
    assert layout.scene_frames == (2, 1)
    assert [layout.text_slice(i) for i in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [layout.video_slice(i) for i in range(2)] == [slice(5, 13), slice(13, 17)]
    assert SceneLayout.from_frames([3, 2], [2, 1], 4) == layout
    assert hash(layout) == hash(SceneLayout((3, 2), (8, 4), 4))
    with pytest.raises(IndexError):
        layout.video_slice(2)


@pytest.mark.parametrize(
    ("text_lens", "video_lens", "tpf", "match"),
    [
        ([], [], 1, "at least one scene"),
        ([1, 2], [3], 1, "one text and one video length per scene"),
        ([0, 2], [3, 3], 1, ">= 1 text"),
        ([1, 2], [3, 0], 1, ">= 1 video"),
        ([1, 1], [4, 6], 4, "not divisible by tokens_per_frame"),
        ([1], [4], 0, "tokens_per_frame"),
    ],
)
def test_layout_rejects_bad_input(text_lens, video_lens, tpf, match):
    with pytest.raises(ValueError, match=match):
        SceneLayout(text_lens, video_lens, tpf)


# --- mask policies ----------------------------------------------------------------------

# text_lens [1, 2], video_lens [2, 1]: positions T1=0, T2=1,2, V1=3,4, V2=5
SMALL = SceneLayout([1, 2], [2, 1])
EXPECTED = {
    "v2": [
        [1, 0, 0, 1, 1, 0],  # T1: own text, own video
        [0, 1, 1, 0, 0, 1],  # T2
        [0, 1, 1, 0, 0, 1],  # T2
        [1, 0, 0, 1, 1, 1],  # V1: own text, all video
        [1, 0, 0, 1, 1, 1],  # V1
        [0, 1, 1, 1, 1, 1],  # V2
    ],
    "isolated": [
        [1, 0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0, 1],
        [0, 1, 1, 0, 0, 1],
        [1, 0, 0, 1, 1, 0],
        [1, 0, 0, 1, 1, 0],
        [0, 1, 1, 0, 0, 1],
    ],
    "full": [[1] * 6] * 6,
    CUSTOM_RULES[0]: [
        [1, 0, 0, 0, 0, 1],  # T1: own text, other video
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],  # V1: other text, own video
        [0, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 1],
    ],
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_mask_matches_method_table(policy):
    expected = torch.tensor(EXPECTED[policy], dtype=torch.bool)
    assert torch.equal(build_attention_mask(SMALL, policy), expected)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_v2_mask_is_symmetric_and_every_row_has_a_key(n):
    mask = build_attention_mask(random_layout(n, seed=n), "v2")
    assert torch.equal(mask, mask.T)
    assert mask.any(dim=1).all()


def test_resolve_policy_names_and_rules():
    assert resolve_policy("v2") == POLICIES["v2"]
    assert resolve_policy(V2_STRING) == POLICIES["v2"]
    rule = BlockRule(KeySet(True, False, False, True), KeySet(False, True, True, False))
    assert resolve_policy(rule) is rule
    assert resolve_policy(rule.to_string()) == rule
    assert (
        resolve_policy(" text: own_text , own_video ; video:own_video,own_text ")
        == POLICIES["isolated"]
    )
    for name, rule in POLICIES.items():
        assert BlockRule.parse(rule.to_string()) == rule, name


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ("v3", r"valid names: \['full', 'isolated', 'v2'\]"),
        ("text:own_text", "both 'text:' and 'video:'"),
        ("text:own_text;video:own_video;text:own_text", "once each"),
        ("text:own_text;vid:own_video", "expected 'text:...'"),
        ("text:own_text,own_audio;video:own_video", "unknown key blocks"),
        ("text:other_text,other_video;video:own_video", "text queries must see own_text"),
        ("text:own_text;video:", "video queries must see own_text or own_video"),
    ],
)
def test_resolve_policy_rejects(policy, match):
    with pytest.raises(ValueError, match=match):
        resolve_policy(policy)


def test_block_rule_rejects_rows_without_keys():
    with pytest.raises(ValueError, match="video queries"):
        BlockRule(KeySet(True, False, False, False), KeySet(False, True, False, True))


# --- masked_attention -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("n", range(1, 7))
def test_masked_attention_matches_dense_reference(policy, n):
    check_against_reference(random_layout(n, seed=10 * n), policy, seed=n)


@pytest.mark.parametrize("policy", ALL_POLICIES)
@pytest.mark.parametrize("n", [1, 3, 6])
def test_fallback_kernel_matches_dense_reference(policy, n, monkeypatch):
    monkeypatch.setattr(attn, "_FORCE_FALLBACK", True)
    monkeypatch.setattr(attn, "_FALLBACK_CHUNK_ELEMS", 64)  # several query chunks per term
    check_against_reference(random_layout(n, seed=7 * n), policy, seed=n)


def test_custom_scale():
    check_against_reference(random_layout(3, seed=1), "v2", seed=3, scale=0.37)


def test_terms_partition_the_mask():
    """Each allowed (query, key) pair is covered by exactly one term; no disallowed pair."""
    for policy in ALL_POLICIES:
        for n in (1, 4):
            layout = random_layout(n, seed=n)
            count = torch.zeros(layout.seq_len, layout.seq_len, dtype=torch.long)
            for term in attn._attention_terms(layout, policy):
                count[term.rows, term.keys] += 1
            assert torch.equal(count, build_attention_mask(layout, policy).long()), policy


def test_no_grad_path_builds_no_graph():
    layout = random_layout(3, seed=5)
    q, k, v = (x.requires_grad_() for x in qkv(layout))
    with torch.no_grad():
        out = masked_attention(q, k, v, layout)
    assert out.grad_fn is None and not out.requires_grad
    plain = masked_attention(*(x.detach() for x in (q, k, v)), layout)
    assert plain.grad_fn is None
    ref = reference_attention(*(x.detach().double() for x in (q, k, v)), layout, "v2")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, out, atol=0, rtol=0)


def test_bfloat16_close_to_reference():
    layout = random_layout(3, seed=2)
    q, k, v = qkv(layout, dtype=torch.bfloat16)
    out = masked_attention(q, k, v, layout)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.double(), k.double(), v.double(), layout, "v2")
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


def test_rejects_length_mismatch():
    layout = random_layout(2, seed=0)
    q, k, v = qkv(SceneLayout([1], [layout.seq_len]))
    with pytest.raises(ValueError, match=r"does not match layout\.seq_len"):
        masked_attention(q, k, v, layout)
    with pytest.raises(ValueError, match=r"must be \(B, H, L, D\)"):
        masked_attention(q[0], k[0], v[0], layout)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fallback", [False, True])
def test_never_allocates_seq_len_squared(fallback, monkeypatch):
    monkeypatch.setattr(attn, "_FORCE_FALLBACK", fallback)
    monkeypatch.setattr(attn, "_FALLBACK_CHUNK_ELEMS", 256)
    # L*L = 15,876 while q/k/v hold 1*1*126*8 = 1,008 elements each
    layout = SceneLayout([2, 2, 2], [40, 40, 40])
    limit = layout.seq_len**2
    q, k, v = (x.requires_grad_() for x in qkv(layout, batch=1, heads=1, head_dim=8))
    with _LargestTensor() as seen:
        out = masked_attention(q, k, v, layout, "v2")
        out.backward(torch.ones_like(out))
    assert 0 < seen.largest < limit
    with _LargestTensor() as dense:  # the detector does see an L x L tensor when one is made
        reference_attention(q, k, v, layout, "v2")
    assert dense.largest >= limit


def test_kernels_get_views_of_the_video_keys_not_copies(monkeypatch):
    """Every key/value handed to a kernel shares storage with the caller's k/v."""
    layout = random_layout(4, seed=3)
    q, k, v = qkv(layout)
    passed = []
    real_forward = attn._cpu_forward

    def spy(q_t, k_t, v_t, scale):
        passed.append((k_t, v_t))
        return real_forward(q_t, k_t, v_t, scale)

    monkeypatch.setattr(attn, "_cpu_forward", spy)
    masked_attention(q, k, v, layout, "v2")
    # text rows: n own-text + n own-video terms; video rows: n own-text terms + 1 all-video
    assert len(passed) == 3 * layout.num_scenes + 1
    for k_t, v_t in passed:
        assert k_t.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert v_t.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


def test_cuda_kernel_calls_fit_the_op_schemas_on_meta(monkeypatch):
    """Without a GPU: the CUDA flash-attention calls run on meta tensors (schemas, shapes,
    dtypes, forward -> backward plumbing). Numerics are only checked by the gpu test."""
    monkeypatch.setattr(
        attn, "_select_kernels", lambda q: (attn._cuda_forward, attn._cuda_backward)
    )
    layout = SceneLayout([3, 5, 2], [16, 8, 24], 8)
    shape = (2, 4, layout.seq_len, 64)
    q, k, v = (
        torch.empty(shape, device="meta", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    out = masked_attention(q, k, v, layout, "v2")
    assert (out.shape, out.dtype, out.device.type) == (shape, torch.bfloat16, "meta")
    for grad in torch.autograd.grad(out, (q, k, v), torch.empty_like(out)):
        assert (grad.shape, grad.dtype) == (shape, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(dtype):
    layout = SceneLayout([5, 9, 3], [64, 48, 80], 16)
    q, k, v = (x.cuda().to(dtype).requires_grad_() for x in qkv(layout, head_dim=64))
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, layout, "v2")
    ref = reference_attention(q64, k64, v64, layout, "v2")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=0)
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out))
    grads_ref = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=10 * tol, rtol=0)


def test_kernel_selection():
    assert attn._select_kernels(torch.empty(1, 1, 4, 16))[0] is attn._cpu_forward
    # meta tensors take the CPU kernel, whose meta function gives shapes without compute
    assert attn._select_kernels(torch.empty(1, 1, 4, 16, device="meta"))[0] is attn._cpu_forward
    # an unknown device (or a dtype no fused kernel takes): the exact pure-torch pair
    assert attn._select_kernels(torch.empty(1, 1, 4, 16, dtype=torch.int32))[0] is (
        attn._fallback_forward
    )
