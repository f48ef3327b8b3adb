"""Attention dropout inside the kernels: the Philox mask (fasttrain/ops/attention_dropout.py,
kernels/_attention_dropout.py) drawn bit for bit alike by the interpreted Triton kernels, the C++ CPU kernel and the
reference; its statistics; outputs and every gradient of each kernel against the reference given the same seed
(the backward regenerating the forward's mask); flash-attn's S_dmask; the public functions reaching the kernels.
GPU tests (`pytest -m gpu`) run fp16/bf16 at full size."""

import warnings

import pytest
import torch

from fasttrain.ops import attention as attention_ops
from fasttrain.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)
from fasttrain.ops.attention_dropout import dense_keep, dropout_seed, keep_threshold, philox
from fasttrain.ops.attention_reference import _get_block_size_n

from flash_attn_ref import decode_s_dmask
from helpers import TOL_FP32, TOL_HALF, max_err

TOL = TOL_FP32["attention"]
KERNELS = ["triton", "cpu"]


def _seeded(fn, *args, seed=5, **kwargs):
    """fn under torch's RNG seeded by `seed`, so that every call draws the same dropout seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def _leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def test_philox_matches_random123_known_answers():
    """Philox4x32-10 in int64 torch arithmetic against Random123's known-answer vectors (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, (k0, k1), want in cases:
        seed = torch.tensor(k0 | (k1 << 32)).to(torch.int64) if k1 < 2**31 else torch.tensor(k0 | (k1 << 32) - 2**64)
        got = philox(seed, *(torch.tensor(c) for c in counter))
        assert [int(w) for w in got] == list(want)


def test_keep_rate_within_a_binomial_bound():
    seed = dropout_seed("cpu")
    for p in (0.1, 0.5, 0.9):
        keep = dense_keep(seed, p, 2, 4, 128, 128)  # 131072 scores
        n, rate = keep.numel(), keep.double().mean().item()
        want = keep_threshold(p) / 65536
        assert abs(want - (1 - p)) <= 2**-17
        assert abs(rate - want) < 5 * (want * (1 - want) / n) ** 0.5, (p, rate)


def test_fresh_seeds_and_their_device(monkeypatch):
    """Each call draws a fresh (seed, offset) pair on q's device: different masks call to call."""
    seeds = [dropout_seed("cpu") for _ in range(2)]
    assert all(s.shape == (2,) and s.dtype == torch.int64 and s.device.type == "cpu" for s in seeds)
    assert not torch.equal(*seeds)
    q, k, v = _leaves((1, 40, 2, 32), (1, 40, 2, 32), (1, 40, 2, 32))
    seen = []
    real = attention_ops.dropout_seed

    def spy(device):
        seen.append(real(device))
        return seen[-1]

    monkeypatch.setattr(attention_ops, "dropout_seed", spy)
    a = flash_attn_func(q, k, v, dropout_p=0.3, backend="cpu")
    b = flash_attn_func(q, k, v, dropout_p=0.3, backend="cpu")
    assert [s.device for s in seen] == [q.device] * 2 and not torch.equal(a, b)


def _probe(backend, B, Tq, Tk, H, Hkv, p, causal=False, window=(-1, -1)):
    """The kernel's keep mask read from its output: V = identity (key j -> column j), so out[b, i, h, j] is the
    dropped, rescaled probability of key j; nonzero exactly where kept (every visible probability is > 0)."""
    D = 128
    q, k = _leaves((B, Tq, H, D), (B, Tk, Hkv, D))
    v = torch.eye(Tk, D).expand(B, Hkv, Tk, D).transpose(1, 2).contiguous()  # (B, Tk, Hkv, D)
    out = _seeded(flash_attn_func, q, k, v, dropout_p=p, causal=causal, window_size=window, backend=backend)
    return (out[..., :Tk] != 0).permute(0, 2, 1, 3)  # (B, Tq, H, Tk) -> (B, H, Tq, Tk)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (20, -1))])
def test_the_mask_is_the_same_on_every_backend(causal, window):
    B, Tq, Tk, H, Hkv, p = 2, 33, 97, 2, 1, 0.4
    want = _seeded(dense_keep, _seeded(dropout_seed, "cpu"), p, B, H, Tq, Tk)
    visible = _probe("reference", B, Tq, Tk, H, Hkv, 0.0, causal, window)  # the band: all kept without dropout
    for backend in ("reference", *KERNELS):
        got = _probe(backend, B, Tq, Tk, H, Hkv, p, causal, window)
        assert torch.equal(got, want & visible), backend


