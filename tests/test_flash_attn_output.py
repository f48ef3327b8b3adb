"""flash-attn's own output tests (test_flash_attn_output, test_flash_attn_varlen_output), ported for the arguments
fasttrain's kernels serve: seqlen pairs off the tile sizes, head dims, causal or a random window given as a tensor,
MHA/GQA/MQA, deterministic, q/k/v apart or k/v packed, softcap (q scaled by it, as flash-attn's test does) and ALiBi
slopes (B, H) drawn as flash-attn's test draws them. The output must be within 2x, and dq/dk/dv within 3x,
PyTorch's own error against the upcast reference (flash-attn's rule; here fp32 against float64). A representative
sample runs by default; the whole grid under -m slow."""

import itertools

import pytest
import torch

from fasttrain.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
)
from fasttrain.ops.attention import HEAD_DIMS

from flash_attn_ref import alibi_bias, assert_within, attention_ref, dropout_fraction, run_grid


def _references(q, k, v, causal, window, pieces=None, dropout_p=0.0, S_dmask=None, softcap=0.0, slopes=None):
    """The float64 reference and PyTorch's fp32 (reordered) outputs, each with its gradient leaves (copies of q, k,
    v). pieces: for packed varlen inputs, the (query, key) slices of each sequence, attended alone and concatenated.
    S_dmask: the kernel's dropout mask as flash-attn returns it (negative = dropped), applied by both. softcap and
    ALiBi slopes (B, H) as flash-attn's reference takes them (the slopes as its test's bias)."""
    found = []
    for upcast in (True, False):
        leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
        kw = dict(causal=causal, window=window, upcast=upcast, reorder=not upcast, dropout_p=dropout_p)
        kw.update(softcap=softcap)
        if pieces is None:
            keep = None if S_dmask is None else S_dmask[:, :, : q.shape[1], : k.shape[1]] >= 0
            bias = None if slopes is None else alibi_bias(slopes, q.shape[1], k.shape[1], causal)
            out = attention_ref(*leaves, **kw, dropout_mask=keep, attn_bias=bias)
        else:  # each sequence alone, bottom-right aligned to its own lengths
            lq, lk, lv = leaves
            parts = []
            for b, (qs, ks) in enumerate(pieces):
                Tq, Tk = qs.stop - qs.start, ks.stop - ks.start
                keep = None if S_dmask is None else S_dmask[b, None, :, :Tq, :Tk] >= 0
                bias = None if slopes is None else alibi_bias(slopes[b : b + 1], Tq, Tk, causal)
                parts.append(
                    attention_ref(lq[qs][None], lk[ks][None], lv[ks][None], **kw, dropout_mask=keep, attn_bias=bias)[0]
                )
            out = torch.cat(parts)
        found.append((out, leaves))
    return found


def _assert_output_and_grads(out, inputs, kvpacked, ref, pt, kv_axis):
    """flash-attn's rule: the output within 2x, each gradient within 3x PyTorch's error; a packed kv's gradient
    against the references' dk and dv stacked along kv_axis."""
    assert_within(out, ref[0], pt[0], mult=2)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    want = list(torch.autograd.grad(ref[0], ref[1], g.double()))
    yard = list(torch.autograd.grad(pt[0], pt[1], g))
    if kvpacked:
        want, yard = [want[0], torch.stack(want[1:], kv_axis)], [yard[0], torch.stack(yard[1:], kv_axis)]
    for a, b, c in zip(got, want, yard):
        assert_within(a, b, c, mult=3)


def _heads_and_window(H, mha_type, seqlen_k, local):
    """Hkv, the window as flash-attn's test draws it (a tensor when local), and as ints."""
    window_size = torch.randint(0, seqlen_k, (2,)) if local else (-1, -1)
    return {"mha": H, "mqa": 1, "gqa": 2}[mha_type], window_size, tuple(int(w) for w in window_size)


