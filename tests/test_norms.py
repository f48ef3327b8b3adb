"""fasttrain.ops.layer_norm / rms_norm and the fused add_layer_norm / add_rms_norm: the Triton kernels (interpreted
on CPU) against torch in float64 for outputs and every gradient, with and without affine parameters, awkward widths,
leading dims, strided inputs, mixed branch/stream dtypes, unused outputs, autocast's output dtype, the torch.compile
registration, the fallback for wide rows and input errors. GPU tests (`pytest -m gpu`) hold bf16/fp16 to twice
torch's own error."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.kernels import norms as kernels
from fasttrain.model.norms import LayerNorm, RMSNorm
from fasttrain.ops.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm

from helpers import TOL_FP32, assert_within_2x_torch, err, float64_leaves, grads

TOL = TOL_FP32["norms"]
BACKENDS = ["triton", "reference"]  # the reference computes its gradients in closed form, as the kernel: both tested


def _run(kind, x, w, b, backend, eps=1e-5):
    if kind == "layer":
        return layer_norm(x, x.shape[-1:], w, b, eps, backend=backend)
    return rms_norm(x, x.shape[-1:], w, eps, backend=backend)


def _torch(kind, x, w, b, eps=1e-5):
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    return F.rms_norm(x, x.shape[-1:], w, eps)


def _leaves(M, N, weight, bias, dtype=torch.float32, device="cpu", seed=0):
    """x (M, N) unit normal; weight near 1 and bias near 0 as trained norms have them, random so every element
    counts; each a leaf requiring grad, or None."""
    g = torch.Generator(device=device).manual_seed(seed)
    x, w, b = (torch.randn(shape, generator=g, device=device) for shape in ((M, N), (N,), (N,)))
    return [
        t.to(dtype).requires_grad_() if on else None for t, on in ((x, True), (1 + 0.5 * w, weight), (0.5 * b, bias))
    ]


def _theirs(backend, grads):
    """torch's same-dtype gradients, for the reference backend's bound (_bound); nothing for the kernels'."""
    return grads() if backend == "reference" else (None,) * 4


def _bound(tol, theirs, want):
    """The bound on a gradient's error against float64 `want`: tol for the kernels; for the reference, which runs
    torch's own LayerNorm backward, tol or twice the error of torch's same-dtype gradient `theirs`, where larger (at
    N = 1 torch's fp32 weight gradient is off by ~4e-5: it forms x * rstd - mean * rstd, not (x - mean) * rstd)."""
    return tol if theirs is None else max(tol, 2 * err(theirs, want))


# (rows, width): a single element, a tiny odd row, GPT-2's 768, one over a power of two, the widest in registers.
SIZES = [(3, 1), (97, 7), (5, 768), (4, 1025), (2, kernels.MAX_N)]


