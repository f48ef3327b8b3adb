"""flash-attn's own kvcache test cases (test_flash_attn_kvcache), ported: random cache lengths, new keys appended
(fewer than the queries, or as many), rotary over none, half or all of head_dim at flash-attn's positions, causal or
a random sliding window given as a tensor, MHA/GQA/MQA, a cache picked per sequence, any split count, ALiBi slopes
(B, H) with flash-attn's test bias and softcap (q scaled by it, as in flash-attn's output test). Each backend's
output must be within 3x PyTorch's own error of the upcast reference (flash-attn's rule for this test), and the
caches must hold the rotated new rows. A representative sample runs by default; the whole grid under -m slow."""

import itertools
import math

import pytest
import torch

from fasttrain.ops import flash_attn_with_kvcache

from flash_attn_ref import alibi_bias, assert_within, attention_ref, rotate, run_grid

BACKENDS = ("triton", "cpu", "reference")


def _check_kvcache(
    seqlen_q,
    seqlen_k,
    d,
    has_batch_idx,
    rotary_fraction,
    rotary_interleaved,
    seqlen_new_eq_seqlen_q,
    causal,
    local,
    new_kv,
    mha_type,
    num_splits,
    has_leftpad,
    page,
    backend,
    dtype=torch.float32,
    softcap=0.0,
    alibi=False,
):
    torch.manual_seed(0)
    B, H = 2, 6
    Bc = 2 * B if has_batch_idx else B
    Hkv = {"mha": H, "gqa": 3, "mqa": 1}[mha_type]
    rotary_dim = math.floor(int(rotary_fraction * d) / 16) * 16
    window_size = torch.randint(0, seqlen_k, (2,)) if local else (-1, -1)  # a tensor, as flash-attn's test passes
    q = torch.randn(B, seqlen_q, H, d, dtype=dtype) * (softcap if softcap > 0 else 1.0)
    # fewer new keys than queries where there can be (flash-attn draws 1..seqlen_q, which may give seqlen_q)
    seqlen_new = seqlen_q if seqlen_new_eq_seqlen_q or seqlen_q == 1 else torch.randint(1, seqlen_q, (1,)).item()
    k = torch.randn(B, seqlen_new, Hkv, d, dtype=dtype) if new_kv else None
    v = torch.randn(B, seqlen_new, Hkv, d, dtype=dtype) if new_kv else None
    block_table = None
    if page:  # pages of `page` rows in a shuffled pool three times the batch's need, as flash-attn's test builds it
        n_blocks = -(-seqlen_k // page)
        pool_k, pool_v = (torch.randn(n_blocks * B * 3, page, Hkv, d, dtype=dtype) for _ in range(2))
        block_table = torch.randperm(n_blocks * B * 3, dtype=torch.int32)[: n_blocks * B].view(B, n_blocks)
        k_cache, v_cache = (pool[block_table.long()].flatten(1, 2)[:, :seqlen_k] for pool in (pool_k, pool_v))
    else:
        k_cache = torch.randn(Bc, seqlen_k, Hkv, d, dtype=dtype)
        v_cache = torch.randn(Bc, seqlen_k, Hkv, d, dtype=dtype)
    # q rows turn at cache_seqlens + t when causal or windowed: the table must reach cache_seqlens + seqlen_q
    room = (seqlen_q if (causal or local) and rotary_dim > 0 else seqlen_new) if new_kv else 0
    cache_seqlens = torch.randint(0 if new_kv else 1, seqlen_k - room + 1, (B,), dtype=torch.int32)
    leftpad = None
    if has_leftpad:  # padding rows below each sequence's filled length, as flash-attn's test draws them
        leftpad = torch.stack([torch.randint(0, max(int(n), 1), ()) for n in cache_seqlens]).to(torch.int32)
    batch_idx = torch.randperm(Bc, dtype=torch.int32)[:B] if has_batch_idx else None
    rows = batch_idx.long() if has_batch_idx else torch.arange(B)

    cos = sin = None
    q_ro, k_ro = q, k
    if rotary_dim > 0:
        # rows for the whole cache, as flash-attn requires (its test: every row the pages can address)
        angle = torch.rand(n_blocks * page if page else seqlen_k, rotary_dim // 2) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        if causal or local:
            q_ro = rotate(q.double(), cos, sin, cache_seqlens, rotary_interleaved)
        else:  # every query row at cache_seqlens
            q_ro = rotate(q.double().flatten(1, 2)[:, None], cos, sin, cache_seqlens, rotary_interleaved).view(q.shape)
        k_ro = rotate(k.double(), cos, sin, cache_seqlens, rotary_interleaved)
    j = torch.arange(seqlen_k)[None]  # (1, seqlen_k)
    kc_ref, vc_ref = k_cache[rows].double(), v_cache[rows].double()
    if new_kv:
        update = (cache_seqlens[:, None] <= j) & (j < cache_seqlens[:, None] + seqlen_new)  # (B, seqlen_k)
        kc_ref[update] = k_ro.double().flatten(0, 1)
        vc_ref[update] = v.double().flatten(0, 1)
    key_padding_mask = j < cache_seqlens[:, None] + (seqlen_new if new_kv else 0)
    if has_leftpad:
        key_padding_mask &= j >= leftpad[:, None]
    window = tuple(int(w) for w in window_size)
    slopes = torch.rand(B, H) * 0.3 if alibi else None

    kc, vc = (pool_k.clone(), pool_v.clone()) if page else (k_cache.clone(), v_cache.clone())
    out = flash_attn_with_kvcache(
        q,
        kc,
        vc,
        k,
        v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=cache_seqlens,
        cache_batch_idx=batch_idx,
        cache_leftpad=leftpad,
        block_table=block_table,
        causal=causal,
        window_size=window_size,
        rotary_interleaved=rotary_interleaved,
        num_splits=num_splits,
        softcap=softcap,
        alibi_slopes=slopes,
        backend=backend,
    )
    masks = dict(key_padding_mask=key_padding_mask, causal=causal, window=window, key_leftpad=leftpad)
    if alibi:
        masks["attn_bias"] = alibi_bias(slopes, seqlen_q, seqlen_k, causal, key_padding_mask.sum(-1), leftpad)
    masks["softcap"] = softcap
    ref = attention_ref(q_ro.double(), kc_ref, vc_ref, **masks)
    pt = attention_ref(q_ro.to(dtype), kc_ref.to(dtype), vc_ref.to(dtype), **masks, upcast=False, reorder=True)
    assert_within(out, ref, pt, mult=3)
    if new_kv:
        if page:  # each sequence's pages, in order
            kc, vc = (c[block_table.long()].flatten(1, 2)[:, :seqlen_k] for c in (kc, vc))
        torch.testing.assert_close(kc[rows].double(), kc_ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
        assert torch.equal(vc[rows].double(), vc_ref)


def _id(case):
    sq, sk, d, bidx, rf, inter, eq, causal, local, new_kv, mha, splits, leftpad, page = case
    flags = [f"q{sq}", f"k{sk}", f"d{d}", mha, f"rot{rf}" + ("i" if inter else ""), f"splits{splits}"]
    flags += [f"paged{page}"] if page else []
    named = ((bidx, "batch_idx"), (not eq, "fewer_new"), (causal, "causal"), (local, "local"), (leftpad, "leftpad"))
    for on, name in named:
        flags += [name] if on else []
    return "-".join(flags + ([] if new_kv else ["no_append"]))


SAMPLE = [
    (1, 128, 64, False, 0.0, False, True, False, False, True, "mha", 0, False, 0),  # plain decode step
    (1, 339, 64, True, 1.0, True, True, True, False, True, "gqa", 3, True, 0),  # rotary, rows picked, left padding
    (3, 97, 32, False, 0.5, False, False, True, False, True, "mqa", 1, False, 0),  # fewer new keys than queries
    (3, 97, 32, False, 1.0, True, False, False, False, True, "gqa", 2, False, 0),  # non-causal: q at cache_seqlens
    (4, 128, 64, False, 0.5, False, True, False, True, True, "gqa", 0, True, 0),  # a random window (a tensor), padding
    (16, 128, 32, True, 0.0, False, True, True, True, False, "mha", 2, True, 0),  # no append, causal, window, padding
    (8, 64, 40, False, 0.0, False, False, True, False, True, "gqa", 0, False, 0),  # head_dim 40
    (1, 339, 64, False, 1.0, False, True, True, False, True, "gqa", 3, False, 256),  # paged: 2 pages, rotary, splits
    (3, 300, 32, False, 0.5, True, False, True, True, True, "mqa", 0, True, 128),  # paged 128, window, left padding
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SAMPLE, ids=_id)
def test_flash_attn_kvcache_sample(backend, case):
    _check_kvcache(*case, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", SAMPLE[1:3], ids=_id)
def test_flash_attn_kvcache_low_precision_cpu_kernel(dtype, case):
    _check_kvcache(*case, backend="cpu", dtype=dtype)


def _grid():
    shapes = [(1, 128), (1, 339), (3, 97), (64, 128)]
    rotaries = [(0.0, False), (0.5, False), (1.0, True)]  # (fraction, interleaved)
    for (sq, sk), (rf, inter), bidx, eq, causal, local, new_kv, mha, splits, pad, page in itertools.product(
        shapes, rotaries, (False, True), (False, True), (False, True), (False, True), (False, True),
        ("mha", "gqa", "mqa"), (0, 3), (False, True), (0, 256),
    ):  # fmt: skip
        if (sq > sk and new_kv) or (not new_kv and rf > 0.0) or (bidx and page):  # what flash-attn's test skips
            continue
        yield sq, sk, 64, bidx, rf, inter, eq, causal, local, new_kv, mha, splits, pad, page


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("triton", "cpu"))
def test_flash_attn_kvcache_grid(backend):
    run_grid(_check_kvcache, _grid(), _id, backend=backend)


# (case, softcap, alibi): a decode step, left padding with rotary and splits, fewer new keys than queries, a window
# over left padding, a paged cache
MODIFIED = [
    (SAMPLE[0], 50.0, True),
    (SAMPLE[1], 0.0, True),
    (SAMPLE[2], 50.0, False),
    (SAMPLE[4], 50.0, True),
    (SAMPLE[8], 30.0, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case,softcap,alibi", MODIFIED, ids=[_id(c) + f"-softcap{s:g}" + ("-alibi" if a else "") for c, s, a in MODIFIED]
)
def test_flash_attn_kvcache_softcap_alibi(backend, case, softcap, alibi):
    _check_kvcache(*case, backend=backend, softcap=softcap, alibi=alibi)


@pytest.mark.slow
@pytest.mark.parametrize("softcap,alibi", [(50.0, False), (0.0, True), (50.0, True)], ids=["softcap", "alibi", "both"])
@pytest.mark.parametrize("backend", ("triton", "cpu"))
def test_flash_attn_kvcache_softcap_alibi_grid(backend, softcap, alibi):
    run_grid(_check_kvcache, _grid(), _id, backend=backend, softcap=softcap, alibi=alibi)


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # the choice is made before any backend runs
def test_flash_attn_kvcache_window_past_cache_is_unbounded(backend):
    """flash-attn turns a window side >= the cache's length into -1 before picking the causal, local or plain
    kernel, so a non-causal call with such a window rotates every q row at cache_seqlens, as (-1, -1) does; a
    window inside the cache turns q's rows per token (so the comparison can tell the two apart)."""
    torch.manual_seed(0)
    B, Tq, H, D, Tmax = 1, 3, 2, 32, 16
    q, k, v = (torch.randn(B, Tq, H, D) for _ in range(3))
    k_cache, v_cache = torch.randn(B, Tmax, H, D), torch.randn(B, Tmax, H, D)
    angles = torch.rand(32, 8) * 6
    lens = torch.tensor([4], dtype=torch.int32)

    def run(window):
        return flash_attn_with_kvcache(
            q, k_cache.clone(), v_cache.clone(), k, v, angles.cos(), angles.sin(), lens, window_size=window,
            backend=backend,
        )  # fmt: skip

    plain = run((-1, -1))
    for window in ((100, -1), (-1, 100), (Tmax, Tmax), (Tmax, -1)):
        torch.testing.assert_close(run(window), plain, atol=1e-5, rtol=1e-5, msg=f"window {window}")
    assert (run((Tmax - 1, -1)) - plain).abs().max() > 1e-2  # local: q row t turns at cache_seqlens + t
