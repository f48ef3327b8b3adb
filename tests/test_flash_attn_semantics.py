"""flash-attn's semantics where fasttrain's signature is flash-attn's: the softmax_lse that return_attn_probs gives
takes no gradient into q, k, v (flash-attn's backward takes `dout, *args`), on every function and backend, and
fasttrain's own lse_grad=True differentiates through it exactly; flash-attn's checks raise errors that
`except RuntimeError` catches as well as `except ValueError` / `except TypeError` (torch's SDPA raises RuntimeError
too)."""

import numpy as np
import pytest
import torch

from fasttrain.ops import attention as ops
from fasttrain.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)

B, T, H, D = 2, 7, 2, 32
CU = torch.tensor([0, 3, 14], dtype=torch.int32)  # uneven sequences of 3 and 11 rows


def _call(name, leaf, backend, **kw):
    """(out, lse) of `name` over one random leaf (the packed tensor where the function takes one)."""
    kw = dict(causal=True, return_attn_probs=True, backend=backend, **kw)
    if name == "func":
        return flash_attn_func(*leaf.unbind(2), **kw)[:2]
    if name == "varlen":
        return flash_attn_varlen_func(*leaf.unbind(1), CU, CU, 11, 11, **kw)[:2]
    if name == "qkvpacked":
        return flash_attn_qkvpacked_func(leaf, **kw)[:2]
    if name == "kvpacked":
        return flash_attn_kvpacked_func(leaf[:, :, 0], leaf[:, :, 1:], **kw)[:2]
    if name == "varlen_qkvpacked":
        return flash_attn_varlen_qkvpacked_func(leaf, CU, 11, **kw)[:2]
    return flash_attn_varlen_kvpacked_func(leaf[:, 0], leaf[:, 1:], CU, CU, 11, 11, **kw)[:2]


def _leaf(name):
    g = torch.Generator().manual_seed(0)
    shape = (2 * T, 3, H, D) if name.startswith("varlen") else (B, T, 3, H, D)  # q, k, v stacked on axis -3
    return torch.randn(shape, generator=g).requires_grad_()


NAMES = ["func", "varlen", "qkvpacked", "kvpacked", "varlen_qkvpacked", "varlen_kvpacked"]


# every function on the C++ kernel; the other backends once (what the lse's gradient does is the function's)
CASES = [(name, "cpu") for name in NAMES] + [("func", "triton"), ("varlen", "reference")]


@pytest.mark.parametrize("name,backend", CASES)
def test_lse_takes_no_gradient_unless_lse_grad(name, backend):
    leaf = _leaf(name)
    out, lse = _call(name, leaf, backend)
    (grad_lse_only,) = torch.autograd.grad(lse.sum(), leaf, retain_graph=True)
    assert torch.count_nonzero(grad_lse_only) == 0  # flash-attn: dq = dk = dv = 0 from a loss on lse alone
    do = torch.randn_like(out)
    (both,) = torch.autograd.grad((out, lse), leaf, (do, torch.randn_like(lse)))
    (out_only,) = torch.autograd.grad(_call(name, leaf, backend)[0], leaf, do)
    torch.testing.assert_close(both, out_only, atol=0, rtol=0)
    out, lse = _call(name, leaf, backend, lse_grad=True)  # fasttrain's own: the exact gradient through lse
    (exact,) = torch.autograd.grad((out, lse), leaf, (do, torch.ones_like(lse)))
    leaf64 = leaf.detach().double().requires_grad_()
    ref_out, ref_lse = _call(name, leaf64, "reference", lse_grad=True)
    (want,) = torch.autograd.grad((ref_out, ref_lse), leaf64, (do.double(), torch.ones_like(ref_lse)))
    torch.testing.assert_close(exact, want.float(), atol=2e-5, rtol=2e-5)
    assert (exact - out_only).abs().max() > 1e-3


