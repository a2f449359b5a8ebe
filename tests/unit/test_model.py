"""Mask2DiT adapter against stock diffusers CogVideoX and an independent per-token reference."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from mask2dit.model import Mask2DiT, video_rotary_embedding
from mask2dit.presets import build_transformer, preset_config

PRESETS = ["tiny", "tiny_sincos"]
TEXT_LEN = 12  # == max_text_seq_length of the presets: the stock sin-cos model needs it
ATOL = 1e-5


@pytest.fixture(scope="module", params=PRESETS)
def stock(request) -> CogVideoXTransformer3DModel:
    return build_transformer(request.param, seed=0).eval()


@pytest.fixture(scope="module")
def rope_stock() -> CogVideoXTransformer3DModel:
    return build_transformer("tiny", seed=1).eval()


def wrap(stock: CogVideoXTransformer3DModel, policy: str = "v2") -> Mask2DiT:
    return Mask2DiT(copy.deepcopy(stock), policy=policy).eval()


def inputs(batch: int = 2, frames: int = 6, height: int = 8, width: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, height, width, generator=g)
    text = torch.randn(batch, TEXT_LEN, 16, generator=g)
    return latents, text


def pipeline_rope(stock, frames: int, height: int, width: int):
    """RoPE exactly as the diffusers CogVideoX pipeline builds it (pixel sizes = 8 x latent)."""
    if not stock.config.use_rotary_positional_embeddings:
        return None
    fake_pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=stock)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        fake_pipe, height * 8, width * 8, frames, torch.device("cpu")
    )


def stock_forward(stock, latents, text, timestep):
    rope = pipeline_rope(stock, *latents.shape[1:2], *latents.shape[3:])
    return stock(
        hidden_states=latents, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rope
    ).sample


# ---------------------------------------------------------------- independent reference


def v2_mask(text_lens, video_lens) -> torch.Tensor:
    """Hand-written v2: text sees its own scene; video sees its own text and all video."""
    scene = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(text_lens)]
        + [torch.full((n,), i) for i, n in enumerate(video_lens)]
    )
    is_text = torch.arange(len(scene)) < sum(text_lens)
    same = scene[:, None] == scene[None, :]
    video_row = (same & is_text[None, :]) | ~is_text[None, :]
    return torch.where(is_text[:, None], same, video_row)


class DenseMaskProcessor:
    """Stock CogVideoXAttnProcessor2_0 with a fixed dense bool mask handed to SDPA."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        b = x.shape[0]
        q, k, v = (
            t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
            for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x))
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, x.shape[1], -1))
        return out[:, text_len:], out[:, :text_len]


