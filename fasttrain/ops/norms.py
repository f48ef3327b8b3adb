"""LayerNorm and RMSNorm with torch's functional signatures, and the pre-norm residual add fused into them
(`add_layer_norm`, `add_rms_norm`: flash-attn's layer_norm_fn with residual= and prenorm=True, Liger's fused add +
RMSNorm), all four over one registered op on rows (M, N).

Backends: `aot` (the same kernels compiled ahead of time and launched from C++, csrc/norms_aot.cpp: the op, its checks
and its autograd in C++, so an eager call never enters Python past the backend choice, and the commonest calls skip
the general checks and choice too, `_aot_short`; CUDA calls whose tensors share one dtype, with the cubins of a CUDA
build), `triton` (kernels/norms.py: one pass each way, rows up to MAX_N wide held in registers) and `reference` (plain
PyTorch: torch's native LayerNorm and its backward from the saved statistics; RMSNorm in closed form). The reference
is what CPU tensors take without the Triton interpreter; its backward computes the gradients from the forward's mean
and 1/std as the kernel does, rather than recomputing the forward under autograd.

One difference from torch, on every backend: under autocast the output is in the autocast dtype (torch computes the
norm in fp32 and returns fp32, and the Linear that follows casts it to bf16 in a separate pass; the kernel computes in
fp32 and writes bf16 once, the same rounding without the extra read and write).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from fasttrain import _backend, _extension
from fasttrain._backend import ArgumentError, ArgumentTypeError
from fasttrain.ops._op import custom_op, reference_gradients

# ---- the backends: what each computes -------------------------------------------------------------------------------
# forward(x, residual, weight, bias, eps, is_rms, out_dtype) -> (y (M, N) in out_dtype, s = x + residual (M, N) in
#   the two's promoted dtype (empty without a residual: the schema has no optional outputs), mean (M,) (empty for
#   RMSNorm), rstd (M,)): the norm of s, or of x alone, over rows x and residual (M, N) and weight, bias (N,);
#   statistics in fp32 (fp64 for fp64 rows).
# backward(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype) -> (dx in x's dtype, plus dres when given;
#   the same values in dx2_dtype or None; dw and db in the weight's dtype, or None), x the rows normalized.


class Reference:
    @staticmethod
    def forward(x, residual, weight, bias, eps, is_rms, out_dtype):
        s = x if residual is None else x + residual
        wide = torch.promote_types(s.dtype, torch.float32)  # half-precision rows are normalized in fp32, as the kernel
        rows, weight, bias = (_to(t, wide) for t in (s, weight, bias))
        if is_rms:
            rstd = torch.rsqrt(rows.square().mean(-1) + eps)  # (M,)
            y = rows * rstd[:, None] if weight is None else rows * rstd[:, None] * weight
            mean = rstd.new_empty(0)
        else:
            y, mean, rstd = torch.native_layer_norm(rows, rows.shape[-1:], weight, bias, eps)
            mean, rstd = mean.view(-1), rstd.view(-1)  # (M, 1) -> (M,)
        return _to(y, out_dtype), (s if residual is not None else x.new_empty(0)), mean, rstd

    @staticmethod
    def backward(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype):
        wide = rstd.dtype  # the forward's
        rows, g, w = (_to(t, wide) for t in (x, dy, weight))
        dw = db = None
        if is_rms:
            xhat = rows * rstd[:, None]
            gw = g if w is None else g * w
            dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd[:, None]
            if w is not None:
                dw = (g * xhat).sum(0)
        else:
            mask = [True, w is not None, False]
            dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
                g, rows, rows.shape[-1:], mean[:, None], rstd[:, None], w, None, mask
            )
            if has_bias:
                db = g.sum(0)
        if dres is not None:
            dx = dx + dres
        param_dtype = weight.dtype if weight is not None else x.dtype
        return _to(dx, x.dtype), _to(dx if dx2_dtype else None, dx2_dtype), _to(dw, param_dtype), _to(db, param_dtype)


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class Triton:
    @staticmethod
    def forward(x, residual, weight, bias, eps, is_rms, out_dtype):
        return _backend.kernels("norms").norm_forward(x, residual, weight, bias, eps, is_rms, out_dtype)

    @staticmethod
    def backward(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype):
        return _backend.kernels("norms").norm_backward(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

# What kernels/norms.py aot_kernels(shipped=True) lists; its MAX_N, not read from there: that would import Triton.
_AOT_HALF = (torch.float16, torch.bfloat16)
_AOT_DTYPES = (*_AOT_HALF, torch.float32)
_AOT_MAX_N = 4096
_AOT_MIX = "the shipped cubins take one dtype, fp32 rows with a half-precision output, or a half branch onto fp32"


def _aot_reason(
    x: Tensor,
    n_cols: int,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> str | None:
    """None for the dtype profiles kernels/norms.py ships (_pointer_types): one dtype; fp32 rows (x, residual, weight,
    bias) with a half output (autocast's, or out_dtype's); a half x added onto an fp32 residual, weight and bias fp32,
    output half. out_dtype None: the public functions' rule (_out_dtype)."""
    if (why := _backend.aot_reason(x.device)) is not None:
        return why
    if n_cols > _AOT_MAX_N:
        return f"normalized rows of {n_cols} elements exceed the kernels' {_AOT_MAX_N} (held in registers)"
    stream = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = out_dtype or (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else stream)
    if stream not in _AOT_DTYPES or out not in _AOT_DTYPES:
        return f"the shipped cubins take fp16, bf16 or fp32, got {stream if stream not in _AOT_DTYPES else out}"
    for t in (residual, weight, bias):
        if t is not None and t.dtype != stream:
            return _AOT_MIX
    if stream != out and stream != torch.float32:  # out is stream's, or half from fp32 rows
        return _AOT_MIX
    if x.dtype != stream and not (x.dtype == out and out in _AOT_HALF):  # a branch: x in the output's half dtype
        return _AOT_MIX
    return None