def test_mean_is_preserved():
    """With V = 1 every output is sum_j P_ij Z_ij / p_keep, whose expectation is 1."""
    B, T, H, p = 2, 256, 4, 0.3
    q, k = _leaves((B, T, H, 64), (B, T, H, 64))
    v = torch.ones(B, T, H, 64)
    rows = flash_attn_func(q * 0.2, k * 0.2, v, dropout_p=p, backend="cpu")[..., 0]  # (B, T, H), flat-ish P
    sigma = (p / (1 - p) / T) ** 0.5 / rows.numel() ** 0.5  # each row: ~T equal terms
    assert abs(rows.mean().item() - 1.0) < 6 * sigma and rows.std() > 0


# (B, Tq, Tk, H, Hkv, D, causal, window): T 1, 97, batch 1, GQA, causal, sliding window
CASES = [
    (1, 1, 1, 1, 1, 32, True, (-1, -1)),
    (2, 97, 97, 2, 1, 32, True, (-1, -1)),
    (1, 40, 97, 4, 1, 32, False, (16, 8)),
    (1, 97, 40, 2, 2, 32, True, (-1, -1)),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-q{}-k{}-H{}/{}-d{}-c{}-w{}".format(*c))
def test_outputs_and_gradients_match_the_reference(backend, case):
    B, Tq, Tk, H, Hkv, D, causal, window = case
    q, k, v = _leaves((B, Tq, H, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D))
    kw = dict(dropout_p=0.25, causal=causal, window_size=window, return_attn_probs=True)
    out, lse, _ = _seeded(flash_attn_func, q, k, v, **kw, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse, _ = _seeded(flash_attn_func, q64, k64, v64, **kw, backend="reference")
    assert max_err(out, ref) < TOL and max_err(lse[lse.isfinite()], ref_lse[ref_lse.isfinite()]) < TOL
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q64, k64, v64))):
        assert max_err(got, want) < TOL


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_and_deterministic_dq_match_the_reference(backend):
    """Packed sequences drop what each sequence drops alone (positions within the sequence); both dQ plans."""
    lens_q, lens_k = [5, 70, 1], [9, 64, 30]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lens_q, lens_k))
    q, k, v = _leaves((76, 4, 32), (103, 2, 32), (103, 2, 32))
    args = (cu_q, cu_k, 70, 64)
    for deterministic in (False, True):
        kw = dict(dropout_p=0.3, causal=True, deterministic=deterministic)
        out = _seeded(flash_attn_varlen_func, q, k, v, *args, **kw, backend=backend)
        ref = _seeded(flash_attn_varlen_func, q, k, v, *args, **kw, backend="reference")
        assert max_err(out, ref) < TOL
        for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            assert max_err(got, want) < TOL


def test_packed_functions_match_the_reference():
    qkv = torch.randn(2, 40, 3, 2, 32, requires_grad=True)
    q, k, v = qkv.unbind(2)
    kv = torch.stack((k, v), 2)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    kw = dict(dropout_p=0.2, causal=True)
    want = _seeded(flash_attn_func, q, k, v, **kw, backend="reference")
    calls = [
        lambda b: flash_attn_qkvpacked_func(qkv, **kw, backend=b),
        lambda b: flash_attn_kvpacked_func(q, kv, **kw, backend=b),
        lambda b: flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, 40, **kw, backend=b).view(2, 40, 2, 32),
        lambda b: flash_attn_varlen_kvpacked_func(
            q.flatten(0, 1), kv.flatten(0, 1), cu, cu, 40, 40, **kw, backend=b
        ).view(2, 40, 2, 32),
    ]
    (g_want,) = _grads(want, (qkv,))
    for call in calls:
        for backend in KERNELS:
            got = _seeded(call, backend)
            assert max_err(got, want) < TOL
            (g_got,) = _grads(got, (qkv,))
            assert max_err(g_got, g_want) < TOL


