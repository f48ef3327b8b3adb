"""fasttrain.flash_attn.ops.triton.layer_norm (fasttrain.ops.dropout_add_norm) against flash-attn's references
(layer_norm_ref, rms_norm_ref, the masks replayed): outputs and every gradient by flash-attn's rule (at most twice the
error of the reference computed in the inputs' dtypes, both against the fp32 one, plus an atol), each flag, awkward
row counts and widths, mixed dtypes; the return structure in every combination, the residual stream's dtype, out_dtype
and autocast, out= and residual_out=, the dropout masks, the RMSNorm module, layer_norm_linear_fn, which calls take
fasttrain's fused add + norm as it is, and the errors. Under TRITON_INTERPRET (the conftest) the fp32 cases run the
norm on the Triton kernels; the half-precision ones take the reference backend, as a CPU user's calls do: the
interpreter converts fp32 to bf16/fp16 by truncation, not rounding as a GPU does, which doubles the output's error and
is not the kernel's. flash-attn's own test file runs through tools/flash_attn_suite.py."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.flash_attn.ops.triton.layer_norm import (
    RMSNorm,
    layer_norm_fn,
    layer_norm_linear_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_ref,
)
from fasttrain.ops import dropout_add_norm, norms

# (x dtype, residual dtype, weight dtype), as flash-attn's test pairs them
DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),
]
# other_bias: LayerNorm without a bias, RMSNorm with one (flash-attn adds it after the scaling)
FLAGS = ("residual", "prenorm", "dropout", "rowscale", "x1", "weight1", "zero_centered", "other_bias")
# The default grid: the common pre-norm block, then each other flag once on top of it, and a few together.
CASES = [
    (),
    ("residual", "prenorm"),
    ("prenorm",),
    ("residual", "dropout"),
    ("residual", "prenorm", "rowscale"),
    ("residual", "prenorm", "x1", "dropout"),
    ("weight1", "prenorm"),
    ("residual", "x1", "weight1", "zero_centered"),
    ("rowscale", "dropout", "zero_centered", "prenorm"),
    ("residual", "prenorm", "other_bias"),
    ("weight1", "other_bias"),
]


# Every combination but rowscale with x1, which raises (test_errors).
EVERY_FLAG = [
    flags
    for on in itertools.product([False, True], repeat=len(FLAGS))
    if not {"rowscale", "x1"} <= set(flags := tuple(f for f, o in zip(FLAGS, on) if o))
]


def _atol(*dtypes):
    return 5e-2 if torch.bfloat16 in dtypes else 1e-2 if torch.float16 in dtypes else 1e-4


def _assert_close(ours, same_dtype, fp32, atol, what):
    """flash-attn's rule: |ours - fp32| <= 2 |same_dtype - fp32| + atol, in the largest entry. Where the two
    references agree exactly (a bf16 x with an fp32 weight computes alike), same_dtype is perturbed by its own dtype's
    rounding (* 0.3 / 0.3), as flash-attn's test does, so that a last-bit difference in ours is not held to zero; the
    same_dtype reference's NaN entries are left out of its error, as there."""
    ours_err = (ours.float() - fp32.float()).abs().max().item()  # NaN in ours fails
    finite = ~same_dtype.isnan()  # fp16's reference overflows to NaN at times (x^2 summed over 3000 in fp16)
    same_dtype, fp32 = same_dtype[finite], fp32[finite]
    ref_err = (same_dtype.float() - fp32.float()).abs().max().item()
    if ref_err == 0:
        ref_err = (same_dtype * 0.3 / 0.3 - fp32).float().abs().max().item()
    assert ours_err <= 2 * ref_err + atol, f"{what}: error {ours_err:.3g}, the reference's {ref_err:.3g}"


def _inputs(shape, dtypes, flags, is_rms, seed=0):
    x_dtype, res_dtype, w_dtype = dtypes
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]

    def rand(shape, dtype):
        return torch.randn(shape, generator=g).to(dtype).requires_grad_()

    with_bias = is_rms == ("other_bias" in flags)
    t = {"x": rand(shape, x_dtype), "weight": rand(N, w_dtype), "bias": rand(N, w_dtype) if with_bias else None}
    if "residual" in flags:
        t["residual"] = rand(shape, res_dtype)
    if "x1" in flags:
        t["x1"] = rand(shape, x_dtype)
    if "weight1" in flags:
        t["weight1"], t["bias1"] = rand(N, w_dtype), rand(N, w_dtype) if with_bias else None
    if "rowscale" in flags:
        t["rowscale"] = torch.randn(shape[:-1], generator=g).to(x_dtype)
    return t