def _triton_reason(x: Tensor, n_cols: int, residual: Tensor | None, *_) -> str | None:
    for t in (x, residual):
        if t is not None and (why := _backend.triton_tensor_reason(t)) is not None:
            return why
    if n_cols > (widest := _backend.kernels("norms").MAX_N):
        return f"normalized rows of {n_cols} elements exceed the kernels' {widest} (held in registers)"
    return None


NORMS = _backend.Table(
    "norms",
    {
        "aot": _backend.Backend(
            _aot_reason,
            None,
            live=_backend.aot_live,
            direct=torch.ops.fasttrain.norm_forward_aot
            if _backend.native_op_reason("norm_forward_aot") is None
            else None,
        ),
        "triton": _backend.Backend(_triton_reason, Triton, live=_backend.triton_live),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered ops: one body for every backend, fake implementations, autograd --------------------------------


@custom_op("fasttrain::norm_forward", mutates_args=(), table=NORMS, reference=Reference.forward)
def _forward_op(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return NORMS[backend].forward(x, residual, weight, bias, eps, is_rms, out_dtype)


@_forward_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, out_dtype, backend):
    M = x.shape[0]
    stream_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    stats = torch.promote_types(stream_dtype, torch.float32)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape if residual is not None else 0, dtype=stream_dtype),
        x.new_empty(0 if is_rms else M, dtype=stats),
        x.new_empty(M, dtype=stats),
    )