def test_the_backward_regenerates_the_mask_numerically():
    """gradcheck in float64 of the reference's closed-form backward with dropout, which draws the forward's mask
    again from the seed (the kernels' backward is checked against it above)."""
    q, k, v = (t.detach().double().requires_grad_() for t in _leaves((1, 6, 2, 8), (1, 7, 1, 8), (1, 7, 1, 8)))
    fn = lambda q, k, v: _seeded(flash_attn_func, q, k, v, dropout_p=0.4, causal=True, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_s_dmask_encodes_the_mask_as_flash_attn():
    """S_dmask (B, H, Tq rounded to 128, Tk rounded to 128): P inside each sequence in flash-attn's encoding (read
    back as its tests read it; tests/test_attention_s_dmask.py has the cases), 0 outside, negative where dropped;
    dropout_p = 0 gives flash-attn's empty tensor."""
    q, k, v = _leaves((2, 33, 2, 32), (2, 97, 1, 32), (2, 97, 1, 32))
    out, lse, S = _seeded(flash_attn_func, q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True, backend="cpu")
    assert S.shape == (2, 2, 128, 128) and S.dtype == q.dtype
    keep = _seeded(dense_keep, _seeded(dropout_seed, "cpu"), 0.3, 2, 2, 33, 97)
    P = torch.softmax(
        torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)).masked_fill(
            torch.ones(33, 97, dtype=torch.bool).tril(97 - 33).logical_not(), float("-inf")
        )
        * 32**-0.5,
        dim=-1,
    )
    inside = S[:, :, :33, :97]
    decoded, _ = decode_s_dmask(S, q.detach(), k.detach(), _get_block_size_n("cpu", 32, True, True), True, (-1, -1))
    assert max_err(decoded, P) < TOL and (S[:, :, 33:] == 0).all() and (S[:, :, :, 97:] == 0).all()
    assert torch.equal((inside > 0), keep & (P > 0))
    _, _, none = flash_attn_func(q, k, v, return_attn_probs=True, backend="cpu")
    assert none.shape == (0,)
    cu = torch.tensor([0, 33, 66], dtype=torch.int32)
    cuk = torch.tensor([0, 97, 194], dtype=torch.int32)
    _, _, Sv = _seeded(
        flash_attn_varlen_func, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cuk, 33, 97,
        dropout_p=0.3, causal=True, return_attn_probs=True, backend="cpu",
    )  # fmt: skip
    assert max_err(Sv, S) < TOL and torch.equal(Sv > 0, S > 0)


def test_sdpa_with_a_band_mask_and_dropout_runs_the_kernels():
    q, k, v = (t.transpose(1, 2) for t in _leaves((1, 24, 2, 32), (1, 24, 2, 32), (1, 24, 2, 32)))  # (B, H, T, D)
    band = torch.ones(24, 24, dtype=torch.bool).tril()
    got = _seeded(scaled_dot_product_attention, q, k, v, attn_mask=band, dropout_p=0.3, backend="triton")
    want = _seeded(scaled_dot_product_attention, q, k, v, dropout_p=0.3, is_causal=True, backend="reference")
    assert max_err(got, want) < TOL and not torch.allclose(got, scaled_dot_product_attention(q, k, v, is_causal=True))


