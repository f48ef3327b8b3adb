"""fasttrain.ops.linear_cross_entropy: every backend (Triton interpreted on CPU, the chunked cpu path, the reference)
against torch's `F.cross_entropy(F.linear(x, weight, bias), ...)` in float64, loss and the gradients of x, weight and
bias, over awkward N and V, ignored rows, every reduction, label smoothing, the softcap; low precision by the
2x-PyTorch rule; torch.compile, the double backward, the backend choice and input errors. GPU tests (`pytest -m gpu`)
check bf16 and the memory the op saves."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttrain import _backend
from fasttrain.kernels import linear_cross_entropy as kernels
from fasttrain.ops import linear_cross_entropy

from helpers import TOL_FP32, assert_within_2x_torch, err, float64_leaves, grads, randn

lce = importlib.import_module("fasttrain.ops.linear_cross_entropy")  # the module (the package exports the function)
TOL = TOL_FP32["linear_cross_entropy"]
BACKENDS = ["triton", "cpu", "reference"]


def _inputs(N, K, V, dtype=torch.float32, device="cpu", bias=False, ignore_every=0, seed=0):
    """x (N, K), weight (V, K) giving logits of scale ~3, bias (V,) or None, leaves requiring grad; targets with every
    ignore_every-th row ignored."""
    x = randn(N, K, dtype=dtype, device=device, seed=seed)
    weight = randn(V, K, dtype=dtype, device=device, seed=seed + 1, scale=3.0 / K**0.5)
    b = randn(V, dtype=dtype, device=device, seed=seed + 2) if bias else None
    g = torch.Generator(device=device).manual_seed(seed + 3)
    target = torch.randint(0, V, (N,), generator=g, device=device)
    if ignore_every:
        target[::ignore_every] = -100
    return x, weight, b, target


def _torch(x, weight, bias, target, reduction="mean", label_smoothing=0.0, softcap=None, ignore_index=-100):
    """torch's composition on whatever it is given (float64 leaves for the oracle)."""
    z = F.linear(x, weight, bias).float() if x.dtype != torch.float64 else F.linear(x, weight, bias)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def _check_against_float64(x, weight, bias, target, backend, tol=TOL, **kw):
    loss = linear_cross_entropy(x, weight, target, bias, backend=backend, **kw)
    leaves = float64_leaves(x, weight, bias)
    want = _torch(*leaves, target, **kw)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert err(loss, want) < tol, err(loss, want)
    upstream = torch.randn(want.shape, dtype=torch.float64)  # per-row for "none": the row scaling is exercised
    got_grads = grads(loss, (x, weight, bias), upstream.float())
    for got, wanted in zip(got_grads, grads(want, leaves, upstream)):
        if wanted is not None:
            assert got.dtype == x.dtype and err(got, wanted) < tol, err(got, wanted)


# (N, V): one row of one class; a vocabulary under and over a kernel block (BLOCK_V) with tails; N prime.
SIZES = [(1, 1), (1, 97), (97, 1025), (5, kernels.BLOCK_V + 1), (3, 2 * kernels.BLOCK_V - 7)]


@pytest.fixture(autouse=True)
def _small_cpu_chunks(monkeypatch):
    """Chunks of 7 rows on the cpu backend at every V of these tests, so that chunking and a short last chunk are
    exercised whatever N."""
    monkeypatch.setattr(lce, "CPU_CHUNK_ELEMENTS", 7 * 2 * kernels.BLOCK_V)


