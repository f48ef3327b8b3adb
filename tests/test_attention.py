"""fasttrain.ops attention: the Triton kernels (interpreted on CPU, fp32) and the C++ CPU kernel against a float64
reference, every gradient, the SDPA and varlen front doors, the torch.compile registration, backend choice and input
errors.
GPU tests (`pytest -m gpu`) check bf16/fp16 by the rule "at most 2x PyTorch's own same-dtype error, both against an
fp32 reference" at T up to 8192.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.kernels import _attention_configs, _attention_launch
from fasttrain.kernels import attention as attention_kernels
from fasttrain.kernels import attention_backward as backward_kernels
from fasttrain.ops import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from fasttrain.ops.attention_reference import UNBOUNDED, attention_reference

from flash_attn_ref import attention_ref
from helpers import TOL_FP32, TOL_HALF, assert_within_2x_torch, float64_leaves, grads, max_err

TOL = TOL_FP32["attention"]


def _inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, Tk, Hkv, D, generator=g, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, Tk, Hkv, D, generator=g, device=device).to(dtype).requires_grad_()
    return q, k, v


def _cu_seqlens(lengths) -> torch.Tensor:
    """(B + 1,) int32 offsets of packed sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _choose(q, k, v):
    """The backend `auto` picks for dense attention of q, k, v without a mask or dropout."""
    from fasttrain.ops.attention import ATTENTION

    return ATTENTION.choose(q, k, v, None, q.shape[1], k.shape[1], None, 0.0, 0.0, None)


# (B, Tq, Tk, H, Hkv, D, causal, window): together every listed value of T, head_dim, GQA ratio, batch, mask kind.
CASES = [
    (1, 1, 1, 1, 1, 32, True, (-1, -1)),  # T = 1
    (3, 17, 17, 4, 2, 64, True, (-1, -1)),  # batch 3, GQA 2
    (1, 97, 97, 4, 1, 128, False, (-1, -1)),  # GQA 4 (MQA), d128
    (2, 128, 128, 2, 2, 64, True, (32, -1)),  # causal sliding window
    (1, 300, 300, 2, 1, 32, False, (64, 16)),  # two-sided window
    (1, 97, 300, 2, 2, 64, True, (-1, -1)),  # Tq < Tk, causal aligned bottom-right
    (2, 128, 17, 4, 4, 32, True, (-1, -1)),  # Tq > Tk: the first 111 rows see no key -> 0, lse +inf
    (1, 300, 128, 2, 1, 96, False, (-1, -1)),  # head_dim 96 padded to 128
    (1, 1025, 1025, 1, 1, 32, True, (-1, -1)),  # docs/conventions.md's awkward 1025
]


# Triton's two backward plans (dQ added by atomics from the dK/dV kernel, the interpreter's default, and dQ by its own
# kernel, deterministic=True) and the C++ CPU kernel (one plan).
KERNELS = [("triton", False), ("triton", True), ("cpu", False)]
KERNEL_IDS = ["atomic_dq", "dq_kernel", "cpu"]


@pytest.mark.parametrize("backend,deterministic", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,causal,window", CASES, ids=lambda c: str(c))
def test_kernel_matches_float64_reference(B, Tq, Tk, H, Hkv, D, causal, window, backend, deterministic):
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D)
    out, lse, _ = flash_attn_func(
        q, k, v, causal=causal, window_size=window, return_attn_probs=True, deterministic=deterministic, backend=backend
    )
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse, _ = flash_attn_func(
        q64, k64, v64, causal=causal, window_size=window, return_attn_probs=True, backend="reference"
    )
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, H, Tq)
    assert max_err(out, ref) < TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # rows that see no key: +inf in both
    assert max_err(lse[finite], ref_lse[finite]) < TOL
    dout = torch.randn_like(out)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
        assert max_err(got, want) < TOL, f"d{name}"


@pytest.mark.parametrize("backend,deterministic", KERNELS, ids=KERNEL_IDS)
def test_varlen_uneven_lengths_forward_and_backward(backend, deterministic):
    lens_q, lens_k = [1, 97, 17, 130], [1, 60, 17, 200]  # includes a length-1 sequence and Tq != Tk per sequence
    cu_q = _cu_seqlens(lens_q)
    cu_k = _cu_seqlens(lens_k)
    for causal, window in ((True, (-1, -1)), (False, (24, 8))):
        g = torch.Generator().manual_seed(1)
        q = torch.randn(sum(lens_q), 4, 64, generator=g).requires_grad_()  # (total_q, H, D)
        k = torch.randn(sum(lens_k), 2, 64, generator=g).requires_grad_()  # (total_k, Hkv, D)
        v = torch.randn(sum(lens_k), 2, 64, generator=g).requires_grad_()
        out, lse, _ = flash_attn_varlen_func(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max(lens_q),
            max(lens_k),
            causal=causal,
            window_size=window,
            return_attn_probs=True,
            deterministic=deterministic,
            backend=backend,
        )
        q64, k64, v64 = float64_leaves(q, k, v)
        ref, ref_lse = attention_reference(q64, k64, v64, 64**-0.5, *(_flash_window(causal, window)), cu_q, cu_k)
        assert lse.shape == (4, sum(lens_q))
        assert max_err(out, ref) < TOL
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite) and max_err(lse[finite], ref_lse[finite]) < TOL
        dout = torch.randn_like(out)
        for got, want in zip(grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
            assert max_err(got, want) < TOL


def _pin_config(monkeypatch, module, tuner: str, kernel, tile, **fixed):
    """module.<tuner> replaced by an autotuner over the one config `tile` (with `fixed` constexprs), which it never
    benchmarks: the interpreter, or a GPU, runs that path whatever the timing would choose."""
    monkeypatch.setattr(module, tuner, module.autotuned(kernel, _attention_configs.one_config_table(tile, **fixed)))


def _force_atomic_dq(monkeypatch):
    """The backward's plan tuner made to answer dQ by atomics, whatever the GPU's timing would choose."""
    monkeypatch.setattr(
        backward_kernels._backward_plans, "choose", lambda key, plans, timeable: backward_kernels.DQ_BY_ATOMICS
    )


@pytest.fixture(params=_attention_configs.FWD_WS_TILES, ids=lambda t: "x".join(map(str, t[:2])))
def warp_specialized_forward(request, monkeypatch):
    """The forward's autotuner holding one WARP_SPECIALIZE config alone, so that the interpreter (or a GPU) runs that
    path: Q, K and V by tensor descriptor, one loop (masking every tile unless none needs it). Left to itself a
    GPU's autotuner takes it only where it is the fastest."""
    _pin_config(monkeypatch, attention_kernels, "_attn_fwd", attention_kernels._attn_fwd_kernel, request.param)


# The TMA path needs half precision (tma_aligned); the interpreter computes its tiles in fp32 after loading, so the
# errors are the inputs' and outputs' rounding: TOL_HALF, against float64 on the same rounded inputs.
WS_CASES = [  # (B, Tq, Tk, H, Hkv, D, causal, window)
    (1, 1, 1, 1, 1, 64, True, (-1, -1)),  # T = 1: one row of a 128-row tile, the rest read as zeros
    (3, 17, 17, 4, 2, 32, True, (-1, -1)),  # batch 3, GQA 2, d32
    (1, 97, 97, 4, 1, 128, False, (-1, -1)),  # MQA, d128, a partial key tile
    (2, 256, 256, 2, 1, 64, False, (-1, -1)),  # whole key tiles, every key seen: the loop without masks (FULL_TILES)
    (2, 128, 128, 2, 2, 64, True, (32, -1)),  # sliding window: tiles before the band are skipped, not masked
    (1, 97, 300, 2, 2, 64, True, (-1, -1)),  # Tq < Tk
    (2, 200, 17, 2, 2, 64, True, (-1, -1)),  # Tq > Tk: rows that see no key give 0 and lse +inf
    (1, 1025, 1025, 1, 1, 64, True, (-1, -1)),
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,causal,window", WS_CASES, ids=lambda c: str(c))
def test_warp_specialized_forward_matches_float64_reference(
    warp_specialized_forward, B, Tq, Tk, H, Hkv, D, causal, window
):
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.bfloat16)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True, backend="triton")
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse, _ = flash_attn_func(
        q64, k64, v64, causal=causal, window_size=window, return_attn_probs=True, backend="reference"
    )
    assert max_err(out, ref) < TOL_HALF[torch.bfloat16]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) < 1e-4  # fp32 throughout: only the log-sum order differs
    _check_half_gradients(q, k, v, out, q64, k64, v64, ref)  # the backward reads this forward's out and lse