def _check_dropout(S_dmask, seqlen_q, seqlen_k, causal, local, window, dropout_p):
    """flash-attn's dropout check: the dropped share of the visible scores within 0.01 of dropout_p (0.025 with a
    window, fewer scores); without dropout S_dmask is flash-attn's empty tensor."""
    if dropout_p == 0.0:
        assert S_dmask.shape == (0,)
        return None
    fraction = dropout_fraction(S_dmask, seqlen_q, seqlen_k, causal, window)
    assert abs(fraction - dropout_p) <= (0.025 if local else 0.01), fraction
    return S_dmask


def _query(shape, softcap):
    """A leaf query, scaled by softcap when there is one (flash-attn's test: so that the scores reach the cap)."""
    q = torch.randn(shape)
    return (q * softcap if softcap > 0 else q).requires_grad_()


def _check_output(
    seqlen_q, seqlen_k, d, causal, local, mha_type, deterministic, kvpacked, backend, dropout_p=0.0, softcap=0.0,
    alibi=False,
):  # fmt: skip
    torch.manual_seed(0)
    B, H = 2, 6
    Hkv, window_size, window = _heads_and_window(H, mha_type, seqlen_k, local)
    q = _query((B, seqlen_q, H, d), softcap)
    kv = torch.randn(B, seqlen_k, 2, Hkv, d, requires_grad=True)
    k, v = (t.detach().clone().requires_grad_() for t in kv.unbind(2))
    slopes = torch.rand(B, H) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window_size, deterministic=deterministic, backend=backend)
    kw.update(dropout_p=dropout_p, return_attn_probs=True)
    kw.update(softcap=softcap, alibi_slopes=slopes)
    if kvpacked:
        (out, _, S_dmask), inputs = flash_attn_kvpacked_func(q, kv, **kw), (q, kv)
    else:
        (out, _, S_dmask), inputs = flash_attn_func(q, k, v, **kw), (q, k, v)
    S_dmask = _check_dropout(S_dmask, seqlen_q, seqlen_k, causal, local, window, dropout_p)
    ref, pt = _references(q, k, v, causal, window, None, dropout_p, S_dmask, softcap, slopes)
    _assert_output_and_grads(out, inputs, kvpacked, ref, pt, kv_axis=2)


def _check_varlen_output(
    seqlen_q, seqlen_k, d, causal, local, mha_type, deterministic, kvpacked, backend, dropout_p=0.0, softcap=0.0,
    alibi=False,
):  # fmt: skip
    torch.manual_seed(0)
    B, H = 3, 4
    Hkv, window_size, window = _heads_and_window(H, mha_type, seqlen_k, local)
    # random lengths per sequence, as flash-attn's random padding masks leave them (one at full length)
    q_lens = [seqlen_q, *torch.randint(1, seqlen_q + 1, (B - 1,)).tolist()]
    k_lens = [seqlen_k, *torch.randint(1, seqlen_k + 1, (B - 1,)).tolist()]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = _query((sum(q_lens), H, d), softcap)
    kv = torch.randn(sum(k_lens), 2, Hkv, d, requires_grad=True)
    k, v = (t.detach().clone().requires_grad_() for t in kv.unbind(1))
    slopes = torch.rand(B, H) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window_size, deterministic=deterministic, backend=backend)
    kw.update(dropout_p=dropout_p, return_attn_probs=True)
    kw.update(softcap=softcap, alibi_slopes=slopes)
    lengths = (cu_q, cu_k, max(q_lens), max(k_lens))
    if kvpacked:
        (out, _, S_dmask), inputs = flash_attn_varlen_kvpacked_func(q, kv, *lengths, **kw), (q, kv)
    else:
        (out, _, S_dmask), inputs = flash_attn_varlen_func(q, k, v, *lengths, **kw), (q, k, v)
    if dropout_p == 0.0:
        assert S_dmask.shape == (0,)
    else:  # the first sequence is at full length: flash-attn's fraction check on it
        _check_dropout(S_dmask[:1], seqlen_q, seqlen_k, causal, local, window, dropout_p)
    pieces = [(slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))) for b in range(B)]
    S_dmask = None if dropout_p == 0.0 else S_dmask
    ref, pt = _references(q, k, v, causal, window, pieces, dropout_p, S_dmask, softcap, slopes)
    _assert_output_and_grads(out, inputs, kvpacked, ref, pt, kv_axis=1)