@pytest.mark.parametrize("N,V", SIZES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_float64(N, V, reduction, backend, monkeypatch):
    monkeypatch.setattr(lce, "CPU_CHUNK_ELEMENTS", 7 * V)
    x, weight, bias, target = _inputs(N, 64, V, bias=N % 2 == 1, ignore_every=3 if N > 3 else 0)
    _check_against_float64(x, weight, bias, target, backend, reduction=reduction)


@pytest.mark.parametrize("label_smoothing,softcap", [(0.1, None), (0.0, 4.0), (0.25, 2.5), (1.0, None)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_and_softcap_match_torch(label_smoothing, softcap, reduction, backend):
    x, weight, bias, target = _inputs(19, 64, 301, bias=True, ignore_every=4)
    _check_against_float64(
        x, weight, bias, target, backend, reduction=reduction, label_smoothing=label_smoothing, softcap=softcap
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_a_custom_ignore_index(backend):
    x, weight, _, target = _inputs(9, 8, 50)
    target[::2] = 7
    rows = linear_cross_entropy(x, weight, target, ignore_index=7, reduction="none", backend=backend)
    assert torch.equal(rows[::2], torch.zeros(5)) and (rows[1::2] > 0).all()
    (dx,) = torch.autograd.grad(rows.sum(), x)
    assert torch.equal(dx[::2], torch.zeros(5, 8)) and dx[1::2].abs().sum() > 0
    _check_against_float64(x, weight, None, target, backend, ignore_index=7, label_smoothing=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored(backend):
    """mean: NaN (0 / 0) as torch, with zero gradients; sum: 0."""
    x, weight, bias, target = _inputs(6, 8, 40, bias=True)
    target[:] = -100
    loss = linear_cross_entropy(x, weight, target, bias, backend=backend, label_smoothing=0.1)
    assert torch.isnan(loss) and torch.isnan(_torch(x, weight, bias, target, label_smoothing=0.1))
    for g in torch.autograd.grad(loss, (x, weight, bias)):
        assert torch.equal(g, torch.zeros_like(g))
    assert linear_cross_entropy(x, weight, target, bias, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_low_precision_within_twice_torch_error(dtype, backend):
    x, weight, bias, target = _inputs(97, 64, 1000, dtype=dtype, bias=True, ignore_every=5)
    loss = linear_cross_entropy(x, weight, target, bias, backend=backend)
    torch_loss = _torch(x, weight, bias, target)  # F.linear in the dtype, the CE on fp32 logits
    leaves = float64_leaves(x, weight, bias)
    want = _torch(*leaves, target)
    assert_within_2x_torch(loss, torch_loss, want, what="loss")
    for ours, theirs, wanted, name in zip(
        grads(loss, (x, weight, bias), None),
        grads(torch_loss, (x, weight, bias), None),
        grads(want, leaves, None),
        "xwb",
    ):
        assert ours.dtype == dtype
        assert_within_2x_torch(ours, theirs, wanted, what=f"d{name}")


def test_autocast_computes_the_logits_in_the_autocast_dtype():
    x, weight, bias, target = _inputs(33, 32, 200, bias=True)
    x = x.detach().bfloat16().requires_grad_()  # a bf16 activation against fp32 weights, as a model under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, weight, target, bias, backend="cpu")
        torch_loss = _torch(x, weight, bias, target)
    assert loss.dtype == torch.float32
    assert err(loss, torch_loss) < 1e-5  # the same bf16 logits, the same fp32 softmax
    ours, theirs = grads(loss, (x, weight, bias), None), grads(torch_loss, (x, weight, bias), None)
    for a, b, t in zip(ours, theirs, (x, weight, bias)):
        assert a.dtype == t.dtype and err(a, b) < 1e-2 * b.abs().max().item()


def test_non_contiguous_inputs():
    x, weight, _, target = _inputs(12, 16, 70)
    x_t = torch.cat([x, x], dim=1)[:, ::2]  # (12, 16), column stride 2
    w_t = weight.t().contiguous().t()  # (70, 16), transposed strides
    for backend in BACKENDS:
        loss = linear_cross_entropy(x_t, w_t, target, backend=backend)
        assert err(loss, _torch(*float64_leaves(x_t, w_t), None, target)) < TOL


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_compiles_with_fullgraph(backend):
    x, weight, bias, target = _inputs(8, 16, 300, bias=True)
    fn = torch.compile(
        lambda x, w, b, t: linear_cross_entropy(x, w, t, b, label_smoothing=0.1, backend=backend),
        fullgraph=True,
        backend="eager",
    )
    loss = fn(x, weight, bias, target)
    leaves = float64_leaves(x, weight, bias)
    want = _torch(*leaves, target, label_smoothing=0.1)
    assert err(loss, want) < TOL
    for got, wanted in zip(grads(loss, (x, weight, bias), None), grads(want, leaves, None)):
        assert err(got, wanted) < TOL


def test_registered_ops_pass_opcheck():
    x, weight, bias, target = _inputs(5, 8, 30, bias=True, ignore_every=2)
    for reduction in ("mean", "none"):
        for weight_grad in (True, False):
            args = (x, weight, bias, target, -100, reduction, 0.1, 3.0, weight_grad, "cpu")
            torch.library.opcheck(lce._forward_op.op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_head_gets_no_gradient_and_x_the_right_one(reduction, backend):
    """A head that needs no gradient (frozen, or LoRA elsewhere) is left out of the computation: dx alone."""
    x, weight, bias, target = _inputs(13, 16, 90, bias=True, ignore_every=3)
    weight, bias = weight.detach(), bias.detach()
    loss = linear_cross_entropy(x, weight, target, bias, reduction=reduction, backend=backend)
    leaves = float64_leaves(x)
    want = _torch(leaves[0], weight.double(), bias.double(), target, reduction=reduction)
    upstream = torch.randn(want.shape, dtype=torch.float64)
    (dx,) = torch.autograd.grad(loss, x, upstream.float())
    assert err(loss, want) < TOL and err(dx, torch.autograd.grad(want, leaves[0], upstream)[0]) < TOL
    args = (x.detach(), weight, bias, target, -100, "sum", 0.0, 0.0, False, "cpu")
    assert [t.numel() for t in lce._forward_op(*args)[2:]] == [x.numel(), 0, 0]  # no dW, no db


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_double_backward_matches_torch(reduction, backend):
    """A gradient penalty d/dx |d loss / dx|^2 (create_graph=True): the second derivative through torch's own
    composition, so it has the op's terms."""
    x, weight, _, target = _inputs(6, 8, 40, ignore_every=4)

    def penalty(fn, x, w):
        loss = fn(x, w)
        loss = loss.sum() if loss.dim() else loss
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), (x, w))

    kw = dict(reduction=reduction, softcap=5.0)
    got = penalty(lambda x, w: linear_cross_entropy(x, w, target, backend=backend, **kw), x, weight)
    want = penalty(lambda x, w: _torch(x, w, None, target, **kw), *float64_leaves(x, weight))
    for a, b in zip(got, want):
        assert err(a, b) < TOL


def test_auto_chooses_triton_under_the_interpreter_and_cpu_otherwise(monkeypatch):
    x, weight, _, target = _inputs(4, 8, 10)
    assert lce.LINEAR_CROSS_ENTROPY.choose(x, weight, target) == "triton"  # tests run with TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert lce.LINEAR_CROSS_ENTROPY.choose(x, weight, target) == "cpu"
    with pytest.raises(_backend.BackendError, match="no 'cuda' backend"):
        linear_cross_entropy(x, weight, target, backend="cuda")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w, t: linear_cross_entropy(x[0], w, t), ValueError, "x must be a 2-D"),
        (lambda x, w, t: linear_cross_entropy(x.long(), w, t), TypeError, "x must be a floating-point"),
        (lambda x, w, t: linear_cross_entropy(x, w[:, :3], t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda x, w, t: linear_cross_entropy(x, w[:0], t), ValueError, "V >= 1"),
        (lambda x, w, t: linear_cross_entropy(x, w.double(), t), TypeError, "weight must have x's dtype"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, bias=torch.zeros(3)), ValueError, r"bias must have shape"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, bias=[0.0]), TypeError, "bias must be a floating-point"),
        (lambda x, w, t: linear_cross_entropy(x, w, t.float()), TypeError, "target must be an integer"),
        (lambda x, w, t: linear_cross_entropy(x, w, t[:2]), ValueError, r"target must have shape \(4,\)"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, label_smoothing="0.1"), TypeError, "label_smoothing"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, softcap=0.0), ValueError, "softcap must be > 0"),
        (lambda x, w, t: linear_cross_entropy(x, w, t, softcap="30"), TypeError, "softcap must be a float"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    x, weight, _, target = _inputs(4, 8, 10)
    with pytest.raises(error, match=match) as raised:
        call(x, weight, target)
    assert type(raised.value) is error and len(str(raised.value).splitlines()) == 1


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,V", [(1, 768, 50257), (4097, 1024, 32000), (97, 128, 1025)], ids=str)
def test_gpu_at_most_twice_torch_error(N, K, V, dtype):
    x, weight, bias, target = _inputs(N, K, V, dtype=dtype, device="cuda", bias=True, ignore_every=5 if N > 1 else 0)
    loss = linear_cross_entropy(x, weight, target, bias, backend="triton", label_smoothing=0.1)
    torch_loss = _torch(x, weight, bias, target, label_smoothing=0.1)
    leaves = float64_leaves(x, weight, bias)
    want = _torch(*leaves, target, label_smoothing=0.1)
    assert_within_2x_torch(loss, torch_loss, want, what="loss")
    ours, theirs = grads(loss, (x, weight, bias), None), grads(torch_loss, (x, weight, bias), None)
    for a, b, w, name in zip(ours, theirs, grads(want, leaves, None), "xwb"):
        assert_within_2x_torch(a, b, w, what=f"d{name}")


@pytest.mark.gpu
def test_gpu_peak_memory_below_eager():
    x, weight, _, target = _inputs(8192, 2048, 128256, dtype=torch.bfloat16, device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dx, dw = torch.autograd.grad(fn(), (x, weight))
        del dx, dw
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda: linear_cross_entropy(x, weight, target, backend="triton"))
    eager = peak(lambda: _torch(x, weight, None, target))
    # eager holds bf16 logits, their fp32 copy, fp32 log-probabilities and gradients (N V x 14 bytes, ~14 GiB); ours
    # dx, dW (and its fp32 accumulator) and one chunk of logits.
    assert ours < 0.25 * eager, (ours, eager)