def test_auto_takes_a_kernel_with_dropout():
    q, k, v = _leaves((1, 16, 2, 32), (1, 16, 2, 32), (1, 16, 2, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference would warn
        assert attention_ops.ATTENTION.choose(q, k, v, None, 16, 16, None, 0.1, 0.0, None) != "reference"


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout_p_still_raises(p):
    q, k, v = _leaves((1, 4, 1, 32), (1, 4, 1, 32), (1, 4, 1, 32))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p="0.1")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_half_precision_full_size(dtype, causal):
    """fp16/bf16 on the GPU kernels at T 2048 against the float32 reference of the same seed: the output within
    TOL_HALF, and the keep rate."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 2048, 8, 128, generator=g, device=dev).to(dtype).requires_grad_() for _ in range(3))
    out = _seeded(flash_attn_func, q, k, v, dropout_p=0.1, causal=causal, backend="triton")  # torch.manual_seed
    ref = _seeded(flash_attn_func, q.float(), k.float(), v.float(), dropout_p=0.1, causal=causal, backend="reference")
    assert max_err(out, ref) < 4 * TOL_HALF[dtype]
    seed = _seeded(dropout_seed, dev)  # seeds CUDA's generator too: the pair the calls above drew
    rate = dense_keep(seed, 0.1, 1, 1, 2048, 2048).float().mean().item()
    assert abs(rate - 0.9) < 0.005
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert max_err(got, want) < 16 * TOL_HALF[dtype]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_draws_the_same_mask(backend):
    """Under torch.compile(fullgraph=True) the seed is drawn in the graph and the mask is the same function of it:
    the reference's inline trace (plain tensor ops on the seed) and the registered op give eager's numbers."""
    torch._dynamo.reset()
    q, k, v = _leaves((1, 24, 2, 32), (1, 24, 1, 32), (1, 24, 1, 32))

    def loss_fn(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=0.3, causal=True, backend=backend).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = _seeded(lambda: torch.autograd.grad(compiled(q, k, v), (q, k, v)))
    want = _seeded(lambda: torch.autograd.grad(loss_fn(q, k, v), (q, k, v)))
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", KERNELS)
def test_registered_ops_with_a_seed(backend):
    """torch.library's checks of both ops with dropout (schema, fake implementations)."""
    q, k, v = (t.detach() for t in _leaves((1, 20, 2, 32), (1, 20, 1, 32), (1, 20, 1, 32)))
    seed = dropout_seed("cpu")
    args = (q, k, v, None, None, 20, 20, 32**-0.5, 1 << 30, 0, None, 0.3, seed, 0.0, None, False, backend)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(attention_ops._forward_op.op, args, test_utils=checks)
    out, lse = attention_ops._forward_op(*args)
    bwd = (torch.randn_like(out), q, k, v, out, lse, None, None, None, 20, 20, 32**-0.5, 1 << 30, 0, None, 0.3, seed)
    torch.library.opcheck(attention_ops._backward_op.op, (*bwd, 0.0, None, False, backend), test_utils=checks)


def test_dropout_prunes_the_tiles_that_spill_with_it():
    """With DROPOUT the autotuners keep the pointer-loop tiles that take it (kernels/_attention_configs.py): at d128
    on sm_90 one dK/dV tile and no atomic-dQ one, so that dropout's backward takes the dQ kernel there."""
    from fasttrain.kernels import _attention_configs as configs

    for table, kept in ((configs.DKDV_CONFIGS, 1), (configs.DKDV_DQ_CONFIGS, 0)):
        by_class = table[90]
        prune = configs.pruner(by_class)
        args = dict(HEAD_DIM=128, TMA_ALIGNED=False)
        assert len(prune(configs.flat(by_class), args, DROPOUT=True)) == kept
        pointer_loop = [c for c in by_class["d128"] if not c.kwargs.get("WARP_SPECIALIZE")]
        assert len(prune(configs.flat(by_class), args, DROPOUT=False)) == len(pointer_loop) > kept
        assert configs.takes_dropout(by_class, 128) == bool(kept) and configs.takes_dropout(by_class, 64)


def test_the_benchmark_checks_and_times_the_dropout_row(monkeypatch):
    """bench_attention's fasttrain_dropout row is checked against the reference's dropout of the same seed before
    it is timed, and reports its time over the plain kernel's; a row off by a constant is not timed."""
    from fasttrain.benchmarks import bench_attention as bench

    found = bench.providers("cpu")
    for off, wrong in ((0.0, False), (0.1, True)):
        providers = {
            "fasttrain": found["fasttrain"],
            "fasttrain_dropout": lambda q, k, v, causal, off=off: found["fasttrain_dropout"](q, k, v, causal) + off,
        }
        monkeypatch.setattr(bench, "providers", lambda device, providers=providers: providers)
        plain, dropped = bench.bench_shape("cpu", torch.float32, 2, 16, 4, 32, True, ["fwd"])
        assert plain["fwd_ms"] > 0
        if wrong:
            assert dropped["skipped"].startswith("wrong result") and "fwd_ms" not in dropped
        else:
            assert dropped["max_rel_err"] < TOL and dropped["vs_plain_fwd"] > 0


def test_sdpa_padding_mask_with_dropout_runs_the_kernels(monkeypatch):
    """A key-padding mask (varlen launches over gathered rows) with dropout: the kernels, not the reference; padded
    keys get nothing, and the dropout acts."""

    def refused(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(attention_ops.Reference, "forward", staticmethod(refused))
    q, k, v = (t.transpose(1, 2) for t in _leaves((2, 16, 2, 32), (2, 16, 2, 32), (2, 16, 2, 32)))  # (B, H, T, D)
    keep = (torch.arange(16)[None] < torch.tensor([16, 9])[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    dropped = scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.3, backend="cpu")
    plain = scaled_dot_product_attention(q, k, v, attn_mask=keep, backend="cpu")
    v2 = v.detach().clone()
    v2[1, :, 9:] = 1e6  # padded values: seen by no query, with or without dropout
    again = _seeded(scaled_dot_product_attention, q, k, v2, attn_mask=keep, dropout_p=0.3, backend="cpu")
    assert torch.isfinite(again).all() and again.abs().max() < 1e3
    assert not torch.allclose(dropped, plain) and dropped.shape == plain.shape
