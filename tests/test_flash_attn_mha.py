"""flash-attn's `flash_attn.modules.mha` (fasttrain.flash_attn.modules.mha) and `InferenceParams`: MHA's outputs and
every gradient against attention written out here in float64 from the module's own weights (causal, GQA, rotary,
ALiBi, window, cross-attention, dwconv, key_padding_mask), packed varlen rows against one sequence at a time,
KV-cache decoding against the full forward, flash-attn's state_dict layout, and the errors. Runs as a CPU user runs
it (conftest.cpu_user: the C++ kernels)."""

import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttrain.flash_attn.modules.mha import (
    MHA,
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    SelfAttention,
    get_alibi_slopes,
)
from fasttrain.flash_attn.utils.generation import InferenceParams

from flash_attn_ref import alibi_bias, attention_ref, rotate
from helpers import TOL_FP32, assert_within_2x_torch, err, randn

pytestmark = pytest.mark.usefixtures("cpu_user")

E, H = 64, 4  # head_dim 16: room for a 16-dim rotary (the decode kernel's fused rotary) and a partial 8-dim one
# Two projections around the attention: measured worst 7.6e-7 where this file uses it, C++ kernels and reference alike.
TOL = TOL_FP32["attention"]


def _tables(T: int, dim: int, base: float):
    """RoFormer's cos and sin (T, dim / 2) of angle t * base ** (-2i / dim), in float64."""
    angles = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, dim, 2) / dim)
    return angles.cos(), angles.sin()


def reference(mha, p, x, x_kv=None, key_padding_mask=None, cfg=None):
    """MHA's output from parameters p (name -> tensor, in x's dtype) in plain PyTorch, through flash-attn's test
    references (tests/flash_attn_ref.py) in x's dtype. The padding goes in as a -inf bias: SelfAttention's causal
    mask is top-left whatever the padding, where attention_ref's would align with the last kept key."""
    cfg = cfg or {}
    Hkv, D = mha.num_heads_kv, mha.head_dim
    if mha.cross_attn:
        q = F.linear(x, p["Wq.weight"], p.get("Wq.bias"))
        kv = F.linear(x if x_kv is None else x_kv, p["Wkv.weight"], p.get("Wkv.bias"))
    else:
        qkv = F.linear(x, p["Wqkv.weight"], p.get("Wqkv.bias"))  # (B, T, (H + 2 Hkv) D)
        if mha.dwconv:  # causal: output t from inputs t - 2 .. t
            weight, bias = p["dwconv_qkv.weight"], p["dwconv_qkv.bias"]
            qkv = F.conv1d(F.pad(qkv.transpose(1, 2), (2, 0)), weight, bias, groups=qkv.shape[-1]).transpose(1, 2)
        q, kv = qkv.split([H * D, 2 * Hkv * D], dim=-1)
    B, Tq, Tk = q.shape[0], q.shape[1], kv.shape[1]
    q = q.unflatten(-1, (H, D))  # (B, Tq, H, D)
    k, v = kv.unflatten(-1, (2, Hkv, D)).unbind(dim=2)  # (B, Tk, Hkv, D) each
    if mha.rotary_emb_dim:
        cos, sin = _tables(max(Tq, Tk), mha.rotary_emb_dim, cfg.get("rotary_emb_base", 10000.0))
        starts, interleaved = torch.zeros(B, dtype=torch.long), cfg.get("rotary_emb_interleaved", False)
        q, k = rotate(q, cos, sin, starts, interleaved), rotate(k, cos, sin, starts, interleaved)
    if "softmax_scale" in cfg:  # attention_ref scales by 1 / sqrt(D)
        q = q * (cfg["softmax_scale"] * D**0.5)
    bias = None
    if cfg.get("use_alibi"):
        bias = alibi_bias(torch.tensor(get_alibi_slopes(H), dtype=torch.float64).expand(B, H), Tq, Tk)
    if key_padding_mask is not None:
        pad = torch.zeros(B, Tk, dtype=x.dtype).masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad  # (B, 1 or H, Tq or 1, Tk)
    causal, window = cfg.get("causal", False), cfg.get("window_size", (-1, -1))
    out = attention_ref(q, k, v, causal=causal, window=window, upcast=False, attn_bias=bias)  # (B, Tq, H, D)
    return F.linear(out.flatten(-2), p["out_proj.weight"], p.get("out_proj.bias"))


def _params(mha, dtype=torch.float64):
    return {n: t.detach().to(dtype).requires_grad_() for n, t in mha.named_parameters()}