def _copies(t):
    return {k: None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}


def _check_against_reference(shape, dtypes, flags, is_rms, monkeypatch):
    if dtypes != (torch.float32,) * 3:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # see the module docstring
    x_dtype, res_dtype, w_dtype = dtypes
    p = 0.27 if "dropout" in flags else 0.0
    prenorm, zero_centered = "prenorm" in flags, "zero_centered" in flags
    ours = _inputs(shape, dtypes, flags, is_rms)
    # No residual: the stream is fp32 by residual_in_fp32 where the dtypes pair x with an fp32 residual.
    in_fp32 = "residual" not in flags and res_dtype == torch.float32
    got = layer_norm_fn(**ours, eps=1e-6, dropout_p=p, prenorm=prenorm, residual_in_fp32=in_fp32,
                        zero_centered_weight=zero_centered, is_rms_norm=is_rms, return_dropout_mask=True)  # fmt: skip
    *outs, mask, mask1 = got
    assert (mask is None) == (p == 0) and (mask1 is None) == (p == 0 or "x1" not in flags)
    ref = rms_norm_ref if is_rms else layer_norm_ref
    refs = []
    for upcast in (False, True):
        inputs = _copies(ours)
        refs.append((inputs, ref(**inputs, eps=1e-6, dropout_p=p, prenorm=prenorm, zero_centered_weight=zero_centered,
                                 dropout_mask=mask, dropout_mask1=mask1, upcast=upcast)))  # fmt: skip
    (pt_in, pt_out), (ref_in, ref_out) = refs
    pt_out, ref_out = (o if isinstance(o, tuple) else (o,) for o in (pt_out, ref_out))
    atol = _atol(*dtypes)
    assert len(outs) == len(pt_out) == len(ref_out)
    for i, (o, o_pt, o_ref) in enumerate(zip(outs, pt_out, ref_out)):
        _assert_close(o, o_pt, o_ref, atol, f"output {i}")
    assert outs[0].dtype == x_dtype
    if prenorm:
        assert outs[-1].dtype == (res_dtype if "residual" in flags or in_fp32 else x_dtype)
    # A loss through every output (the stream's too), as flash-attn's test takes it.
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def loss(outs, fp32=False):
        y = outs[0] * F.gelu(outs[1]) if "weight1" in flags else outs[0]
        if prenorm:
            y = y * torch.sigmoid(outs[-1].to(res_dtype if fp32 else outs[-1].dtype))
        return (y.float() * g).sum()

    names = [k for k, v in ours.items() if v is not None and v.requires_grad]
    dgot = torch.autograd.grad(loss(outs), [ours[k] for k in names])
    dpt = torch.autograd.grad(loss(pt_out), [pt_in[k] for k in names])
    dref = torch.autograd.grad(loss(ref_out, fp32=True), [ref_in[k] for k in names])
    for name, a, b, c in zip(names, dgot, dpt, dref):
        assert a.dtype == ours[name].dtype, name
        _assert_close(a, b, c, atol, f"d{name}")


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("flags", CASES, ids=lambda f: "+".join(f) or "plain")
def test_matches_reference(flags, dtypes, is_rms, monkeypatch):
    _check_against_reference((97, 192), dtypes, flags, is_rms, monkeypatch)


