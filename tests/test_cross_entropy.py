"""fasttrain.ops.cross_entropy: the Triton kernels (interpreted on CPU) against torch's F.cross_entropy in float64,
every reduction, ignored rows, awkward sizes, the torch.compile registration and input errors. GPU tests
(`pytest -m gpu`) check bf16/fp16 against torch's own error and the memory the op saves."""

import pytest
import torch
import torch.nn.functional as F

from fasttrain.kernels import cross_entropy as kernels
from fasttrain.ops.cross_entropy import cross_entropy

from helpers import TOL_FP32, assert_within_2x_torch, err, randn

TOL = TOL_FP32["cross_entropy"]
BACKENDS = ["triton", "reference"]  # the reference computes its gradient from the saved logsumexp, as the kernel


def _inputs(N, V, dtype=torch.float32, device="cpu", ignore_every=0, seed=0):
    """Logits (N, V) of scale 3, a leaf requiring grad, and targets with every ignore_every-th row ignored."""
    logits = randn(N, V, dtype=dtype, device=device, seed=seed, scale=3.0)
    target = torch.randint(0, V, (N,), generator=torch.Generator(device=device).manual_seed(seed + 1), device=device)
    if ignore_every:
        target[::ignore_every] = -100
    return logits, target


def _torch64(logits, target, reduction, ignore_index=-100):
    x = logits.detach().double().requires_grad_()
    return x, F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)


# (N, V): one row, one class, a vocabulary under / just over a chunk (BLOCK_V = 4096), several chunks with a tail.
SIZES = [(1, 1), (1, 97), (97, 1025), (5, kernels.BLOCK_V + 1), (3, 3 * kernels.BLOCK_V - 7)]


@pytest.mark.parametrize("N,V", SIZES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_float64(N, V, reduction, backend):
    logits, target = _inputs(N, V, ignore_every=3 if N > 3 else 0)
    loss = cross_entropy(logits, target, reduction=reduction, backend=backend)
    x64, want = _torch64(logits, target, reduction)
    assert loss.dtype == torch.float32 and loss.shape == want.shape
    assert err(loss, want) < TOL
    upstream = torch.randn_like(want)  # a random upstream gradient, so the per-row scaling is exercised
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    (want_grad,) = torch.autograd.grad(want, x64, upstream)
    assert grad.dtype == logits.dtype and err(grad, want_grad) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_have_zero_loss_and_gradient_and_all_ignored_mean_is_nan(backend):
    logits, target = _inputs(6, 50, ignore_every=2)
    rows = cross_entropy(logits, target, reduction="none", backend=backend)
    assert torch.equal(rows[::2], torch.zeros(3))
    (grad,) = torch.autograd.grad(rows.sum(), logits)
    assert torch.equal(grad[::2], torch.zeros(3, 50)) and grad[1::2].abs().sum() > 0
    target[:] = 7
    assert torch.isnan(cross_entropy(logits, target, ignore_index=7, backend=backend))  # 0 / 0, as torch
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=7))