def test_an_ignored_lse_launches_no_dlse(monkeypatch):
    """The default costs nothing: the backward gets dlse None, so the kernels run without HAS_DLSE."""
    seen = []
    backward = ops.ATTENTION["cpu"].backward
    monkeypatch.setattr(ops.ATTENTION["cpu"], "backward", lambda *a: seen.append(a[6]) or backward(*a))
    leaf = _leaf("func")
    out, lse = _call("func", leaf, "cpu")
    (out.sum() + lse.sum()).backward()
    out, lse = _call("func", leaf, "cpu", lse_grad=True)
    (out.sum() + lse.sum()).backward()
    assert seen[0] is None and seen[1] is not None


def test_a_negative_window_side_is_unbounded_as_flash_attns_cpp_reads_it():
    # flash-attn's C++ takes any side < 0 as -1, and any integer with __index__ (numpy's, a 0-dim tensor) as an int
    q, k, v = (t.detach() for t in _leaf("func").unbind(2))
    kc, vc = k.clone(), v.clone()
    sides = [((-2, 0), (-1, 0)), ((-7, -3), (-1, -1)), ((3, -5), (3, -1)), ((np.int64(2), torch.tensor(1)), (2, 1))]
    for window, same in sides:
        want = flash_attn_func(q, k, v, window_size=same, backend="cpu")
        assert torch.equal(flash_attn_func(q, k, v, window_size=window, backend="cpu"), want), window
        got, want = (
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5, window_size=w, backend="cpu") for w in (window, same)
        )
        assert torch.equal(got, want), window


def test_numpy_floats_for_softmax_scale_and_softcap_as_flash_attn_takes_them():
    q, k, v = (t.detach() for t in _leaf("func").unbind(2))
    for kw in (dict(softmax_scale=0.25), dict(softcap=3.0)):
        as_numpy = {name: np.float32(value) for name, value in kw.items()}
        want = flash_attn_func(q, k, v, **kw, backend="cpu")
        assert torch.equal(flash_attn_func(q, k, v, **as_numpy, backend="cpu"), want)
        want = flash_attn_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=5, **kw, backend="cpu")
        assert torch.equal(
            flash_attn_with_kvcache(q, k.clone(), v.clone(), cache_seqlens=5, **as_numpy, backend="cpu"), want
        )


def test_numpy_float_dropout_p_as_flash_attn_and_torch_take_it():
    q, k, v = (t.detach() for t in _leaf("func").unbind(2))
    torch.manual_seed(3)
    want = flash_attn_func(q, k, v, dropout_p=0.25, backend="cpu")
    torch.manual_seed(3)
    assert torch.equal(flash_attn_func(q, k, v, dropout_p=np.float32(0.25), backend="cpu"), want)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) -> (B, H, T, D)
    torch.manual_seed(3)
    want = scaled_dot_product_attention(qt, kt, vt, dropout_p=0.25)
    torch.manual_seed(3)
    assert torch.equal(scaled_dot_product_attention(qt, kt, vt, dropout_p=np.float64(0.25)), want)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        flash_attn_func(q, k, v, dropout_p=np.bool_(True))


def test_lse_grad_is_a_bool():
    with pytest.raises(TypeError, match="lse_grad must be a bool"):
        _call("func", _leaf("func"), "cpu", lse_grad=1)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: flash_attn_func(*_leaf("func").unbind(2), window_size=(0.5, 0)), TypeError),
        (lambda: flash_attn_func(*_leaf("func").unbind(2), dropout_p=1.0), ValueError),
        (lambda: flash_attn_func(_leaf("func")[:, :, 0].long(), *_leaf("func").unbind(2)[1:]), TypeError),
        (lambda: flash_attn_qkvpacked_func(_leaf("func")[:, :, :2]), ValueError),
        (
            lambda: flash_attn_with_kvcache(
                torch.randn(2, 1, 2, 32), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
            ),
            ValueError,
        ),
        (lambda: flash_attn_with_kvcache(torch.randn(2, 1, 2, 32), "k", torch.randn(2, 8, 2, 32)), TypeError),
        (lambda: scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 32), dropout_p=-0.1), ValueError),
    ],  # fmt: skip
)
def test_flash_attn_checks_raise_what_flash_attn_and_fasttrain_clients_catch(call, error):
    # flash-attn's TORCH_CHECKs raise RuntimeError; fasttrain's rule is ValueError / TypeError: both catch these
    for caught in (RuntimeError, error):
        with pytest.raises(caught):
            call()
