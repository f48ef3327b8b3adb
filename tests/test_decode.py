"""flash_attn_with_kvcache: the split-KV Triton kernels (interpreter on CPU, fp16/bf16 on GPU) and the C++ CPU kernel
against the reference.

CPU shapes stay small (D = 32, caches <= 320 rows) because the interpreter's cost grows with programs x tiles; the C++
kernel's own tests below take caches across several of its 512-key tiles.
"""

import warnings

import pytest
import torch

from fasttrain._backend import BackendError
from fasttrain.kernels.decode import num_splits_heuristic
from fasttrain.ops import flash_attn_with_kvcache
from fasttrain.ops.decode import _kvcache_op

from helpers import TOL_FP32, assert_within_2x_torch, max_err

TOL = dict(atol=TOL_FP32["decode"], rtol=TOL_FP32["decode"])
KERNELS = ("triton", "cpu")  # every case below runs both against the reference
CPU_LENGTHS = (1, 97, 300)  # cache rows already filled, one per sequence: awkward sizes


def _case(
    Tq,
    H,
    Hkv,
    lengths,
    D=32,
    Tmax=320,
    append=True,
    rotary=False,
    dtype=torch.float32,
    device="cpu",
    batch_idx=None,
    rotary_dim=None,
    seed=0,
):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    B = len(lengths)
    Bc = B if batch_idx is None else max(batch_idx) + 2
    kw = dict(
        q=randn(B, Tq, H, D),
        k_cache=randn(Bc, Tmax, Hkv, D),
        v_cache=randn(Bc, Tmax, Hkv, D),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=device),
    )
    if append:
        kw.update(k=randn(B, Tq, Hkv, D), v=randn(B, Tq, Hkv, D))
    if rotary:
        angles = torch.rand(Tmax, (rotary_dim or D) // 2, generator=g) * 6.3  # (Tmax, rd/2)
        kw.update(rotary_cos=angles.cos().to(device, dtype), rotary_sin=angles.sin().to(device, dtype))
    if batch_idx is not None:
        kw["cache_batch_idx"] = torch.tensor(batch_idx, dtype=torch.int32, device=device)
    return kw


def _run(kw, backend, **extra):
    """The op on fresh copies of the caches: (out, lse, k_cache, v_cache)."""
    kw = dict(kw, k_cache=kw["k_cache"].clone(), v_cache=kw["v_cache"].clone())
    out, lse = flash_attn_with_kvcache(**kw, **extra, return_softmax_lse=True, backend=backend)
    return out, lse, kw["k_cache"], kw["v_cache"]


def _assert_matches_reference(kw, tol=TOL, kernels=KERNELS, **extra):
    """Each kernel's (out, lse, k_cache, v_cache) against the reference's; returns the first kernel's."""
    want = _run(kw, "reference", **extra)
    results = []
    for backend in kernels:
        results.append(_run(kw, backend, **extra))
        for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), results[-1], want):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, backend=backend, name=name: f"{backend} {name}: {m}")
    return results[0]


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 1), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("Tq", [1, 2, 3, 4])
def test_matches_reference(Tq, H, Hkv, rotary):
    # Three splits, so the combine step runs; lengths 1, 97, 300 in one batch.
    _assert_matches_reference(_case(Tq, H, Hkv, CPU_LENGTHS, rotary=rotary), num_splits=3, causal=True)


@pytest.mark.parametrize("num_splits", [0, 1, 2, 16])
def test_any_number_of_splits(num_splits):
    # 16 splits of a 1-row cache leave most splits empty: they must weigh nothing in the combine.
    _assert_matches_reference(_case(1, 4, 2, CPU_LENGTHS, D=64), num_splits=num_splits)


@pytest.mark.parametrize("Tq,H,Hkv,D", [(4, 32, 1, 32), (2, 4, 2, 40)], ids=["mqa-two-row-blocks", "d40"])
def test_many_rows_and_odd_head_dim(Tq, H, Hkv, D):
    # 4 tokens x 32 query heads of one kv head: 128 rows, two 64-row blocks per (split, b); d40 pads to 64.
    _assert_matches_reference(_case(Tq, H, Hkv, CPU_LENGTHS, D=D, rotary=True), num_splits=2)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (40, -1)), (False, (20, 5))])