@pytest.fixture(params=list(_attention_configs.DKDV_WS_TILES.values()), ids=lambda t: "x".join(map(str, t[:2])))
def warp_specialized_backward(request, monkeypatch):
    """dK/dV's autotuner holding one WARP_SPECIALIZE config alone: Q and dO by descriptor in one loop. Only the plan
    with a dQ kernel runs it (deterministic=True), since dQ by atomics does not specialize
    (kernels/attention_backward.py)."""
    _pin_config(
        monkeypatch,
        backward_kernels,
        "_attn_bwd_dkdv",
        backward_kernels._attn_bwd_dkdv_kernel,
        request.param,
        ATOMIC_DQ=False,
    )


def _check_half_gradients(q, k, v, out, q64, k64, v64, ref):
    """Gradients are bf16-rounded sums over up to Tq queries, so their error scales with their size: within 1% of the
    largest (8 bits of mantissa are 0.4%). A fixed dO, so that no earlier test's draws change the margins."""
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
        assert max_err(got, want) <= 1e-2 * want.abs().max().item() + 1e-3, f"d{name}"


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,causal,window", WS_CASES, ids=lambda c: str(c))
def test_warp_specialized_backward_matches_float64_reference(
    warp_specialized_backward, B, Tq, Tk, H, Hkv, D, causal, window
):
    """dK/dV by the specialized loop on every awkward shape the forward's test takes (Tq 256: the unmasked loop)."""
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.bfloat16)
    out = flash_attn_func(q, k, v, causal=causal, window_size=window, deterministic=True, backend="triton")
    q64, k64, v64 = float64_leaves(q, k, v)
    ref = flash_attn_func(q64, k64, v64, causal=causal, window_size=window, backend="reference")
    _check_half_gradients(q, k, v, out, q64, k64, v64, ref)


def test_warp_specialized_backward_lse_gradient_and_varlen(warp_specialized_backward):
    """A loss on the logsumexp (dlse folded into delta), and packed sequences of uneven length: query tiles that run
    past their sequence read zeros from the descriptors and masked lse/delta, key blocks past it write nothing."""
    q, k, v = _inputs(2, 41, 33, 2, 1, 64, dtype=torch.bfloat16)
    out, lse, _ = flash_attn_func(
        q, k, v, causal=True, return_attn_probs=True, deterministic=True, backend="triton", lse_grad=True
    )
    loss = (out.float() ** 2).sum() + (lse * torch.linspace(-1, 1, 41)).sum()
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, 64**-0.5, UNBOUNDED, 0)
    ref_loss = (ref**2).sum() + (ref_lse * torch.linspace(-1, 1, 41, dtype=torch.float64)).sum()
    # out ** 2 doubles out's bf16 rounding in dO: 2% of the largest gradient (the pointer loop's error here, 1.3%).
    for got, want in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q64, k64, v64))):
        assert max_err(got, want) <= 2e-2 * want.abs().max().item()
    lens_q, lens_k = [1, 130, 17, 61], [5, 60, 200, 61]
    cu_q = _cu_seqlens(lens_q)
    cu_k = _cu_seqlens(lens_k)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(sum(lens_k), 2, 64, generator=g).bfloat16().requires_grad_() for _ in range(2))
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, deterministic=True, backend="triton"
    )
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, _ = attention_reference(q64, k64, v64, 64**-0.5, *(_flash_window(True, (-1, -1))), cu_q, cu_k)
    _check_half_gradients(q, k, v, out, q64, k64, v64, ref)


def test_warp_specialized_forward_varlen_skips_blocks_past_a_sequence(warp_specialized_forward):
    """Packed sequences of uneven length: a 128-row block past a short sequence's end visits no key and writes
    nothing (no early return there), and no tile reads past its own sequence (the descriptors end at it)."""
    lens_q, lens_k = [1, 300, 17, 130], [1, 60, 200, 130]
    cu_q = _cu_seqlens(lens_q)
    cu_k = _cu_seqlens(lens_k)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).bfloat16()
    k, v = (torch.randn(sum(lens_k), 2, 64, generator=g).bfloat16() for _ in range(2))
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, return_attn_probs=True, backend="triton"
    )
    ref, ref_lse = attention_reference(
        q.double(), k.double(), v.double(), 64**-0.5, *(_flash_window(True, (-1, -1))), cu_q, cu_k
    )
    assert max_err(out, ref) < TOL_HALF[torch.bfloat16]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and max_err(lse[finite], ref_lse[finite]) < 1e-4


@pytest.mark.parametrize(
    "B,Tq,Tk,H,Hkv,D,causal,window",
    [
        (3, 17, 17, 4, 2, 32, True, (-1, -1)),
        pytest.param(2, 256, 256, 2, 1, 64, False, (-1, -1), marks=pytest.mark.slow),  # unmasked (FULL_TILES)
        (2, 200, 17, 2, 2, 64, True, (-1, -1)),
    ],
    ids=lambda c: str(c),
)
def test_warp_specialized_kernels_take_softcap_and_alibi(
    warp_specialized_forward, warp_specialized_backward, B, Tq, Tk, H, Hkv, D, causal, window
):
    # flash-attn's score modifiers in the specialized loops (the unmasked FULL_TILES one too), forward and dK/dV
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.bfloat16)
    slopes = torch.rand(B, H, generator=torch.Generator().manual_seed(1))
    kw = dict(causal=causal, window_size=window, softcap=2.0, alibi_slopes=slopes)
    out = flash_attn_func(q, k, v, deterministic=True, backend="triton", **kw)
    q64, k64, v64 = float64_leaves(q, k, v)
    ref = flash_attn_func(q64, k64, v64, backend="reference", **kw)
    assert max_err(out, ref) < TOL_HALF[torch.bfloat16]
    _check_half_gradients(q, k, v, out, q64, k64, v64, ref)