# The interpreted Triton kernels (fp32) at one row of 3000; 97 rows of 3000 take the reference in fp16 (seconds less).
@pytest.mark.parametrize(
    "shape, dtypes", [((1, 3000), DTYPES[0]), ((1, 3000), DTYPES[1]), ((97, 3000), DTYPES[1]), ((1, 1, 192), DTYPES[0])]
)
@pytest.mark.parametrize("flags", [("residual", "prenorm"), ("residual", "prenorm", "x1", "weight1", "dropout")])
def test_matches_reference_awkward_shapes(shape, dtypes, flags, monkeypatch):
    _check_against_reference(shape, dtypes, flags, False, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("shape", [(1, 192), (97, 192), (97, 3000)])
@pytest.mark.parametrize("flags", EVERY_FLAG, ids=lambda f: "+".join(f) or "plain")
def test_matches_reference_every_flag(flags, shape, dtypes, is_rms, monkeypatch):
    _check_against_reference(shape, dtypes, flags, is_rms, monkeypatch)


def test_return_structure():
    x, w, b = torch.randn(2, 3, 16), torch.randn(16), torch.randn(16)
    for weight1, prenorm, masks, p in itertools.product([None, w], [False, True], [False, True], [0.0, 0.5]):
        got = layer_norm_fn(x, w, b, weight1=weight1, prenorm=prenorm, return_dropout_mask=masks, dropout_p=p)
        count = 1 + (weight1 is not None) + prenorm + 2 * masks
        if count == 1:
            assert isinstance(got, torch.Tensor) and got.shape == x.shape
            continue
        assert isinstance(got, tuple) and len(got) == count
        assert all(t.shape == x.shape for t in got[: count - 2 * masks])
        if masks:
            assert got[-1] is None and (got[-2] is None) == (p == 0)
            assert p == 0 or got[-2].dtype == torch.bool and got[-2].shape == x.shape


def test_residual_stream_dtype_and_identity():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8)
    y, s = rms_norm_fn(x, w, None, prenorm=True)
    assert s.dtype == torch.bfloat16 and s.data_ptr() == x.data_ptr() and s.shape == x.shape  # x itself
    assert rms_norm_fn(x, w, None, prenorm=True, residual_in_fp32=True)[1].dtype == torch.float32
    res = torch.randn(4, 8, dtype=torch.float16)
    # The residual's dtype, whatever residual_in_fp32 says and whatever x + residual would promote to.
    y, s = rms_norm_fn(x.float(), w, None, residual=res, prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.float16 and y.dtype == torch.float32
    y, s = rms_norm_fn(x, w, None, residual=res, prenorm=True)
    assert s.dtype == torch.float16 and y.dtype == torch.bfloat16
    assert torch.equal(s, (x.float() + res.float()).half())
    # With dropout and no residual, the stream is the dropped-out x in x's dtype.
    y, s, mask, _ = rms_norm_fn(x, w, None, dropout_p=0.5, prenorm=True, return_dropout_mask=True)
    assert s.dtype == torch.bfloat16 and torch.equal(s, (x.float() * mask * 2).bfloat16())


def test_out_dtype_and_autocast():
    x, w, b = torch.randn(5, 32), torch.randn(32), torch.randn(32)
    assert layer_norm_fn(x, w, b, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    want = layer_norm_ref(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # flash-attn's kernel ignores autocast: x's dtype
        got = layer_norm_fn(x, w, b)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)


def test_out_and_residual_out_are_written():
    x, res, w = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16), torch.randn(16)
    out, res_out = torch.empty(6, 16, dtype=torch.float16), torch.empty(2, 3, 16)
    y, s = layer_norm_fn(x, w, None, residual=res, prenorm=True, out=out, residual_out=res_out)
    want_y, want_s = layer_norm_ref(x, w, None, residual=res, prenorm=True)
    assert y.data_ptr() == out.data_ptr() and y.shape == x.shape and y.dtype == torch.float16
    assert s.data_ptr() == res_out.data_ptr() and torch.equal(res_out, want_s)
    assert torch.allclose(out.view_as(y).float(), want_y, atol=1e-2)
    y.float().sum().backward()  # the gradient passes through the copy
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer_norm_fn(x, w, None, residual=res, residual_out=res_out.zero_())  # written without prenorm too
    assert torch.equal(res_out, want_s)


def test_dropout_masks():
    x, x1, w = torch.randn(64, 256), torch.randn(64, 256), torch.randn(256)
    torch.manual_seed(3)
    y, mask, mask1 = layer_norm_fn(x, w, None, x1=x1, dropout_p=0.3, return_dropout_mask=True)
    for m in (mask, mask1):
        assert abs((1 - m.float().mean()).item() - 0.3) < 0.02
    assert not torch.equal(mask, mask1)
    # The masks returned are the ones applied, and torch's generator draws them.
    want = layer_norm_ref(x, w, None, x1=x1, dropout_p=0.3, dropout_mask=mask, dropout_mask1=mask1)
    assert torch.allclose(y, want, atol=1e-5)
    torch.manual_seed(3)
    assert torch.equal(layer_norm_fn(x, w, None, x1=x1, dropout_p=0.3, return_dropout_mask=True)[1], mask)
    # p = 1 drops everything: the norm of zeros (the bias), with finite gradients.
    xg = x.clone().requires_grad_()
    b = torch.randn(256)
    y = layer_norm_fn(xg, w, b, dropout_p=1.0)
    y.sum().backward()
    assert torch.allclose(y, b.expand_as(y)) and torch.equal(xg.grad, torch.zeros_like(x))


def test_a_dropped_inf_or_nan_is_zero_as_flash_attns():
    x = torch.tensor([[float("inf"), 1.0, 2.0, 3.0], [float("nan"), 1.0, 2.0, 3.0]])
    w, b = torch.ones(4), torch.zeros(4)
    torch.manual_seed(0)
    while True:  # a draw that drops column 0 of both rows and keeps the rest of at least one
        y, mask, _ = layer_norm_fn(x, w, b, dropout_p=0.5, return_dropout_mask=True)
        if not mask[:, 0].any():
            break
    assert torch.equal(y.isnan(), torch.zeros_like(mask))  # no NaN from inf * 0
    torch.testing.assert_close(y, layer_norm_ref(x, w, b, dropout_p=0.5, dropout_mask=mask))
    assert torch.equal(layer_norm_fn(x, w, b + 0.5, dropout_p=1.0), (b + 0.5).expand_as(x))


def test_rowscale_gets_no_gradient():
    x, w = torch.randn(3, 4, 8, requires_grad=True), torch.randn(8)
    rowscale = torch.rand(3, 4, requires_grad=True)
    y = layer_norm_fn(x, w, None, rowscale=rowscale)
    assert torch.allclose(y, layer_norm_ref(x, w, None, rowscale=rowscale), atol=1e-5)
    y.sum().backward()
    assert rowscale.grad is None and x.grad is not None


def test_common_calls_take_the_fused_add_norm_as_given(monkeypatch):
    """No dropout, rowscale or x1: fasttrain's norm op gets x and residual themselves (its fused add); otherwise
    the fp32 pre-add result, and the residual still goes to the fused add."""
    calls = []
    norm = norms._norm
    monkeypatch.setattr(norms, "_norm", lambda *a: calls.append(a) or norm(*a))
    x, res, w = torch.randn(2, 3, 64, dtype=torch.bfloat16), torch.randn(2, 3, 64), torch.randn(64)
    rms_norm_fn(x, w, None, residual=res, prenorm=True, residual_in_fp32=True)
    ((branch, residual, n, *_, out_dtype),) = calls
    assert branch.data_ptr() == x.data_ptr() and residual.data_ptr() == res.data_ptr() and n == 64
    assert out_dtype == torch.bfloat16
    calls.clear()
    rms_norm_fn(x, w, None, residual=res, dropout_p=0.1)
    ((branch, residual, *_),) = calls
    assert branch.dtype == torch.float32 and residual.data_ptr() == res.data_ptr()


def test_aot_column_takes_the_given_output_dtype(monkeypatch):
    """The aot column's dtype profiles read out_dtype when the caller gives it (a bf16 branch onto an fp32 stream,
    output bf16, is the shipped mixed profile, without autocast)."""
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    x, res, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64), torch.randn(64)
    assert norms._aot_reason(x, 64, res, w, None, torch.bfloat16) is None
    assert norms._aot_reason(x, 64, res, w, None, torch.float32) is not None
    assert norms._aot_reason(x, 64, res, w, None) is not None  # no autocast: the output would be fp32


