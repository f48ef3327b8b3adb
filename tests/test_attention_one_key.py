"""Query rows that see exactly one key (a single key; a (0, 0) window; packed sequences of one key each): the softmax
of one score is the constant 1, so the backward's dS is exactly the logsumexp's gradient. Without a loss on the
logsumexp dQ and dK are exactly 0, as PyTorch's autograd gives them; with one they are dlse times the scaled keys and
queries; dV sums dO over the rows. Both Triton plans (interpreted) and the C++ CPU kernel, plain and with softcap and
ALiBi, against the float64 reference."""

import pytest
import torch

from fasttrain.ops import flash_attn_func, flash_attn_varlen_func

from helpers import TOL_FP32, float64_leaves, max_err

# (Tq, Tk, window, varlen), B 2, H 2 over Hkv 1, D 32: every row sees one key
LAYOUTS = {"one_key": (13, 1, (-1, -1), False), "window_0_0": (9, 9, (0, 0), False), "varlen": (5, 1, (-1, -1), True)}
MODIFIERS = {"plain": (0.0, False), "softcap_alibi": (5.0, True)}
# (layout, backend, deterministic, modifiers): every layout on the CPU kernel and each Triton plan (atomic dQ; the dQ
# kernel, deterministic=True), each layout and plan once with the modifiers (the interpreter costs ~1 s a case)
CASES = [(layout, "cpu", False, m) for layout in LAYOUTS for m in MODIFIERS]
CASES += [("one_key", "triton", False, "plain"), ("window_0_0", "triton", True, "plain")]
CASES += [("window_0_0", "triton", False, "softcap_alibi"), ("varlen", "triton", True, "softcap_alibi")]


def _attention(q, k, v, Tq, Tk, varlen, **kw):
    if varlen:
        B = q.shape[0] // Tq
        cu_q, cu_k = (torch.arange(0, B * T + 1, T, dtype=torch.int32) for T in (Tq, Tk))
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, Tq, Tk, return_attn_probs=True, lse_grad=True, **kw)[:2]
    return flash_attn_func(q, k, v, return_attn_probs=True, lse_grad=True, **kw)[:2]


@pytest.mark.parametrize(
    "layout,backend,deterministic,modifiers", CASES, ids=[f"{c[0]}-{c[1]}{'-dq_kernel' * c[2]}-{c[3]}" for c in CASES]
)
def test_rows_that_see_one_key_have_exact_gradients(layout, backend, deterministic, modifiers):
    (Tq, Tk, window, varlen), (softcap, alibi) = LAYOUTS[layout], MODIFIERS[modifiers]
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 2, 2, 1, 32
    shape_q, shape_k = ((B * Tq, H, D), (B * Tk, Hkv, D)) if varlen else ((B, Tq, H, D), (B, Tk, Hkv, D))
    q = torch.randn(shape_q, generator=g).requires_grad_()
    k, v = (torch.randn(shape_k, generator=g).requires_grad_() for _ in range(2))
    kw = dict(window_size=window, softcap=softcap, alibi_slopes=torch.rand(B, H, generator=g) if alibi else None)
    out, lse = _attention(q, k, v, Tq, Tk, varlen, deterministic=deterministic, backend=backend, **kw)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)

    dq, dk, _ = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0  # on main's build: ~1e-6 off 0

    q64, k64, v64 = float64_leaves(q, k, v)
    ref, ref_lse = _attention(q64, k64, v64, Tq, Tk, varlen, backend="reference", **kw)
    loss = (out * dout).sum() + (lse * dlse).sum()  # dS = dlse exactly
    ref_loss = (ref * dout.double()).sum() + (ref_lse * dlse.double()).sum()
    got, want = torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q64, k64, v64))
    for name, a, b in zip("qkv", got, want):
        assert max_err(a, b) < TOL_FP32["attention"], f"d{name}"
