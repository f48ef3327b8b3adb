"""flash-attn's packed functions (qkvpacked, kvpacked and their varlen forms): every backend gives what the unpacked
function gives on the same q, k, v, outputs and gradients; the gradient lands in one packed tensor, which the Triton
backward writes through its views (no concatenation); flash-attn's own cases (its 2x-PyTorch-error rule against an
upcast reference) on small sizes; the arguments are checked by name."""

import pytest
import torch

from fasttrain.ops import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

from flash_attn_ref import assert_within, attention_ref
from helpers import TOL_FP32

TOL = dict(atol=TOL_FP32["attention"], rtol=TOL_FP32["attention"])
BACKENDS = ("triton", "cpu", "reference")


def _packed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_()


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _against_unpacked(packed_fn, unpacked_fn, packed_inputs, split):
    """out and every packed gradient against the unpacked function on detached copies of the views."""
    out = packed_fn(*packed_inputs)
    do = torch.randn_like(out)
    out.backward(do)
    views = [t.detach().clone().requires_grad_() for t in split(*packed_inputs)]
    want = unpacked_fn(*views)
    want.backward(do)
    torch.testing.assert_close(out, want, **TOL)
    grads = split(*(t.grad for t in packed_inputs))
    for name, got, view in zip("qkv", grads, views):
        torch.testing.assert_close(got, view.grad, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


# Awkward lengths on the CPU kernel and the reference; the interpreted Triton kernels at shorter ones (their cost).
SHAPES = {"triton": [(1, 1, 2, 32, True), (2, 33, 2, 64, False)], "cpu": [(1, 1, 2, 32, True), (2, 97, 4, 64, False)]}
SHAPES["reference"] = SHAPES["cpu"]


@pytest.mark.parametrize("backend,B,T,H,D,causal", [(b, *shape) for b in BACKENDS for shape in SHAPES[b]])
def test_qkvpacked_equals_unpacked(backend, B, T, H, D, causal):
    qkv = _packed(B, T, 3, H, D, seed=T)
    _against_unpacked(
        lambda qkv: flash_attn_qkvpacked_func(qkv, causal=causal, backend=backend),
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal, backend=backend),
        (qkv,),
        lambda qkv: qkv.unbind(2),
    )


KV_CASES = [(1, 97, 4, 1, (-1, -1)), (33, 40, 4, 2, (16, 0)), (20, 37, 2, 2, (8, 8))]  # MQA, GQA + window, two-sided
KV_BACKENDS = (
    [("cpu", case) for case in KV_CASES] + [("reference", case) for case in KV_CASES] + [("triton", KV_CASES[2])]
)


@pytest.mark.parametrize("backend,case", KV_BACKENDS)
def test_kvpacked_equals_unpacked(backend, case):
    Tq, Tk, H, Hkv, window = case
    q, kv = _packed(2, Tq, H, 32, seed=1), _packed(2, Tk, 2, Hkv, 32, seed=2)
    _against_unpacked(
        lambda q, kv: flash_attn_kvpacked_func(q, kv, causal=True, window_size=window, backend=backend),
        lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=window, backend=backend),
        (q, kv),
        lambda q, kv: (q, *kv.unbind(2)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_qkvpacked_equals_unpacked(backend):
    lengths = (1, 17, 9)
    cu, qkv = _offsets(lengths), _packed(sum(lengths), 3, 2, 32, seed=3)
    _against_unpacked(
        lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu, 17, causal=True, backend=backend),
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True, backend=backend),
        (qkv,),
        lambda qkv: qkv.unbind(1),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_kvpacked_equals_unpacked(backend):
    q_lengths, k_lengths = (1, 20, 7), (5, 33, 7)
    cu_q, cu_k = _offsets(q_lengths), _offsets(k_lengths)
    q, kv = _packed(sum(q_lengths), 4, 32, seed=4), _packed(sum(k_lengths), 2, 2, 32, seed=5)
    _against_unpacked(
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 20, 33, causal=True, backend=backend),
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 33, causal=True, backend=backend),
        (q, kv),
        lambda q, kv: (q, *kv.unbind(1)),
    )