def per_token_reference(stock, latents, text, scene_t, scene_frames, text_lens, mask):
    """The whole forward with a time embedding gathered per token (no runs, no slicing)."""
    b, f, _, h, w = latents.shape
    p = stock.config.patch_size
    tokens_per_frame = (h // p) * (w // p)
    t_text = scene_t.repeat_interleave(torch.tensor(text_lens), dim=1)
    t_video = scene_t.repeat_interleave(torch.tensor(scene_frames) * tokens_per_frame, dim=1)

    def emb(t):
        return stock.time_embedding(stock.time_proj(t.flatten())).view(*t.shape, -1)

    def mod(ada, e, chunks):
        return ada.linear(ada.silu(e)).chunk(chunks, dim=-1)

    e_text, e_video = emb(t_text), emb(t_video)
    x = stock.patch_embed(text, latents)
    txt, vid = x[:, : text.shape[1]], x[:, text.shape[1] :]
    proc = DenseMaskProcessor(mask)
    rope = pipeline_rope(stock, f, h, w)
    for blk in stock.transformer_blocks:
        sh, sc, g, _, _, _ = mod(blk.norm1, e_video, 6)
        _, _, _, tsh, tsc, tg = mod(blk.norm1, e_text, 6)
        av, at = proc(
            blk.attn1,
            blk.norm1.norm(vid) * (1 + sc) + sh,
            blk.norm1.norm(txt) * (1 + tsc) + tsh,
            image_rotary_emb=rope,
        )
        vid, txt = vid + g * av, txt + tg * at
        sh, sc, g, _, _, _ = mod(blk.norm2, e_video, 6)
        _, _, _, tsh, tsc, tg = mod(blk.norm2, e_text, 6)
        fv = blk.ff(blk.norm2.norm(vid) * (1 + sc) + sh)
        ft = blk.ff(blk.norm2.norm(txt) * (1 + tsc) + tsh)
        vid, txt = vid + g * fv, txt + tg * ft
    sh, sc = mod(stock.norm_out, e_video, 2)
    vid = stock.proj_out(stock.norm_out.norm(stock.norm_final(vid)) * (1 + sc) + sh)
    out = vid.reshape(b, f, h // p, w // p, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return out.flatten(5, 6).flatten(3, 4)


# ---------------------------------------------------------------- equality with stock


@torch.no_grad()
def test_single_scene_equals_stock(stock):
    latents, text = inputs()
    t = torch.tensor([17, 803])
    expected = stock_forward(stock, latents, text, t)
    model = wrap(stock, "v2")
    assert torch.allclose(model(latents, text, t, scene_frames=[6]), expected, atol=ATOL)
    # Our processor installed in the stock forward (no layout) is the stock processor.
    got = stock_forward(model.transformer, latents, text, t)
    assert torch.allclose(got, expected, atol=ATOL)


@torch.no_grad()
def test_full_policy_three_scenes_shared_timestep_equals_stock(stock):
    latents, text = inputs()
    t = torch.tensor([250, 999])
    expected = stock_forward(stock, latents, text, t)
    out = wrap(stock, "full")(latents, text, t, scene_frames=[2, 3, 1])
    assert torch.allclose(out, expected, atol=ATOL)
    out_per_scene = wrap(stock, "full")(latents, text, t[:, None].repeat(1, 3), [2, 3, 1])
    assert torch.allclose(out_per_scene, expected, atol=ATOL)


@torch.no_grad()
def test_v2_differs_from_full_and_equals_dense_mask_reference(stock):
    latents, text = inputs(frames=5)
    t = torch.tensor([400, 60])
    scene_frames, text_lens = [1, 3, 1], [3, 4, 5]
    model = wrap(stock, "v2")
    out = model(latents, text, t, scene_frames, text_lens)
    full = model(latents, text, t, scene_frames, text_lens, policy="full")
    assert (out - full).abs().max() > 1e-3
    reference = copy.deepcopy(stock)
    mask = v2_mask(text_lens, [f * 16 for f in scene_frames])
    reference.set_attn_processor(DenseMaskProcessor(mask))
    assert torch.allclose(out, stock_forward(reference, latents, text, t), atol=ATOL)


def test_rope_equals_pipeline_for_total_frames(rope_stock):
    for frames, height, width in [(6, 8, 8), (39, 12, 8), (5, 8, 16)]:
        ours = video_rotary_embedding(rope_stock.config, frames, height, width)
        theirs = pipeline_rope(rope_stock, frames, height, width)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


# ---------------------------------------------------------------- per-segment timesteps


@torch.no_grad()
def test_equal_per_scene_timesteps_equal_shared(rope_stock):
    latents, text = inputs()
    model = wrap(rope_stock)
    t = torch.tensor([123, 456])
    shared = model(latents, text, t, [2, 2, 2])
    assert torch.equal(model(latents, text, t[:, None].repeat(1, 3), [2, 2, 2]), shared)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["v2", "full"])
def test_extension_timesteps_match_per_token_reference(stock, policy):
    latents, text = inputs(frames=5)
    scene_frames, text_lens = [2, 1, 2], [4, 4, 4]
    # Sample 0 in extension mode (context at 0), sample 1 a normal step at another t.
    scene_t = torch.tensor([[0, 0, 600], [300, 300, 300]])
    out = wrap(stock, policy)(latents, text, scene_t, scene_frames, text_lens)
    video_lens = [f * 16 for f in scene_frames]
    mask = v2_mask(text_lens, video_lens) if policy == "v2" else None
    expected = per_token_reference(stock, latents, text, scene_t, scene_frames, text_lens, mask)
    assert torch.allclose(out, expected, atol=ATOL)
    # The per-scene timesteps matter: same inputs at a shared t = 600 differ.
    shared = wrap(stock, policy)(latents, text, torch.tensor([600, 300]), scene_frames)
    assert (out[0] - shared[0]).abs().max() > 1e-3
    assert torch.allclose(out[1], shared[1], atol=ATOL)


def test_extension_gradients_match_per_token_reference(rope_stock):
    latents, text = inputs(frames=5)
    scene_frames, text_lens = [2, 1, 2], [5, 3, 4]
    scene_t = torch.tensor([[0, 0, 600], [0, 0, 90]])
    model = wrap(rope_stock).train()
    reference = copy.deepcopy(rope_stock).train()
    ours_in, ref_in = latents.clone().requires_grad_(), latents.clone().requires_grad_()
    weight = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    (model(ours_in, text, scene_t, scene_frames, text_lens) * weight).sum().backward()
    mask = v2_mask(text_lens, [f * 16 for f in scene_frames])
    ref_out = per_token_reference(reference, ref_in, text, scene_t, scene_frames, text_lens, mask)
    (ref_out * weight).sum().backward()
    assert torch.allclose(ours_in.grad, ref_in.grad, atol=1e-5)
    ref_params = dict(reference.named_parameters())
    for name, param in model.transformer.named_parameters():
        assert torch.allclose(param.grad, ref_params[name].grad, atol=1e-4), name


@torch.no_grad()
def test_context_tokens_get_t0_embedding_in_every_adaln(rope_stock):
    """Every AdaLN (both norms of each block, final norm) sees emb(0) and emb(t) per sample."""
    model = wrap(rope_stock)
    tr = model.transformer
    seen = []
    layers = [m.linear for b in tr.transformer_blocks for m in (b.norm1, b.norm2)]
    hooks = [
        layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
        for layer in [*layers, tr.norm_out.linear]
    ]
    latents, text = inputs()
    model(latents, text, torch.tensor([[0, 0, 700], [0, 0, 35]]), [2, 2, 2])
    for h in hooks:
        h.remove()
    expected = tr.time_embedding(tr.time_proj(torch.tensor([0, 700, 0, 35])))
    assert len(seen) == len(layers) + 1
    for got in seen:  # rows: (sample 0, context), (sample 0, target), (sample 1, ...)
        assert torch.allclose(got, F.silu(expected), atol=ATOL)


# ---------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_equal_gradients(rope_stock):
    latents, text = inputs()
    scene_t = torch.tensor([[0, 0, 500], [0, 0, 20]])

    def grads(checkpointing: bool):
        model = Mask2DiT(copy.deepcopy(rope_stock)).train()
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        calls = []
        model.transformer.transformer_blocks[0].ff.register_forward_hook(lambda *_: calls.append(1))
        model(latents, text, scene_t, [2, 2, 2]).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really was recomputed
    assert plain.keys() == ckpt.keys()
    for name, grad in plain.items():
        assert grad is not None and torch.allclose(grad, ckpt[name], atol=1e-6), name


def test_stock_checkpoint_loads_unchanged(tmp_path, rope_stock):
    rope_stock.save_pretrained(tmp_path / "transformer")
    model = Mask2DiT.from_pretrained(tmp_path, subfolder="transformer", policy="isolated")
    stock_sd, ours = rope_stock.state_dict(), model.transformer.state_dict()
    assert list(ours) == list(stock_sd)
    assert all(torch.equal(ours[k], stock_sd[k]) for k in stock_sd)
    assert list(model.state_dict()) == [f"transformer.{k}" for k in stock_sd]
    model.save_pretrained(tmp_path / "again")
    again = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], stock_sd[k]) for k in stock_sd)


