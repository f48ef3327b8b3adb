"""fasttrain.ops.apply_rotary_emb: the Triton kernel (interpreted on CPU) and the C++ CPU kernel against a float64
rotation for outputs and gradients, on awkward lengths, GQA head counts, partial and interleaved rotation, int and
per-sequence offsets, per-sequence tables, strided views of a fused qkv, bf16/fp16, in place, the torch.compile
registration and input errors. GPU tests (`pytest -m gpu`) hold bf16/fp16 to twice the reference's own error."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fasttrain.model.rotary import rotary_tables
from fasttrain.ops.rotary import apply_rotary_emb, apply_rotary_emb_reference

from helpers import TOL_FP32, assert_within_2x_torch, err, randn

TOL = TOL_FP32["rotary"]
KERNELS = ["triton", "cpu"]
BIG = 2**63 - 1  # offsets whose sums with T overflow int64


def _tables(n_pos, rot, device="cpu"):
    return rotary_tables(n_pos, rot, device=device)  # (n_pos, rot/2) fp32 each


def _x(B, T, H, D, dtype=torch.float32, device="cpu", seed=0):
    return randn(B, T, H, D, dtype=dtype, device=device, seed=seed)


def _want(x, cos, sin, interleaved=False, offsets=0):
    """The reference in float64, and its input leaf."""
    x64 = x.detach().double().requires_grad_()
    offsets = offsets.clone() if isinstance(offsets, torch.Tensor) else offsets
    return x64, apply_rotary_emb_reference(x64, cos.double(), sin.double(), interleaved, offsets)


def _check(x, cos, sin, backend, interleaved=False, offsets=0, tol=TOL):
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, backend=backend)
    x64, want = _want(x, cos, sin, interleaved, offsets)
    assert y.dtype == x.dtype and y.shape == x.shape and err(y, want) < tol
    upstream = torch.randn_like(want)
    (grad,) = torch.autograd.grad(y, x, upstream.to(y.dtype))
    (want_grad,) = torch.autograd.grad(want, x64, upstream)
    assert err(grad, want_grad) < tol


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 8), (2, 97, 3, 64), (1, 1025, 2, 16), (2, 5, 12, 128)], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_matches_float64(B, T, H, D, interleaved, backend):
    cos, sin = _tables(T, D)
    _check(_x(B, T, H, D), cos, sin, backend, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_partial_rotation_passes_the_rest_through(interleaved, backend):
    x = _x(2, 9, 3, 32)
    cos, sin = _tables(9, 12)  # rotary_dim 12 of 32
    _check(x, cos, sin, backend, interleaved)
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, backend=backend)
    assert torch.equal(y[..., 12:], x[..., 12:])


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_int_and_tensor_offsets_and_per_sequence_tables(backend):
    x = _x(3, 7, 4, 32)
    cos, sin = _tables(40, 32)
    _check(x, cos, sin, backend, offsets=5)
    offsets = torch.tensor([0, 11, 30])
    _check(x, cos, sin, backend, offsets=offsets)
    _check(x, cos, sin, backend, offsets=offsets.int())
    positions = offsets[:, None] + torch.arange(7)  # (B, T): what a KV cache gives the model
    per_sequence = apply_rotary_emb(x, cos[positions], sin[positions], backend=backend)
    assert err(per_sequence, apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, backend=backend)) < TOL
    _check(x, cos[positions], sin[positions], backend)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("B", [1, 3])
def test_tables_with_a_leading_batch_of_one_match_the_plain_table(backend, B):
    # Hugging Face's rotary embeddings give (1, T, R/2)-shaped rows (their half-width form here).
    x = _x(B, 7, 4, 32, seed=B)
    cos, sin = _tables(7, 24)  # partial rotation: 24 of 32 dims
    y = apply_rotary_emb(x, cos[None], sin[None], backend=backend)
    assert torch.equal(y, apply_rotary_emb(x, cos, sin, backend=backend))
    _check(x, cos[None], sin[None], backend)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_tensor_offsets_past_the_table_leave_those_rows_unrotated(backend, interleaved):
    # flash-attn's kernel reads cos 1 and sin 0 past the table: such rows pass through, forward and backward.
    x = _x(3, 5, 2, 32)
    cos, sin = _tables(6, 24)  # partial rotation: 24 of 32 dims
    offsets = torch.tensor([0, 3, -2])  # row 1 runs past the table from t = 3; row 2 starts before it
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, backend=backend)
    outside = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [True] * 2 + [False] * 3])  # (B, T)
    assert torch.equal(y[outside], x[outside]) and not torch.equal(y[~outside], x[~outside])
    inside = apply_rotary_emb_reference(x.double(), cos.double(), sin.double(), interleaved, offsets.clamp(0, 1) * 3)
    assert err(y[1, :3], inside[1, :3]) < TOL and err(y[0], inside[0]) < TOL
    from_zero = apply_rotary_emb_reference(x[2:, 2:].double(), cos.double(), sin.double(), interleaved)
    assert err(y[2:, 2:], from_zero) < TOL  # row 2 reaches position 0 at t = 2
    huge = torch.tensor([0, BIG, -BIG - 1])  # sums with t that overflow int64: still outside, never a wild read
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=huge, backend=backend)
    assert torch.equal(y[1:], x[1:]) and err(y[0], inside[0]) < TOL
    _check(x, cos, sin, backend, interleaved, offsets=offsets)  # the gradient too, against the float64 reference


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_packed_sequences_each_rotate_from_their_own_start(backend):
    # flash-attn's cu_seqlens/max_seqlen: x (total, H, D) holds sequences of 5, 1 and 4 rows, then 2 rows of none.
    x = _x(1, 12, 3, 16)[0]
    cos, sin = _tables(9, 12)
    cu_seqlens = torch.tensor([0, 5, 6, 10], dtype=torch.int32)
    pieces = [(0, 5), (5, 6), (6, 10)]
    # tensor offsets: sequence 2 runs past the 9 rows at its 4th row
    for offsets, inplace in ((0, False), (4, True), (torch.tensor([0, 7, 6]), False), (torch.tensor([1, 0, 6]), True)):
        shift = offsets.tolist() if isinstance(offsets, torch.Tensor) else [offsets] * 3
        want = torch.cat(
            [
                apply_rotary_emb(x[None, a:b], cos, sin, seqlen_offsets=torch.tensor([s]), backend="reference")[0]
                for (a, b), s in zip(pieces, shift)
            ]
            + [x[10:]]
        )  # (12, 3, 16)
        leaf = x.clone().requires_grad_()
        src = leaf * 1.0 if inplace else leaf
        y = apply_rotary_emb(src, cos, sin, False, inplace, offsets, cu_seqlens, 5, backend=backend)
        assert y.shape == x.shape and err(y, want) < TOL and torch.equal(y[10:], x[10:])
        assert (y is src) == inplace and torch.equal(y[9], x[9]) == (shift[2] == 6)  # position 9: past the table
        upstream = torch.randn_like(y)
        (grad,) = torch.autograd.grad(y, leaf, upstream)
        back = apply_rotary_emb(upstream, cos, -sin, seqlen_offsets=offsets, cu_seqlens=cu_seqlens, max_seqlen=5)
        assert err(grad, back) < TOL
    with pytest.raises(TypeError, match="max_seqlen must be an int with cu_seqlens"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"x must be a \(total, H, D\) tensor with cu_seqlens"):
        apply_rotary_emb(x[None], cos, sin, cu_seqlens=cu_seqlens, max_seqlen=5)
    with pytest.raises(ValueError, match="fewer than seqlen_offsets"):  # flash-attn's bound: offset + max_seqlen
        apply_rotary_emb(x, cos, sin, seqlen_offsets=5, cu_seqlens=cu_seqlens, max_seqlen=5)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(3,\)"):
        apply_rotary_emb(
            x, cos, sin, seqlen_offsets=torch.zeros(2, dtype=torch.long), cu_seqlens=cu_seqlens, max_seqlen=5
        )
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        apply_rotary_emb(x, cos, sin, cu_seqlens=cu_seqlens.float(), max_seqlen=5)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("inplace", [False, True])
def test_packed_rows_past_max_seqlen_stay_as_they_are(backend, inplace):
    # flash-attn's kernel launches max_seqlen rows per sequence rounded up to its 8-row tile (4 rows past 128
    # rotary dims): a sequence of 13 rows under max_seqlen=4 has rows 0..7 rotated and 8..12 returned as they are
    # (flash-attn leaves them untouched in place); a sequence of 7 rows is rotated whole.
    x = _x(1, 23, 2, 16)[0]
    cos, sin = _tables(16, 16)
    cu_seqlens = torch.tensor([0, 13, 20, 23], dtype=torch.int32)
    want = x.clone()
    for a, b in ((0, 8), (13, 20), (20, 23)):
        want[a:b] = apply_rotary_emb_reference(x[None, a:b], cos, sin)[0]
    src = x.clone()
    y = apply_rotary_emb(src, cos, sin, inplace=inplace, cu_seqlens=cu_seqlens, max_seqlen=4, backend=backend)
    assert (y is src) == inplace and err(y, want) < TOL and torch.equal(y[8:13], x[8:13])
    wide = _x(1, 10, 1, 272)[0]  # 272 rotary dims: a 4-row tile
    cos, sin = _tables(16, 272)
    y = apply_rotary_emb(
        wide, cos, sin, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), max_seqlen=3, backend=backend
    )
    assert err(y[:4], apply_rotary_emb_reference(wide[None, :4], cos, sin)[0]) < TOL and torch.equal(y[4:], wide[4:])


def _change_id(value) -> str:
    """A test id without a random tensor's values, which differ between xdist's workers and break its collection."""

    def show(v):
        if not torch.is_tensor(v):
            return str(v)
        return str(v.tolist()) if v.numel() <= 2 else f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"

    return ",".join(f"{k}={show(v)}" for k, v in value.items()) if isinstance(value, dict) else str(value)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(offset=5), r"offset 5 \+ T = 4 is past the 8 positions"),
        (dict(offset=BIG), "is past the 8 positions"),
        (dict(offset=-BIG), "is past the 8 positions"),
        (dict(offsets=torch.tensor([0, 0]), offset=BIG), "with seqlen_offsets is past the 8 positions"),
        (dict(offsets=torch.tensor([0, 0]), offset=-BIG), "with seqlen_offsets is past the 8 positions"),
        (dict(offsets=torch.tensor([0])), r"offsets must be a \(B,\) integer CPU tensor"),
        (dict(offsets=torch.tensor([0.0, 1.0])), r"offsets must be a \(B,\) integer CPU tensor"),
        (dict(offsets=torch.tensor([False, True])), r"offsets must be a \(B,\) integer CPU tensor"),
        (dict(x=torch.randn(2, 4, 3, 32)[..., ::2]), "unit stride along D"),
        (dict(cos=torch.ones(8, 9), sin=torch.ones(8, 9)), "9 columns, more than head_dim / 2"),
        (dict(cos=torch.ones(8, 8, dtype=torch.long), sin=torch.ones(8, 8, dtype=torch.long)), "floating-point CPU"),
        (dict(sin=torch.ones(8, 4)), "of one shape"),
        (dict(cos=torch.ones(2, 4, 8), sin=torch.ones(2, 4, 8), offset=1), "offsets need a shared"),
        (dict(cos=torch.ones(2, 5, 8), sin=torch.ones(2, 5, 8)), r"per-sequence cos/sin must be \(B, T, R/2\)"),
        (dict(x=torch.randn(2, 4, 3, 16).double()), "takes float32, bfloat16 or float16"),
    ],
    ids=_change_id,
)
@pytest.mark.parametrize("inplace", [False, True], ids=["rotary_cpu", "rotary_cpu_"])
def test_cpu_op_checks_what_the_wrapper_would(change, match, inplace):
    # torch.ops.fasttrain.rotary_cpu(_) called directly: an error, never a read past the tables.
    cos, sin = _tables(8, 16)
    args = dict(x=torch.randn(2, 4, 3, 16), cos=cos, sin=sin, offsets=None, offset=0) | change
    with pytest.raises(RuntimeError, match=match):
        if inplace:
            torch.ops.fasttrain.rotary_cpu_(*args.values(), False)
        else:
            torch.ops.fasttrain.rotary_cpu(*args.values(), False, False)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_inplace_refuses_an_expanded_x(backend):
    cos, sin = _tables(8, 16)
    x = torch.randn(1, 1, 1, 16).expand(2, 3, 4, 16)  # one row, 24 aliases
    with pytest.raises(ValueError, match="inplace=True needs x whose elements do not share memory"):
        apply_rotary_emb(x, cos, sin, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="single memory location"):  # the C++ op on its own refuses too
        torch.ops.fasttrain.rotary_cpu_(x, cos, sin, None, 0, False)


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
@pytest.mark.parametrize("shape", [(0, 4, 3, 16), (2, 0, 3, 16), (2, 4, 0, 16)], ids=str)
def test_empty_inputs_forward_and_backward(shape, backend):
    x = torch.randn(shape, requires_grad=True)
    cos, sin = _tables(8, 16)
    y = apply_rotary_emb(x, cos, sin, seqlen_offsets=2, backend=backend)
    y.sum().backward()  # an empty upstream gradient, expanded: stride 0 along D
    assert y.shape == shape and x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tables", ["int offset", "tensor offsets", "per sequence"])
def test_cpu_kernel_low_precision_is_one_rounding_from_the_reference(dtype, interleaved, tables):
    # Both round an fp32 rotation once to dtype, and the two fp32 rotations differ by an fp32 ulp at most (FMA or
    # not), so each element is the reference's or one ulp of dtype from it.
    x = _x(2, 97, 5, 64, dtype=dtype)[:, :, :4]  # strided, as the model passes q
    cos, sin = _tables(140, 48)
    offsets = torch.tensor([7, 40])
    kwargs = {"int offset": dict(seqlen_offsets=7), "tensor offsets": dict(seqlen_offsets=offsets), "per sequence": {}}[
        tables
    ]
    if tables == "per sequence":
        positions = offsets[:, None] + torch.arange(97)  # (B, T)
        cos, sin = cos[positions], sin[positions]
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, backend="cpu", **kwargs)
    ref = apply_rotary_emb(x, cos, sin, interleaved=interleaved, backend="reference", **kwargs)
    one_ulp = torch.finfo(dtype).eps * ref.float().abs() + torch.finfo(dtype).tiny
    assert y.dtype == dtype and torch.equal(y[..., 48:], x[..., 48:])
    assert ((y.float() - ref.float()).abs() <= one_ulp).all()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad,) = torch.autograd.grad(y, x, upstream)
    (ref_grad,) = torch.autograd.grad(ref, x, upstream)
    # As above, plus where a pair's two products cancel: their fp32 sums (fused or not) differ by up to two fp32 ulps
    # of the products, which the result's own ulp does not bound.
    cancellation = 2**-21 * upstream.float().abs().amax(-1, keepdim=True)
    assert (
        (grad.float() - ref_grad.float()).abs()
        <= torch.finfo(dtype).eps * ref_grad.float().abs() + torch.finfo(dtype).tiny + cancellation
    ).all()


def test_auto_takes_the_cpu_kernel_without_the_interpreter():
    # The main job's path: CPU tensors, no TRITON_INTERPRET (the tests turn it on, hence a fresh interpreter), and no
    # fallback warning (fasttrain's own: torch 2.11's profiler warns on entering, on the GPU machine's torch).
    script = textwrap.dedent("""
        import warnings; warnings.filterwarnings("error", message="fasttrain")
        import torch
        from fasttrain.ops import apply_rotary_emb
        x = torch.randn(2, 5, 3, 8, requires_grad=True)
        cos, sin = torch.rand(2, 5, 4).unbind(0)
        with torch.profiler.profile() as prof:
            apply_rotary_emb(x, cos, sin).sum().backward()
        print("rotary_cpu calls:", sum(e.name == "fasttrain::rotary_cpu" for e in prof.events()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "rotary_cpu calls: 2" in result.stdout, result.stderr  # forward, backward


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (8, 1)], ids=str)
def test_strided_qkv_views_with_gqa_heads(backend, H, Hkv):
    B, T, D = 2, 33, 16
    qkv = torch.randn(B, T, H + 2 * Hkv, D, requires_grad=True)
    q, k, _ = qkv.split([H, Hkv, Hkv], dim=2)  # not contiguous: the model's layout
    cos, sin = _tables(T, D)
    for t in (q, k):
        y = apply_rotary_emb(t, cos, sin, backend=backend)
        assert y.is_contiguous() and err(y, apply_rotary_emb_reference(t, cos, sin)) < TOL
    loss = (apply_rotary_emb(q, cos, sin, backend=backend) ** 2).sum() + apply_rotary_emb(k, cos, sin).sum()
    want = (apply_rotary_emb_reference(q, cos, sin) ** 2).sum() + apply_rotary_emb_reference(k, cos, sin).sum()
    (grad,) = torch.autograd.grad(loss, qkv)
    (want_grad,) = torch.autograd.grad(want, qkv)
    assert err(grad, want_grad) < TOL


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_inplace_rotates_x_and_passes_gradients_through(backend):
    x = _x(2, 6, 3, 16).detach()
    cos, sin = _tables(10, 16)
    want = apply_rotary_emb_reference(x, cos, sin, seqlen_offsets=2)
    out = apply_rotary_emb(x, cos, sin, inplace=True, seqlen_offsets=2, backend=backend)
    assert out is x and err(x, want) < TOL
    again = x.clone()  # flash-attn reads its flags by truth: ints 1 and 0 as True and False
    assert apply_rotary_emb(again, cos, sin, inplace=1, interleaved=0, seqlen_offsets=2, backend=backend) is again
    view = _x(2, 6, 5, 16, dtype=torch.bfloat16).detach()
    q, before = view[:, :, :3], view.clone()  # q: strided, in place inside its qkv
    want = apply_rotary_emb_reference(q, cos[:, :4], sin[:, :4], seqlen_offsets=2)  # rotary_dim 8 of 16
    apply_rotary_emb(q, cos[:, :4], sin[:, :4], inplace=True, seqlen_offsets=2, backend=backend)
    assert err(q, want) <= torch.finfo(torch.bfloat16).eps  # one bf16 rounding apart at most
    assert torch.equal(q[..., 8:], before[:, :, :3, 8:]) and torch.equal(view[:, :, 3:], before[:, :, 3:])
    # x requiring grad: rotated in place all the same, the gradient rotated back through it (as flash-attn's)
    leaf = _x(2, 6, 3, 16).requires_grad_()
    y = leaf * 1.0
    out = apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=2, backend=backend)
    x64, want = _want(leaf, cos, sin, offsets=2)
    assert out is y and err(y, want) < TOL
    upstream = torch.randn_like(want)
    assert err(torch.autograd.grad(y, leaf, upstream.float())[0], torch.autograd.grad(want, x64, upstream)[0]) < TOL


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_compiles_with_fullgraph(backend):
    x = _x(2, 5, 3, 16)
    cos, sin = _tables(5, 16)
    step = torch.compile(lambda x: apply_rotary_emb(x, cos, sin, backend=backend), fullgraph=True, backend="eager")
    y = step(x)
    x64, want = _want(x, cos, sin)
    assert err(y, want) < TOL
    assert err(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(want.sum(), x64)[0]) < TOL