def test_triton_backward_writes_the_packed_gradient_in_place(monkeypatch):
    # The gradient autograd hands to qkv is the very tensor whose three views the kernels wrote: no stack or cat.
    from fasttrain.kernels import attention_backward

    written, launch = [], attention_backward.attention_backward

    def recording(*args):  # addresses only: a reference held here would make autograd copy the gradient
        written.append([(t.data_ptr(), t.stride(-3)) for t in args[15]])  # into, before the dropout arguments
        return launch(*args)

    monkeypatch.setattr(attention_backward, "attention_backward", recording)
    qkv = _packed(1, 40, 3, 2, 32)
    flash_attn_qkvpacked_func(qkv, causal=True, backend="triton").sum().backward()
    ((dq, row), (dk, _), (dv, _)), = written  # fmt: skip
    assert qkv.grad.data_ptr() == dq and (dk, dv) == (dq + 2 * 32 * 4, dq + 2 * 2 * 32 * 4)  # fp32 rows of H x D
    assert row == 3 * 2 * 32 and qkv.grad.shape == qkv.shape


def test_dropout_is_the_unpacked_functions_own():
    # dropout_p > 0: the same seed gives the same mask, forward and backward.
    qkv = _packed(2, 33, 3, 2, 32)
    torch.manual_seed(7)
    out = flash_attn_qkvpacked_func(qkv, dropout_p=0.3, causal=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    torch.manual_seed(7)
    want = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(qkv.grad[:, :, 1], k.grad, atol=0, rtol=0)


def test_return_attn_probs_and_lse_gradient():
    qkv = _packed(2, 17, 3, 2, 32)
    out, lse, probs = flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True, backend="cpu", lse_grad=True)
    assert out.shape == (2, 17, 2, 32) and lse.shape == (2, 2, 17) and probs.shape == (0,)
    (out.sum() + lse.sum()).backward()  # lse_grad=True: lse takes a gradient too, as flash_attn_func's
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    o, lse_want, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="reference", lse_grad=True)
    (o.sum() + lse_want.sum()).backward()
    torch.testing.assert_close(qkv.grad[:, :, 0], q.grad, **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ("triton", "cpu"))
def test_flash_attn_qkvpacked_cases(backend, causal):
    # flash-attn's test_flash_attn_qkvpacked: out and dqkv within 2x PyTorch's same-dtype error of an upcast
    # reference (fp32 here, against float64).
    qkv = _packed(2, 45, 3, 3, 64, seed=9)
    out = flash_attn_qkvpacked_func(qkv, causal=causal, backend=backend)
    q, k, v = qkv.detach().double().requires_grad_().unbind(2)
    ref = attention_ref(q, k, v, causal=causal)
    pt = attention_ref(*(t.float() for t in (q, k, v)), causal=causal, upcast=False, reorder=True)
    assert_within(out, ref, pt, mult=2)
    do = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, do)
    qkv64 = qkv.detach().double().requires_grad_()
    (dref,) = torch.autograd.grad(attention_ref(*qkv64.unbind(2), causal=causal), qkv64, do.double())
    qkv32 = qkv.detach().clone().requires_grad_()
    pt_out = attention_ref(*qkv32.unbind(2), causal=causal, upcast=False, reorder=True)
    (dpt,) = torch.autograd.grad(pt_out, qkv32, do)
    assert_within(dqkv, dref, dpt, mult=2)


def test_compiles_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    qkv = _packed(1, 16, 3, 2, 32)
    fn = torch.compile(lambda t: flash_attn_qkvpacked_func(t, causal=True, backend="cpu"), backend=counter)
    fn(qkv).sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(qkv.grad[:, :, 2].abs().sum() > 0, torch.tensor(True))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 2, 2, 32)), ValueError, r"qkv must be \(B, T, 3, H, D\)"),
        (lambda: flash_attn_qkvpacked_func([1.0]), TypeError, "qkv must be a torch.Tensor"),
        (
            lambda: flash_attn_kvpacked_func(torch.randn(1, 4, 2, 32), torch.randn(1, 4, 3, 2, 32)),
            ValueError,
            "kv must",
        ),
        (lambda: flash_attn_kvpacked_func(None, torch.randn(1, 4, 2, 2, 32)), TypeError, "q must be a torch.Tensor"),
        (
            lambda: flash_attn_kvpacked_func(torch.randn(1, 4, 3, 32), torch.randn(1, 4, 2, 2, 32)),
            ValueError,
            "must divide",
        ),
        (
            lambda: flash_attn_varlen_qkvpacked_func(torch.randn(5, 3, 2, 32), _offsets((2, 2)), 2),
            ValueError,
            "cu_seqlens_q must rise from 0 to the packed length 5",
        ),
        (lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 32), dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 32), softcap=float("inf")), ValueError, "softcap"),
        (
            lambda: flash_attn_qkvpacked_func(torch.randn(1, 4, 3, 2, 32), alibi_slopes=torch.rand(2).double()),
            TypeError,
            "alibi_slopes must be float32",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