def test_windows_and_non_causal(causal, window):
    _assert_matches_reference(_case(3, 4, 2, CPU_LENGTHS, rotary=True), num_splits=2, causal=causal, window_size=window)


def test_rotary_variants_and_batch_idx():
    # Interleaved pairs, rotary over half of head_dim (the rest passes through), cache rows picked per sequence.
    kw = _case(2, 4, 2, CPU_LENGTHS, rotary=True, rotary_dim=16, batch_idx=[3, 0, 1])
    _assert_matches_reference(kw, num_splits=2, rotary_interleaved=False)
    _assert_matches_reference(kw, num_splits=2, rotary_interleaved=True)


def test_rows_without_keys_give_zero_and_inf_lse():
    # No append: sequence 0 has no key; sequence 1 has 2, so its first two of four query tokens see none.
    kw = _case(4, 4, 2, (0, 2, 97), append=False)
    out, lse, _, _ = _assert_matches_reference(kw, num_splits=2, causal=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))
    assert torch.all(out[1, :2] == 0) and torch.all(lse[1, :, :2] == float("inf"))
    assert torch.isfinite(lse[1, :, 2:]).all() and torch.isfinite(lse[2]).all()


@pytest.mark.parametrize("backend", KERNELS)
def test_whole_cache_when_no_seqlens(backend):
    kw = _case(1, 4, 2, (5, 6), Tmax=96, append=False)
    del kw["cache_seqlens"]
    out = flash_attn_with_kvcache(**kw, backend=backend)
    full = dict(kw, cache_seqlens=96)  # an int is taken for every sequence
    torch.testing.assert_close(out, flash_attn_with_kvcache(**full, backend="reference"), **TOL)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_append_writes_exactly_the_new_rows(rotary, backend):
    lengths, batch_idx = (0, 97, 317), [2, 0, 4]  # 317 + 3 new rows fill the cache to its last row
    kw = _case(3, 4, 2, lengths, rotary=rotary, batch_idx=batch_idx)
    _, _, kc, vc = _run(kw, backend, num_splits=2)
    expect_k = kw["k"]
    if rotary:  # the reference's rotation, in fp32 (checked against the closed form in test_rotary_reference)
        _, _, ref_kc, _ = _run(kw, "reference")
        expect_k = torch.stack([ref_kc[r, n : n + 3] for r, n in zip(batch_idx, lengths)])
    written = torch.zeros(kc.shape[:2], dtype=torch.bool)  # (B_cache, Tmax)
    for b, (row, n) in enumerate(zip(batch_idx, lengths)):
        written[row, n : n + 3] = True
        torch.testing.assert_close(kc[row, n : n + 3], expect_k[b], atol=1e-6, rtol=0)
        assert torch.equal(vc[row, n : n + 3], kw["v"][b])
    assert torch.equal(kc[~written], kw["k_cache"][~written])
    assert torch.equal(vc[~written], kw["v_cache"][~written])


def test_strided_lengths_and_rotary_tables():
    # cache_seqlens a column of a (B, 2) tensor, rotary_cos a slice of a wider table, rotary_sin contiguous: the
    # kernels index all of them at unit stride with one table stride, so the launcher must pass contiguous copies.
    kw = _case(2, 4, 2, CPU_LENGTHS, rotary=True)
    kw["cache_seqlens"] = torch.stack((kw["cache_seqlens"], torch.zeros(3, dtype=torch.int32)), dim=1)[:, 0]
    half = kw["rotary_cos"].shape[1]
    kw["rotary_cos"] = torch.cat((kw["rotary_cos"], torch.zeros_like(kw["rotary_cos"])), dim=1)[:, :half]
    assert kw["cache_seqlens"].stride(0) == 2 and kw["rotary_cos"].stride(0) != kw["rotary_sin"].stride(0)
    _assert_matches_reference(kw, num_splits=2)