def test_rms_norm_module():
    torch.manual_seed(0)
    assert RMSNorm(48, dtype=torch.float16, device="meta").weight.dtype == torch.float16
    m = RMSNorm(48, eps=1e-5, dropout_p=0.5)
    assert torch.equal(m.weight, torch.ones(48))
    assert m.bias is None and m.eps == 1e-5 and m.drop.p == 0.5
    zc = RMSNorm(48, zero_centered_weight=True)
    assert torch.equal(zc.weight, torch.zeros(48))
    with torch.no_grad():
        zc.weight.uniform_()
    zc.reset_parameters()
    assert torch.equal(zc.weight, torch.zeros(48))
    x, res = torch.randn(3, 48), torch.randn(3, 48)
    m.eval()  # no dropout outside training
    y, s = m(x, residual=res, prenorm=True)
    want_y, want_s = rms_norm_ref(x, m.weight, None, residual=res, eps=1e-5, prenorm=True)
    assert torch.allclose(y, want_y, atol=1e-6) and torch.equal(s, want_s)
    assert torch.allclose(zc(x), rms_norm_ref(x, zc.weight, None, eps=1e-5, zero_centered_weight=True), atol=1e-6)
    m.train()
    assert not torch.allclose(m(x), rms_norm_ref(x, m.weight, None, eps=1e-5))
    assert RMSNorm(48).drop is None


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("is_rms", [False, True])
def test_layer_norm_linear_fn(is_rms, prenorm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g).requires_grad_()
    res = torch.randn(2, 5, 64, generator=g).requires_grad_()
    nw, nb = torch.randn(64, generator=g).requires_grad_(), None if is_rms else torch.randn(64, generator=g)
    lw, lb = torch.randn(96, 64, generator=g).requires_grad_(), torch.randn(96, generator=g).requires_grad_()
    got = layer_norm_linear_fn(x, nw, nb, lw, lb, residual=res, prenorm=prenorm, is_rms_norm=is_rms)
    y, s = (rms_norm_ref if is_rms else layer_norm_ref)(x, nw, nb, residual=res, prenorm=True)
    want = F.linear(y, lw, lb)
    out = got[0] if prenorm else got
    assert torch.allclose(out, want, atol=1e-4)
    if prenorm:
        assert torch.equal(got[1], s)
    leaves = [x, res, nw, lw, lb]
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        assert torch.allclose(a, b, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer_norm_linear_fn(x, nw, nb, lw, lb, residual=res, prenorm=prenorm, is_rms_norm=is_rms)
    out = out[0] if prenorm else out
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), want, atol=0.5)