def _id(case):
    sq, sk, d, causal, local, mha, det, packed = case
    flags = [f"q{sq}", f"k{sk}", f"d{d}", mha]
    for on, name in ((causal, "causal"), (local, "local"), (det, "deterministic"), (packed, "kvpacked")):
        flags += [name] if on else []
    return "-".join(flags)


# (seqlen_q, seqlen_k, d, causal, local, mha_type, deterministic, kvpacked)
SAMPLE = [
    (113, 203, 32, True, False, "mha", False, False),
    (128, 217, 64, False, True, "gqa", True, True),
    (108, 256, 96, True, True, "mqa", False, False),
    (203, 113, 64, True, False, "gqa", False, True),  # more queries than keys: the first rows see none
    (1, 239, 64, False, False, "mha", False, False),
    (97, 97, 40, True, False, "gqa", False, False),  # a head dim the CPU kernel alone takes
]
TRITON_SAMPLE = [  # the interpreter's cost grows with the tiles: shorter sequences
    (17, 40, 32, True, False, "gqa", False, False),
    (40, 17, 64, True, True, "mha", True, True),
]


# One key per query: the softmax is constant, so dQ and dK are exactly 0 and dV sums dO over every query row of the
# K/V head's group (1434 rows under MQA)
ONE_KEY = [(239, 1, 32, False, False, "mqa", False, True), (239, 1, 40, False, False, "gqa", True, False)]

# (backend, case, varlen): the CPU kernel on flash-attn's lengths, the interpreted Triton kernels on shorter ones
CASES = [("cpu", c, False) for c in SAMPLE] + [("cpu", c, True) for c in SAMPLE[:2]]
CASES += [("cpu", ONE_KEY[0], False), ("cpu", ONE_KEY[1], True)]
CASES += [("triton", c, False) for c in TRITON_SAMPLE] + [("triton", TRITON_SAMPLE[0], True)]


@pytest.mark.parametrize(
    "backend,case,varlen", CASES, ids=[f"{b}-{_id(c)}" + ("-varlen" if v else "") for b, c, v in CASES]
)
def test_flash_attn_output(backend, case, varlen):
    (_check_varlen_output if varlen else _check_output)(*case, backend=backend)


# flash-attn's dropout_p 0.17: the kernel's mask read back from S_dmask, applied by the references
DROPOUT_CASES = [("cpu", SAMPLE[0], False), ("cpu", SAMPLE[1], False), ("cpu", SAMPLE[1], True)]
DROPOUT_CASES += [("triton", (33, 97, 32, True, False, "gqa", False, False), False)]
DROPOUT_CASES += [("triton", TRITON_SAMPLE[1], True)]


@pytest.mark.parametrize(
    "backend,case,varlen",
    DROPOUT_CASES,
    ids=[f"{b}-{_id(c)}" + ("-varlen" if v else "") for b, c, v in DROPOUT_CASES],
)
def test_flash_attn_output_dropout(backend, case, varlen):
    (_check_varlen_output if varlen else _check_output)(*case, backend=backend, dropout_p=0.17)


def _grid(head_dims):
    shapes = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1, 239), (239, 1)]
    for (sq, sk), d, causal, local, mha, det, packed in itertools.product(
        shapes, head_dims, (False, True), (False, True), ("mha", "mqa", "gqa"), (False, True), (False, True)
    ):
        yield sq, sk, d, causal, local, mha, det, packed


GRID_HEAD_DIMS = {"cpu": (32, 40, 59, 64, 96, 111, 128), "triton": tuple(d for d in HEAD_DIMS if d <= 128)}


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("backend", list(GRID_HEAD_DIMS))
def test_flash_attn_output_grid(backend, varlen):
    check = _check_varlen_output if varlen else _check_output
    run_grid(check, _grid(GRID_HEAD_DIMS[backend]), _id, backend=backend)


