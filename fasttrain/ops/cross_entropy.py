"""Cross-entropy over logits (N, V): torch's `F.cross_entropy` for class-index targets, over one registered op that
returns the per-row losses (reduced after it with plain torch ops, so autograd hands the backward a per-row gradient
whatever the reduction).

Backends: `aot` (the same kernels compiled ahead of time and launched from C++, csrc/cross_entropy_aot.cpp: the op, its
checks, the reduction and its autograd in C++, so an eager call runs no Python past the backend choice, and the
commonest calls skip the general checks and choice too, `_aot_short`; CUDA fp16, bf16 or fp32 logits, with the cubins of
a CUDA build), `triton` (kernels/cross_entropy.py: never materializes fp32 logits or log-probabilities) and `reference`
(plain PyTorch in fp32: torch's log_softmax and nll_loss forward, and the gradient softmax - onehot in closed form from
the saved logsumexp, as the kernel computes it, rather than torch's autograd through them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend, _extension
from fasttrain.ops._op import custom_op, reference_gradients

REDUCTIONS = ("mean", "sum", "none")


# ---- the backends: what each computes -------------------------------------------------------------------------------
# forward(logits (N, V), target (N,) int64, ignore_index) -> (loss (N,), lse (N,)) fp32, an ignored row's loss 0;
# backward(grad_row (N,) fp32, logits, target, lse, ignore_index) -> d loss / d logits (N, V) in the logits' dtype.


class Reference:
    @staticmethod
    def forward(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        x = logits.float()
        logp = torch.log_softmax(x, dim=-1)  # (N, V)
        loss = F.nll_loss(logp, target, ignore_index=ignore_index, reduction="none")  # (N,), an ignored row's 0
        # lse = x_j - logp_j at any column j, off by logp_j's rounding: taken at the target, where |logp_j| is the
        # row's loss (an ignored row takes column 0; its gradient is 0). Two gathers, not another pass over x.
        col = torch.where(target == ignore_index, 0, target)[:, None]  # (N, 1)
        return loss, (x.gather(1, col) - logp.gather(1, col)).squeeze(1)

    @staticmethod
    def backward(grad_row: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
        kept = target != ignore_index
        g = torch.where(kept, grad_row, 0.0)[:, None]  # (N, 1)
        grad = torch.sub(logits.float(), lse[:, None]).exp_().mul_(g)  # softmax * g
        grad.scatter_add_(1, torch.where(kept, target, 0)[:, None], -g)  # - onehot * g
        return grad.to(logits.dtype)


class Triton:
    @staticmethod
    def forward(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
        return _backend.kernels("cross_entropy").cross_entropy_forward(logits, target, ignore_index)

    @staticmethod
    def backward(grad_row: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int) -> Tensor:
        return _backend.kernels("cross_entropy").cross_entropy_backward(grad_row, logits, target, lse, ignore_index)


# ---- the table: which backend can serve which inputs ----------------------------------------------------------------

# What kernels/cross_entropy.py aot_kernels(shipped=True) lists: one case per kernel and logits dtype, any vocabulary.
_AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2**31 - 1
_AOT_OP_REASON = _backend.native_op_reason("cross_entropy_forward_aot")  # read once: Dynamo cannot trace the import


def _aot_reason(logits: Tensor, ignore_index: int) -> str | None:
    """None for what the shipped cubins were compiled for: CUDA fp16/bf16/fp32 logits whose row stride and V fit
    int32 (the JIT compiles an i64 variant past that), an int32 ignore_index, logits 16-byte aligned (a view at an
    odd offset goes to the JIT, which compiles for it, rather than being copied)."""
    if (why := _backend.aot_reason(logits.device)) is not None:
        return why
    return _aot_input_reason(logits, ignore_index)


def _aot_input_reason(logits: Tensor, ignore_index: int) -> str | None:
    """_aot_reason past the device's."""
    if _AOT_OP_REASON is not None:
        return _AOT_OP_REASON
    if logits.dtype not in _AOT_DTYPES:
        return f"the shipped cubins take fp16, bf16 or fp32 logits, got {logits.dtype}"
    if max(logits.shape[1], logits.stride(0)) > _I32:
        return "a logits row stride or vocabulary past int32 (the JIT compiles for it)"
    if not -_I32 - 1 <= ignore_index <= _I32:
        return "an ignore_index past int32 (the JIT compiles for it)"
    # Dynamo cannot trace storage_offset: a traced call leaves a misaligned view to the C++ op's copy.
    if (
        not torch.compiler.is_compiling()
        and logits.stride(1) == 1
        and logits.storage_offset() * logits.element_size() % 16
    ):
        return "logits not 16-byte aligned (the JIT compiles for it; the aot path would copy them)"
    return None


def _triton_reason(logits: Tensor, ignore_index: int) -> str | None:
    return _backend.triton_tensor_reason(logits)