CASES = {
    "plain": {},
    "causal-flash": {"causal": True, "use_flash_attn": True},
    "gqa-flash": {"causal": True, "num_heads_kv": 2, "use_flash_attn": True},
    "mqa-plain": {"causal": True, "num_heads_kv": 1},
    "rotary-partial-interleaved": {
        "causal": True,
        "rotary_emb_dim": 8,
        "rotary_emb_interleaved": True,
        "use_flash_attn": True,
    },
    "rotary-gqa-plain": {"causal": True, "rotary_emb_dim": 16, "rotary_emb_base": 500.0, "num_heads_kv": 2},
    "alibi": {"causal": True, "use_alibi": True, "use_flash_attn": True},
    "window": {"window_size": (5, 2), "use_flash_attn": True, "softmax_scale": 0.3},
    "cross-flash": {"cross_attn": True, "num_heads_kv": 2, "use_flash_attn": True},
    "cross-plain": {"cross_attn": True},
    "dwconv": {"causal": True, "dwconv": True},
    "no-bias-residual-checkpointing": {
        "qkv_proj_bias": False,
        "out_proj_bias": False,
        "return_residual": True,
        "checkpointing": True,
        "use_flash_attn": True,
        "causal": True,
    },
}


@pytest.mark.parametrize("B,T", [(2, 97), (1, 1)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_mha_and_its_gradients_match_plain_pytorch(name, B, T):
    cfg = CASES[name]
    torch.manual_seed(0)
    mha = MHA(E, H, layer_idx=0, **cfg)
    x = randn(B, T, E)
    x_kv = randn(B, 2 * T + 3, E, seed=1) if cfg.get("cross_attn") else None
    out = mha(x, x_kv=x_kv)
    if cfg.get("return_residual"):
        out, residual = out
        assert residual is x
    p, x64, x_kv64 = _params(mha), x.detach().double().requires_grad_(), None
    if x_kv is not None:
        x_kv64 = x_kv.detach().double().requires_grad_()
    want = reference(mha, p, x64, x_kv64, cfg=cfg)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert err(out, want) < TOL
    upstream = randn(*out.shape, seed=2, grad=False)
    out.backward(upstream)
    want.backward(upstream.double())
    assert err(x.grad, x64.grad) < TOL
    if x_kv is not None:
        assert err(x_kv.grad, x_kv64.grad) < TOL
    for n, t in mha.named_parameters():
        assert err(t.grad, p[n].grad) < TOL, n


@pytest.mark.parametrize("num_heads_kv,causal", [(H, False), (H, True), (2, False)])
def test_key_padding_mask_hides_keys(num_heads_kv, causal):
    torch.manual_seed(0)
    mha = MHA(E, H, num_heads_kv=num_heads_kv, causal=causal)
    x = randn(3, 11, E)
    keep = torch.arange(11) < torch.tensor([11, 4, 1])[:, None]  # (B, T): right padding, key 0 always kept
    want = reference(mha, _params(mha), x.detach().double(), key_padding_mask=keep, cfg={"causal": causal})
    assert err(mha(x, key_padding_mask=keep), want) < TOL


def test_a_row_with_every_key_masked_still_attends():
    # -10000 added to every score of the row leaves its softmax as it was: not NaN, not 0, as flash-attn's. Up to
    # the fp32 spacing of scores near -10000 (1e-3), which moves the outputs by 3.6e-4 here.
    qkv = randn(2, 6, 3, H, 16, grad=False)
    keep = torch.tensor([[True] * 6, [False] * 6])
    out = SelfAttention()(qkv, key_padding_mask=keep)
    torch.testing.assert_close(out[1], SelfAttention()(qkv)[1], atol=2e-3, rtol=0)


def test_cross_attention_causal_aligns_the_last_query_with_the_last_kept_key():
    # flash-attn's CrossAttention (MHA's plain path for GQA and cross_attn): with a key_padding_mask, query row i of
    # Tq sees keys up to i + kept - Tq, kept counting the sequence's kept keys.
    q, kv = randn(2, 3, H, 16, grad=False), randn(2, 8, 2, 2, 16, seed=1, grad=False)
    keep = torch.arange(8) < torch.tensor([8, 5])[:, None]  # (B, Tk)
    out = CrossAttention(causal=True)(q, kv, key_padding_mask=keep)
    k, v = kv.double().unbind(dim=2)  # (B, Tk, Hkv, D) each
    want = attention_ref(q.double(), k, v, key_padding_mask=keep, causal=True)  # aligned with the last kept key
    assert err(out, want) < TOL


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_cross_attn_mixer_subset_and_default_x_kv(use_flash_attn):
    torch.manual_seed(0)
    mha = MHA(E, H, num_heads_kv=2, cross_attn=True, use_flash_attn=use_flash_attn)
    x, x_kv = randn(2, 9, E, grad=False), randn(2, 5, E, seed=1, grad=False)
    full = mha(x, x_kv=x_kv)
    # mixer_subset picks query rows before Wq (a ViT's CLS token); the keys still come from all of x_kv.
    torch.testing.assert_close(mha(x, x_kv=x_kv, mixer_subset=slice(0, 1)), full[:, :1], atol=TOL, rtol=0)
    torch.testing.assert_close(mha(x), mha(x, x_kv=x), atol=0, rtol=0)  # x_kv defaults to x


@pytest.mark.parametrize("num_heads_kv", [H, 2])
def test_varlen_rows_equal_each_sequence_alone(num_heads_kv):
    torch.manual_seed(0)
    mha = MHA(E, H, num_heads_kv=num_heads_kv, causal=True, use_alibi=True, use_flash_attn=True)
    lengths = [1, 97, 5]
    x = randn(sum(lengths), E)
    cu = torch.tensor([0, 1, 98, 103], dtype=torch.int32)
    # GQA goes through FlashCrossAttention, which takes the keys' offsets as well, as flash-attn's.
    extra = {} if num_heads_kv == H else {"cu_seqlens_k": cu, "max_seqlen_k": 97}
    out = mha(x, cu_seqlens=cu, max_seqlen=97, **extra)
    assert out.shape == x.shape
    for start, n in zip(cu.tolist(), lengths):
        alone = mha(x[start : start + n][None])[0]  # (n, E)
        torch.testing.assert_close(out[start : start + n], alone, atol=TOL, rtol=0)


DECODE = {
    "fused-rotary": {"rotary_emb_dim": 16, "use_flash_attn": True},  # one kernel call rotates, appends, attends
    "rotary-8-gqa": {"rotary_emb_dim": 8, "num_heads_kv": 2, "use_flash_attn": True, "rotary_emb_interleaved": True},
    "alibi-mqa": {"use_alibi": True, "num_heads_kv": 1, "use_flash_attn": True},
    "plain-rotary-gqa": {"rotary_emb_dim": 16, "num_heads_kv": 2},  # the cache written in Python, CrossAttention
}


@pytest.mark.parametrize("lengths_per_sample", [False, True])
@pytest.mark.parametrize("name", sorted(DECODE))
def test_decoding_with_inference_params_equals_the_full_forward(name, lengths_per_sample):
    torch.manual_seed(0)
    mha = MHA(E, H, causal=True, layer_idx=3, **DECODE[name]).eval()
    B, T, prompt = 2, 13, 5
    x = randn(B, T, E, grad=False)
    full = mha(x)
    params = InferenceParams(max_seqlen=T, max_batch_size=B)
    params.key_value_memory_dict[3] = mha.allocate_inference_cache(B, T)
    if lengths_per_sample:  # rotary's offsets and the decode kernel's cache lengths, advanced with seqlen_offset
        params.lengths_per_sample = torch.zeros(B, dtype=torch.int32)
    steps = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:  # the prompt, then one token a step
        steps.append(mha(x[:, start:stop], inference_params=params))
        params.seqlen_offset += stop - start
        if lengths_per_sample:
            params.lengths_per_sample += stop - start
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)
    assert params.key_value_memory_dict[3].shape == (B, T, 2, mha.num_heads_kv, E // H)


@pytest.mark.parametrize("name", ["fused-rotary", "rotary-8", "gqa-interleaved"])
def test_decoding_reads_each_samples_own_length_from_lengths_per_sample(name):
    # uneven lengths: sample 1 keeps 3 of its 5 prompt tokens, so its new tokens sit (and rotate) at 3 and 4
    config = {
        "fused-rotary": {"rotary_emb_dim": 16},
        "rotary-8": {"rotary_emb_dim": 8},
        "gqa-interleaved": {"rotary_emb_dim": 16, "num_heads_kv": 2, "rotary_emb_interleaved": True},
    }[name]
    torch.manual_seed(0)
    mha = MHA(E, H, causal=True, layer_idx=0, use_flash_attn=True, **config).eval()
    x, new = randn(2, 5, E, grad=False), randn(2, 2, E, seed=1, grad=False)
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    params.lengths_per_sample = torch.zeros(2, dtype=torch.int32)
    mha(x, inference_params=params)
    params.seqlen_offset, params.lengths_per_sample = 5, torch.tensor([5, 3], dtype=torch.int32)
    steps = []
    for t in range(2):
        steps.append(mha(new[:, t : t + 1], inference_params=params))
        params.seqlen_offset += 1
        params.lengths_per_sample += 1
    got = torch.cat(steps, dim=1)  # (2, 2, E)
    want = mha(torch.cat([x[:1], new[:1]], dim=1))[:, 5:], mha(torch.cat([x[1:, :3], new[1:]], dim=1))[:, 3:]
    torch.testing.assert_close(got, torch.cat(want), atol=TOL, rtol=0)


def test_a_windowed_mha_decodes_over_the_whole_cache():
    # As flash-attn's MHA: the prefill attends within the window, the decode kernel is given no window_size.
    torch.manual_seed(0)
    windowed = MHA(E, H, causal=True, layer_idx=0, use_flash_attn=True, window_size=(2, 0)).eval()
    whole = MHA(E, H, causal=True, layer_idx=0, use_flash_attn=True).eval()
    whole.load_state_dict(windowed.state_dict())
    x = randn(1, 9, E, grad=False)
    params = InferenceParams(max_seqlen=9, max_batch_size=1)
    torch.testing.assert_close(windowed(x[:, :6], inference_params=params), windowed(x[:, :6]))
    params.seqlen_offset = 6
    step = windowed(x[:, 6:7], inference_params=params)
    torch.testing.assert_close(step, whole(x)[:, 6:7], atol=TOL, rtol=0)
    assert not torch.allclose(step, windowed(x)[:, 6:7], atol=1e-3)


def test_allocate_inference_cache_follows_out_proj():
    mha = MHA(E, H, num_heads_kv=2, dtype=torch.bfloat16)
    cache = mha.allocate_inference_cache(3, 7)
    assert cache.shape == (3, 7, 2, 2, E // H) and cache.dtype == torch.bfloat16
    assert mha.allocate_inference_cache(1, 2, dtype=torch.float32).dtype == torch.float32


# flash-attn's MHA parameters (flash_attn/modules/mha.py, 2.8): name -> shape, for E = 64, H = 4 (D = 16)
STATE = {
    "mha": ({}, {"Wqkv.weight": (192, 64), "Wqkv.bias": (192,), "out_proj.weight": (64, 64), "out_proj.bias": (64,)}),
    "gqa-no-bias": (
        {"num_heads_kv": 2, "qkv_proj_bias": False, "out_proj_bias": False},
        {"Wqkv.weight": (128, 64), "out_proj.weight": (64, 64)},
    ),
    "cross": (
        {"cross_attn": True, "num_heads_kv": 1},
        {
            "Wq.weight": (64, 64),
            "Wq.bias": (64,),
            "Wkv.weight": (32, 64),
            "Wkv.bias": (32,),
            "out_proj.weight": (64, 64),
            "out_proj.bias": (64,),
        },
    ),
    "dwconv-rotary-alibi": (
        {"dwconv": True, "rotary_emb_dim": 16, "use_alibi": True, "use_flash_attn": True},
        {
            "Wqkv.weight": (192, 64),
            "Wqkv.bias": (192,),
            "dwconv_qkv.weight": (192, 1, 3),
            "dwconv_qkv.bias": (192,),
            "out_proj.weight": (64, 64),
            "out_proj.bias": (64,),
        },
    ),
    "dwconv-gqa": (
        {"dwconv": True, "num_heads_kv": 2},
        {
            "Wqkv.weight": (128, 64),
            "Wqkv.bias": (128,),
            "dwconv_q.weight": (64, 1, 3),
            "dwconv_q.bias": (64,),
            "dwconv_kv.weight": (64, 1, 3),
            "dwconv_kv.bias": (64,),
            "out_proj.weight": (64, 64),
            "out_proj.bias": (64,),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(STATE))
def test_state_dict_is_flash_attns(name):
    cfg, shapes = STATE[name]
    state = MHA(E, H, **cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    saved = {k: torch.randn(s) for k, s in shapes.items()}  # a checkpoint of flash-attn's MHA
    loaded = MHA(E, H, **cfg)
    loaded.load_state_dict(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_flash_attns_quirks_are_kept():
    # flash-attn 2.8 makes plain nn.Linear projections whatever fused_bias_fc says, and its dwconv convolutions on
    # the default dtype and device.
    fused, plain = MHA(E, H, fused_bias_fc=True), MHA(E, H)
    assert type(fused.Wqkv) is torch.nn.Linear and fused.state_dict().keys() == plain.state_dict().keys()
    assert MHA(E, H, dwconv=True, dtype=torch.bfloat16).dwconv_qkv.weight.dtype == torch.float32


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_bf16_within_2x_of_pytorch_in_bf16(use_flash_attn):
    cfg = {"causal": True, "num_heads_kv": 2, "rotary_emb_dim": 16, "use_flash_attn": use_flash_attn}
    torch.manual_seed(0)
    mha = MHA(E, H, **cfg)
    x = randn(2, 97, E, grad=False)
    x64, x16, ours = (x.to(dtype).requires_grad_() for dtype in (torch.float64, torch.bfloat16, torch.bfloat16))
    want = reference(mha, _params(mha), x64, cfg=cfg)
    same_dtype = reference(mha, _params(mha, torch.bfloat16), x16, cfg=cfg)
    out = mha.to(torch.bfloat16)(ours)
    assert out.dtype == torch.bfloat16
    assert_within_2x_torch(out, same_dtype, want, what="MHA bf16")
    upstream = randn(*out.shape, seed=2, grad=False)
    for y in (want, same_dtype, out):
        y.backward(upstream.to(y.dtype))
    assert_within_2x_torch(ours.grad, x16.grad, x64.grad, what="MHA bf16 dx")


def test_alibi_slopes_go_back_to_float32_after_a_cast():
    mha = MHA(E, H, use_alibi=True, causal=True, use_flash_attn=True).to(torch.bfloat16)
    out = mha(randn(1, 9, E, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and mha.inner_attn.alibi_slopes.dtype == torch.float32
    assert "inner_attn.alibi_slopes" not in mha.state_dict()  # not persistent, as flash-attn's


def test_flash_modules_match_the_plain_ones():
    torch.manual_seed(0)
    qkv = randn(2, 33, 3, H, 16, grad=False)
    flash, plain = FlashSelfAttention(), SelfAttention()
    torch.testing.assert_close(flash(qkv, causal=True), plain(qkv, causal=True), atol=TOL, rtol=0)
    q, kv = randn(2, 7, H, 16, grad=False), randn(2, 19, 2, 1, 16, seed=1, grad=False)
    # Causal with Tq < Tk: both align the last query with the last key.
    flash, plain = FlashCrossAttention(causal=True, softmax_scale=0.2), CrossAttention(causal=True, softmax_scale=0.2)
    torch.testing.assert_close(flash(q, kv), plain(q, kv), atol=TOL, rtol=0)


@pytest.mark.parametrize("cls", [FlashSelfAttention, SelfAttention])
def test_attention_dropout_applies_in_training_only(cls):
    qkv = randn(1, 40, 3, H, 16, grad=False)
    without = cls()(qkv)
    module = cls(attention_dropout=0.5)
    assert torch.equal(module.eval()(qkv), without)
    assert not torch.allclose(module.train()(qkv), without, atol=1e-3)


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_mha_dropout_reaches_its_attention_modules(use_flash_attn):
    mha = MHA(E, H, dropout=0.5, use_flash_attn=use_flash_attn)
    assert mha.inner_attn.drop.p == mha.inner_cross_attn.drop.p == 0.5
    x = randn(1, 40, E, grad=False)
    assert torch.equal(mha.eval()(x), mha(x))
    assert not torch.allclose(mha.train()(x), mha.eval()(x), atol=1e-3)


@pytest.mark.parametrize("num_heads_kv", [None, 2])
def test_mha_with_rotary_compiles_whole(num_heads_kv):
    # GQA's rotation is one in-place op on the projection: two on views of one base broke AOTAutograd
    torch.manual_seed(0)
    mha = MHA(E, H, num_heads_kv=num_heads_kv, rotary_emb_dim=16, causal=True, use_flash_attn=True)
    x = randn(2, 9, E)
    want = mha(x)
    (want_dx,) = torch.autograd.grad(want.sum(), x)
    got = torch.compile(mha, backend="aot_eager", fullgraph=True)(x)
    (dx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(dx, want_dx, atol=TOL, rtol=0)


def test_get_alibi_slopes():
    assert get_alibi_slopes(8) == [2.0 ** (-(i + 1)) for i in range(8)]
    twelve = [2.0 ** (-(i + 1)) for i in range(8)] + [2.0 ** (-(2 * i + 1) / 2) for i in range(4)]
    assert get_alibi_slopes(12) == pytest.approx(twelve, rel=1e-15)
    assert get_alibi_slopes(1) == [2.0**-8]


def test_layout_is_flash_attns():
    mha = importlib.import_module("fasttrain.flash_attn.modules.mha")
    names = ["MHA", "CrossAttention", "FlashCrossAttention", "FlashSelfAttention", "SelfAttention", "get_alibi_slopes"]
    assert sorted(mha.__all__) == sorted(names)
    with pytest.raises(ImportError):  # tensor parallel: not mirrored, so its import fails at once
        exec("from fasttrain.flash_attn.modules.mha import ParallelMHA")
    fields = [(f.name, f.default) for f in dataclasses.fields(InferenceParams)]
    assert [n for n, _ in fields] == [
        "max_seqlen",
        "max_batch_size",
        "seqlen_offset",
        "batch_size_offset",
        "key_value_memory_dict",
        "lengths_per_sample",
    ]
    params = InferenceParams(4, 2, seqlen_offset=3, lengths_per_sample=torch.tensor([3, 1], dtype=torch.int32))
    params.reset(8, 1)
    assert (params.max_seqlen, params.max_batch_size, params.seqlen_offset) == (8, 1, 0)
    assert params.lengths_per_sample.tolist() == [0, 0] and params.key_value_memory_dict == {}


def _mha(**cfg):
    return MHA(E, H, **cfg)


ERRORS = [
    (lambda: _mha(num_heads_kv=3), "num_heads_kv"),
    (lambda: MHA(60, 8), "embed_dim"),
    (lambda: _mha(use_alibi=True), "use_alibi"),
    (lambda: _mha(window_size=(4, 0)), "window_size"),
    (lambda: _mha(cross_attn=True, rotary_emb_dim=8), "rotary_emb_dim"),
    (lambda: _mha()(torch.randn(2, 3, E + 1)), "embed_dim"),
    (lambda: _mha()(torch.randn(3, E)), "x must be"),
    (
        lambda: _mha(use_flash_attn=True)(torch.randn(3, E), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
        "max_seqlen",
    ),
    (
        lambda: _mha()(torch.randn(3, E), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3),
        "use_flash_attn",
    ),
    (
        lambda: _mha(use_flash_attn=True)(torch.randn(1, 3, E), key_padding_mask=torch.ones(1, 3, dtype=torch.bool)),
        "key_padding_mask",
    ),
    (lambda: _mha()(torch.randn(1, 3, E), key_padding_mask=torch.ones(1, 3)), "key_padding_mask"),
    (lambda: _mha()(torch.randn(1, 3, E), inference_params=InferenceParams(4, 1)), "layer_idx"),
    (
        lambda: _mha(layer_idx=0, use_flash_attn=True)(
            torch.randn(1, 1, E), inference_params=InferenceParams(4, 1, seqlen_offset=2)
        ),
        "no cache for layer_idx 0",
    ),
    (lambda: _mha(layer_idx=0)(torch.randn(1, 5, E), inference_params=InferenceParams(4, 1)), "max_seqlen"),
    (
        lambda: _mha(layer_idx=0)(torch.randn(1, 3, E), inference_params=InferenceParams(4, 1), max_seqlen=3),
        "inference_params cannot be used with max_seqlen",
    ),
    (lambda: _mha(dwconv=True, num_heads_kv=2)(torch.randn(1, 3, E)), "dwconv"),
    (lambda: _mha()(torch.randn(1, 3, E), x_kv=torch.randn(1, 3, E)), "x_kv"),
    (lambda: FlashSelfAttention()(torch.randn(3, 3, 2, 8), cu_seqlens=torch.tensor([0, 3])), "cu_seqlens"),
    (
        lambda: FlashCrossAttention()(
            torch.randn(3, 2, 8),
            torch.randn(3, 2, 2, 8),
            cu_seqlens=torch.tensor([0, 3], dtype=torch.int32),
            max_seqlen=3,
        ),
        "cu_seqlens_k",
    ),
    (lambda: CrossAttention()(torch.randn(1, 3, 3, 8), torch.randn(1, 3, 2, 2, 8)), "divide"),
    (lambda: get_alibi_slopes(0), "nheads"),
]


@pytest.mark.parametrize("call,match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