def test_lengths_past_the_cache_read_only_the_cache():
    # check_lengths=False with cache_seqlens past Tmax: keys stop at the cache end. Sequence 0's cache row is
    # followed by sequence 1's, so a read past its end would pick up those rows and differ from the reference.
    kw = _case(2, 4, 2, (96 + 7, 40), Tmax=96, append=False)
    _assert_matches_reference(kw, num_splits=2, check_lengths=False)


def test_rotary_reference():
    # The reference rotation in closed form: pair (x_i, x_{i+D/2}) turned by angle theta at position p.
    kw = _case(1, 2, 2, (5, 0), D=8, rotary=True)
    _, _, kc, _ = _run(kw, "reference", rotary_interleaved=False)
    cos, sin, k = kw["rotary_cos"], kw["rotary_sin"], kw["k"]
    for b, p in enumerate((5, 0)):
        x1, x2 = k[b, 0, :, :4], k[b, 0, :, 4:]
        want = torch.cat((x1 * cos[p] - x2 * sin[p], x2 * cos[p] + x1 * sin[p]), dim=-1)
        torch.testing.assert_close(kc[b, p], want, **TOL)


def test_num_splits_fills_the_gpu():
    # Batch 1 x 32k context, GQA 32/8: 8 (b, kv-head) programs alone would leave 124 of an H100's 132 SMs idle.
    splits = num_splits_heuristic(batch_kv_heads=8, m_blocks=1, cache_len=32768, num_sms=132)
    assert 8 * splits >= 132 and 32768 / splits >= 128
    assert num_splits_heuristic(64 * 8, 1, 4096, 132) == 1  # large batch fills it already
    assert num_splits_heuristic(1, 1, 1, 132) == 1  # a 1-row cache has nothing to split
    assert num_splits_heuristic(1, 1, 1024, 132) == 1024 // 128  # at least 128 keys per split


def _pages(n_blocks=3):
    """A paged cache of n_blocks 128-row pages for _bad's (B=2, Hkv=2, D=32) inputs."""
    return dict(k_cache=torch.randn(n_blocks, 128, 2, 32), v_cache=torch.randn(n_blocks, 128, 2, 32))