def test_warp_specialized_kernels_take_empty_packed_sequences(warp_specialized_forward, warp_specialized_backward):
    """Sequences of 0 queries (their keys get dK = dV = 0), of 0 keys (their queries see nothing: out 0, lse +inf,
    dQ 0) and of both, the last: their descriptors get one row, which no tile reads or writes (TMA takes no zero
    dimension)."""
    lens_q, lens_k = [0, 5, 130, 4, 0], [3, 0, 140, 7, 0]
    cu_q = _cu_seqlens(lens_q)
    cu_k = _cu_seqlens(lens_k)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(sum(lens_k), 2, 64, generator=g).bfloat16().requires_grad_() for _ in range(2))
    out, lse, _ = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max(lens_q),
        max(lens_k),
        causal=True,
        return_attn_probs=True,
        deterministic=True,
        backend="triton",
    )
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, 64**-0.5, *(_flash_window(True, (-1, -1))), cu_q, cu_k)
    assert max_err(out, ref) < TOL_HALF[torch.bfloat16]
    assert torch.all(out[:5] == 0) and torch.all(lse[:, :5] == float("inf"))  # sequence 1's queries see no key
    dk, dv = torch.autograd.grad(out, (k, v), torch.randn(out.shape, generator=g).to(out.dtype), retain_graph=True)
    assert torch.all(dk[:3] == 0) and torch.all(dv[:3] == 0)  # sequence 0's keys, seen by no query
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and max_err(lse[finite], ref_lse[finite]) < 1e-4
    _check_half_gradients(q, k, v, out, q64, k64, v64, ref)


def test_tma_aligned_reads_dtype_head_dim_base_and_strides():
    x = torch.randn(2, 33, 4, 64).bfloat16()
    assert attention_kernels.tma_aligned(x, x.transpose(1, 2).contiguous().transpose(1, 2))  # SDPA layout too
    assert not attention_kernels.tma_aligned(x.float())  # fp32: the TMA configs were built for half tiles
    assert not attention_kernels.tma_aligned(torch.randn(2, 33, 4, 96).bfloat16())  # D not a power of 2
    assert not attention_kernels.tma_aligned(torch.randn(2 * 33 * 4 * 64 + 1).bfloat16()[1:].view(2, 33, 4, 64))
    assert not attention_kernels.tma_aligned(torch.randn(2, 33, 1, 68).bfloat16()[..., :64])  # 136-byte rows
    # An expanded dO ((out * w).sum(): strides (0, 0, 0, 1)): a zero stride is not given to TMA
    assert not attention_kernels.tma_aligned(torch.randn(64).bfloat16().expand(2, 33, 4, 64))


def test_tuners_key_band_edges_by_octave_and_unbounded_past_the_sequence():
    band_class = _attention_launch.band_class
    # SDPA's top-left causal at Tq 100 against Tk 357..611 (right = Tq - Tk) shares one key per octave
    assert {band_class(100 - tk, 1024) for tk in range(357, 612)} == {-512}
    assert [band_class(e, 1024) for e in (0, 1, 3, 64, 65, -1, -5)] == [0, 1, 4, 64, 128, -1, -8]
    # a window as wide as the sequence, or wider, is unbounded: one key with UNBOUNDED
    assert {band_class(e, 1024) for e in (1024, 5000, UNBOUNDED)} == {1024} and band_class(-2000, 1024) == -1024
    for tuner in (
        attention_kernels._attn_fwd,
        backward_kernels._attn_bwd_dkdv,
        backward_kernels._attn_bwd_dkdv_dq,
        backward_kernels._attn_bwd_dq,
    ):  # a key name the kernel lacks would be dropped without a word
        assert {"tune_seqlen", "tune_left", "tune_right"} <= set(tuner.keys) and not {"left", "right"} & set(tuner.keys)


def test_fasttrain_attention_ws_0_leaves_the_specialized_configs_out():
    code = (
        "from fasttrain.kernels import _attention_configs as c; "
        "print(sum(x.kwargs['WARP_SPECIALIZE'] for t in (c.FWD_CONFIGS, c.DKDV_CONFIGS) for x in c.flat(t[90])))"
    )
    counts = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "FASTTRAIN_ATTENTION_WS": flag},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for flag in ("0", "1")
    ]
    assert counts[0] == "0" and int(counts[1]) == 4  # the forward's tile and dK/dV's, each in d64 and d128


@pytest.mark.parametrize("table", ["FWD_CONFIGS", "DKDV_CONFIGS"])
def test_pruner_keeps_warp_specialized_configs_only_where_tma_can_read(table):
    by_class = getattr(_attention_configs, table)[90]
    prune, configs = _attention_configs.pruner(by_class), _attention_configs.flat(by_class)

    def specialized(head_dim, **kwargs):
        return [c.kwargs["WARP_SPECIALIZE"] for c in prune(configs, {}, HEAD_DIM=head_dim, **kwargs)]

    for head_dim in (64, 128):
        assert any(specialized(head_dim, TMA_ALIGNED=True)) and not all(specialized(head_dim, TMA_ALIGNED=True))
        assert specialized(head_dim, TMA_ALIGNED=False) and not any(specialized(head_dim, TMA_ALIGNED=False))
    assert not any(specialized(256, TMA_ALIGNED=True))


@pytest.mark.parametrize("table", ["FWD_CONFIGS", "DKDV_CONFIGS", "DKDV_DQ_CONFIGS"])
def test_pruner_leaves_out_the_tiles_that_spill_with_score_modifiers(table):
    by_class = getattr(_attention_configs, table)[90]
    prune, configs = _attention_configs.pruner(by_class), _attention_configs.flat(by_class)
    for head_dim in (64, 128, 256):
        plain = prune(configs, {}, HEAD_DIM=head_dim, TMA_ALIGNED=True, SOFTCAP=False, ALIBI=False)
        for flags in ({"SOFTCAP": True, "ALIBI": False}, {"SOFTCAP": False, "ALIBI": True}):
            modified = prune(configs, {}, HEAD_DIM=head_dim, TMA_ALIGNED=True, **flags)
            assert modified == [c for c in plain if id(c) not in _attention_configs.PLAIN_ONLY] and modified
    assert any(id(c) in _attention_configs.PLAIN_ONLY for c in configs)


def test_varlen_strided_cu_seqlens():
    # cu_seqlens as a column of a (B + 1, 2) tensor: the kernels read Cu + b, so a strided view must be copied first.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(50, 2, 32, generator=g) for _ in range(3))  # (total, H, D)
    cu = torch.tensor([0, 7, 31, 50], dtype=torch.int32)
    strided = torch.stack((cu, torch.zeros_like(cu)), dim=1)[:, 0]
    assert strided.stride(0) == 2
    got = flash_attn_varlen_func(q, k, v, strided, strided, 24, 24, causal=True, backend="triton")
    want = flash_attn_varlen_func(q, k, v, cu, cu, 24, 24, causal=True, backend="reference")
    assert max_err(got, want) < TOL