@pytest.mark.parametrize(
    "change",
    [{"patch_size_t": 1}, {"use_learned_positional_embeddings": True}],
)
def test_unsupported_configs_are_rejected(change):
    transformer = CogVideoXTransformer3DModel(**{**preset_config("tiny"), **change})
    with pytest.raises(ValueError, match="not supported"):
        Mask2DiT(transformer)


def test_bad_policy_rejected_at_construction(rope_stock):
    with pytest.raises(ValueError):
        Mask2DiT(copy.deepcopy(rope_stock), policy="nonsense")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scene_frames": [2, 2]}, "sum to"),
        ({"scene_frames": [3, 3, 0]}, "sum to"),
        ({"scene_frames": [2, 1, 1, 1, 1]}, "split equally"),
        ({"text_lens": [6, 5]}, "text_lens"),
        ({"timesteps": torch.zeros(2, 3)}, "timesteps"),
        ({"latents": torch.zeros(2, 6, 4, 7, 8)}, "divisible"),
        ({"text": torch.zeros(2, TEXT_LEN, 8)}, "text"),
    ],
)
@torch.no_grad()
def test_shape_errors_are_clear(rope_stock, kwargs, match):
    latents, text = inputs()
    args = {"latents": latents, "text": text, "timesteps": torch.tensor([1, 2])}
    args["scene_frames"] = [3, 3]
    args.update(kwargs)
    model = wrap(rope_stock)
    with pytest.raises(ValueError, match=match):
        model(
            args["latents"],
            args["text"],
            args["timesteps"],
            args["scene_frames"],
            args.get("text_lens"),
        )


def test_replaced_processor_is_detected(rope_stock):
    model = wrap(rope_stock)
    model.transformer.fuse_qkv_projections()
    latents, text = inputs()
    with pytest.raises(ValueError, match="MaskedCogVideoXAttnProcessor"):
        model(latents, text, torch.tensor([1, 2]), [3, 3])