def _bad(**changes):
    kw = _case(2, 4, 2, (3, 5), Tmax=64)
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(cache_seqlens=torch.tensor([3, 63], dtype=torch.int32)), "cache too short"),
        (dict(q=torch.randn(2, 2, 5, 32)), "multiple of k_cache's heads"),
        (dict(k_cache=torch.randn(2, 64, 2, 32, dtype=torch.float16)), "k_cache must have q's dtype"),
        (dict(v=torch.randn(2, 2, 2, 32, dtype=torch.float64)), "v must have k_cache's dtype torch.float32"),
        (dict(v=None), "k and v must be given together"),
        (dict(cache_seqlens=torch.tensor([3, 5, 1])), "cache_seqlens must be an int32/int64 tensor of shape"),
        (dict(cache_seqlens=torch.tensor([-1, 5])), "cache_seqlens must be >= 0"),
        (dict(cache_seqlens=[3, 5]), "cache_seqlens must be an int32/int64 tensor"),
        (dict(cache_batch_idx=torch.tensor([0, 2])), r"cache_batch_idx must lie in \[0, 2\)"),
        (dict(k=None, v=None, rotary_cos=torch.ones(64, 16), rotary_sin=torch.ones(64, 16)), "pass k and v"),
        (dict(rotary_cos=torch.ones(6, 16), rotary_sin=torch.ones(6, 16)), "have 6 rows, fewer than the cache's 64"),
        (dict(q=torch.randn(2, 2, 4)), "q must be 4-D"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "page_block_size .* must be a multiple of 128"),
        (
            dict(**_pages(), block_table=torch.tensor([[0], [3]], dtype=torch.int32)),
            r"block_table must lie in \[0, 3\)",
        ),
        (dict(**_pages(), block_table=torch.tensor([[0], [1]])), "block_table must be an int32 tensor"),
        (  # flash-attn's message names the block_table whose pages are too few
            dict(**_pages(), block_table=torch.zeros(2, 1, dtype=torch.int32), cache_seqlens=torch.tensor([3, 127])),
            "cache too short: .* block_table's pages hold 128",
        ),
        (dict(**_pages(), block_table=torch.zeros(3, 1, dtype=torch.int32)), r"block_table must be \(B=2"),
        (
            dict(**_pages(), block_table=torch.zeros(2, 1, dtype=torch.int32), cache_batch_idx=torch.tensor([0, 1])),
            "cache_batch_idx must be None with a block_table",
        ),
        (
            dict(cache_leftpad=torch.tensor([0, 6], dtype=torch.int32)),
            r"cache_leftpad must lie in \[0, cache_seqlens\]",
        ),
        (dict(cache_leftpad=torch.tensor([0.0, 1.0])), "cache_leftpad must be an int32/int64 tensor"),
        (dict(num_splits=-1), "num_splits must be an int >= 0"),
    ],
)
def test_bad_inputs_raise(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(**_bad(**changes))


def test_the_grid_puts_batch_times_kv_heads_on_its_unbounded_axis(monkeypatch):
    # CUDA caps a grid's y and z at 65535 blocks: B 2048 x 32 KV heads (Llama-2-7B serving) is 65536.
    from fasttrain.kernels import decode as kernels

    grids, launch = [], kernels._decode

    class Recording:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(kernels, "_decode", Recording())
    kw = _case(1, 4, 2, CPU_LENGTHS)
    _assert_matches_reference(kw, num_splits=3)
    assert grids == [(len(CPU_LENGTHS) * 2, 3, 1)]


def test_backend_refuses_what_it_cannot_serve():
    kw = _case(1, 4, 2, (3,), Tmax=32, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="fp32 only"):
        flash_attn_with_kvcache(**kw, backend="triton")
    flash_attn_with_kvcache(**kw, backend="reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_precision(dtype):
    # The append (rotation included) is the reference's own code: caches bitwise equal.
    _assert_low_precision_matches_reference(_case(2, 8, 2, CPU_LENGTHS, rotary=True, dtype=dtype))


@pytest.mark.parametrize(
    "Tq,H,Hkv,window,lengths",
    [
        (1, 32, 8, (-1, -1), (1, 1025, 1580)),  # a decode step of GQA 32/8: 4 rows per K/V head, the decode path
        (1, 32, 8, (-1, -1), (1021,)),  # batch 1: one sequence's keys in 3 splits (not whole blocks), combined
        (2, 4, 4, (700, -1), (1, 1025, 1580)),  # the decode path (2 rows per head), a window starting mid-block
        (16, 8, 1, (-1, -1), (1, 1025, 1580)),  # 16 tokens x 8 heads = 128 rows: the prefill path, two row blocks
        (5, 4, 4, (700, -1), (1, 1025, 1580)),  # the prefill path (20 rows per head), a window starting mid-tile
    ],
)
def test_cpu_kernel_across_key_tiles(Tq, H, Hkv, window, lengths):
    """Caches of 1600 rows, lengths up to four 512-key tiles, read in place: q a transposed view, the caches head
    slices of wider ones, so the kernel must follow their row strides (no rotary: it would hand on a fresh q)."""
    kw = _case(Tq, H, Hkv, lengths, D=64, Tmax=1600, seed=5)
    want = _run(kw, "reference", window_size=window)
    q = kw["q"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, Tq, H, D) with strides of (B, H, Tq, D)
    caches = []
    for name in ("k_cache", "v_cache"):
        wide = torch.randn(*kw[name].shape[:2], 2 * Hkv, 64)
        wide[:, :, :Hkv] = kw[name]
        caches.append(wide[:, :, :Hkv])
    assert (Tq == 1 or q.stride(1) == 64) and caches[0].stride(1) == 2 * Hkv * 64
    out, lse = flash_attn_with_kvcache(
        **dict(kw, q=q, k_cache=caches[0], v_cache=caches[1]),
        window_size=window,
        return_softmax_lse=True,
        backend="cpu",
    )
    for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), (out, lse, *caches), want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


ROW_COUNTS = {
    "rows1": (1, 4, 4),
    "rows2": (1, 2, 1),
    "rows3": (1, 3, 1),
    "rows4": (1, 4, 1),
    "rows5": (1, 5, 1),
    "rows6": (2, 6, 2),
    "rows7": (1, 7, 1),
    "rows8": (2, 8, 2),
}  # Tq x H / Hkv query rows per K/V head


@pytest.mark.parametrize("D", [8, 20, 72, 128])
@pytest.mark.parametrize("Tq,H,Hkv", ROW_COUNTS.values(), ids=ROW_COUNTS.keys())
def test_cpu_kernel_every_row_count_and_head_dim(Tq, H, Hkv, D):
    """The decode path's register blocks: 1-8 query rows per K/V head (Tq x group), each compiled on its own, and
    head dims that leave 16-, 8- and single-column remainders."""
    _assert_matches_reference(_case(Tq, H, Hkv, CPU_LENGTHS, D=D), kernels=("cpu",))


def _assert_low_precision_matches_reference(kw):
    # Attention in fp32 from the same rounded inputs, rounded once, as the reference: lse to fp32 summation order,
    # out within one rounding (a relative unit in the last place of bf16 / fp16).
    (out, lse, kc, vc), (ref_out, ref_lse, ref_kc, ref_vc) = _run(kw, "cpu"), _run(kw, "reference")
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc) and out.dtype == kw["q"].dtype
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    ulp = 2.0**-7 if out.dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-6, rtol=ulp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [20, 72])
@pytest.mark.parametrize("rows", ["rows1", "rows4", "rows6"])
def test_cpu_kernel_low_precision_every_head_dim(rows, D, dtype):
    """bf16 / fp16 caches widened a block at a time, head dims off the 8-wide conversions."""
    Tq, H, Hkv = ROW_COUNTS[rows]
    _assert_low_precision_matches_reference(_case(Tq, H, Hkv, CPU_LENGTHS, D=D, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hkv", [16, 64])
def test_cpu_kernel_short_blocks_for_wide_rows(Hkv, dtype):
    # d128 key rows of 16 K/V heads (2048 floats: blocks of 16 keys, 128 KiB of values) and of 64 (8192: the floor of
    # 8 keys), lengths past 512 so that a sequence's keys split across threads and are combined.
    kw = _case(1, Hkv, Hkv, (1, 97, 1030), D=128, Tmax=1100, dtype=dtype)
    if dtype == torch.float32:
        _assert_matches_reference(kw, kernels=("cpu",))
    else:
        _assert_low_precision_matches_reference(kw)


def test_cpu_kernel_empty_query_and_head_dim():
    # Tq 0: nothing to attend, empty results; head_dim 0: every score 0, so lse = log(keys seen).
    op = torch.ops.fasttrain.attention_kvcache_cpu
    kc = torch.randn(2, 16, 2, 8)
    out, lse = op(torch.randn(2, 0, 4, 8), kc, kc, torch.tensor([3, 5]), None, None, 1.0, 1 << 30, 0, 0.0, None)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)
    kc = torch.randn(2, 16, 2, 0)
    out, lse = op(torch.randn(2, 1, 4, 0), kc, kc, torch.tensor([3, 5]), None, None, 1.0, 1 << 30, 0, 0.0, None)
    assert out.shape == (2, 1, 4, 0)
    torch.testing.assert_close(lse, torch.tensor([3.0, 5.0]).log()[:, None, None].expand(2, 4, 1))


def test_auto_chooses_the_cpu_kernel_without_the_interpreter(monkeypatch):
    from fasttrain.ops import decode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = _case(1, 4, 2, CPU_LENGTHS, D=48)  # any head_dim
    rest = (kw["k_cache"], kw["v_cache"], None, None, None, 0.0, None, 0)  # the choice's arguments after q
    assert decode.DECODE.choose(kw["q"], *rest) == "cpu"
    with warnings.catch_warnings():  # the intended CPU path, not a fallback: no warning
        warnings.simplefilter("error")
        _run(kw, "auto")
    with pytest.warns(RuntimeWarning, match="the CPU kernel takes fp32, bf16 or fp16, got torch.float64"):
        decode.DECODE.choose(kw["q"].double(), *rest)


def test_cpu_kernel_refuses_a_cache_row_out_of_range():
    # check_lengths=False skips the Python checks; the kernel still reads only rows that exist.
    kw = _case(2, 4, 2, (3, 5), Tmax=64, append=False, batch_idx=[0, 1])
    kw["cache_batch_idx"] = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cache_batch_idx must lie in \[0, 3\), got 3"):
        flash_attn_with_kvcache(**kw, check_lengths=False, backend="cpu")


def test_registered_op_traces():
    # Schema (the in-place cache update), fake implementation and torch.compile-style dispatch.
    kw = _case(2, 4, 2, (3, 9), Tmax=32, rotary=True)
    args = (
        kw["q"],
        kw["k_cache"],
        kw["v_cache"],
        kw["k"],
        kw["v"],
        kw["rotary_cos"],
        kw["rotary_sin"],
        kw["cache_seqlens"],
        None,
        torch.tensor([1, 0], dtype=torch.int32),
        None,
        32**-0.5,
        1 << 30,
        0,
        False,
        True,
        0,
        5.0,
        torch.rand(2, 4),
        "reference",
    )
    torch.library.opcheck(_kvcache_op.op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------- GPU


def _torch_same_dtype(kw):
    """PyTorch's own low-precision path (scores and p @ v in the input dtype, softmax in fp32): the error yardstick."""
    q, kc, vc = kw["q"], kw["k_cache"].clone(), kw["v_cache"].clone()
    B, Tq, H, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        n = int(kw["cache_seqlens"][b])
        kc[b, n : n + Tq], vc[b, n : n + Tq] = kw["k"][b], kw["v"][b]
        k = kc[b, : n + Tq].repeat_interleave(H // kc.shape[2], dim=1)  # (L, H, D)
        v = vc[b, : n + Tq].repeat_interleave(H // kc.shape[2], dim=1)
        s = torch.einsum("thd,shd->hts", q[b], k) * D**-0.5  # (H, Tq, L) in the input dtype
        causal = torch.arange(n + Tq, device=q.device) <= (n + torch.arange(Tq, device=q.device))[:, None]
        p = torch.softmax(s.float().masked_fill(~causal, float("-inf")), dim=-1).to(q.dtype)
        out[b] = torch.einsum("hts,shd->thd", p, v)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Tq", [1, 4, 16])
@pytest.mark.parametrize("H,Hkv", [(32, 8), (32, 32)], ids=["gqa4", "mha"])
def test_gpu_low_precision_within_twice_torch_error(dtype, Tq, H, Hkv):
    lengths = (1, 97, 4000, 16381 - Tq)  # up to the last row of a 16k cache
    kw = _case(Tq, H, Hkv, lengths, D=128, Tmax=16384, dtype=dtype, device="cuda", seed=Tq)
    ref32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    want, want_lse, _, _ = _run(ref32, "reference", causal=True)
    got, got_lse, kc, vc = _run(kw, "triton", causal=True)
    assert_within_2x_torch(got, _torch_same_dtype(kw), want, measure=max_err, slack=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-2, rtol=0)
    for b, n in enumerate(lengths):
        assert torch.equal(kc[b, n : n + Tq], kw["k"][b]) and torch.equal(vc[b, n : n + Tq], kw["v"][b])


@pytest.mark.gpu
def test_gpu_rotary_and_cuda_graph_capture():
    kw = _case(1, 32, 8, (5, 300, 2047), D=128, Tmax=2048 + 64, dtype=torch.bfloat16, device="cuda", rotary=True)
    eager_out, _, eager_kc, _ = _run(kw, "triton", rotary_interleaved=False)
    ref = _run(kw, "reference", rotary_interleaved=False)
    torch.testing.assert_close(eager_out, ref[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(eager_kc, ref[2], atol=1e-2, rtol=1e-2)  # bf16 rounding of the rotated rows
    # A captured decode step replays with new inputs and the same result as eager (num_splits from Tmax: no sync).
    static = dict(kw, k_cache=kw["k_cache"].clone(), v_cache=kw["v_cache"].clone())
    flash_attn_with_kvcache(**static, rotary_interleaved=False, backend="triton")  # warm-up: autotune, compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flash_attn_with_kvcache(**static, rotary_interleaved=False, backend="triton")
    static["k_cache"].copy_(kw["k_cache"])
    static["v_cache"].copy_(kw["v_cache"])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