def _count_offset_reads(monkeypatch):
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    return reads


def _assert_offsets_checked(device, reads_per_three_calls, monkeypatch):
    """Three calls with the same offsets read them reads_per_three_calls times; in-place changes are caught."""
    reads = _count_offset_reads(monkeypatch)
    g = torch.Generator().manual_seed(4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the CUDA kernels take fp16/bf16
    q, k, v = (torch.randn(20, 2, 32, generator=g).to(device, dtype) for _ in range(3))  # (total, H, D)
    cu_q, cu_k = (torch.tensor([0, 5, 20], dtype=torch.int32, device=device) for _ in range(2))
    for _ in range(3):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 15, 15, causal=True, backend="triton")
    assert [sum(t is cu for t in reads) for cu in (cu_q, cu_k)] == [reads_per_three_calls] * 2
    cu_q[1] = 25  # in place: no longer rising
    with pytest.raises(ValueError, match="cu_seqlens_q must rise"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 15, 15, causal=True, backend="triton")
    cu_q[1] = 2  # in place: valid offsets, but the longest sequence is now 18
    with pytest.raises(ValueError, match="max_seqlen_q"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 15, 15, causal=True, backend="triton")


def test_varlen_cpu_offsets_checked_every_call(monkeypatch):
    # Reading CPU offsets costs no sync, so nothing is remembered: a write through .data (which keeps the in-place
    # version) is caught too. (The triton backend: the reference reads the offsets itself.)
    _assert_offsets_checked("cpu", 3, monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(20, 2, 32, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 20], dtype=torch.int32)
    flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, backend="triton")
    cu.data[1] = 25
    with pytest.raises(ValueError, match="must rise"):
        flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, backend="triton")


def test_varlen_under_inference_mode():
    # Inference tensors have no in-place version to remember offsets by; they are read every call.
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        q, k, v = (torch.randn(20, 2, 32, generator=g) for _ in range(3))
        cu = torch.tensor([0, 5, 20], dtype=torch.int32)
        for _ in range(2):
            got = flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, causal=True, backend="triton")
        want = flash_attn_varlen_func(q, k, v, cu, cu, 15, 15, causal=True, backend="reference")
    assert max_err(got, want) < TOL


@pytest.mark.gpu
def test_gpu_varlen_offsets_read_once_per_version(monkeypatch):
    # Every layer of a model gets the same cu_seqlens; reading CUDA offsets is a host sync, so it happens once per
    # tensor and in-place version, and an in-place change is still checked.
    _assert_offsets_checked("cuda", 1, monkeypatch)


def test_sequences_past_int32_row_offsets_are_refused_by_the_kernels():
    # 2**21 tokens x 16 heads x 64 = 2**31 elements in one sequence: the kernels' int32 row offsets would wrap.
    # Expanded views (stride 0 along T and H) make the shape without the memory; the check counts the contiguous
    # row stride that the backward may copy to.
    q = torch.randn(1, 1, 1, 64).expand(1, 2**21, 16, 64)
    with pytest.raises(_backend.BackendError, match="int32 row offsets"):
        flash_attn_func(q, q, q, causal=True, backend="triton")
    k = torch.randn(1, 1, 1, 64).expand(1, 2**20, 16, 64)  # keys at half that: within range, so q alone is named
    with pytest.raises(_backend.BackendError, match="q.s longest sequence"):
        flash_attn_func(q, k, k, causal=True, backend="triton")


def _flash_window(causal, window):
    left, right = (UNBOUNDED if w == -1 else w for w in window)
    return left, 0 if causal else right


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_lse_gradient_flows(backend):
    """A loss on the returned logsumexp differentiates through it (d lse / d s = p), on every backend."""
    q, k, v = _inputs(2, 40, 33, 2, 1, 32)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend, lse_grad=True)
    loss = (out * out).sum() + (lse * torch.linspace(-1, 1, 40)).sum()
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse = attention_reference(q64, k64, v64, 32**-0.5, UNBOUNDED, 0)
    ref_loss = (ref * ref).sum() + (ref_lse * torch.linspace(-1, 1, 40, dtype=torch.float64)).sum()
    for got, want in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q64, k64, v64))):
        assert max_err(got, want) < TOL


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
@pytest.mark.parametrize("Tq", [8, 130])
def test_very_negative_scores_keep_gradients_finite(Tq, deterministic):
    """Every score near -140, so lse ~ -137: a zero key row past the sequence's end would score 0 and weigh
    exp(137) = inf in fp32, and inf * (k = 0) is NaN in dQ. Non-causal, Tk 40 in a 64-key block; Tq 8 is one masked
    query tile, Tq 130 has whole tiles that the block would otherwise visit unmasked."""
    g = torch.Generator().manual_seed(6)
    q = (5 + 0.1 * torch.randn(1, Tq, 2, 32, generator=g)).requires_grad_()
    k = (-5 + 0.1 * torch.randn(1, 40, 2, 32, generator=g)).requires_grad_()
    v = torch.randn(1, 40, 2, 32, generator=g).requires_grad_()
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, deterministic=deterministic, backend="triton")
    assert lse.max() < -120
    q64, k64, v64 = float64_leaves(q, k, v)
    ref = flash_attn_func(q64, k64, v64, backend="reference")
    dout = torch.randn(out.shape, generator=g)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
        assert torch.isfinite(got).all(), f"d{name}"
        # scores of -140 in fp32 carry ~1e-5 of rounding into every exp: 0.1% of the largest gradient (measured
        # worst 5.2e-5 on dQ's 0.08)
        assert max_err(got, want) < TOL + 1e-3 * want.abs().max().item(), f"d{name}"


@pytest.fixture
def atomic_dq_32_rows(monkeypatch):
    """The atomic dK/dV kernel on 32-row query tiles, whose dQ share is computed as (K^T dS)^T (the interpreter's
    own config has 64)."""
    _pin_config(
        monkeypatch,
        backward_kernels,
        "_attn_bwd_dkdv_dq",
        backward_kernels._attn_bwd_dkdv_kernel,
        (32, 64, 4, 1, False),
        ATOMIC_DQ=True,
    )