@pytest.mark.parametrize("M,N", SIZES, ids=str)
@pytest.mark.parametrize("kind,affine", [("layer", "wb"), ("layer", "w"), ("layer", ""), ("rms", "w"), ("rms", "")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_float64(M, N, kind, affine, backend):
    x, w, b = _leaves(M, N, "w" in affine, "b" in affine)
    y = _run(kind, x, w, b, backend)
    leaves64 = float64_leaves(x, w, b)
    want = _torch(kind, *leaves64)
    assert y.dtype == x.dtype and y.shape == x.shape and err(y, want) < TOL
    upstream = torch.randn_like(want)
    torch_grads = _theirs(backend, lambda: grads(_torch(kind, x, w, b), (x, w, b), upstream.float()))
    for got, ref, theirs in zip(grads(y, (x, w, b), upstream.float()), grads(want, leaves64, upstream), torch_grads):
        assert (got is None) == (ref is None)
        if got is not None:
            assert got.dtype == torch.float32 and err(got, ref) < _bound(TOL, theirs, ref)


def test_leading_dims_multi_dim_shape_and_strided_input_match_torch():
    base = torch.randn(2, 6, 3, 5, requires_grad=True)
    x = base.transpose(0, 1)  # (6, 2, 3, 5), not contiguous
    w, b = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    y = layer_norm(x, (3, 5), w, b, backend="triton")
    want = F.layer_norm(x, (3, 5), w, b)
    assert y.shape == x.shape and err(y, want) < TOL
    upstream = torch.randn_like(y)
    for got, ref in zip(
        torch.autograd.grad(y, (base, w, b), upstream), torch.autograd.grad(want, (base, w, b), upstream)
    ):
        assert err(got, ref) < TOL


@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
def test_two_dim_strided_rows_and_strided_weight_match_torch(layout):
    # 2-D rows go to the kernel without a reshape when their columns are unit-stride; 1-D weights without a copy
    # when unit-stride: both fast paths, and the layouts that must not take them.
    if layout == "row-strided":
        base = torch.randn(6, 40, requires_grad=True)
        x = base[:, 3:27]  # (6, 24), row stride 40
    else:
        base = torch.randn(24, 6, requires_grad=True)
        x = base.t()  # (6, 24), column stride 6
    wide = torch.randn(48, requires_grad=True)
    w, b = wide[::2], torch.randn(24, requires_grad=True)  # w: stride 2
    for add in (False, True):
        r = torch.randn(6, 24, requires_grad=True) if add else None
        leaves = (base, wide, b) + ((r,) if add else ())
        if add:
            y, s = add_layer_norm(x, r, (24,), w, b, backend="triton")
            want_s = x + r
            want = F.layer_norm(want_s, (24,), w, b)
            assert err(s, want_s) < TOL
        else:
            y, want = layer_norm(x, (24,), w, b, backend="triton"), F.layer_norm(x, (24,), w, b)
        assert y.shape == x.shape and err(y, want) < TOL
        upstream = torch.randn_like(y)
        for got, ref in zip(torch.autograd.grad(y, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
            assert err(got, ref) < TOL


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(
    "normalized_shape", [torch.Size([24]), [24], (np.int64(24),)], ids=["Size", "list", "numpy-int"]
)
def test_normalized_shape_takes_what_torch_takes(normalized_shape, backend):
    x = torch.randn(5, 24)
    assert err(layer_norm(x, normalized_shape, backend=backend), F.layer_norm(x, (24,))) < TOL
    assert err(rms_norm(x, normalized_shape, backend=backend), F.rms_norm(x, (24,))) < TOL


@pytest.mark.parametrize(
    "normalized_shape",
    [24, np.int64(24), (), [], torch.Size([]), (True,)],
    ids=["int", "numpy-int", "()", "[]", "Size()", "bool"],
)
def test_normalized_shape_torch_refuses_raises_its_exception(normalized_shape):
    # torch's F.layer_norm / F.rms_norm: a bare int is a TypeError, no dims a RuntimeError (input 0-dim too)
    for x in (torch.randn(5, 24), torch.randn(())):
        for ours, theirs in ((layer_norm, F.layer_norm), (rms_norm, F.rms_norm)):
            with pytest.raises(Exception) as want:
                theirs(x, normalized_shape)
            with pytest.raises(want.type, match="normalized_shape"):
                ours(x, normalized_shape)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def test_parameter_dtypes_as_torchs_cpu_norms_take_them():
    # layer_norm: weight and bias of x's dtype, or fp32 ones with fp16/bf16 x, else torch's RuntimeError; rms_norm:
    # any weight dtype, the output in x's. Values as torch's where it takes them (the check precedes the choice).
    x32 = torch.randn(5, 24)
    for x_dtype, w_dtype, b_dtype in itertools.product(_FLOATS, (*_FLOATS, None), (*_FLOATS, None)):
        x = x32.to(x_dtype)
        w = None if w_dtype is None else torch.randn(24, dtype=w_dtype)
        b = None if b_dtype is None else torch.randn(24, dtype=b_dtype)
        tol = TOL if x_dtype in (torch.float32, torch.float64) else 1e-2
        for ours, theirs, params in (
            (layer_norm, F.layer_norm, (w, b)),
            (rms_norm, F.rms_norm, (w,)),
        ):
            if ours is rms_norm and b_dtype is not None:
                continue
            try:
                want = theirs(x, (24,), *params)
            except RuntimeError:
                with pytest.raises(RuntimeError, match="weight and bias must have input's dtype"):
                    ours(x, (24,), *params, backend="reference")
                continue
            got = ours(x, (24,), *params, backend="reference")
            assert got.dtype == want.dtype and err(got, want) < tol, (ours.__name__, x_dtype, w_dtype, b_dtype)


def test_rms_norm_default_eps_is_torchs():
    x = 1e-4 * torch.randn(4, 16)  # tiny rows, where eps matters
    assert err(rms_norm(x, (16,), backend="triton"), F.rms_norm(x, (16,))) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_of_half_rows_is_torchs(dtype):
    # torch takes its computation type's epsilon (float32's), not finfo(fp16 or bf16).eps, 1e4 times larger
    x = (1e-2 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))).to(dtype)
    r = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).to(dtype) * 1e-3
    backends = ["reference"] if dtype == torch.bfloat16 else BACKENDS  # the interpreter's bf16 (docs/platform.md)
    for backend in backends:
        assert err(rms_norm(x, (16,), backend=backend), F.rms_norm(x, (16,))) < 1e-2
        y, s = add_rms_norm(x, r, (16,), backend=backend)
        assert err(y, F.rms_norm(s, (16,))) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_normalized_shape_of_every_dim_of_a_2d_input(kind, backend):
    # (3, 7) normalized over (3, 7): one row of 21, not three rows of 7
    x, w, b = _leaves(3, 7, True, kind == "layer")
    w2, b2 = w.detach().reshape(1, 7).expand(3, 7).contiguous().requires_grad_(), None
    if b is not None:
        b2 = b.detach().reshape(1, 7).expand(3, 7).contiguous().requires_grad_()
    ours = (
        layer_norm(x, (3, 7), w2, b2, backend=backend) if kind == "layer" else rms_norm(x, [3, 7], w2, backend=backend)
    )
    want = F.layer_norm(x, (3, 7), w2, b2) if kind == "layer" else F.rms_norm(x, [3, 7], w2)
    assert err(ours, want) < TOL
    inputs = [t for t in (x, w2, b2) if t is not None]
    dy = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    for got, ref in zip(grads(ours, inputs, dy), grads(want, inputs, dy)):
        assert err(got, ref) < TOL


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_autocast_writes_the_autocast_dtype(kind, backend):
    # fp16, not bf16: the interpreter's fp32 -> bf16 store truncates (docs/platform.md); a GPU test checks bf16.
    x, w, b = _leaves(8, 96, True, kind == "layer")
    with torch.autocast("cpu", dtype=torch.float16):
        y = _run(kind, x, w, b, backend)
        torch_y = _torch(kind, x, w, b)  # fp32 out: torch's autocast runs norms in fp32
    assert torch_y.dtype == torch.float32 and y.dtype == torch.float16
    # The same fp32 value (up to summation order) rounded once: at most one fp16 step apart.
    assert torch.allclose(y.float(), torch_y.half().float(), rtol=2**-10, atol=0)
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == torch.float32


def test_compiles_with_fullgraph():
    x, w, b = _leaves(6, 40, True, True)
    step = torch.compile(lambda x, w, b: layer_norm(x, (40,), w, b, backend="triton"), fullgraph=True, backend="eager")
    y = step(x, w, b)
    want = F.layer_norm(x, (40,), w, b)
    assert err(y, want) < TOL
    for got, ref in zip(torch.autograd.grad(y.sum(), (x, w, b)), torch.autograd.grad(want.sum(), (x, w, b))):
        assert err(got, ref) < TOL


def test_rows_wider_than_the_kernel_take_the_reference_or_refuse():
    x = torch.randn(2, kernels.MAX_N + 1)
    with pytest.raises(_backend.BackendError, match=f"exceed the kernels' {kernels.MAX_N}"):
        layer_norm(x, x.shape[-1:], backend="triton")
    with pytest.warns(RuntimeWarning, match="reference"):
        y = layer_norm(x, x.shape[-1:])
    assert err(y, F.layer_norm(x, x.shape[-1:])) < TOL


@pytest.mark.parametrize(
    "module,torch_module",
    [
        (LayerNorm(24, bias=True), nn.LayerNorm(24)),
        (LayerNorm(24, bias=False), nn.LayerNorm(24, bias=False)),
        (RMSNorm(24, eps=1e-6), nn.RMSNorm(24, eps=1e-6)),
    ],
)
def test_modules_are_torchs_with_the_fused_op(module, torch_module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    torch_module.load_state_dict(module.state_dict())  # same keys and shapes: checkpoints move both ways
    x = torch.randn(3, 5, 24, requires_grad=True)
    y, want = module(x), torch_module(x)
    assert err(y, want) < TOL
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *module.parameters()), upstream)
    want_grads = torch.autograd.grad(want, (x, *torch_module.parameters()), upstream)
    for got, ref in zip(grads, want_grads):
        assert err(got, ref) < TOL


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w: layer_norm(x.long(), (8,)), TypeError, "input must be a floating-point"),
        (lambda x, w: layer_norm(x, (7,)), ValueError, r"normalized_shape must be the trailing dims of input \(4, 8\)"),
        (lambda x, w: layer_norm(x, (2, 4, 8)), ValueError, "normalized_shape"),
        (lambda x, w: layer_norm(x, (8.0,)), TypeError, r"normalized_shape must be .* got \(8.0,\)"),
        (lambda x, w: layer_norm(x, 8.0), TypeError, "normalized_shape"),
        (lambda x, w: layer_norm(x, (8,), w[:4]), ValueError, r"weight must have shape \(8,\), got \(4,\)"),
        (lambda x, w: layer_norm(x, (8,), w, w[:3]), ValueError, "bias must have shape"),
        (lambda x, w: rms_norm(x, (8,), w.long()), TypeError, "weight must be a floating-point"),
        (lambda x, w: layer_norm(x, (8,), eps=-1.0), ValueError, "eps must be a float >= 0"),
        (lambda x, w: rms_norm(x, (8,), eps="1e-6"), TypeError, "eps"),
        (lambda x, w: rms_norm(x, (8,), backend="cuda"), Exception, "cuda"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 8), torch.randn(8))