CROSS_ENTROPY = _backend.Table(
    "cross_entropy",
    {
        "aot": _backend.Backend(
            _aot_reason,
            None,
            live=_backend.aot_live,
            direct=torch.ops.fasttrain.cross_entropy_forward_aot.default if _AOT_OP_REASON is None else None,
        ),
        "triton": _backend.Backend(_triton_reason, Triton, live=_backend.triton_live),
        "reference": _backend.Backend(_backend.always, Reference),
    },
)


# ---- the registered ops: one body for every backend, fake implementations, autograd --------------------------------


@custom_op("fasttrain::cross_entropy_forward", mutates_args=(), table=CROSS_ENTROPY, reference=Reference.forward)
def _forward_op(logits: Tensor, target: Tensor, ignore_index: int, backend: str) -> tuple[Tensor, Tensor]:
    return CROSS_ENTROPY[backend].forward(logits, target, ignore_index)


@_forward_op.register_fake
def _(logits, target, ignore_index, backend):
    return (
        logits.new_empty(logits.shape[:1], dtype=torch.float32),
        logits.new_empty(logits.shape[:1], dtype=torch.float32),
    )


@custom_op("fasttrain::cross_entropy_backward", mutates_args=())
def _backward_op(
    grad_row: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, backend: str
) -> Tensor:
    return CROSS_ENTROPY[backend].backward(grad_row, logits, target, lse, ignore_index)


@_backward_op.register_fake
def _(grad_row, logits, target, lse, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, backend = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _backward(ctx, grad_loss, grad_lse):  # grad_lse: the logsumexp never leaves cross_entropy, so it has none
    logits, target, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # a double backward follows (see reference_gradients)
        (grad,) = reference_gradients(
            lambda x: Reference.forward(x, target, ctx.ignore_index)[0], (logits,), (grad_loss,)
        )
        return grad, None, None, None
    grad = _backward_op(grad_loss.float().contiguous(), logits, target, lse, ctx.ignore_index, ctx.backend)
    return grad, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- the public function: check the arguments, choose, call, reduce ------------------------------------------------


_AOT_OP = CROSS_ENTROPY.direct.get("aot")  # None: no short path
_SHORT = _extension.load()[0].cross_entropy_short if _AOT_OP is not None else None


def _aot_short(input, target, ignore_index, reduction, backend) -> Tensor | None:
    """The loss from the aot op for a call that the checks and choice in `cross_entropy` would send there unchanged:
    no backend named or forced, plain tensors on one device, logits (N, V) of a shipped dtype with unit column stride
    that the aot column takes (_aot_reason), int64 targets (N,), an int ignore_index and a known reduction, no trace.
    Else None, and the general path checks, chooses and calls; it does nothing else this one skips, so both give the
    same launch (tests/test_cross_entropy_aot.py). The checks on the arguments and the op call run in C++
    (csrc/aot_short.cpp)."""
    if backend is not None or _AOT_OP is None or type(input) is not Tensor:
        return None
    if _backend.aot_reason(input.device) is not None or _backend.forced() or _backend.intercepted():
        return None  # the device first: a CPU tensor leaves at once
    return _SHORT(input, target, ignore_index, reduction)


def cross_entropy(
    input: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean", *, backend: str | None = None
) -> Tensor:
    """torch's `F.cross_entropy(input, target, ignore_index=..., reduction=...)` for class indices.

    input: (N, V) logits, any floating dtype; target: (N,) integer class indices. Rows whose target equals
    ignore_index add nothing and get zero gradient; "mean" divides by the rows not ignored (NaN when all are, as in
    torch). Unlike torch, the loss is float32 whatever the logits dtype (a bf16 mean loses the digits a training curve
    shows), and on the triton backend a target outside [0, V) gives a NaN loss instead of a device assert (not under
    a double backward, create_graph=True, whose gradients come from the reference).
    Class weights and label smoothing are not implemented. backend: "auto" (default), "aot", "triton" or
    "reference"; on "aot" a double backward raises (FASTTRAIN_AOT=0 or backend="triton" serve it)."""
    if (loss := _aot_short(input, target, ignore_index, reduction, backend)) is not None:
        return loss
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor of logits, got {getattr(input, 'dtype', type(input).__name__)}"
        )
    if input.dim() != 2:
        raise ValueError(f"input must be a 2-D tensor of logits (N, V), got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ValueError("input must have at least one class (V >= 1), got shape (N, 0)")
    integer = isinstance(target, Tensor) and not (target.is_floating_point() or target.is_complex())
    if not integer or target.dtype == torch.bool:
        got = getattr(target, "dtype", type(target).__name__)
        raise TypeError(f"target must be an integer tensor of class indices, got {got}")
    if target.shape != input.shape[:1]:
        raise ValueError(f"target must have shape ({input.shape[0]},), got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target must be on input's device ({input.device}), got {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    name = CROSS_ENTROPY.choose(input, ignore_index, backend=backend)
    if name != "reference" and input.stride(-1) != 1:
        input = input.contiguous()  # the kernels need unit stride along the vocabulary only
    if name == "aot" and _AOT_OP is not None:
        return _AOT_OP(input, target.long(), ignore_index, reduction)[0]  # reduced in C++ too: one op call
    loss, _ = _forward_op(input, target.long().contiguous(), ignore_index, name)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()