@pytest.mark.parametrize(
    "B,Tq,Tk,H,Hkv,D,causal,window",
    [
        (1, 97, 97, 4, 2, 96, True, (-1, -1)),  # head_dim 96 padded to 128, GQA 2
        (2, 70, 45, 2, 2, 32, False, (20, 5)),  # two-sided window, Tk in a part-empty key block
    ],
    ids=lambda c: str(c),
)
def test_atomic_dq_on_32_row_tiles_matches_float64(atomic_dq_32_rows, B, Tq, Tk, H, Hkv, D, causal, window):
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D)
    out = flash_attn_func(q, k, v, causal=causal, window_size=window, backend="triton")
    q64, k64, v64 = float64_leaves(q, k, v)
    ref = flash_attn_func(q64, k64, v64, causal=causal, window_size=window, backend="reference")
    dout = torch.randn_like(out)
    for name, got, want in zip("qkv", grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
        assert max_err(got, want) < TOL, f"d{name}"


class _LaunchSpy:
    """Stands in for an autotuned kernel: counts its launches and passes them on."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_backward_plans_launch_what_they_say(monkeypatch):
    """Off the GPU the backward takes dQ by atomics from the dK/dV kernel and launches no dQ kernel;
    deterministic=True, or torch.use_deterministic_algorithms(True), launches the dQ kernel and no atomics."""
    names = ("_attn_bwd_dkdv_dq", "_attn_bwd_dkdv", "_attn_bwd_dq")
    spies = [_LaunchSpy(getattr(backward_kernels, name)) for name in names]
    for name, spy in zip(names, spies):
        monkeypatch.setattr(backward_kernels, name, spy)

    def backward(**kwargs):
        q, k, v = _inputs(1, 40, 40, 2, 1, 32)
        flash_attn_func(q, k, v, causal=True, backend="triton", **kwargs).sum().backward()
        return tuple(spy.launches for spy in spies)

    assert backward() == (1, 0, 0)
    assert backward(deterministic=True) == (1, 1, 1)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert backward() == (1, 2, 2)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


@pytest.mark.parametrize("Tq,Tk,causal", [(33, 33, True), (20, 45, True), (45, 20, True), (20, 45, False)])
def test_sdpa_matches_torch(Tq, Tk, causal):
    """torch's layout and top-left causal alignment, with GQA through enable_gqa."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, Tq, 32, generator=g, dtype=torch.float64)  # (B, H, T, D)
    k = torch.randn(2, 2, Tk, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, Tk, 32, generator=g, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
    got = scaled_dot_product_attention(
        *(t.float() for t in (q, k, v)), is_causal=causal, enable_gqa=True, scale=0.3, backend="triton"
    )
    assert got.shape == want.shape and max_err(got, want) < TOL


def test_sdpa_attn_mask_takes_the_reference_path_and_dropout_the_kernels():
    q, k, v = (torch.randn(2, 2, 24, 32, dtype=torch.float64) for _ in range(3))  # (B, H, T, D)
    mask = torch.rand(24, 24) > 0.3
    mask[:, 0] = True
    for m in (mask, torch.randn(2, 1, 24, 24, dtype=torch.float64)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert max_err(scaled_dot_product_attention(q, k, v, attn_mask=m), want) < 1e-12
    with pytest.raises(_backend.BackendError, match="attn_mask"):
        scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, backend="triton")
    torch.manual_seed(0)
    dropped = flash_attn_func(q, k, v, dropout_p=0.5)
    assert dropped.shape == q.shape and not torch.allclose(dropped, flash_attn_func(q, k, v))
    assert flash_attn_func(q.float(), k.float(), v.float(), dropout_p=0.1, backend="triton").shape == q.shape


@pytest.mark.parametrize("case", ["dropout", "packed dropout", "float mask", "bool mask"])
def test_reference_dropout_and_mask_gradients_check_numerically(case):
    """The reference backend's closed-form backward with dropout (its mask drawn again from the forward's seed) and
    an attn_mask (a float one takes a gradient too), checked by torch.autograd.gradcheck in float64 (and the double
    backward by gradgradcheck); torch's RNG is reseeded at each call so that every call drops the same
    probabilities."""
    q, k, v = float64_leaves(*_inputs(1, 5, 6, 2, 1, 4, seed=7))
    mask = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    def attend(q, k, v, mask, on=True):
        """The case's attention; on=False leaves the dropout or the mask out."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            p = 0.3 if on else 0.0
            if case == "packed dropout":
                cu = torch.tensor([0, 2, 5], dtype=torch.int32)
                return flash_attn_varlen_func(q[0], k[0, :5], v[0, :5], cu, cu, 3, 3, dropout_p=p, causal=True)
            if case == "dropout":
                return flash_attn_func(q, k, v, dropout_p=p, causal=True)
            attn_mask = None if not on else mask if case == "float mask" else mask > 0
            sdpa = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask, enable_gqa=True)
            return sdpa.transpose(1, 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback to the reference, which this test means
        assert not torch.allclose(attend(q, k, v, mask), attend(q, k, v, mask, on=False))  # dropout or mask acts
        inputs = (q, k, v, mask) if case == "float mask" else (q, k, v)
        fn = (lambda *t: attend(*t)) if case == "float mask" else (lambda q, k, v: attend(q, k, v, mask))
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        if case == "dropout":  # the double backward recomputes the forward, with the same mask
            assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_cpu(dtype, backend):
    """fp16/bf16 run through the same kernels (widened after each load when interpreting; widened on entry and
    rounded once at the end by the C++ kernel)."""
    q, k, v = _inputs(1, 50, 50, 2, 1, 64, dtype=dtype)
    out = flash_attn_func(q, k, v, causal=True, backend=backend)
    q64, k64, v64 = float64_leaves(q, k, v)
    ref = flash_attn_func(q64, k64, v64, causal=True, backend="reference")
    assert out.dtype == dtype and max_err(out, ref) < TOL_HALF[dtype]
    dout = torch.randn_like(out)
    for got, want in zip(grads(out, (q, k, v), dout), grads(ref, (q64, k64, v64), dout.double())):
        assert got.dtype == dtype and max_err(got, want) < 4 * TOL_HALF[dtype]


@pytest.mark.parametrize("modified", [False, True], ids=["plain", "softcap-alibi"])
@pytest.mark.parametrize("backend,deterministic", KERNELS, ids=KERNEL_IDS)
def test_registered_ops_schema_and_fake_tensors(backend, deterministic, modified):
    """torch.library's own checks of both ops (schema, fake implementations against the real ones), every plan, with
    and without the score modifiers."""
    from fasttrain.ops import attention as attention_ops

    q, k, v = (t.detach() for t in _inputs(1, 20, 20, 2, 1, 32))
    modifiers = (5.0, torch.rand(1, 2)) if modified else (0.0, None)
    args = (q, k, v, None, None, 20, 20, 32**-0.5, UNBOUNDED, 0, None, 0.0, None, *modifiers, deterministic, backend)
    torch.library.opcheck(attention_ops._forward_op.op, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = attention_ops._forward_op(*args)
    backward_args = (
        torch.randn_like(out),
        q,
        k,
        v,
        out,
        lse,
        None,
        None,
        None,
        20,
        20,
        32**-0.5,
        UNBOUNDED,
        0,
        None,
        0.0,
        None,
        *modifiers,
        deterministic,
        backend,
    )
    torch.library.opcheck(attention_ops._backward_op.op, backward_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_torch_compile_fullgraph_no_graph_break(backend):
    """The registered op traces under fullgraph=True, forward and backward, and gives eager's numbers."""
    torch._dynamo.reset()
    q, k, v = _inputs(2, 24, 24, 4, 2, 32)

    def loss_fn(q, k, v):
        return flash_attn_func(q, k, v, causal=True, backend=backend).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-5


def test_auto_chooses_the_cpu_kernel_without_the_interpreter(monkeypatch):
    import fasttrain.ops.attention as attention_ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 8, 8, 2, 1, 48)  # any head_dim: the C++ kernel's matmuls take it
    assert _choose(q, k, v) == "cpu"
    with warnings.catch_warnings():  # the intended CPU path, not a fallback: no warning
        warnings.simplefilter("error")
        out = flash_attn_func(q, k, v, causal=True, backend="auto")
    out.sum().backward()  # the model's CPU training path: autograd through the C++ kernel's op
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(_backend.BackendError, match="TRITON_INTERPRET"):
        flash_attn_func(q, k, v, backend="triton")
    with pytest.warns(RuntimeWarning, match="the CPU kernel takes fp32, bf16 or fp16, got torch.float64"):
        _choose(q.double(), k, v)
    monkeypatch.setattr(attention_ops, "_CPU_OP_REASON", "no extension here")
    with pytest.raises(_backend.BackendError, match="no extension here"):
        flash_attn_func(q, k, v, backend="cpu")


@pytest.mark.parametrize(
    "Tq,Tk,H,Hkv,D,causal,window",
    [
        (700, 1250, 4, 1, 128, True, (-1, -1)),  # diagonal 550 keys in: rows 448-473 see none of their block's 3rd tile
        (1100, 1100, 2, 2, 64, False, (700, 400)),  # a band of 1164 keys per block: three tiles, rows start mid-tile
        (64, 1537, 2, 1, 32, False, (-1, -1)),  # one query block over four key tiles, the last one 1 key
    ],
)
def test_cpu_kernel_across_key_tiles(Tq, Tk, H, Hkv, D, causal, window):
    """The C++ kernel's online softmax over several 512-key tiles, with rows that see none of a tile; out, lse and
    every gradient (a loss on lse too) against float64."""
    q, k, v = _inputs(1, Tq, Tk, H, Hkv, D, seed=3)
    out, lse, _ = flash_attn_func(
        q, k, v, causal=causal, window_size=window, return_attn_probs=True, backend="cpu", lse_grad=True
    )
    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse, _ = flash_attn_func(
        q64, k64, v64, causal=causal, window_size=window, return_attn_probs=True, backend="reference", lse_grad=True
    )
    finite = torch.isfinite(ref_lse)
    assert max_err(out, ref) < TOL and torch.equal(torch.isfinite(lse), finite)
    assert max_err(lse[finite], ref_lse[finite]) < TOL
    dout, dlse = torch.randn_like(out), torch.randn_like(lse).masked_fill(~finite, 0.0)
    got = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    want = torch.autograd.grad((ref, ref_lse), (q64, k64, v64), (dout.double(), dlse.double()))
    for name, a, b in zip("qkv", got, want):
        assert max_err(a, b) < TOL, f"d{name}"


def test_cpu_kernel_takes_strided_inputs_and_is_bitwise_repeatable():
    # q, k, v as a model slices them from one (B, T, 3, H, D) projection; dout a transposed view
    qkv = torch.randn(2, 97, 3, 4, 32, requires_grad=True)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(2, 4, 97, 32).transpose(1, 2)
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True, backend="cpu")
        runs.append((out, *grads(out, (q, k, v), dout)))
    ref = flash_attn_func(*(t.detach().contiguous() for t in (q, k, v)), causal=True, backend="reference")
    assert max_err(runs[0][0], ref) < TOL
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# In a child process, since the route is read once per process: the C++ kernel's out and grads on GQA T 97 (strided
# q/k/v from one projection) and on four key tiles, the last of one key, and the route the tiles took.
_TILE_ROUTE_RUN = """
import sys, torch
from fasttrain import _C
from fasttrain.ops import flash_attn_func
g = torch.Generator().manual_seed(5)
results = []
for B, Tq, Tk, H, Hkv, causal in ((2, 97, 97, 4, 2, True), (1, 64, 1537, 2, 1, False)):
    q = torch.randn(B, Tq, H, 32, generator=g).requires_grad_()
    kv = torch.randn(B, Tk, 2, Hkv, 32, generator=g).requires_grad_()
    k, v = kv.unbind(2)
    out = flash_attn_func(q, k, v, causal=causal, backend="cpu")
    dout = torch.randn(out.shape, generator=g)
    results.append((q, kv, causal, dout, out, *torch.autograd.grad(out, (q, kv), dout)))
torch.save({"route": _C.cpu_tile_blas(), "results": [tuple(t.detach() if torch.is_tensor(t) else t for t in r)
                                                      for r in results]}, sys.argv[1])
"""


