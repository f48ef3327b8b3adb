"""flash-attn's score modifiers beyond its own test cases (tests/test_flash_attn_output.py and
test_flash_attn_kvcache.py port those): (H,) slopes against the same slopes per sequence, the packed functions, batch 1
with one key, scores far past the cap, torch.compile, and on a GPU bf16/fp16 at full sizes under the 2x-PyTorch rule,
every backward plan and the decode kernel."""

import pytest
import torch

from fasttrain.kernels import attention_backward as backward_kernels
from fasttrain.ops import (
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fasttrain.ops.attention_reference import UNBOUNDED, attention_reference

from flash_attn_ref import alibi_bias, attention_ref
from helpers import TOL_FP32, assert_within_2x_torch, err, float64_leaves, grads, max_err

KERNELS = ("cpu", "triton")
TOL = TOL_FP32["attention"]


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_head_slopes_are_every_sequences_slopes(backend, varlen):
    # (H,) slopes give exactly what the same slopes repeated per sequence (B, H) give: one slope per head.
    B, T, H, D = 3, 19, 4, 32
    q, k, v = _leaves((B, T, H, D), (B, T, 2, D), (B, T, 2, D))
    slopes = torch.rand(H)
    kw = dict(causal=True, softcap=3.0, backend=backend)
    if varlen:
        cu = torch.tensor([0, 5, 24, 57], dtype=torch.int32)
        args = (*(t.flatten(0, 1) for t in (q, k, v)), cu, cu, 33, 33)
        run = lambda s: flash_attn_varlen_func(*args, alibi_slopes=s, **kw)  # noqa: E731
    else:
        run = lambda s: flash_attn_func(q, k, v, alibi_slopes=s, **kw)  # noqa: E731
    head, every = run(slopes), run(slopes.expand(B, H).contiguous())
    assert torch.equal(head, every)
    dout = torch.randn_like(head)
    for a, b in zip(grads(head, (q, k, v), dout), grads(every, (q, k, v), dout)):
        assert torch.equal(a, b)
    assert (
        max_err(run(slopes.expand(B, H) * torch.tensor([[1.0], [0.5], [2.0]])), head) > 1e-3
    )  # per-sequence rows count


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_packed_functions_take_the_modifiers(backend, varlen):
    B, T, H, D = 2, 21, 2, 32
    (qkv,) = _leaves((B * T, 3, H, D) if varlen else (B, T, 3, H, D))
    slopes, cu = torch.rand(B, H), torch.tensor([0, 9, 42], dtype=torch.int32)
    kw = dict(causal=True, softcap=4.0, alibi_slopes=slopes, backend=backend)
    if varlen:
        out = flash_attn_varlen_qkvpacked_func(qkv, cu, 33, **kw)
    else:
        out = flash_attn_qkvpacked_func(qkv, **kw)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(-3))
    if varlen:
        want = flash_attn_varlen_func(q, k, v, cu, cu, 33, 33, **kw)
    else:
        want = flash_attn_func(q, k, v, **kw)
    assert max_err(out, want) < 1e-6
    dout = torch.randn_like(out)
    (dqkv,) = grads(out, (qkv,), dout)
    assert max_err(dqkv, torch.stack(grads(want, (q, k, v), dout), -3)) < 1e-6


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["scores", "far past the cap"])
def test_batch_one_and_a_single_key_against_float64(backend, scale):
    # Batch 1, one key (every query sees it or nothing), and 97 queries against 97 keys, with scores either normal or
    # 1e4 times larger: tanh saturates there without inf or NaN, forward or backward.
    for Tq, Tk in ((3, 1), (97, 97)):
        q, k, v = _leaves((1, Tq, 4, 32), (1, Tk, 2, 32), (1, Tk, 2, 32), seed=Tq)
        q = (q.detach() * scale).requires_grad_()  # the scores, not the values
        slopes = torch.rand(4)
        kw = dict(causal=True, window_size=(40, -1), softcap=2.0, alibi_slopes=slopes)
        out = flash_attn_func(q, k, v, backend=backend, **kw)
        q64, k64, v64 = float64_leaves(q, k, v)
        want = attention_reference(q64, k64, v64, 32**-0.5, 40, 0, None, None, None, 0.0, None, 2.0, slopes)[0]
        dout = torch.randn_like(out)
        got_grads, want_grads = grads(out, (q, k, v), dout), grads(want, (q64, k64, v64), dout.double())
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in got_grads)
        assert max_err(out, want) < TOL
        # at 1e4 the fp32 products q . k themselves are off by ~1e-3 where they cancel near 0 (the uncapped scores),
        # which dK (through q ~ 1e4) carries at the capped scores' slope
        rtol = TOL if scale == 1.0 else 1e-2
        for g, w in zip(got_grads, want_grads):
            assert max_err(g, w) < rtol * max(1.0, w.abs().max().item())


def test_torch_compile_traces_the_modifiers():
    torch._dynamo.reset()
    q, k, v = _leaves((2, 24, 4, 32), (2, 24, 2, 32), (2, 24, 2, 32))
    slopes = torch.rand(2, 4)

    def loss_fn(q, k, v):
        return flash_attn_func(q, k, v, causal=True, softcap=5.0, alibi_slopes=slopes, backend="cpu").square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-6


# ---- GPU: bf16/fp16 against an fp32 reference, judged against PyTorch's own error in the same dtype -------------