def test_out_of_range_target_gives_nan_on_the_kernel_and_an_error_on_the_reference():
    logits, target = _inputs(4, 10)
    target[1] = 10
    rows = cross_entropy(logits, target, reduction="none", backend="triton")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
    with pytest.raises((IndexError, RuntimeError)):
        cross_entropy(logits, target, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logits_give_fp16_gradients_within_rounding(backend):
    logits, target = _inputs(33, 1000, dtype=torch.float16)
    loss = cross_entropy(logits, target, backend=backend)
    x64, want = _torch64(logits, target, "mean")
    assert err(loss, want) < 1e-4  # the loss is computed in fp32 from exact fp16 inputs
    (grad,) = torch.autograd.grad(loss, logits)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert grad.dtype == torch.float16 and err(grad, want_grad) < 1e-3 * want_grad.abs().max().item()


def test_reference_backend_and_non_contiguous_logits():
    logits, target = _inputs(20, 64)
    strided = torch.cat([logits, logits], dim=1)[:, ::2]  # (20, 64) with column stride 2
    for backend in ("triton", "reference"):
        loss = cross_entropy(strided, target, backend=backend)
        assert err(loss, _torch64(strided, target, "mean")[1]) < TOL


def test_compiles_with_fullgraph():
    logits, target = _inputs(8, 300)
    step = torch.compile(lambda x, t: cross_entropy(x, t, backend="triton"), fullgraph=True, backend="eager")
    loss = step(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    x64, want = _torch64(logits, target, "mean")
    assert err(loss, want) < TOL and err(grad, torch.autograd.grad(want, x64)[0]) < TOL


def _gradient_penalty(loss_fn, x):
    """d/dx |d loss / dx|^2, the first-order gradient kept as a graph (create_graph=True); the cube keeps it attached
    even where the op's own part would be dropped."""
    (g,) = torch.autograd.grad(loss_fn(x) + x.pow(3).sum(), x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), x)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_torch(backend):
    logits, target = _inputs(6, 40, ignore_every=4)
    x64, _ = _torch64(logits, target, "sum")
    got = _gradient_penalty(lambda x: cross_entropy(x, target, backend=backend), logits)
    assert err(got, _gradient_penalty(lambda x: F.cross_entropy(x, target), x64)) < TOL


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_int32_targets_work_on_every_backend(backend):
    logits, target = _inputs(5, 12)
    loss = cross_entropy(logits, target.int(), backend=backend)
    assert err(loss, _torch64(logits, target, "mean")[1]) < TOL


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, t: cross_entropy(x[0], t), ValueError, "input must be a 2-D"),
        (lambda x, t: cross_entropy(x.long(), t), TypeError, "input must be a floating-point tensor"),
        (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "at least one class"),
        (lambda x, t: cross_entropy(x, t.float()), TypeError, "target must be an integer"),
        (lambda x, t: cross_entropy(x, t.bool()), TypeError, "target must be an integer"),
        (lambda x, t: cross_entropy(x, t[:2]), ValueError, r"target must have shape \(4,\)"),
        (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda x, t: cross_entropy(x, t, ignore_index=1.5), TypeError, "ignore_index"),
        (lambda x, t: cross_entropy(x, t, backend="cuda"), Exception, "cuda"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    logits, target = _inputs(4, 10)
    with pytest.raises(error, match=match):
        call(logits, target)


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(1, 50257), (4097, 50257), (8192, 50304), (97, 1025)], ids=str)
def test_gpu_at_most_twice_torch_error(N, V, dtype):
    logits, target = _inputs(N, V, dtype=dtype, device="cuda", ignore_every=5 if N > 1 else 0)  # N=1: no 0/0 mean
    loss = cross_entropy(logits, target, backend="triton")
    torch_loss = F.cross_entropy(logits.float(), target)  # what a careful eager script does
    x64, want = _torch64(logits, target, "mean")
    assert_within_2x_torch(loss, torch_loss, want, what="loss")
    (grad,) = torch.autograd.grad(loss, logits)
    (torch_grad,) = torch.autograd.grad(torch_loss, logits)
    (want_grad,) = torch.autograd.grad(want, x64)
    assert_within_2x_torch(grad, torch_grad, want_grad, what="gradient")


@pytest.mark.gpu
def test_gpu_peak_memory_below_eager():
    logits, target = _inputs(8192, 50304, dtype=torch.bfloat16, device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (grad,) = torch.autograd.grad(fn(), logits)
        del grad
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda: cross_entropy(logits, target, backend="triton"))
    eager = peak(lambda: F.cross_entropy(logits.float(), target))
    # ours: the bf16 gradient (1x the logits); eager: fp32 copy, fp32 log-probs, fp32 grad and the bf16 grad (7x).
    assert ours < 0.5 * eager, (ours, eager)