@pytest.mark.parametrize("route", ["sgemm_", "at::mm"])
def test_cpu_kernel_tiles_through_blas_or_at_mm(route, tmp_path):
    """The tiles' matmuls call MKL's sgemm_ straight where libtorch exports it (the x86 wheels), at::mm where it does
    not or FASTTRAIN_CPU_BLAS=aten asks; both routes against float64, forward and backward."""
    if route == "sgemm_" and not torch.backends.mkl.is_available():
        route = "at::mm"  # a torch without MKL exports no sgemm_ for the weak symbol to find
    env = {k: v for k, v in os.environ.items() if k != "FASTTRAIN_CPU_BLAS"}
    if route == "at::mm":
        env["FASTTRAIN_CPU_BLAS"] = "aten"
    subprocess.run([sys.executable, "-c", _TILE_ROUTE_RUN, str(tmp_path / "run.pt")], env=env, check=True)
    run = torch.load(tmp_path / "run.pt")
    assert run["route"] == route
    for q, kv, causal, dout, out, dq, dkv in run["results"]:
        q64, kv64 = (t.double().requires_grad_() for t in (q, kv))
        ref = flash_attn_func(q64, *kv64.unbind(2), causal=causal, backend="reference")
        assert max_err(out, ref) < TOL
        want = torch.autograd.grad(ref, (q64, kv64), dout.double())
        assert max_err(dq, want[0]) < TOL and max_err(dkv, want[1]) < TOL


def test_unsupported_head_dim_falls_back_or_refuses(monkeypatch):
    import fasttrain.ops.attention as attention_ops

    q, k, v = _inputs(1, 8, 8, 2, 2, 48)
    with pytest.raises(_backend.BackendError, match="head_dim"):
        flash_attn_func(q, k, v, backend="triton")
    assert _choose(q, k, v) == "cpu"  # CPU tensors: the C++ kernel takes any head_dim
    monkeypatch.setattr(attention_ops, "_CPU_OP_REASON", "off in this test")
    with pytest.warns(RuntimeWarning, match="head_dim"):
        out = flash_attn_func(q, k, v)
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_no_keys_give_zeros_as_torch(backend):
    # A sequence with no keys (Tk = 0, or an empty one in a packed batch): out 0, lse +inf, as SDPA gives 0.
    q, k, v = _inputs(2, 5, 0, 2, 2, 32)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, float("inf")))
    sdpa = scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), backend=backend)
    assert torch.equal(sdpa, F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))))
    q, k, v = _inputs(1, 6, 4, 2, 2, 32)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 3, 6], [0, 0, 4]))
    packed = flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 3, 4, backend=backend)
    assert torch.equal(packed[:3], torch.zeros(3, 2, 32))
    assert max_err(packed[3:], flash_attn_func(q[:, 3:], k, v, backend="reference")[0]) < TOL