@pytest.mark.parametrize("backend", KERNELS + ["reference"])
def test_tables_get_no_gradient(backend):
    x = _x(2, 5, 3, 16)
    cos, sin = _tables(5, 16)
    cos.requires_grad_()
    y = apply_rotary_emb(x, cos, sin, backend=backend)
    grad_x, grad_cos = torch.autograd.grad(y.sum(), (x, cos), allow_unused=True)
    assert grad_x is not None and grad_cos is None


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, c, s: apply_rotary_emb(x[0], c, s), ValueError, r"x must be a \(B, T, H, D\) tensor"),
        (lambda x, c, s: apply_rotary_emb(x.long(), c, s), TypeError, "x must be a floating-point"),
        (lambda x, c, s: apply_rotary_emb(x, c[0], s), ValueError, "cos must be"),
        (lambda x, c, s: apply_rotary_emb(x, c, s.long()), TypeError, "sin must be a floating-point"),
        (lambda x, c, s: apply_rotary_emb(x, c.to("meta"), s), ValueError, "cos must be on x's device"),
        (lambda x, c, s: apply_rotary_emb(x, c, s[:, :2]), ValueError, "sin must have cos's shape"),
        (lambda x, c, s: apply_rotary_emb(x, torch.ones(8, 9), torch.ones(8, 9)), ValueError, "1..8 columns"),
        (lambda x, c, s: apply_rotary_emb(x, c[:3], s[:3]), ValueError, "fewer than seqlen_offsets"),
        (lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=5), ValueError, "fewer than seqlen_offsets"),
        (  # flash-attn's assert seqlen_ro >= seqlen holds with offsets per sequence too
            lambda x, c, s: apply_rotary_emb(
                x, c[:3], s[:3], seqlen_offsets=torch.zeros(x.shape[0], dtype=torch.int32)
            ),
            ValueError,
            "fewer than the sequence length",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=-1),
            ValueError,
            "seqlen_offsets must be an int >= 0",
        ),
        (lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=True), TypeError, "seqlen_offsets must be an int"),
        (lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=1.0), TypeError, "seqlen_offsets must be an int"),
        (
            lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=torch.zeros(2)),
            TypeError,
            "integer tensor, got torch.float32",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=torch.zeros(3, dtype=torch.long)),
            ValueError,
            r"integer tensor of shape \(2,\)",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c, s, seqlen_offsets=torch.zeros(2, dtype=torch.long, device="meta")),
            ValueError,
            "seqlen_offsets must be on x's device",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c[:4].expand(2, 4, 8), s[:4].expand(2, 4, 8), seqlen_offsets=1),
            ValueError,
            "seqlen_offsets must be 0",
        ),
        (
            lambda x, c, s: apply_rotary_emb(
                x, c[:4].expand(2, 4, 8), s[:4].expand(2, 4, 8), seqlen_offsets=torch.zeros(2, dtype=torch.long)
            ),
            ValueError,
            "seqlen_offsets must be 0",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c[:5].expand(2, 5, 8), s[:5].expand(2, 5, 8)),
            ValueError,
            r"must be \(2, 4, R/2\) or \(1, 4, R/2\)",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c[None, :5], s[None, :5]),
            ValueError,
            r"must be \(2, 4, R/2\) or \(1, 4, R/2\), got \(1, 5, 8\)",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c[:4].expand(3, 4, 8), s[:4].expand(3, 4, 8)),
            ValueError,
            r"got \(3, 4, 8\)",
        ),
        (
            lambda x, c, s: apply_rotary_emb(x, c[None, :4], s[None, :4], seqlen_offsets=2),
            ValueError,
            "seqlen_offsets must be 0",
        ),
        (lambda x, c, s: apply_rotary_emb(x, c, s, interleaved="yes"), TypeError, "interleaved must be a bool"),
        (lambda x, c, s: apply_rotary_emb(x, c, s, inplace=1.0), TypeError, "inplace must be a bool"),
        (
            lambda x, c, s: apply_rotary_emb(torch.randn(2, 4, 3, 32)[..., ::2], c, s, inplace=True, backend="triton"),
            ValueError,
            "unit stride along D",
        ),
        (lambda x, c, s: apply_rotary_emb(x.double(), c, s, backend="triton"), RuntimeError, "float64"),
        (lambda x, c, s: apply_rotary_emb(x.double(), c, s, backend="cpu"), RuntimeError, "fp32, bf16 or fp16"),
        (lambda x, c, s: apply_rotary_emb(x, c, s, backend="cuda"), RuntimeError, "cuda"),
        (  # the in-place call with a gradient keeps the backend asked for
            lambda x, c, s: apply_rotary_emb(x.requires_grad_() * 1.0, c, s, inplace=True, backend="cuda"),
            RuntimeError,
            "cuda",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    cos, sin = _tables(8, 16)
    with pytest.raises(error, match=match):
        call(torch.randn(2, 4, 3, 16), cos, sin)


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,T,H,D,rot,interleaved",
    [(1, 1, 32, 128, 128, False), (16, 1024, 12, 64, 64, False), (2, 1025, 8, 128, 64, True)],
    ids=str,
)
@pytest.mark.parametrize("view", [False, True], ids=["contiguous", "view"])
def test_gpu_at_most_twice_the_reference_error(B, T, H, D, rot, interleaved, view, dtype):
    x = _x(B, T, H + 2 * view, D, dtype=dtype, device="cuda")[:, :, :H]  # view: strided, as the model passes q
    cos, sin = _tables(T + 7, rot, device="cuda")
    kwargs = dict(interleaved=interleaved, seqlen_offsets=7)
    y = apply_rotary_emb(x, cos, sin, backend="triton", **kwargs)
    ref = apply_rotary_emb(x, cos, sin, backend="reference", **kwargs)
    x64, want = _want(x, cos, sin, interleaved, offsets=7)
    assert y.dtype == dtype
    assert_within_2x_torch(y, ref, want, what="y")
    upstream = torch.randn_like(want)
    (grad,) = torch.autograd.grad(y, x, upstream.to(dtype))
    (ref_grad,) = torch.autograd.grad(ref, x, upstream.to(dtype))
    (want_grad,) = torch.autograd.grad(want, x64, upstream)
    assert_within_2x_torch(grad, ref_grad, want_grad, what="gradient")


def test_the_reference_rotates_float64_in_float64():
    # float64 inputs are rotated without an fp32 round trip, so gradcheck's default 1e-6 step resolves the gradient
    g = torch.Generator().manual_seed(0)
    cos, sin = (t.double() for t in rotary_tables(12, 8, 10000.0))  # (T, R/2) each
    x = torch.randn(2, 12, 3, 8, generator=g, dtype=torch.float64)
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = cos[:, None], sin[:, None]  # (T, 1, R/2): over heads
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert (apply_rotary_emb_reference(x, cos, sin) - want).abs().max().item() < 1e-15
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin, backend="reference"), (x,))