@custom_op("fasttrain::norm_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    is_rms: bool,
    has_bias: bool,
    dres: Tensor | None,
    dx2_dtype: torch.dtype | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, *rest = NORMS[backend].backward(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype)
    # An absent output (dx2, dw, db) comes back empty (distinct tensors: a custom op's outputs may not alias).
    dx2, dw, db = (x.new_empty(0) if t is None else t for t in rest)
    return dx, dx2, dw, db


@_backward_op.register_fake
def _(dy, x, weight, mean, rstd, is_rms, has_bias, dres, dx2_dtype, backend):
    param = weight if weight is not None else x
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(x.shape if dx2_dtype is not None else 0, dtype=dx2_dtype or x.dtype),
        param.new_empty(x.shape[1:] if weight is not None else 0),
        param.new_empty(x.shape[1:] if has_bias else 0),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, out_dtype, backend = inputs
    # The rows normalized: the new residual stream when the add is fused, else x.
    ctx.save_for_backward(output[1] if residual is not None else x, weight, bias, output[2], output[3])
    ctx.is_rms, ctx.has_bias, ctx.eps, ctx.out_dtype, ctx.backend = is_rms, bias is not None, eps, out_dtype, backend
    ctx.dtypes = (x.dtype, residual.dtype) if residual is not None else None
    # An output nobody used (the final norm's residual stream, the statistics) brings None, not a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dstream, grad_mean, grad_rstd):  # mean and rstd never leave the op, so they have no gradient
    rows, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows
        return _reference_backward(ctx, rows, weight, bias, dy, dstream)
    dy = torch.zeros_like(rows) if dy is None else _unit_column_stride(dy)
    if ctx.dtypes is None:
        dx, _, dw, db = _backward_op(dy, rows, weight, mean, rstd, ctx.is_rms, ctx.has_bias, None, None, ctx.backend)
        dx_in, dres_in = dx, None
    else:
        # s = x + residual: both get the gradient arriving at s (through the norm and from the stream downstream),
        # each in its own dtype. s has the wider of the two, so at most one needs a second copy (dx2); when
        # neither has s's dtype (fp16 + bf16 make fp32), both take s's and autograd rounds each once.
        other = next((d for d in ctx.dtypes if d != rows.dtype), None) if rows.dtype in ctx.dtypes else None
        dstream = _unit_column_stride(dstream) if dstream is not None else None
        dx, dx2, dw, db = _backward_op(
            dy, rows, weight, mean, rstd, ctx.is_rms, ctx.has_bias, dstream, other, ctx.backend
        )
        dx_in, dres_in = (dx2 if d == other else dx for d in ctx.dtypes)
    return (dx_in, dres_in, dw if weight is not None else None, db if ctx.has_bias else None, None, None, None, None)


def _reference_backward(ctx, rows, weight, bias, dy, dstream):
    """The gradients as a graph, through the reference backend's norm (see reference_gradients)."""
    drows, dw, db = reference_gradients(
        lambda rows, weight, bias: Reference.forward(rows, None, weight, bias, ctx.eps, ctx.is_rms, ctx.out_dtype)[0],
        (rows, weight, bias),
        (dy,),
    )
    if ctx.dtypes is None:
        return drows, None, dw, db, None, None, None, None
    if dstream is not None:  # s = x + residual passes the stream's gradient to both
        drows = dstream if drows is None else drows + dstream
    return drows, drows, dw, db, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _unit_column_stride(t: Tensor) -> Tensor:
    # The kernels take any row stride but unit column stride (a sum's upstream gradient arrives expanded, stride 0).
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- the public functions: check the arguments, choose, call -------------------------------------------------------


def _normalized(
    name: str, input: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None
) -> tuple[int, tuple[int, ...]]:
    """(elements per normalized row, normalized_shape as a tuple), after checking every argument against it."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(
            f"{name}: input must be a floating-point tensor, got {getattr(input, 'dtype', type(input).__name__)}"
        )
    # A bare int is refused, as torch's F.layer_norm / F.rms_norm refuse it (nn.LayerNorm's constructor takes one).
    if not isinstance(normalized_shape, (tuple, list)):
        raise TypeError(
            f"{name}: normalized_shape must be a tuple or list of ints (as torch's), got {normalized_shape!r}"
        )
    shape = tuple(normalized_shape)
    for n in shape:
        # `type(...) is int` first: isinstance against numbers.Integral (an ABC) is several times slower, per dim.
        if type(n) is not int and (isinstance(n, bool) or not isinstance(n, numbers.Integral)):
            raise TypeError(f"{name}: normalized_shape must be a tuple or list of ints, got {shape}")
    if not shape:  # torch's RuntimeError: no dim to normalize over
        raise ArgumentError(f"{name}: normalized_shape must name at least one trailing dim of input, got ()")
    if len(shape) > input.dim() or input.shape[input.dim() - len(shape) :] != shape or min(shape) < 1:
        raise ArgumentError(
            f"{name}: normalized_shape must be the trailing dims of input {tuple(input.shape)}, got {shape}"
        )
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(
                f"{name}: {arg} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            )
        if t.shape != shape:
            raise ArgumentError(f"{name}: {arg} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != input.device:
            raise ArgumentError(f"{name}: {arg} must be on input's device ({input.device}), got {t.device}")
    n = 1
    for d in shape:
        n *= d
    return n, shape


def _check_cpu_param_dtypes(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    """torch's CPU layer_norm (autocast or not) takes weight and bias of input's dtype, or fp32 ones with fp16/bf16
    input, and raises a RuntimeError for any other mix."""
    if input.device.type != "cpu":
        return
    params = [t.dtype for t in (weight, bias) if t is not None]
    if all(d == input.dtype for d in params):
        return
    if input.dtype in (torch.float16, torch.bfloat16) and all(d == torch.float32 for d in params):
        return
    raise ArgumentTypeError(
        f"layer_norm: weight and bias must have input's dtype {input.dtype}, or float32 with fp16/bf16 input, as "
        f"torch's CPU layer_norm takes them, got weight {weight.dtype if weight is not None else None} and bias "
        f"{bias.dtype if bias is not None else None}"
    )


def _out_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The norm's output dtype for rows of `dtype`: autocast's when it is on (module docstring), else the rows'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _rows(t: Tensor, n_cols: int) -> Tensor:
    if t.dim() == 2 and t.shape[1] == n_cols and t.stride(1) == 1:  # already (M, N) rows: no view (one node fewer)
        return t
    return _unit_column_stride(t.reshape(-1, n_cols))  # (M, N): one row per normalized slice


def _flat(t: Tensor | None) -> Tensor | None:
    # (N,) unit-stride parameters; autograd takes their gradients back to the normalized shape.
    return t if t is None or (t.dim() == 1 and t.stride(0) == 1) else t.reshape(-1).contiguous()


def _norm(
    input: Tensor,
    residual: Tensor | None,
    n_cols: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    backend: str | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(the norm of input + residual, or of input alone; input + residual, or an empty tensor) in input's shape. The
    norm in out_dtype, or None: the rows' dtype, autocast's when it is on (_out_dtype)."""
    name = NORMS.choose(input, n_cols, residual, weight, bias, out_dtype, backend=backend)
    x, r = _rows(input, n_cols), (_rows(residual, n_cols) if residual is not None else None)
    if out_dtype is None:
        dtype = torch.promote_types(input.dtype, residual.dtype) if residual is not None else input.dtype
        out_dtype = _out_dtype(input.device, dtype)
    y, stream, _, _ = _forward_op(x, r, _flat(weight), _flat(bias), float(eps), is_rms, out_dtype, name)
    if x is input:
        return y, stream
    return y.view(input.shape), (stream.view(input.shape) if residual is not None else stream)


# ---- the short path: the commonest calls, straight to the aot op ---------------------------------------------------

_AOT_OP = NORMS.direct["aot"].default if "aot" in NORMS.direct else None  # None: no short path
_SHORT = _extension.load()[0].norm_short if _AOT_OP is not None else None


def _aot_short(
    input, residual, normalized_shape, weight, bias, eps, is_rms: bool, backend
) -> tuple[Tensor, Tensor] | Tensor | None:
    """y (no residual) or (y, s) from the aot op for a call that the checks and choice below `_norm` would send there
    unchanged: no backend named or forced, normalized_shape one int in a tuple, list or Size within the
    shipped widths, plain tensors of one shipped dtype on one device, weight and bias (N,) with unit stride, eps a
    float >= 0 (None: RMSNorm's machine epsilon), no autocast, not traced, the aot column live for the device. Else
    None, and the general path checks, chooses and calls; it does nothing else this one skips, so both give the same
    launch (tests/test_norms_aot.py). The checks on the arguments and the op call run in C++ (csrc/aot_short.cpp)."""
    if backend is not None or _AOT_OP is None or type(input) is not Tensor:
        return None
    if _backend.aot_reason(input.device) is not None or _backend.forced() or _backend.intercepted():
        return None  # the device first: a CPU tensor leaves at once
    return _SHORT(input, residual, normalized_shape, weight, bias, eps, is_rms)


def _check_eps(name: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name}: eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be a float >= 0, got {eps!r}")


def _check_residual(name: str, input: Tensor, residual) -> None:
    if not isinstance(residual, Tensor) or not residual.is_floating_point():
        raise TypeError(
            f"{name}: residual must be a floating-point tensor, "
            f"got {getattr(residual, 'dtype', type(residual).__name__)}"
        )
    if residual.shape != input.shape:
        raise ValueError(f"{name}: residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.device != input.device:
        raise ValueError(f"{name}: residual must be on input's device ({input.device}), got {residual.device}")


def layer_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """torch's `F.layer_norm`: normalize over the trailing `normalized_shape` dims to zero mean and unit variance,
    then scale by weight and shift by bias. Statistics in fp32 whatever the dtype; under autocast the output is in the
    autocast dtype (module docstring). backend: "auto" (default), "triton" or "reference"."""
    if (out := _aot_short(input, None, normalized_shape, weight, bias, eps, False, backend)) is not None:
        return out
    n_cols, shape = _normalized("layer_norm", input, normalized_shape, weight, bias)
    _check_cpu_param_dtypes(input, weight, bias)
    _check_eps("layer_norm", eps)
    return _norm(input, None, n_cols, weight, bias, eps, False, backend)[0]


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """torch's `F.rms_norm`: x / sqrt(mean(x^2) + eps) over the trailing `normalized_shape` dims, times weight;
    eps None means the machine epsilon of the fp32-or-wider type it computes in, as torch (float32's for fp16 and
    bf16 inputs, not theirs). Statistics in fp32; under autocast the output is in the
    autocast dtype (module docstring). backend: "auto" (default), "triton" or "reference"."""
    if (out := _aot_short(input, None, normalized_shape, weight, None, eps, True, backend)) is not None:
        return out
    n_cols, shape = _normalized("rms_norm", input, normalized_shape, weight, None)
    if eps is None:
        eps = torch.finfo(torch.promote_types(input.dtype, torch.float32)).eps  # torch's opmath type's
    _check_eps("rms_norm", eps)
    return _norm(input, None, n_cols, weight, None, eps, True, backend)[0]


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """A pre-norm block's residual add and the LayerNorm after it, in one pass: (layer_norm(s), s) for
    s = input + residual, the new residual stream, in the two's promoted dtype as `input + residual` gives it (a bf16
    branch onto an fp32 stream stays fp32). The norm is `layer_norm`'s (same arguments, same output dtype rule)."""
    if (out := _aot_short(input, residual, normalized_shape, weight, bias, eps, False, backend)) is not None:
        return out
    n_cols, shape = _normalized("add_layer_norm", input, normalized_shape, weight, bias)
    _check_residual("add_layer_norm", input, residual)
    _check_eps("add_layer_norm", eps)
    return _norm(input, residual, n_cols, weight, bias, eps, False, backend)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(s), s) for s = input + residual in one pass, as add_layer_norm; eps None means the machine epsilon
    of s's fp32-or-wider computation type, as rms_norm(s) would take."""
    if (out := _aot_short(input, residual, normalized_shape, weight, None, eps, True, backend)) is not None:
        return out
    n_cols, shape = _normalized("add_rms_norm", input, normalized_shape, weight, None)
    _check_residual("add_rms_norm", input, residual)
    if eps is None:
        eps = torch.finfo(torch.promote_types(torch.promote_types(input.dtype, residual.dtype), torch.float32)).eps
    _check_eps("add_rms_norm", eps)
    return _norm(input, residual, n_cols, weight, None, eps, True, backend)