def test_more_sequences_than_the_grid_takes_fall_back_to_the_reference(monkeypatch):
    # CUDA's grid takes 65535 blocks on the batch axis; patched to 2 here, so 3 sequences exceed it.
    import fasttrain.ops.attention as attention_ops

    monkeypatch.setattr(attention_ops, "GRID_YZ_MAX", 2)
    monkeypatch.setattr(attention_ops, "_CPU_OP_REASON", "off in this test")  # else auto takes the C++ kernel
    q, k, v = _inputs(3, 5, 5, 2, 2, 32)
    with pytest.raises(_backend.BackendError, match=r"3 sequences exceed the kernels' grid \(2 per launch"):
        flash_attn_func(q, k, v, backend="triton")
    cu = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="sequences exceed"):
        packed = flash_attn_varlen_func(*(t.reshape(15, 2, 32) for t in (q, k, v)), cu, cu, 5, 5, causal=True)
    assert max_err(packed, flash_attn_func(q, k, v, causal=True, backend="reference").reshape(15, 2, 32)) < 1e-6


@pytest.mark.parametrize("aliased", [False, True], ids=["qkv", "x-as-qkv"])
@pytest.mark.parametrize("causal", [False, True])
def test_double_backward_matches_torch_float64(causal, aliased):
    # A gradient penalty through attention: the first-order gradients kept as a graph (create_graph=True).
    def penalty(attend, q, k, v):
        grads = torch.autograd.grad(
            attend(q, k, v).pow(2).sum() + sum(t.pow(3).sum() for t in (q, k, v)), (q, k, v), create_graph=True
        )
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), (q, k, v))

    def torch_sdpa(q, k, v):  # (B, T, H, D) <-> (B, H, T, D); the math backend: torch's flash has no double backward
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal, enable_gqa=True
            ).transpose(1, 2)

    if aliased:  # self-attention on one tensor: each slot's gradient counted once
        x = _inputs(1, 9, 9, 4, 4, 32)[0]
        x64 = x.detach().double().requires_grad_()
        want = penalty(lambda x, *_: torch_sdpa(x, x, x), x64, x64, x64)
        got = penalty(lambda x, *_: flash_attn_func(x, x, x, causal=causal, backend="triton"), x, x, x)
    else:
        q, k, v = _inputs(1, 9, 9, 4, 2, 32)
        want = penalty(torch_sdpa, *float64_leaves(q, k, v))
        got = penalty(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, backend="triton"), q, k, v)
    for name, g, ref in zip("qkv", got, want):
        assert max_err(g, ref) < TOL * ref.abs().max().item(), f"d{name}"


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q, k, v: flash_attn_func(q[0], k, v), ValueError, "q must be 4-D"),
        (
            lambda q, k, v: flash_attn_func(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1)),
            ValueError,
            "must divide",
        ),
        (lambda q, k, v: flash_attn_func(q, k.double(), v), TypeError, "k must have q's dtype"),
        (lambda q, k, v: flash_attn_func(q, k, v[..., :16]), ValueError, "same shape"),
        (lambda q, k, v: flash_attn_func(q, k, v, window_size=(1.5, 3)), TypeError, "window_size"),
        (lambda q, k, v: flash_attn_func(q, k, v, softcap=float("inf")), ValueError, "softcap"),
        (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
        (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda q, k, v: flash_attn_func(q.long(), k, v), TypeError, "floating-point"),
        (
            lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8),
            TypeError,
            "cu_seqlens_q",
        ),
        (
            lambda q, k, v: flash_attn_varlen_func(
                q[0], k[0], v[0], torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32), 8, 8
            ),
            ValueError,
            "packed",
        ),
        (
            lambda q, k, v: flash_attn_varlen_func(
                q[0], k[0], v[0], torch.tensor([0, 8], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32), 4, 8
            ),
            ValueError,
            "max_seqlen_q",
        ),
        (
            lambda q, k, v: scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))),
            ValueError,
            "enable_gqa",
        ),
        (
            lambda q, k, v: scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), enable_gqa=True, attn_mask=torch.ones(8, 8, dtype=torch.long)
            ),
            TypeError,
            "attn_mask must be bool .* or floating-point .*, got torch.int64",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    q, k, v = _inputs(1, 8, 8, 4, 2, 32)
    with pytest.raises(error, match=match):
        call(q, k, v)


# ---- GPU: bf16/fp16 against an fp32 reference, judged against PyTorch's own error in the same dtype -------------

GPU_CASES = [  # (B, T, H, Hkv, D, causal, window)
    (2, 1024, 8, 2, 64, True, (-1, -1)),
    (1, 8192, 4, 1, 128, True, (-1, -1)),
    (1, 4096, 4, 4, 128, False, (-1, -1)),
    (1, 2048, 4, 2, 256, True, (-1, -1)),
    (2, 4096, 4, 2, 128, True, (512, -1)),
    (1, 1025, 4, 4, 64, False, (100, 100)),
    (2, 1000, 4, 2, 128, False, (-1, -1)),  # the last key block part-empty, every tile unmasked but there
]


@pytest.fixture(params=["atomic_dq", "dq_kernel"])
def backward_plan(request, monkeypatch):
    """Each backward plan forced, whichever the GPU's timing would choose: returns the `deterministic` to pass."""
    if request.param == "dq_kernel":
        return True
    _force_atomic_dq(monkeypatch)
    return False


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Hkv,D,causal,window", GPU_CASES, ids=lambda c: str(c))
def test_gpu_at_most_twice_pytorch_error(backward_plan, B, T, H, Hkv, D, causal, window, dtype):
    _check_gpu_against_pytorch(B, T, H, Hkv, D, causal, window, dtype, deterministic=backward_plan)