# ---- the residual add fused in -------------------------------------------------------------------------------------


def _run_add(kind, x, r, w, b, backend, eps=1e-5):
    if kind == "layer":
        return add_layer_norm(x, r, x.shape[-1:], w, b, eps, backend=backend)
    return add_rms_norm(x, r, x.shape[-1:], w, eps, backend=backend)


def _torch_add(kind, x, r, w, b, eps=1e-5):
    s = x + r
    return _torch(kind, s, w, b, eps), s


# (branch dtype, residual dtype): fp32; a half-precision branch onto an fp32 stream, as under autocast; the reverse;
# an fp16 stream, where s is rounded before it is normalized.
ADD_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize("M,N", SIZES, ids=str)
@pytest.mark.parametrize("kind,affine", [("layer", "wb"), ("layer", ""), ("rms", "w")])
@pytest.mark.parametrize("dtypes", ADD_DTYPES, ids=lambda d: f"{str(d[0])[6:]}+{str(d[1])[6:]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_matches_torch_float64(M, N, kind, affine, dtypes, backend):
    x, w, b = _leaves(M, N, "w" in affine, "b" in affine, seed=1)
    x = x.detach().to(dtypes[0]).requires_grad_()
    r = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(dtypes[1]).requires_grad_()
    y, stream = _run_add(kind, x, r, w, b, backend)
    wide = torch.promote_types(*dtypes)
    assert y.dtype == stream.dtype == wide and y.shape == stream.shape == x.shape
    # The float64 reference rounds s to the stream's dtype, as `s = x + r` does, with the gradient passing straight
    # through the rounding; y is the norm of s as stored (and what backward reads), rounded once to y's dtype.
    leaves64 = float64_leaves(x, r, w, b)
    exact = leaves64[0] + leaves64[1]
    want_s = exact + (exact.to(wide).double() - exact).detach()
    want_y = _torch(kind, want_s, *leaves64[2:])
    half_step = 2**-11 if wide == torch.float16 else 0.0
    assert err(stream, want_s) <= half_step + 1e-7 and err(y, want_y) < TOL + half_step
    up_y, up_s = torch.randn_like(want_y), torch.randn_like(want_s)
    upstream = (up_y.to(y.dtype), up_s.to(stream.dtype))
    got = grads((y, stream), (x, r, w, b), upstream)
    ref = grads((want_y, want_s), leaves64, (up_y, up_s))
    theirs = _theirs(backend, lambda: grads(_torch_add(kind, x, r, w, b), (x, r, w, b), upstream))
    for leaf, g, want, torch_g in zip((x, r, w, b), got, ref, theirs):
        assert (g is None) == (want is None)
        if g is not None:
            # x and residual take the same gradient, each in its own dtype (one fp16 rounding where it is fp16);
            # an fp16 upstream gradient rounds once more.
            tol = TOL + 2 * half_step + (2**-11 if g.dtype == torch.float16 else 0)
            assert g.dtype == leaf.dtype and err(g, want) < _bound(tol, torch_g, want)


@pytest.mark.parametrize("used", ["normed", "stream"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_with_one_output_unused(used, backend):
    # The last norm of a model discards the stream; the other case leaves the norm's gradient absent instead.
    x, w, b = _leaves(33, 40, True, True, seed=3)
    r = torch.randn(33, 40, requires_grad=True)
    y, stream = _run_add("layer", x, r, w, b, backend)
    want_y, want_s = _torch_add("layer", x, r, w, b)
    out, want = (y, want_y) if used == "normed" else (stream, want_s)
    upstream = torch.randn_like(want)
    live = (x, r, w, b) if used == "normed" else (x, r)
    for g, ref in zip(torch.autograd.grad(out, live, upstream), torch.autograd.grad(want, live, upstream)):
        assert err(g, ref) < TOL


def test_add_norm_under_autocast_writes_the_autocast_dtype_and_an_fp32_stream():
    x, w, b = _leaves(8, 96, True, True)  # fp32 stream
    branch = torch.randn(8, 96).half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y, stream = add_layer_norm(branch, x, (96,), w, b, backend="triton")
        want_y, want_s = _torch_add("layer", branch, x, w, b)
    assert y.dtype == torch.float16 and stream.dtype == torch.float32 and torch.equal(stream, want_s)
    assert torch.allclose(y.float(), want_y.half().float(), rtol=2**-10, atol=0)


def test_add_norm_compiles_with_fullgraph():
    x, w, b = _leaves(6, 40, True, True)
    r = torch.randn(6, 40, requires_grad=True)
    step = torch.compile(
        lambda x, r, w, b: add_layer_norm(x, r, (40,), w, b, backend="triton"), fullgraph=True, backend="eager"
    )
    y, stream = step(x, r, w, b)
    want_y, want_s = _torch_add("layer", x, r, w, b)
    assert err(y, want_y) < TOL and err(stream, want_s) < TOL
    for got, ref in zip(
        torch.autograd.grad((y * stream).sum(), (x, r, w, b)),
        torch.autograd.grad((want_y * want_s).sum(), (x, r, w, b)),
    ):
        assert err(got, ref) < TOL


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_norm_modules_take_a_residual(backend, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_BACKEND", backend)
    for module in (LayerNorm(24), RMSNorm(24, eps=1e-6)):
        x, r = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
        y, stream = module(x, r)
        assert torch.equal(stream, x + r) and err(y, module(x + r)) < TOL


@pytest.mark.parametrize(
    "call,error,match",
    [
        (
            lambda x: add_layer_norm(x, x[:, :4], (8,)),
            ValueError,
            r"residual must have input's shape \(4, 8\), got \(4, 4\)",
        ),
        (lambda x: add_rms_norm(x, x.long(), (8,)), TypeError, "residual must be a floating-point"),
        (lambda x: add_layer_norm(x, None, (8,)), TypeError, "residual must be"),
        (lambda x: add_layer_norm(x, x, (7,)), ValueError, "normalized_shape"),
        (lambda x: add_rms_norm(x, x, (8,), eps=-1.0), ValueError, "add_rms_norm: eps must be a float >= 0"),
        (lambda x: add_layer_norm(x, x.double(), (8,), backend="triton"), Exception, "float64"),
    ],
)
def test_add_norm_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 8))


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N", [(1, 768), (16384, 768), (4097, 4096), (97, 1025)], ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gpu_at_most_twice_torch_error(kind, M, N, dtype):
    x, w, b = _leaves(M, N, True, kind == "layer", dtype=dtype, device="cuda")
    leaves64 = float64_leaves(x, w, b)
    want = _torch(kind, *leaves64)
    y, torch_y = _run(kind, x, w, b, "triton"), _torch(kind, x, w, b)
    assert y.dtype == dtype
    assert_within_2x_torch(y, torch_y, want, what="y")
    upstream = torch.randn_like(want)
    ours = grads(y, (x, w, b), upstream.to(dtype))
    theirs = grads(torch_y, (x, w, b), upstream.to(dtype))
    for got, other, ref in zip(ours, theirs, grads(want, leaves64, upstream)):
        if ref is not None:
            assert got.dtype == dtype
            assert_within_2x_torch(got, other, ref, what="a gradient")


@pytest.mark.gpu
def test_gpu_fp32_residual_under_autocast_writes_bf16():
    x, w, b = _leaves(4096, 768, True, True, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer_norm(x, (768,), w, b, backend="triton")
    want = F.layer_norm(x, (768,), w, b)
    assert y.dtype == torch.bfloat16
    assert_within_2x_torch(y, want.bfloat16(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("M,N", [(1, 768), (16384, 768), (97, 1025)], ids=str)
def test_gpu_add_norm_bf16_branch_onto_fp32_stream(kind, M, N):
    # The training step's case: a bf16 branch added to the fp32 stream under bf16 autocast.
    stream_in, w, b = _leaves(M, N, True, kind == "layer", device="cuda")
    branch = torch.randn(M, N, device="cuda").bfloat16().requires_grad_()
    leaves = (branch, stream_in, w, b)
    leaves64 = float64_leaves(*leaves)
    want_y, want_s = _torch_add(kind, *leaves64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, stream = _run_add(kind, branch, stream_in, w, b, "triton")
        torch_y, torch_s = _torch_add(kind, branch, stream_in, w, b)  # fp32 out: torch's autocast norms run fp32
    assert y.dtype == torch.bfloat16 and stream.dtype == torch.float32 and torch.equal(stream, torch_s)
    assert_within_2x_torch(y, torch_y.bfloat16(), want_y, what="y")
    up_y, up_s = torch.randn_like(want_y), torch.randn_like(want_s)
    ours = grads((y, stream), leaves, (up_y.bfloat16(), up_s.float()))
    theirs = grads((torch_y.bfloat16(), torch_s), leaves, (up_y.bfloat16(), up_s.float()))
    for leaf, got, other, ref in zip(leaves, ours, theirs, grads((want_y, want_s), leaves64, (up_y, up_s))):
        if ref is not None:
            assert got.dtype == leaf.dtype
            assert_within_2x_torch(got, other, ref, what="a gradient")


def _hessian_vector(fn, leaves):
    """d/dleaves of |d fn / d leaves|^2 with fn's first-order gradient kept as a graph: a gradient penalty. The cube
    term keeps the first-order gradient attached even where the op's own part would be dropped."""
    y = fn(*leaves) + sum(t.pow(3).sum() for t in leaves)
    first = torch.autograd.grad(y, leaves, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in first), leaves)


@pytest.mark.parametrize("kind", ["layer", "rms", "add_layer", "add_rms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_torch(kind, backend):
    fused, base = kind.startswith("add_"), kind.removeprefix("add_")
    x, w, b = _leaves(6, 24, True, base == "layer", seed=4)
    r = torch.randn(6, 24, generator=torch.Generator().manual_seed(5)).requires_grad_() if fused else None
    leaves = [t for t in (x, r, w, b) if t is not None]

    def loss(norm, add):
        def fn(*t):
            it = iter(t)
            x, r, w = next(it), next(it) if fused else None, next(it)
            b = next(it, None)
            if not fused:
                return norm(base, x, w, b).pow(3).sum()
            y, s = add(base, x, r, w, b)
            return (y.pow(3) * s).sum()

        return fn

    ours = loss(lambda *a: _run(*a, backend), lambda *a: _run_add(*a, backend))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    for got, want in zip(_hessian_vector(ours, leaves), _hessian_vector(loss(_torch, _torch_add), leaves64)):
        assert err(got, want) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_fp16_branch_onto_bf16_stream_rounds_each_gradient_once(backend):
    # s = fp16 + bf16 is fp32; the stream's gradient reaches each input in its own dtype, never through the other's.
    x = torch.randn(2, 16).half().requires_grad_()
    r = torch.randn(2, 16).bfloat16().requires_grad_()
    y, stream = add_layer_norm(x, r, (16,), backend=backend)
    upstream = torch.tensor([[1e5], [1e-8]]).expand(2, 16)  # past fp16's range; under its smallest subnormal
    dx, dr = torch.autograd.grad(stream, (x, r), upstream)
    assert dx.dtype == torch.float16 and dr.dtype == torch.bfloat16
    assert torch.equal(dr.float(), upstream.bfloat16().float()) and torch.equal(dx.float(), upstream.half().float())