def _block_table(cu_k, page, extra_blocks=3):
    """A shuffled block table (B, max_blocks) int32 for sequences of lengths cu_k.diff() (unused slots -1, never
    read), with extra pages nobody uses; and the number of pages."""
    need = [-(-n // page) for n in cu_k.diff().tolist()]
    num_blocks = sum(need) + extra_blocks
    pages = iter(torch.randperm(num_blocks).tolist())
    table = torch.full((len(need), max(need)), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor([next(pages) for _ in range(n)])
    return table, num_blocks


def _to_pages(x, cu_k, table, num_blocks, page, fill):
    """x (total_k, ...) laid out in the pages the table gives, `fill(shape)` everywhere else."""
    cache = fill(num_blocks, page, *x.shape[1:])
    for b in range(table.shape[0]):
        for t in range(int(cu_k[b + 1] - cu_k[b])):
            cache[table[b, t // page], t % page] = x[int(cu_k[b]) + t]
    return cache


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("page", [4, 16])
def test_flash_attn_varlen_paged_kv(backend, page):
    """flash-attn's test_flash_attn_varlen_causal with paged_kv_block_size: a block_table over a shuffled paged cache
    gives the contiguous call's output exactly, and the keys' gradients land in the pages that hold them."""
    torch.manual_seed(0)
    H, Hkv, D = 4, 2, 32
    q_lens, k_lens = [5, 1, 23], [30, 7, 23]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (q_lens, k_lens))
    q = torch.randn(sum(q_lens), H, D, requires_grad=True)
    k, v = (torch.randn(sum(k_lens), Hkv, D, requires_grad=True) for _ in range(2))
    table, num_blocks = _block_table(cu_k, page)
    k_cache, v_cache = (
        _to_pages(t.detach(), cu_k, table, num_blocks, page, torch.randn).requires_grad_() for t in (k, v)
    )
    args = (cu_q, cu_k, max(q_lens), max(k_lens))
    want = flash_attn_varlen_func(q, k, v, *args, causal=True, backend=backend)
    got = flash_attn_varlen_func(q, k_cache, v_cache, *args, causal=True, block_table=table, backend=backend)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    do = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k_cache, v_cache), do)
    dq, dk, dv = torch.autograd.grad(want, (q, k, v), do)
    torch.testing.assert_close(got_grads[0], dq, atol=0, rtol=0)
    for name, a, b in (("k", got_grads[1], dk), ("v", got_grads[2], dv)):
        want_pages = _to_pages(b, cu_k, table, num_blocks, page, torch.zeros)  # 0 in the pages nobody reads
        torch.testing.assert_close(a, want_pages, atol=0, rtol=0, msg=lambda m, n=name: f"d{n}_cache: {m}")


def test_flash_attn_varlen_paged_kv_refuses_bad_tables():
    q = torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 14], dtype=torch.int32)
    cache = torch.randn(5, 4, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    args = (cu_q, cu_k, 5, 8)
    flash_attn_varlen_func(q, cache, cache, *args, block_table=table)  # the valid call the others break
    with pytest.raises(ValueError, match=r"block_table's pages must lie in \[0, 5\), got values in \[0, 7\]"):
        flash_attn_varlen_func(q, cache, cache, *args, block_table=torch.tensor([[0, 1], [2, 7]], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs more than block_table's 1 pages of 4"):
        flash_attn_varlen_func(q, cache, cache, *args, block_table=table[:, :1])
    with pytest.raises(TypeError, match="block_table must be an int32 tensor"):
        flash_attn_varlen_func(q, cache, cache, *args, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table must be \(B=2, max_blocks >= 1\)"):
        flash_attn_varlen_func(q, cache, cache, *args, block_table=table[:1])
    with pytest.raises(ValueError, match="k must be a paged cache"):
        flash_attn_varlen_func(q, cache[0], cache, *args, block_table=table)


# (backend, case, softcap, alibi, varlen): flash-attn's softcap 50 and ALiBi slopes, apart and together, through the
# CPU kernel and both of the Triton backward's dQ plans (atomics; deterministic: the dQ kernel)
MODIFIED = [
    ("cpu", SAMPLE[0], 50.0, False, False),
    ("cpu", SAMPLE[1], 0.0, True, False),
    ("cpu", SAMPLE[3], 50.0, True, False),  # more queries than keys
    ("cpu", SAMPLE[4], 50.0, True, False),  # one query
    ("cpu", SAMPLE[5], 50.0, True, False),  # 97 x 97, head dim 40
    ("cpu", SAMPLE[1], 50.0, True, True),
    ("triton", TRITON_SAMPLE[0], 50.0, True, False),
    ("triton", TRITON_SAMPLE[1], 50.0, True, False),
    ("triton", TRITON_SAMPLE[1], 0.0, True, True),
    ("triton", TRITON_SAMPLE[0], 50.0, False, True),
    # one key per query under the modifiers; capped and biased scores, whose logsumexp is large (the CPU backward
    # renormalizes each row's recomputed P)
    ("cpu", ONE_KEY[0], 50.0, False, False),
    ("cpu", ONE_KEY[0], 0.0, True, True),
    ("cpu", (113, 203, 59, False, False, "mha", False, False), 50.0, True, False),
    ("cpu", (1, 239, 64, False, True, "gqa", False, False), 50.0, True, False),
    # packed sequences whose rows see few keys, so that a p near 1/2 of a large capped or biased score makes a large dS
    # (q scaled by the cap): the CPU backward's exact scores for its large probabilities
    ("cpu", (113, 211, 40, True, True, "mha", False, False), 50.0, False, True),
    ("cpu", (1, 239, 40, False, True, "mqa", False, False), 50.0, True, True),
    ("cpu", (108, 256, 59, True, True, "mha", False, False), 50.0, True, True),
]


# flash-attn refuses softcap with dropout ("Softcapping does not support dropout for now"); fasttrain computes it,
# checked against the reference given the kernel's mask, outputs and gradients, with ALiBi on the CPU varlen case.
# softcap 2 (q scaled by it): scores within the cap's bend, none of whose p underflows to 0, which S_dmask's sign
# could not mark dropped (-0.0), so that flash-attn's dropped-fraction check holds.
SOFTCAP_DROPOUT_CASES = DROPOUT_CASES[:4]  # the interpreter's dropout is slow: one Triton case


@pytest.mark.parametrize(
    "backend,case,varlen",
    SOFTCAP_DROPOUT_CASES,
    ids=[f"{b}-{_id(c)}" + ("-varlen" if v else "") for b, c, v in SOFTCAP_DROPOUT_CASES],
)
def test_flash_attn_output_softcap_dropout(backend, case, varlen):
    check = _check_varlen_output if varlen else _check_output
    check(*case, backend=backend, dropout_p=0.17, softcap=2.0, alibi=varlen and backend == "cpu")


def _modified_id(backend, case, softcap, alibi, varlen):
    flags = [f"softcap{softcap:g}"] if softcap else []
    return "-".join([backend, _id(case), *flags, *(["alibi"] if alibi else []), *(["varlen"] if varlen else [])])


@pytest.mark.parametrize("backend,case,softcap,alibi,varlen", MODIFIED, ids=[_modified_id(*m) for m in MODIFIED])
def test_flash_attn_output_softcap_alibi(backend, case, softcap, alibi, varlen):
    (_check_varlen_output if varlen else _check_output)(*case, backend=backend, softcap=softcap, alibi=alibi)


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("backend", list(GRID_HEAD_DIMS))
@pytest.mark.parametrize("softcap,alibi", [(50.0, False), (0.0, True), (50.0, True)], ids=["softcap", "alibi", "both"])
def test_flash_attn_output_softcap_alibi_grid(backend, varlen, softcap, alibi):
    check = _check_varlen_output if varlen else _check_output
    cases = (c for c in _grid(GRID_HEAD_DIMS[backend][:4]) if c[0] <= 256 and c[1] <= 256)
    run_grid(check, cases, _id, backend=backend, softcap=softcap, alibi=alibi)