WS_GPU_CASES = [  # (B, T, H, Hkv, D, causal, window)
    (1, 1, 1, 1, 128, True, (-1, -1)),
    (2, 1025, 8, 2, 64, True, (-1, -1)),
    (2, 1025, 4, 2, 32, True, (-1, -1)),  # d32 takes the d64 class's tiles: 64-byte TMA rows
    (1, 4096, 4, 4, 128, False, (-1, -1)),  # the unmasked loops (FULL_TILES)
    (1, 8192, 4, 1, 128, True, (-1, -1)),
    (2, 4096, 4, 2, 128, True, (512, -1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,Hkv,D,causal,window", WS_GPU_CASES, ids=lambda c: str(c))
def test_gpu_warp_specialized_forward_at_most_twice_pytorch_error(
    warp_specialized_forward, B, T, H, Hkv, D, causal, window, dtype
):
    _check_gpu_against_pytorch(B, T, H, Hkv, D, causal, window, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,Hkv,D,causal,window", WS_GPU_CASES, ids=lambda c: str(c))
def test_gpu_warp_specialized_backward_at_most_twice_pytorch_error(
    warp_specialized_backward, B, T, H, Hkv, D, causal, window
):
    """bf16 only: the dtype changes no code in the loop, and the forward's test already covers fp16 on the card."""
    _check_gpu_against_pytorch(B, T, H, Hkv, D, causal, window, torch.bfloat16, deterministic=True)


@pytest.mark.gpu
def test_gpu_warp_specialized_forward_and_backward_varlen(warp_specialized_forward, warp_specialized_backward):
    _check_gpu_varlen(deterministic=True)


_EMPTY_SEQUENCES_CHILD = """
import sys
import pytest
sys.path.insert(0, sys.argv[1])
import test_attention as t
fwd, dkdv = t._attention_configs.FWD_WS_TILES[0], list(t._attention_configs.DKDV_WS_TILES.values())[0]
with pytest.MonkeyPatch.context() as mp:
    t._pin_config(mp, t.attention_kernels, "_attn_fwd", t.attention_kernels._attn_fwd_kernel, fwd)
    t._pin_config(mp, t.backward_kernels, "_attn_bwd_dkdv", t.backward_kernels._attn_bwd_dkdv_kernel, dkdv,
                  ATOMIC_DQ=False)
    t._check_gpu_varlen(deterministic=True, lens=(1, 0, 1000, 3000, 17, 0))
    t._check_gpu_varlen(deterministic=True, lens=(0, 1000, 3000, 17, 0), lens_k=(5, 0, 3000, 40, 0))
"""


@pytest.mark.gpu
def test_gpu_tma_kernels_take_empty_packed_sequences():
    """Sequences of 0 rows (queries, keys or both; the last among them) through the warp-specialized forward and
    dK/dV, which cannot return early: their descriptors get one row that no tile touches (tma_rows in
    kernels/_attention_tiles.py). In a child process, so that a fault there cannot poison this worker's CUDA context
    for the tests after it."""
    child = subprocess.run(
        [sys.executable, "-c", _EMPTY_SEQUENCES_CHILD, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert child.returncode == 0, child.stderr[-3000:]


@pytest.mark.gpu
def test_gpu_varlen_both_backward_plans(backward_plan):
    _check_gpu_varlen(deterministic=backward_plan)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_repeatable(monkeypatch):
    """deterministic=True overrides the plan tuner, here made to answer the atomic plan."""
    _force_atomic_dq(monkeypatch)
    q, k, v = _inputs(2, 2048, 2048, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    grads = [
        grads(flash_attn_func(q, k, v, causal=True, deterministic=True, backend="triton"), (q, k, v), dout)
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
def test_gpu_kv_rows_tma_cannot_read_take_the_pointer_loop():
    """K/V rows of 68 elements (136 B, not a multiple of 16): the autotuner must not try a TMA config on them."""
    q, k, v = _inputs(2, 1000, 1000, 4, 2, 68, dtype=torch.bfloat16, device="cuda")
    q = q.detach()[..., :64].contiguous()
    k, v = (t.detach()[..., :64] for t in (k, v))  # (2, 1000, 2, 64) views, token stride 136
    assert not attention_kernels.tma_aligned(q, k, v)
    out = flash_attn_func(q, k, v, causal=True, backend="triton")
    ref = flash_attn_func(q.float(), k.float(), v.float(), causal=True, backend="reference")
    pt = attention_ref(q, k, v, causal=True, upcast=False)  # eager PyTorch, same dtype
    assert_within_2x_torch(out, pt, ref, measure=max_err, slack=1e-5)


def _check_gpu_against_pytorch(B, T, H, Hkv, D, causal, window, dtype, deterministic=False):
    q, k, v = _inputs(B, T, T, H, Hkv, D, dtype=dtype, device="cuda")
    out = flash_attn_func(q, k, v, causal=causal, window_size=window, deterministic=deterministic, backend="triton")
    pt = attention_ref(q, k, v, causal=causal, window=window, upcast=False)  # eager PyTorch, same dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = flash_attn_func(q32, k32, v32, causal=causal, window_size=window, backend="reference")
    assert_within_2x_torch(out, pt, ref, measure=max_err, slack=1e-5)
    dout = torch.randn_like(out)
    for name, got, mine, want in zip(
        "qkv", grads(out, (q, k, v), dout), grads(pt, (q, k, v), dout), grads(ref, (q32, k32, v32), dout.float())
    ):
        assert_within_2x_torch(got, mine, want, measure=max_err, slack=1e-5, what=f"d{name}")


@pytest.mark.gpu
def test_gpu_sdpa_bf16():
    qs, ks, vs = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = scaled_dot_product_attention(qs, ks, vs, is_causal=True, backend="triton")
    torch_bf16 = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), is_causal=True)
    assert_within_2x_torch(got, torch_bf16, ref, measure=max_err, slack=1e-5)


def _check_gpu_varlen(deterministic=False, lens=(1, 1000, 3000, 17), lens_k=None):
    """Packed sequences of 1-3000 rows (keys as many as queries unless lens_k), GQA 4: the output and every gradient
    within 2x PyTorch's own bf16 error."""
    lens_k = lens if lens_k is None else lens_k
    cu_q, cu_k = (
        torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for n in (lens, lens_k)
    )
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(sum(lens), 8, 128, generator=g, device="cuda").bfloat16().requires_grad_()
    k, v = (torch.randn(sum(lens_k), 2, 128, generator=g, device="cuda").bfloat16().requires_grad_() for _ in range(2))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    packing = (cu_q, cu_k, max(lens), max(lens_k))
    out = flash_attn_varlen_func(q, k, v, *packing, causal=True, deterministic=deterministic, backend="triton")
    pt = torch.cat(  # eager PyTorch, same dtype, per sequence: (total_q, H, D)
        [
            attention_ref(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal=True, upcast=False)[0]
            for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())
        ]
    )
    ref = flash_attn_varlen_func(q32, k32, v32, *packing, causal=True, backend="reference")
    assert_within_2x_torch(out, pt, ref, measure=max_err, slack=1e-5)
    dout = torch.randn(out.shape, generator=g, device="cuda").bfloat16()
    for name, got, mine, want in zip(
        "qkv", grads(out, (q, k, v), dout), grads(pt, (q, k, v), dout), grads(ref, (q32, k32, v32), dout.float())
    ):
        assert_within_2x_torch(got, mine, want, measure=max_err, slack=1e-5, what=f"d{name}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_an_lse_no_one_differentiates_reaches_the_backward_as_none(backend, monkeypatch):
    """flash_attn_func's common call returns out alone: its backward gets dlse None (no zeros made, and the kernels'
    HAS_DLSE off, which the aot column's backward op needs), and its gradients are the ones with a zero dlse."""
    from fasttrain.ops import attention as ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 97, 4, 32, requires_grad=True) for _ in "qkv")
    seen = []
    backward = ops.ATTENTION[backend].backward
    monkeypatch.setattr(ops.ATTENTION[backend], "backward", lambda *a: seen.append(a[6]) or backward(*a))
    out = flash_attn_func(q, k, v, causal=True, backend=backend)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend=backend, lse_grad=True)
    want = torch.autograd.grad((out, lse), (q, k, v), (do, torch.zeros_like(lse)))
    assert seen[0] is None and seen[1] is not None
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