def test_errors():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    bad = [
        (dict(x=x.long(), weight=w, bias=b), TypeError, "x must be a floating-point tensor"),
        (dict(x=x, weight=None, bias=b), TypeError, r"weight must be a tensor of shape \(8,\)"),
        (dict(x=x, weight=torch.randn(7), bias=b), ValueError, r"weight must have shape \(8,\)"),
        (dict(x=x, weight=w, bias=torch.randn(2, 8)), ValueError, "bias must have shape"),
        (dict(x=x, weight=w, bias=b, residual=torch.randn(4, 9)), ValueError, "residual must have shape"),
        (dict(x=x, weight=w, bias=b, x1=torch.randn(3, 8)), ValueError, "x1 must have shape"),
        (dict(x=x, weight=w, bias=b, weight1=torch.randn(8).int()), TypeError, "weight1 must be a floating"),
        (dict(x=x, weight=w, bias=b, bias1=b), ValueError, "bias1 .* needs weight1"),
        (dict(x=x, weight=w, bias=b, x1=x, rowscale=torch.ones(4)), ValueError, "rowscale must be None when x1"),
        (dict(x=x, weight=w, bias=b, rowscale=torch.ones(5)), ValueError, "rowscale must be a tensor of one factor"),
        (dict(x=x, weight=w, bias=b, eps=-1.0), ValueError, "eps must be a float >= 0"),
        (dict(x=x, weight=w, bias=b, dropout_p=1.5), ValueError, r"dropout_p must be a float in \[0, 1\]"),
        (dict(x=x, weight=w, bias=b, out_dtype=torch.int32), TypeError, "out_dtype must be None or a floating"),
        (dict(x=x, weight=w, bias=b, out=torch.empty(4, 9)), ValueError, "out must hold x's rows"),
        (dict(x=x, weight=w, bias=b, residual_out=torch.empty(8, 4).t()), ValueError, "residual_out must be viewable"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match="layer_norm_fn: " + message):
            layer_norm_fn(**kwargs)
    with pytest.raises(ValueError, match="rms_norm_fn: eps"):
        rms_norm_fn(x, w, None, eps=-1.0)
    with pytest.raises(ValueError, match=r"layer_norm_linear_fn: linear_weight must be \(K, 8\)"):
        layer_norm_linear_fn(x, w, b, torch.randn(4, 7), None)
    with pytest.raises(ValueError, match=r"layer_norm_linear_fn: norm_weight must have shape \(8,\)"):
        layer_norm_linear_fn(x, torch.randn(7), b, torch.randn(4, 8), None)
    with pytest.raises(ValueError, match=r"layer_norm_linear_fn: linear_bias must have shape \(4,\)"):
        layer_norm_linear_fn(x, w, b, torch.randn(4, 8), torch.randn(5))


def test_references_are_the_plain_norms():
    x, res, w, b = torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.randn(16), torch.randn(16)
    assert torch.allclose(layer_norm_ref(x, w, b, residual=res), F.layer_norm(x + res, (16,), w, b, 1e-6))
    y, s = rms_norm_ref(x, w, None, residual=res, prenorm=True, eps=1e-5)
    assert torch.allclose(y, F.rms_norm(x + res, (16,), w, 1e-5), atol=1e-6) and torch.equal(s, x + res)
    assert dropout_add_norm.layer_norm_fn is layer_norm_fn