GPU_CASES = [  # (B, T, H, Hkv, D, causal, window)
    (2, 1024, 8, 2, 64, True, (-1, -1)),
    (1, 4096, 4, 4, 128, False, (-1, -1)),
    (2, 1000, 4, 2, 128, True, (256, -1)),
    (1, 2048, 4, 2, 256, True, (-1, -1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap,alibi", [(30.0, False), (0.0, True), (30.0, True)], ids=["softcap", "alibi", "both"])
@pytest.mark.parametrize("B,T,H,Hkv,D,causal,window", GPU_CASES, ids=lambda c: str(c))
def test_gpu_at_most_twice_pytorch_error(B, T, H, Hkv, D, causal, window, softcap, alibi, dtype, plan, monkeypatch):
    if plan == "atomic_dq":
        monkeypatch.setattr(backward_kernels._backward_plans, "choose", lambda *a: backward_kernels.DQ_BY_ATOMICS)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g, device="cuda") * (softcap / 4 if softcap else 1.0)
    k, v = (torch.randn(B, T, Hkv, D, generator=g, device="cuda") for _ in range(2))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    slopes = torch.rand(B, H, device="cuda") * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    out = flash_attn_func(q, k, v, deterministic=plan == "dq_kernel", backend="triton", **kw)
    left, right = (UNBOUNDED if window[0] < 0 else window[0]), (0 if causal else UNBOUNDED)
    args = (D**-0.5, left, right, None, None, None, 0.0, None, softcap, slopes)
    wide = [t.detach().float().requires_grad_() for t in (q, k, v)]  # the fp32 reference's leaves
    want = attention_reference(*wide, *args)[0]
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bias = None if slopes is None else alibi_bias(slopes, T, T)  # -slope * |i - j|, flash-attn's kernel's
    pt = attention_ref(*same, causal=causal, window=window, upcast=False, softcap=softcap, attn_bias=bias)
    assert_within_2x_torch(out, pt, want, what="out")
    dout = torch.randn_like(out)
    for name, a, b, c in zip(
        "qkv", grads(out, (q, k, v), dout), grads(pt, same, dout), grads(want, wide, dout.float())
    ):
        assert_within_2x_torch(a, b, c, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_gpu_decode_with_modifiers_matches_the_reference(paged):
    B, H, Hkv, D, Tmax = 8, 16, 4, 128, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    cache = [torch.randn(B, Tmax, Hkv, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    seqlens = torch.randint(1, Tmax, (B,), generator=g, device="cuda", dtype=torch.int32)
    leftpad = (seqlens // 3).to(torch.int32)
    slopes = torch.rand(H, device="cuda")
    kw = dict(cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True, softcap=30.0, alibi_slopes=slopes)
    block_table = None
    if paged:  # pages of 256 rows, the batch's own in order
        block_table = torch.arange(B * Tmax // 256, device="cuda", dtype=torch.int32).view(B, -1)
        cache = [c.view(-1, 256, Hkv, D) for c in cache]
    out = flash_attn_with_kvcache(q, *cache, block_table=block_table, backend="triton", **kw)
    want = flash_attn_with_kvcache(q, *cache, block_table=block_table, backend="reference", **kw)
    assert err(out, want) < 2e-2


def _flash_lse(q, k, slopes, causal, key_offset=0):
    """flash-attn's lse for (B, Tq, H, D) against (B, Tk, H, D), float64: its causal kernel adds slope * j to key j,
    its other kernels -slope * |i + Tk - Tq - j|; key_offset: padding rows that open the keys (not counted in j)."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1] - key_offset
    k = k[:, key_offset:]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D**-0.5
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)[None, :]
    slopes = slopes.double().view(-1, H, 1, 1)
    s = s + (slopes * j if causal else -slopes * (i + Tk - Tq - j).abs())
    if causal:
        s = s.masked_fill(j > i + Tk - Tq, float("-inf"))
    return torch.logsumexp(s, dim=-1)  # (B, H, Tq)


@pytest.mark.parametrize("backend", [*KERNELS, "reference"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_alibi_lse_is_flash_attns(backend, causal):
    # flash-attn's causal kernels bias key j by slope * j: the same output, an lse higher by slope * (i + Tk - Tq);
    # every function with its signature returns that lse.
    B, Tq, Tk, H, D = 2, 5, 11, 2, 32
    q, k, v = _leaves((B, Tq, H, D), (B, Tk, H, D), (B, Tk, H, D))
    slopes = torch.rand(B, H)
    kw = dict(causal=causal, alibi_slopes=slopes, backend=backend)
    want = _flash_lse(q, k, slopes, causal)
    _, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)
    cu_q = torch.tensor([0, Tq, 2 * Tq], dtype=torch.int32)
    cu_k = torch.tensor([0, Tk, 2 * Tk], dtype=torch.int32)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    _, lse, _ = flash_attn_varlen_func(*flat, cu_q, cu_k, Tq, Tk, return_attn_probs=True, **kw)
    torch.testing.assert_close(lse.double(), want.transpose(0, 1).flatten(1), atol=1e-5, rtol=1e-5)  # (H, B * Tq)
    qkv = torch.stack((q, q, q), dim=2)  # (B, Tq, 3, H, D): queries as their own keys
    _, lse, _ = flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **kw)
    torch.testing.assert_close(lse.double(), _flash_lse(q, q, slopes, causal), atol=1e-5, rtol=1e-5)
    if backend == "reference":
        return
    # the cache: 3 padding rows open each sequence, 8 rows filled, 2 new queries attend to them
    cache = torch.randn(B, 16, H, D)
    cache[:, 3:11] = k[:, :8].detach()
    pad = torch.full((B,), 3, dtype=torch.int32)
    seqlens = torch.full((B,), 11, dtype=torch.int32)
    q2 = q[:, :2].detach()
    _, lse = flash_attn_with_kvcache(
        q2, cache, cache.clone(), cache_seqlens=seqlens, cache_leftpad=pad, return_softmax_lse=True, **kw
    )
    torch.testing.assert_close(lse.double(), _flash_lse(q2, cache[:, :11], slopes, causal, 3), atol=1e-5, rtol=1e-5)
