"""fasttrain.flash_attn's cross-entropy (flash-attn's `cross_entropy_loss` and `CrossEntropyLoss`, a port of
flash-attn's tests/losses/test_cross_entropy.py for this project): losses, z-losses and gradients against a float64
PyTorch computation for every option, fp32/fp16/bf16, awkward vocabularies, ignored and out-of-range labels, the
in-place backward, reductions and input errors. Plain calls run the Triton kernels under the interpreter here, and the
composition in PyTorch when the interpreter is off (`cpu_user`). The vocabulary split over a process group is
checked by tests/test_dist.py (tests/dist_checks.py, job `cross_entropy`)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fasttrain.flash_attn.losses.cross_entropy import CrossEntropyLoss
from fasttrain.flash_attn.ops.triton.cross_entropy import cross_entropy_loss

from helpers import randn

# Against float64 on the same (rounded) logits: the losses are float32 whatever the logits dtype; the gradient is
# rounded to the logits dtype once.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# (label_smoothing, logit_scale, lse_square_scale, inplace_backward, precomputed_lse)
OPTIONS = {
    "plain": (0.0, 1.0, 0.0, False, False),
    "smoothing": (0.9, 1.0, 0.0, False, False),
    "scale": (0.0, 0.7, 0.0, False, False),
    "z_loss": (0.0, 1.0, 1e-2, False, False),
    "inplace": (0.0, 1.0, 0.0, True, False),
    "lse": (0.0, 1.0, 0.0, False, True),
    "lse_z_inplace": (0.0, 1.0, 1e-2, True, True),
    "all": (0.9, 0.7, 1e-2, True, True),  # precomputed_lse ignored: scaled and smoothed
}


def _labels(N, V, seed=1, ignore_every=0):
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed))
    if ignore_every:
        labels[::ignore_every] = -100
    return labels


def _float64(logits, labels, smoothing, scale, z_scale, ignore_index=-100):
    """(float64 leaf, losses, z_losses) as flash-attn's test computes them, per row: torch's label-smoothed
    cross-entropy of the scaled logits plus z_scale * lse^2, 0 on ignored rows."""
    x = logits.detach().double().requires_grad_()
    z = x * scale
    ce = F.cross_entropy(z, labels.long(), ignore_index=ignore_index, reduction="none", label_smoothing=smoothing)
    z_loss = (z_scale * torch.logsumexp(z, -1).square()).masked_fill(labels == ignore_index, 0.0)
    return x, ce + z_loss, z_loss


def _check(logits, labels, options):
    smoothing, scale, z_scale, inplace, use_lse = options
    x64, want, want_z = _float64(logits, labels, smoothing, scale, z_scale)
    lse = torch.logsumexp(logits.detach().float(), -1) if use_lse else None
    loss, z_loss = cross_entropy_loss(
        logits,
        labels,
        precomputed_lse=lse,
        label_smoothing=smoothing,
        logit_scale=scale,
        lse_square_scale=z_scale,
        inplace_backward=inplace,
    )
    assert loss.dtype == z_loss.dtype == torch.float32 and loss.shape == z_loss.shape == labels.shape
    assert not z_loss.requires_grad
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_loss.double(), want_z.detach(), rtol=1e-5, atol=1e-6)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(7))
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    (want_grad,) = torch.autograd.grad(want, x64, upstream.double())
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert (grad.data_ptr() == logits.data_ptr()) == inplace  # the in-place backward writes over the logits
    dtype = logits.dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=RTOL[dtype], atol=ATOL[dtype])


# (dtype, N, V): GPT-2's vocabulary of 50257 in fp32 by default, in half precision under -m slow.
CASES = [
    *((dtype, N, V) for dtype in (torch.float32, torch.float16, torch.bfloat16) for N, V in [(7, 1), (1, 97), (7, 97)]),
    (torch.float32, 3, 50257),
    pytest.param(torch.float16, 3, 50257, marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, 3, 50257, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("dtype,N,V", CASES, ids=str)
def test_losses_and_gradients_match_float64(dtype, N, V, options):
    logits = randn(N, V, dtype=dtype, scale=3.0)
    _check(logits, _labels(N, V, ignore_every=3 if N > 3 else 0), options)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_composition_without_kernels_matches_float64(cpu_user, options):
    # Without the interpreter a plain call has no kernel on the CPU and takes the composition too.
    logits = randn(9, 1025, scale=3.0)
    _check(logits, _labels(9, 1025, ignore_every=4), options)


def test_plain_calls_take_the_kernels_and_calls_with_options_the_composition(monkeypatch):
    module = importlib.import_module("fasttrain.ops.cross_entropy_loss")
    triton = importlib.import_module("fasttrain.ops.cross_entropy").Triton
    composed, launched = [], []
    apply, forward = module._CrossEntropyLoss.apply, triton.forward
    monkeypatch.setattr(module._CrossEntropyLoss, "apply", lambda *args: composed.append(1) or apply(*args))
    monkeypatch.setattr(triton, "forward", staticmethod(lambda *args: launched.append(1) or forward(*args)))
    logits, labels = randn(4, 33), _labels(4, 33)
    cross_entropy_loss(logits, labels)
    assert (len(launched), len(composed)) == (1, 0)
    for options in [dict(label_smoothing=0.1), dict(inplace_backward=True), dict(precomputed_lse=torch.zeros(4))]:
        cross_entropy_loss(logits, labels, **options)
    assert (len(launched), len(composed)) == (1, 3)
    monkeypatch.delenv("TRITON_INTERPRET")  # no kernel for CPU tensors: the composition
    cross_entropy_loss(logits, labels)
    assert (len(launched), len(composed)) == (1, 4)


def test_rows_chunked_as_one(monkeypatch):
    module = importlib.import_module("fasttrain.ops.cross_entropy_loss")  # the name alone is the function
    monkeypatch.setattr(module, "_CHUNK", 2 * 97)  # 2 rows a chunk, one of 1 at the end
    logits = randn(7, 97, scale=3.0)
    _check(logits, _labels(7, 97, ignore_every=3), OPTIONS["all"])


@pytest.mark.parametrize("interpreter", [True, False], ids=["kernels", "composition"])
@pytest.mark.parametrize("smoothing,z_scale", [(0.0, 0.0), (0.9, 1e-2)])
def test_label_outside_the_vocabulary_adds_no_cross_entropy_but_keeps_the_softmax_gradient(
    monkeypatch, interpreter, smoothing, z_scale
):
    # flash-attn's kernel: the loss is the z-loss (and smoothing * (lse - mean logit)); its gradient is still the
    # softmax's (and the smoothing's), with no -1 at any column.
    if not interpreter:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    V = 11
    logits = randn(4, V, scale=2.0)
    labels = torch.tensor([V, -1, 3, -100])
    loss, z_loss = cross_entropy_loss(logits, labels, label_smoothing=smoothing, lse_square_scale=z_scale)
    x = logits.detach().double().requires_grad_()
    lse = torch.logsumexp(x, -1)
    want = z_scale * lse.square() + smoothing * (lse - x.mean(-1))
    want[2] = F.cross_entropy(x[2:3], labels[2:3], label_smoothing=smoothing) + z_scale * lse[2].square()
    want[3] = 0.0
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    # The gradient is that of lse + z_scale * lse^2 - smoothing * mean logit on rows 0 and 1, not of their loss.
    differentiated = torch.cat([lse[:2] + z_scale * lse[:2].square() - smoothing * x[:2].mean(-1), want[2:]])
    (want_grad,) = torch.autograd.grad(differentiated, x, upstream.double())
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_precomputed_lse_is_used_only_without_smoothing_and_scale():
    logits, labels = randn(5, 13), _labels(5, 13)
    true_lse = torch.logsumexp(logits.detach(), -1)
    shifted = true_lse + 2.0  # not the logits' logsumexp: its use shows in the loss
    loss, _ = cross_entropy_loss(logits, labels, precomputed_lse=shifted)
    picked = logits.detach().gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(loss, shifted - picked)
    (grad,) = torch.autograd.grad(loss.sum(), logits)  # the backward takes it too: softmax of exp(x - lse)
    want = torch.exp(logits.detach() - shifted[:, None]) - F.one_hot(labels, 13)
    torch.testing.assert_close(grad, want)
    ignored, _ = cross_entropy_loss(logits, labels, precomputed_lse=shifted, logit_scale=0.5)
    torch.testing.assert_close(ignored, F.cross_entropy(logits.detach() * 0.5, labels, reduction="none"))


def test_strided_logits_and_int32_labels():
    base = randn(6, 2 * 97, grad=False)
    logits = base[:, ::2].requires_grad_()  # (6, 97), column stride 2
    labels = _labels(6, 97).int()
    _check(logits, labels, OPTIONS["z_loss"])
    _check(logits, labels, OPTIONS["plain"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("return_z_loss", [False, True])
def test_module_reductions_match_flash_attns_test(reduction, return_z_loss):
    # flash-attn's test: torch.nn.CrossEntropyLoss(label_smoothing) of the scaled logits plus the mean z-loss.
    logits, labels = randn(8, 50, scale=2.0), _labels(8, 50, ignore_every=3)
    module = CrossEntropyLoss(
        reduction=reduction, label_smoothing=0.1, logit_scale=0.7, lse_square_scale=1e-2, return_z_loss=return_z_loss
    )
    out = module(logits, labels)
    loss, z_loss = out if return_z_loss else (out, None)
    x64, rows, z_rows = _float64(logits, labels, 0.1, 0.7, 1e-2)
    kept = (labels != -100).sum()
    reduce = {"mean": lambda r: r.sum() / kept, "sum": torch.sum, "none": lambda r: r}[reduction]
    torch.testing.assert_close(loss.double(), reduce(rows).detach(), rtol=1e-5, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.shape == (() if reduction != "none" else (8,))
    if return_z_loss:
        torch.testing.assert_close(z_loss.double(), reduce(z_rows).detach(), rtol=1e-5, atol=1e-7)
        assert z_loss.dtype == torch.float32 and z_loss.shape == loss.shape and not z_loss.requires_grad
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    (want,) = torch.autograd.grad(reduce(rows).sum(), x64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("interpreter", [True, False], ids=["kernels", "composition"])
def test_ignored_rows_have_zero_loss_and_gradient_and_an_all_ignored_mean_is_nan(monkeypatch, interpreter):
    if not interpreter:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, labels = randn(6, 30), _labels(6, 30, ignore_every=2)
    for z_scale in (0.0, 1e-2):
        loss, z_loss = cross_entropy_loss(logits, labels, lse_square_scale=z_scale)
        assert torch.equal(loss[::2], torch.zeros(3)) and torch.equal(z_loss[::2], torch.zeros(3))
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.equal(grad[::2], torch.zeros(3, 30)) and grad[1::2].abs().min() > 0
    labels[:] = 7
    assert torch.isnan(CrossEntropyLoss(ignore_index=7)(logits, labels))


def test_bad_input_errors_name_the_argument():
    logits, labels = randn(4, 10), _labels(4, 10)
    with pytest.raises(NotImplementedError, match="reduction"):
        CrossEntropyLoss(reduction="batchmean")
    cases = [
        (TypeError, "logits", dict(logits=logits.detach().long())),
        (ValueError, "logits", dict(logits=randn(2, 2, 10))),
        (ValueError, "logits", dict(logits=randn(4, 0))),
        (TypeError, "labels", dict(labels=labels.float())),
        (ValueError, "labels", dict(labels=labels[:3])),
        (TypeError, "ignore_index", dict(ignore_index=-100.0)),
        (ValueError, "logit_scale", dict(logit_scale=0.0)),
        (ValueError, "precomputed_lse", dict(precomputed_lse=torch.zeros(3))),
    ]
    for error, name, kwargs in cases:
        args = {"logits": logits, "labels": labels, **kwargs}
        with pytest.raises(error, match=name):
            cross_entropy_loss(**args)
