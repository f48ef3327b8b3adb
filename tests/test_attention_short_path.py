"""flash_attn_func's short path (fasttrain/ops/attention.py `_aot_short`, csrc/attention_aot_autograd.cpp), tested
without a GPU: the calls the aot column would take go from the public function straight to one C++ op with its
autograd in C++, and launch what the general path (checks, the table's choice, the registered op and its Python
autograd) launches, forward and backward; every other call takes the general path; torch.compile traces it; a double
backward takes the reference's gradients as the general path does.

The C++ ops run on CPU tensors with the launch recorder on, over launch-less registry entries of the shipped fp16
cases (bench_overhead's, made from the kernels' descriptions: no cubin is compiled or read, nothing is computed, so
outputs and first-order gradients are never checked here; GPU tests in tests/test_attention_aot.py and
tests/test_attention_backward_aot.py check the ops' values).
"""

import pytest
import torch

import fasttrain._C as C
from fasttrain import _backend
from fasttrain.benchmarks import bench_overhead
from fasttrain.ops import attention as ops
from fasttrain.ops import attention_checks, attention_packed
from fasttrain.ops.attention import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from fasttrain.ops.attention_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

SM = 132


@pytest.fixture(scope="module")
def registered():
    C.aot_clear()
    bench_overhead._register_described(torch.float16, ("attention", "attention_backward"))
    yield
    C.aot_clear()


@pytest.fixture
def recording(registered, monkeypatch):
    """Launches recorded, nothing tuned (each kernel's first shipped tile, the atomic plan), and CPU tensors taken by
    the aot column."""
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    C.aot_tune_reset()
    C.aot_record(True, SM)
    yield
    C.aot_record(False, 0)
    C.aot_tune_reset()


def _launches(records):
    """The recorded launches with each address reduced to whether it is null (outputs are fresh per call)."""
    return [{**r, "args": [bool(a) if t == "ptr" else a for t, a in zip(r["types"], r["args"])]} for r in records]


def _leaves(B, Tq, Tk, H, Hkv, D, dtype=torch.float16):
    torch.manual_seed(0)
    q = torch.randn(B, Tq, H, D, dtype=dtype, requires_grad=True)
    return q, *(torch.randn(B, Tk, Hkv, D, dtype=dtype, requires_grad=True) for _ in "kv")


def _both_paths(monkeypatch, call, leaves, deterministic_algorithms=False):
    """(launches, gradient shapes) of call(*leaves) forward and backward: the short path's, then the general path's."""
    runs = []
    for short in (True, False):
        with monkeypatch.context() as m:
            if short:  # the short path never asks the table
                m.setattr(ops.ATTENTION, "choose", lambda *a, **k: pytest.fail("the general path ran"))
            else:
                m.setattr(ops, "_AOT_OP", None)
                m.setattr(ops, "_AOT_VARLEN_OP", None)
                m.setattr(attention_packed, "_AOT_PACKED_OP", None)
                m.setattr(attention_packed, "_AOT_VARLEN_PACKED_OP", None)
            out = call(*leaves)
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic_algorithms)
            try:
                out.backward(torch.randn_like(out))
            finally:
                torch.use_deterministic_algorithms(before)
        runs.append((_launches(C.aot_records()), [(t.grad.shape, t.grad.dtype) for t in leaves], out.shape))
        C.aot_record(True, SM)  # clears
        for t in leaves:
            t.grad = None
    return runs


W = ops.UNBOUNDED
# (B, Tq, Tk, H, Hkv, D, flash_attn_func's keywords, torch.use_deterministic_algorithms in the backward): one token;
# GQA 4, causal, deterministic; a window at head dim 128; Tq < Tk with a scale, GQA 8, the global switch; two
# sequences, GQA 2, bf16 is the dtype's only difference (fp16 here).
CASES = [
    (1, 1, 1, 2, 2, 64, {"causal": True}, False),
    (1, 97, 97, 8, 2, 64, {"causal": True, "deterministic": True}, False),
    (1, 33, 33, 2, 2, 128, {"window_size": (16, 0)}, False),
    (1, 5, 40, 8, 1, 64, {"softmax_scale": 0.3, "window_size": (-1, 7)}, True),
    (2, 17, 17, 4, 2, 64, {"causal": True, "window_size": (8, -1)}, False),
]


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"case{i}")
def test_short_path_launches_what_the_general_path_does(recording, monkeypatch, i):
    *shape, kwargs, global_switch = CASES[i]
    runs = _both_paths(monkeypatch, lambda q, k, v: flash_attn_func(q, k, v, **kwargs), _leaves(*shape), global_switch)
    (short, short_grads, short_shape), (general, general_grads, general_shape) = runs
    assert short == general and short_grads == general_grads and short_shape == general_shape
    kernels = [r["kernel"] for r in short]
    separate_dq = kwargs.get("deterministic", False) or global_switch
    assert kernels == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + (
        ["_attn_bwd_dq_kernel"] if separate_dq else []
    )
    named = dict(zip(("left", "right"), short[0]["args"][24:26]))
    left, right = kwargs.get("window_size", (-1, -1))
    assert named == {
        "left": W if left == -1 else left,
        "right": 0 if kwargs.get("causal") else (W if right == -1 else right),
    }


@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_without_a_mask_takes_the_short_path_with_the_same_launches(recording, monkeypatch, gqa):
    B, Tq, Tk, H, Hkv, D = 1, 9, 20, 4, 2 if gqa else 4, 64
    leaves = [t.detach().transpose(1, 2).requires_grad_() for t in _leaves(B, Tq, Tk, H, Hkv, D)]  # (B, H, T, D)

    def call(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    (short, short_grads, shape), (general, general_grads, _) = _both_paths(monkeypatch, call, leaves)
    assert short == general and short_grads == general_grads and shape == (B, H, Tq, D)
    assert short[0]["args"][24:26] == [W, Tq - Tk]  # top-left causal: the bottom-right band shifted by Tq - Tk


def _causal_mask(Tq, Tk, window=None):
    """torch's top-left causal mask (Tq, Tk), True = attend; a window keeps the last `window` keys of each row."""
    i, j = torch.arange(Tq)[:, None], torch.arange(Tk)
    return (j <= i) & (j > i - window) if window else j <= i


# (mask, SDPA's (left, right) in flash-attn's bottom-right coordinates): boolean causal; additive causal (0 / -inf)
# broadcast over the batch; a boolean sliding window; all True (unbounded both ways)
MASKS = [
    (lambda Tq, Tk: _causal_mask(Tq, Tk), lambda Tq, Tk: [W, Tq - Tk]),
    (
        lambda Tq, Tk: torch.zeros(1, 1, Tq, Tk).masked_fill(~_causal_mask(Tq, Tk), float("-inf")),
        lambda Tq, Tk: [W, Tq - Tk],
    ),
    (lambda Tq, Tk: _causal_mask(Tq, Tk, window=4), lambda Tq, Tk: [3 + Tk - Tq, Tq - Tk]),
    (lambda Tq, Tk: torch.ones(Tq, Tk, dtype=torch.bool), lambda Tq, Tk: [W, W]),
]


@pytest.mark.parametrize("i", range(len(MASKS)), ids=["bool-causal", "additive-causal", "window", "all"])
def test_sdpa_with_a_band_mask_takes_the_short_path_with_the_same_launches(recording, monkeypatch, i):
    B, Tq, Tk, H, Hkv, D = 2, 12, 12, 4, 2, 64
    make, band = MASKS[i]
    mask = make(Tq, Tk)
    leaves = [t.detach().transpose(1, 2).requires_grad_() for t in _leaves(B, Tq, Tk, H, Hkv, D)]  # (B, H, T, D)

    def call(q, k, v):
        return scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)

    (short, short_grads, shape), (general, general_grads, _) = _both_paths(monkeypatch, call, leaves)
    assert short == general and short_grads == general_grads and shape == (B, H, Tq, D)
    assert short[0]["args"][24:26] == band(Tq, Tk) and len(short) == 3


def _packed_leaves(packed, B, Tq, Tk, H, Hkv, D):
    torch.manual_seed(0)
    if packed == "qkv":
        return (torch.randn(B, Tq, 3, H, D, dtype=torch.float16, requires_grad=True),)
    q = torch.randn(B, Tq, H, D, dtype=torch.float16, requires_grad=True)
    return q, torch.randn(B, Tk, 2, Hkv, D, dtype=torch.float16, requires_grad=True)


PACKED = {"qkv": flash_attn_qkvpacked_func, "kv": flash_attn_kvpacked_func}
# (packed, B, Tq, Tk, H, Hkv, D, keywords, torch.use_deterministic_algorithms): qkvpacked causal, one token; qkvpacked
# with a window at head dim 128, deterministic; kvpacked GQA 2:1 with Tq != Tk and a scale; kvpacked MQA, the switch
PACKED_CASES = [
    ("qkv", 1, 1, 1, 2, 2, 64, {"causal": True}, False),
    ("qkv", 2, 33, 33, 2, 2, 128, {"window_size": (16, 0), "deterministic": True}, False),
    ("kv", 2, 9, 20, 4, 2, 64, {"softmax_scale": 0.3}, False),
    ("kv", 1, 17, 17, 4, 1, 64, {"causal": True}, True),
]


@pytest.mark.parametrize("i", range(len(PACKED_CASES)), ids=lambda i: f"{PACKED_CASES[i][0]}{i}")
def test_packed_functions_take_the_short_path_with_the_same_launches(recording, monkeypatch, i):
    packed, *shape, kwargs, global_switch = PACKED_CASES[i]
    leaves = _packed_leaves(packed, *shape)
    runs = _both_paths(monkeypatch, lambda *t: PACKED[packed](*t, **kwargs), leaves, global_switch)
    _assert_same_packed_launches(runs, kwargs.get("deterministic", False) or global_switch)


def _assert_same_packed_launches(runs, separate_dq: bool):
    """`_both_paths`' two runs equal, forward and backward, the dQ kernel launched only with a separate dQ pass."""
    (short, short_grads, short_shape), (general, general_grads, general_shape) = runs
    assert short == general and short_grads == general_grads and short_shape == general_shape
    kernels = ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    assert [r["kernel"] for r in short] == kernels + ["_attn_bwd_dq_kernel"] * separate_dq


@pytest.mark.parametrize("packed", ["qkv", "kv"])
def test_packed_short_path_writes_the_gradients_into_the_packed_gradient(recording, packed):
    B, T, H, Hkv, D = 1, 16, 4, 4 if packed == "qkv" else 2, 64
    leaves = _packed_leaves(packed, B, T, T, H, Hkv, D)
    out = PACKED[packed](*leaves, causal=True, deterministic=True)
    assert "AttentionAotPacked" in out.grad_fn.name()
    out.backward(torch.randn_like(out))
    fwd, pre, dkdv, dq = C.aot_records()
    g = leaves[-1].grad  # qkv's (B, T, 3, H, D) or kv's (B, Tk, 2, Hkv, D) gradient, written in place: no copy
    first = 1 if packed == "qkv" else 0  # k's slot in it
    assert g.shape == leaves[-1].shape and g.is_contiguous()
    assert dkdv["args"][6:8] == [g[:, :, first].data_ptr(), g[:, :, first + 1].data_ptr()]  # DK, DV
    assert dq["args"][6] == (leaves[0].grad.data_ptr() if packed == "kv" else g[:, :, 0].data_ptr())  # DQ
    q, k, v = leaves[0].unbind(2) if packed == "qkv" else (leaves[0], *leaves[1].unbind(2))
    assert fwd["args"][:3] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]  # the forward reads the views: no copy


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


# (query lengths, key lengths, H, Hkv, D, flash_attn_varlen_func's keywords, torch.use_deterministic_algorithms):
# one one-token sequence; a one-token sequence beside longer ones, GQA 4, causal, deterministic; a window at head dim
# 128 with Tq_b != Tk_b and a scale; MQA, causal with a left window, the global switch
VARLEN_CASES = [
    ((1,), (1,), 2, 2, 64, {"causal": True}, False),
    ((1, 40, 17), (1, 40, 17), 8, 2, 64, {"causal": True, "deterministic": True}, False),
    ((5, 30), (12, 33), 2, 2, 128, {"window_size": (16, 0), "softmax_scale": 0.3}, False),
    ((9, 20), (9, 20), 4, 1, 64, {"causal": True, "window_size": (8, -1)}, True),
]


def _varlen_leaves(lengths_q, lengths_k, H, Hkv, D):
    torch.manual_seed(0)
    q = torch.randn(sum(lengths_q), H, D, dtype=torch.float16, requires_grad=True)
    return q, *(torch.randn(sum(lengths_k), Hkv, D, dtype=torch.float16, requires_grad=True) for _ in "kv")


@pytest.mark.parametrize("i", range(len(VARLEN_CASES)), ids=lambda i: f"case{i}")
def test_varlen_short_path_launches_what_the_general_path_does(recording, monkeypatch, i):
    lengths_q, lengths_k, H, Hkv, D, kwargs, global_switch = VARLEN_CASES[i]
    cu_q, cu_k = _offsets(lengths_q), _offsets(lengths_k)
    max_q, max_k = max(lengths_q) + i % 2, max(lengths_k)  # a bound above the longest too

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    assert "AttentionAot" in call(*_varlen_leaves(lengths_q, lengths_k, H, Hkv, D)).grad_fn.name()
    C.aot_record(True, SM)  # clears
    runs = _both_paths(monkeypatch, call, _varlen_leaves(lengths_q, lengths_k, H, Hkv, D), global_switch)
    (short, short_grads, short_shape), (general, general_grads, general_shape) = runs
    assert short == general and short_grads == general_grads and short_shape == general_shape
    separate_dq = kwargs.get("deterministic", False) or global_switch
    kernels = ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    assert [r["kernel"] for r in short] == kernels + ["_attn_bwd_dq_kernel"] * separate_dq
    assert all(r["case"].endswith("varlen") for r in short[1:])


def _varlen_packed_leaves(packed, lengths_q, lengths_k, H, Hkv, D):
    torch.manual_seed(0)
    if packed == "qkv":
        return (torch.randn(sum(lengths_q), 3, H, D, dtype=torch.float16, requires_grad=True),)
    q = torch.randn(sum(lengths_q), H, D, dtype=torch.float16, requires_grad=True)
    return q, torch.randn(sum(lengths_k), 2, Hkv, D, dtype=torch.float16, requires_grad=True)


# (packed, query lengths, key lengths, H, Hkv, D, keywords, the switch): qkvpacked causal with a one-token sequence;
# qkvpacked with a window at head dim 128, deterministic; kvpacked GQA 2 with Tq_b != Tk_b; kvpacked MQA, the switch
VARLEN_PACKED_CASES = [
    ("qkv", (1, 13), (1, 13), 2, 2, 64, {"causal": True}, False),
    ("qkv", (33, 7), (33, 7), 2, 2, 128, {"window_size": (16, 0), "deterministic": True}, False),
    ("kv", (9, 3), (20, 5), 4, 2, 64, {"softmax_scale": 0.3}, False),
    ("kv", (17,), (17,), 4, 1, 64, {"causal": True}, True),
]


def _varlen_packed_call(packed, lengths_q, lengths_k, kwargs):
    cu_q, cu_k = _offsets(lengths_q), _offsets(lengths_k)
    if packed == "qkv":
        return lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu_q, max(lengths_q), **kwargs)
    return lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lengths_q), max(lengths_k), **kwargs)


@pytest.mark.parametrize("i", range(len(VARLEN_PACKED_CASES)), ids=lambda i: f"{VARLEN_PACKED_CASES[i][0]}{i}")
def test_varlen_packed_functions_take_the_short_path_with_the_same_launches(recording, monkeypatch, i):
    packed, lengths_q, lengths_k, H, Hkv, D, kwargs, global_switch = VARLEN_PACKED_CASES[i]
    call = _varlen_packed_call(packed, lengths_q, lengths_k, kwargs)
    leaves = _varlen_packed_leaves(packed, lengths_q, lengths_k, H, Hkv, D)
    assert "AttentionAotPacked" in call(*leaves).grad_fn.name()
    C.aot_record(True, SM)  # clears
    runs = _both_paths(monkeypatch, call, leaves, global_switch)
    _assert_same_packed_launches(runs, kwargs.get("deterministic", False) or global_switch)


@pytest.mark.parametrize("packed", ["qkv", "kv"])
def test_varlen_packed_short_path_writes_the_gradients_into_the_packed_gradient(recording, packed):
    lengths, H, Hkv, D = (1, 15), 4, 4 if packed == "qkv" else 2, 64
    leaves = _varlen_packed_leaves(packed, lengths, lengths, H, Hkv, D)
    out = _varlen_packed_call(packed, lengths, lengths, {"causal": True, "deterministic": True})(*leaves)
    assert "AttentionAotPacked" in out.grad_fn.name()
    out.backward(torch.randn_like(out))
    fwd, pre, dkdv, dq = C.aot_records()
    g = leaves[-1].grad  # qkv's (total, 3, H, D) or kv's (total_k, 2, Hkv, D) gradient, written in place: no copy
    first = 1 if packed == "qkv" else 0  # k's slot in it
    assert g.shape == leaves[-1].shape and g.is_contiguous()
    assert dkdv["args"][6:8] == [g[:, first].data_ptr(), g[:, first + 1].data_ptr()]  # DK, DV
    assert dq["args"][6] == (leaves[0].grad.data_ptr() if packed == "kv" else g[:, 0].data_ptr())  # DQ
    q, k, v = leaves[0].unbind(1) if packed == "qkv" else (leaves[0], *leaves[1].unbind(1))
    assert fwd["args"][:3] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]  # the forward reads the views: no copy


class _Offsets:
    """What `_known_longest` reads of a CUDA offsets tensor, which this machine cannot make: its values raise."""

    is_cuda = True

    def __init__(self):
        self._version = 0

    def tolist(self):
        raise AssertionError("the offsets were read")


def test_known_longest_reads_no_cuda_offsets(monkeypatch):
    monkeypatch.setattr(attention_checks, "_checked_offsets", {})
    cu = _Offsets()
    assert attention_checks._known_longest("cu_seqlens_q", cu, 40) is None  # never checked: the general path reads
    attention_checks._checked_offsets["cu_seqlens_q"] = (attention_checks.weakref.ref(cu), 0, 40, 17)
    assert attention_checks._known_longest("cu_seqlens_q", cu, 40) == 17  # remembered: no read
    assert attention_checks._known_longest("cu_seqlens_k", cu, 40) is None  # remembered under the other name only
    assert attention_checks._known_longest("cu_seqlens_q", cu, 41) is None  # another packed length
    cu._version = 1  # written in place since
    assert attention_checks._known_longest("cu_seqlens_q", cu, 40) is None
    assert attention_checks._known_longest("cu_seqlens_q", _Offsets(), 40) is None  # another tensor


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_packed_op_refuses_a_packed_axis_of_the_wrong_size(device):
    q = torch.randn(1, 16, 2, 64, device=device, dtype=torch.bfloat16)
    for qkv, kv, name in (
        (torch.randn(1, 16, 2, 2, 64, device=device, dtype=torch.bfloat16), None, "qkv"),
        (torch.randn(1, 16, 4, 2, 64, device=device, dtype=torch.bfloat16), None, "qkv"),
        (q, torch.randn(1, 16, 1, 2, 64, device=device, dtype=torch.bfloat16), "kv"),
        (q, torch.randn(1, 16, 3, 2, 64, device=device, dtype=torch.bfloat16), "kv"),
    ):
        with pytest.raises(RuntimeError, match=f"{name} must be"):
            torch.ops.fasttrain.attention_aot_packed(qkv, kv, 0.125, -1, -1, False)


def test_packed_short_path_is_once_differentiable_as_the_general_path(recording):
    (qkv,) = _packed_leaves("qkv", 1, 8, 8, 2, 2, 64)
    errors = []
    for backend in (None, "aot"):
        (g,) = torch.autograd.grad(flash_attn_qkvpacked_func(qkv, backend=backend).float().pow(2).sum(), (qkv,),
                                   create_graph=True)  # fmt: skip
        with pytest.raises(RuntimeError, match="marked with @once_differentiable") as e:
            g.float().sum().backward()
        errors.append(str(e.value).splitlines()[0])
    assert errors[0] == errors[1]


class _General(Exception):
    pass


def test_short_path_leaves_every_other_call_to_the_general_path(recording, monkeypatch):
    monkeypatch.setattr(ops.ATTENTION, "choose", lambda *a, **k: (_ for _ in ()).throw(_General()))
    q, k, v = _leaves(1, 8, 8, 4, 2, 64)
    rows, cu = [t[0] for t in (q, k, v)], _offsets((3, 5))  # two packed sequences (8, H, D)
    general = [
        lambda: flash_attn_func(q, k, v, backend="aot"),  # a backend named
        lambda: flash_attn_func(q, k, v, return_attn_probs=True),
        lambda: flash_attn_func(q, k, v, softcap=30.0),
        lambda: flash_attn_func(q, k, v, alibi_slopes=torch.ones(4)),
        lambda: flash_attn_func(q, k, v, window_size=[4, 0]),  # a list: the general path reads it
        lambda: flash_attn_func(q, k, v, softmax_scale=1),  # an int scale
        lambda: flash_attn_func(q.float(), k.float(), v.float()),  # not a shipped dtype
        lambda: flash_attn_func(*(t[..., :32] for t in (q, k, v))),  # head_dim 32
        lambda: flash_attn_func(q[:, :, :3], k[:, :, :1], v[:, :, :1]),  # GQA group 3
        lambda: flash_attn_func(q.detach().transpose(1, 3).contiguous().transpose(1, 3), k, v),  # stride along D
        lambda: flash_attn_func(torch.nn.Parameter(q.detach()), k, v),  # a subclass
        lambda: scaled_dot_product_attention(  # a padding mask: segments, gathered rows
            *(t.transpose(1, 2) for t in (q, k, v)), torch.arange(8) < 5, enable_gqa=True
        ),
        lambda: scaled_dot_product_attention(  # two stretches of keys per row: the reference
            *(t.transpose(1, 2) for t in (q, k, v)), torch.arange(8) % 2 == 0, enable_gqa=True
        ),
        lambda: flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), backend="aot"),
        lambda: flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), dropout_p=0.1),
        lambda: flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), return_attn_probs=True),
        lambda: flash_attn_qkvpacked_func(torch.stack((q, q, q), 2).float()),
        lambda: flash_attn_kvpacked_func(q, torch.stack((k, v), 2), window_size=[4, 0]),
        lambda: flash_attn_kvpacked_func(q[..., :32], torch.stack((k, v), 2)[..., :32]),  # head_dim 32
        lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8, backend="aot"),
        lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8, return_attn_probs=True),
        lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8, softcap=30.0),
        lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8, window_size=[4, 0]),
        lambda: flash_attn_varlen_func(*rows, torch.stack((cu, cu), 1)[:, 0], cu, 8, 8),  # strided offsets
        lambda: flash_attn_varlen_func(*(t.float() for t in rows), cu, cu, 8, 8),  # not a shipped dtype
        lambda: flash_attn_varlen_func(rows[0][:, :3], rows[1][:, :1], rows[2][:, :1], cu, cu, 8, 8),  # GQA 3
        lambda: flash_attn_varlen_qkvpacked_func(torch.stack(rows[:1] * 3, 1), cu, 8, backend="aot"),
        lambda: flash_attn_varlen_qkvpacked_func(torch.stack(rows[:1] * 3, 1), cu, 8, dropout_p=0.1),
        lambda: flash_attn_varlen_kvpacked_func(
            rows[0], torch.stack(rows[1:], 1), cu, cu, 8, 8, lse_grad=True, return_attn_probs=True
        ),  # fmt: skip
        lambda: flash_attn_varlen_kvpacked_func(rows[0][..., :32], torch.stack(rows[1:], 1)[..., :32], cu, cu, 8, 8),
    ]
    for i, call in enumerate(general):
        with pytest.raises(_General):
            call()
        assert C.aot_records() == [], i
    with monkeypatch.context() as m:
        m.setenv("FASTTRAIN_BACKEND", "reference")
        with pytest.raises(_General):
            flash_attn_func(q, k, v)
    # a bad argument never reaches the op: the general path raises its error
    bad = [
        (lambda: flash_attn_func(q, k.double(), v), TypeError, "k must have q's dtype"),
        (lambda: flash_attn_func(q, k[:, :, :0], v[:, :, :0]), ValueError, "must divide"),
        (lambda: flash_attn_func(q, k, v[:, :4]), ValueError, "same shape"),
        (lambda: flash_attn_func(q, k, v, window_size=(0.5, 0)), TypeError, "window_size"),
        (lambda: scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))), ValueError, "enable_gqa"),
        (
            lambda: scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), torch.ones(8, 8) > 0, is_causal=True, enable_gqa=True
            ),
            ValueError,
            "cannot both be set",
        ),
        (
            lambda: scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), torch.ones(8, 8, dtype=torch.int64), enable_gqa=True
            ),
            TypeError,
            "attn_mask must be bool",
        ),
        (lambda: flash_attn_func(q, k, v, lse_grad=1), TypeError, "lse_grad must be a bool"),
        (lambda: flash_attn_func(q, k, v, dropout_p=1.0), ValueError, "dropout_p must be in"),
        (lambda: flash_attn_func(q, k, v, dropout_p=True), TypeError, "dropout_p must be a float"),
        (lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8, dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (
            lambda: scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), dropout_p=1.5, enable_gqa=True
            ),
            ValueError,
            "dropout_p must be in",
        ),
        (lambda: flash_attn_qkvpacked_func(torch.stack((q, q, q), 2), lse_grad=None), TypeError, "lse_grad"),
        (lambda: flash_attn_kvpacked_func(q, torch.stack((k, v), 2), lse_grad="yes"), TypeError, "lse_grad"),
        (lambda: flash_attn_qkvpacked_func(torch.stack((q, q), 2)), ValueError, "qkv must be"),
        (lambda: flash_attn_kvpacked_func(q[:, :, :3], torch.stack((k, v), 2)), ValueError, "must divide"),
        (lambda: flash_attn_varlen_func(*rows, cu, cu, 4, 8), ValueError, "max_seqlen_q must be an int >= the"),
        (lambda: flash_attn_varlen_func(*rows, cu, cu, 8, 8.0), TypeError, "max_seqlen_k must be an int"),
        (lambda: flash_attn_varlen_func(*rows, cu.long(), cu, 8, 8), TypeError, "cu_seqlens_q must be an int32"),
        (lambda: flash_attn_varlen_func(*rows, cu, cu.flip(0), 8, 8), ValueError, "cu_seqlens_k must rise from 0"),
        (lambda: flash_attn_varlen_func(*rows, cu, cu[:2], 8, 8), ValueError, "must have the same length"),
        (lambda: flash_attn_varlen_func(*rows, cu, _offsets((3, 4)), 8, 8), ValueError, "packed length 8"),
        (lambda: flash_attn_varlen_qkvpacked_func(torch.stack(rows[:1] * 3, 1), cu.flip(0), 8), ValueError, "rise"),
        (
            lambda: flash_attn_varlen_kvpacked_func(rows[0], torch.stack(rows[1:], 1), cu, cu, 8, 2),
            ValueError,
            "max_seqlen_k must be an int >=",
        ),  # fmt: skip
    ]
    for call, error, match in bad:
        with pytest.raises(error, match=match):
            call()
    assert C.aot_records() == []


def test_autocast_changes_neither_path(recording, monkeypatch):
    # the ops have no autocast kernel: under autocast the general path takes the aot column as it is, so the short
    # path takes the call too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (short, _, _), (general, _, _) = _both_paths(monkeypatch, flash_attn_func, _leaves(1, 16, 16, 4, 4, 64))
    assert short == general and len(short) == 3


def _meta(shape, stride=None, dtype=torch.float16):
    return torch.empty_strided(shape, stride or torch.empty(shape, device="meta").stride(), dtype=dtype, device="meta")


def test_short_path_takes_exactly_what_the_columns_reason_takes(monkeypatch):
    """The inline checks against `_aot_reason` itself, on meta tensors (sizes and strides, no memory): dtypes, head
    dims, groups, the grid's batch and head limits, int32 row offsets and strides at their edges."""
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    monkeypatch.setattr(ops, "_AOT_OP", lambda *args: "short")
    big = 2**31 // (4 * 64)  # rows of 4 x 64 elements: int32 offsets end at row `big`
    variants = [
        ((1, 8, 4, 64), (1, 8, 4, 64), torch.float16, None),
        ((1, 8, 4, 128), (1, 8, 1, 128), torch.bfloat16, None),
        ((1, 8, 4, 64), (1, 8, 4, 64), torch.float32, None),
        ((1, 8, 4, 96), (1, 8, 4, 96), torch.float16, None),
        ((1, 8, 4, 32), (1, 8, 4, 32), torch.float16, None),
        ((1, 8, 16, 64), (1, 8, 1, 64), torch.float16, None),  # GQA 16
        ((1, 8, 6, 64), (1, 8, 2, 64), torch.float16, None),  # GQA 3
        ((65535, 1, 2, 64), (65535, 1, 2, 64), torch.float16, None),
        ((65536, 1, 2, 64), (65536, 1, 2, 64), torch.float16, None),
        ((1, big - 1, 4, 64), (1, 4, 4, 64), torch.float16, None),
        ((1, big, 4, 64), (1, 4, 4, 64), torch.float16, None),
        ((1, 4, 4, 64), (1, big, 4, 64), torch.float16, None),
        ((1, 4, 4, 64), (1, 4, 4, 64), torch.float16, (2**30, 2**29, 64, 1)),  # q's rows 2**29 apart
        ((1, 4, 4, 64), (1, 4, 4, 64), torch.float16, (2**31, 256, 64, 1)),  # a batch stride past int32
        ((1, 1, 65536, 64), (1, 1, 65536, 64), torch.float16, None),  # heads past the grid
    ]
    taken = []
    for q_shape, k_shape, dtype, q_stride in variants:
        q, k, v = _meta(q_shape, q_stride, dtype), _meta(k_shape, dtype=dtype), _meta(k_shape, dtype=dtype)
        taken.append(ops._aot_short(q, k, v, None, W, 0, False) == "short")
        why = ops._aot_reason(q, k, v, None, q.shape[1], k.shape[1], None, 0.0, 0.0, None)
        assert taken[-1] == (why is None), (q_shape, k_shape, dtype, q_stride, why)
    assert taken == [True, True, False, True, False, False, False, True, False, True, False, False, False, False, False]


def test_autograd_runs_in_cpp_and_a_call_with_nothing_to_record_skips_it(recording):
    q, k, v = _leaves(1, 16, 16, 2, 2, 64)
    out = flash_attn_func(q, k, v, causal=True)
    assert "AttentionAot" in out.grad_fn.name()
    out.sum().backward()
    assert len(C.aot_records()) == 3 and all(t.grad is not None for t in (q, k, v))
    C.aot_record(True, SM)  # clears
    with torch.no_grad():
        out = flash_attn_func(q, k, v, causal=True)
    out_detached = flash_attn_func(q.detach(), k.detach(), v.detach(), causal=True)
    assert out.grad_fn is None and out_detached.grad_fn is None and not out_detached.requires_grad
    assert [r["kernel"] for r in C.aot_records()] == ["_attn_fwd_kernel"] * 2


def test_a_gradient_with_strides_past_int32_is_copied_for_the_cubins(recording):
    # dO is whatever view the caller differentiated: here a batch stride of 2**31 on a size-1 batch (no storage)
    q, k, v = _leaves(1, 16, 16, 2, 2, 64)
    dout = torch.randn(1, 16, 2, 64, dtype=torch.float16)
    wide = dout.as_strided(dout.shape, (2**31, *dout.stride()[1:]))
    launches = []
    for grad in (dout, wide):
        flash_attn_func(q, k, v, causal=True).backward(grad)
        launches.append(_launches(C.aot_records()))
        C.aot_record(True, SM)  # clears
    assert launches[0] == launches[1] and len(launches[0]) == 3


def test_torch_compile_traces_the_short_path_forward_and_backward(recording):
    q, k, v = _leaves(1, 16, 16, 4, 2, 64)

    def attend(q, k, v):
        return flash_attn_func(q, k, v, causal=True, deterministic=True)

    attend(q, k, v).sum().backward()
    eager = _launches(C.aot_records())
    C.aot_record(True, SM)  # clears
    torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v).sum().backward()
    assert _launches(C.aot_records()) == eager and len(eager) == 4


COMPILED = {
    "dense": lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend="aot"),
    "qkv": lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True, backend="aot"),
    "kv": lambda q, kv: flash_attn_kvpacked_func(q, kv, window_size=(4, 0), backend="aot"),
    "varlen-qkv": lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, CU, 11, causal=True, backend="aot"),
}
CU = torch.tensor([0, 5, 16], dtype=torch.int32)


@pytest.mark.parametrize("which", list(COMPILED))
def test_compiled_general_backward_ignores_the_lse_gradient_it_is_handed(recording, monkeypatch, which):
    """Under torch.compile, AOTAutograd hands the backward a zero dlse for the lse nobody differentiates (the packed
    Function's set_materialize_grads does not survive its trace): the backward still takes the aot column's launches
    that the eager call records (a dlse read would launch the preprocess's HAS_DLSE cubin instead)."""
    monkeypatch.setattr(ops.Triton, "backward", lambda *a: pytest.fail("the triton column's backward ran"))
    if which == "dense":
        leaves = _leaves(1, 16, 16, 4, 2, 64)
    elif which == "varlen-qkv":
        leaves = (torch.randn(16, 3, 2, 64, dtype=torch.float16, requires_grad=True),)
    else:
        leaves = _packed_leaves(which, 1, 16, 16, 4, 2, 64)
    COMPILED[which](*leaves).sum().backward()
    eager = _launches(C.aot_records())
    C.aot_record(True, SM)  # clears
    torch.compile(COMPILED[which], backend="aot_eager")(*leaves).sum().backward()
    assert _launches(C.aot_records()) == eager and [r["kernel"] for r in eager][-2:] == [
        "_attn_bwd_preprocess_kernel",
        "_attn_bwd_dkdv_kernel",
    ]


@pytest.mark.parametrize("aliased", [False, True], ids=["qkv", "x-as-qkv"])
def test_double_backward_takes_the_reference_gradients_as_the_general_path_does(recording, aliased):
    # A gradient penalty: the first-order gradients kept as a graph. The recorder computes no output, so the outer
    # loss is out.sum(), whose upstream gradient (ones) does not read it.
    def penalty(attend, q, k, v):
        grads = torch.autograd.grad(attend(q, k, v).float().sum(), (q, k, v), create_graph=True)
        return [g.detach() for g in grads], torch.autograd.grad(sum(g.float().pow(2).sum() for g in grads), (q, k, v))

    if aliased:
        x = _leaves(1, 9, 9, 2, 2, 64)[0]
        leaves = (x, x, x)
    else:
        leaves = _leaves(1, 9, 9, 4, 2, 64)
    assert "AttentionAot" in flash_attn_func(*leaves, causal=True).grad_fn.name()  # the short path's node
    C.aot_record(True, SM)  # clears
    got = penalty(lambda q, k, v: flash_attn_func(q, k, v, causal=True), *leaves)
    want = penalty(lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend="reference"), *leaves)
    assert C.aot_records()[0]["kernel"] == "_attn_fwd_kernel"  # the short path's forward, then the reference
    for g, ref in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(g, ref)


def test_varlen_double_backward_takes_the_reference_gradients_as_the_general_path_does(recording):
    def penalty(attend, q, k, v):
        grads = torch.autograd.grad(attend(q, k, v).float().sum(), (q, k, v), create_graph=True)
        return [g.detach() for g in grads], torch.autograd.grad(sum(g.float().pow(2).sum() for g in grads), (q, k, v))

    cu_q, cu_k = _offsets((1, 8)), _offsets((4, 9))
    leaves = _varlen_leaves((1, 8), (4, 9), 4, 2, 64)

    def attend(q, k, v, backend=None):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 9, causal=True, backend=backend)

    assert "AttentionAot" in attend(*leaves).grad_fn.name()  # the short path's node
    C.aot_record(True, SM)  # clears
    got = penalty(attend, *leaves)
    want = penalty(lambda q, k, v: attend(q, k, v, "reference"), *leaves)
    assert C.aot_records()[0]["kernel"] == "_attn_fwd_kernel"  # the short path's forward, then the reference
    for g, ref in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(g, ref)


DROPOUT_CALLS = {
    "flash": (lambda q, k, v: flash_attn_func(q, k, v, 0.1, causal=True), (1, 17, 17, 4, 2, 64)),
    "flash-gqa-window": (
        lambda q, k, v: flash_attn_func(q, k, v, 0.25, window_size=(8, 0), deterministic=True),
        (2, 9, 20, 8, 2, 64),
    ),
    "sdpa": (
        lambda q, k, v: scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.1, is_causal=True, enable_gqa=True
        ).transpose(1, 2),
        (1, 12, 12, 4, 2, 64),
    ),
    "varlen": (
        lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], CU, CU, 11, 11, 0.1, causal=True),
        (1, 16, 16, 4, 2, 64),
    ),
}


@pytest.mark.parametrize("which", list(DROPOUT_CALLS))
def test_dropout_short_path_draws_the_seed_as_the_general_path_does(recording, monkeypatch, which):
    """Under one torch.manual_seed both paths draw the same seed, leave torch's RNG in the same state and pass the
    seed to the same launches, forward and backward, so they drop the same scores."""
    call, shape = DROPOUT_CALLS[which]
    drawn, states = [], []
    real = ops.dropout_seed
    monkeypatch.setattr(ops, "dropout_seed", lambda device: drawn.append(real(device)) or drawn[-1])

    def seeded(*leaves):
        torch.manual_seed(7)
        out = call(*leaves)
        states.append(torch.get_rng_state())
        return out

    (short, short_grads, short_shape), (general, general_grads, _) = _both_paths(monkeypatch, seeded, _leaves(*shape))
    assert short == general and short_grads == general_grads
    assert len(drawn) == 2 and torch.equal(drawn[0], drawn[1]) and torch.equal(states[0], states[1])
    kernels = [r["kernel"] for r in short]
    assert kernels[:3] == ["_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    assert all(r["case"].endswith("dropout") for r in short if r["kernel"] != "_attn_bwd_preprocess_kernel")
    drawn.clear()
    leaves = _leaves(*shape)
    out = call(*leaves)  # the short path: its node, and the seed tensor's address in every launch
    node = out.grad_fn
    while node.name() == "TransposeBackward0":  # SDPA's (B, H, T, D) output seen as (B, T, H, D)
        node = node.next_functions[0][0]
    assert "AttentionAot" in node.name()
    out.backward(torch.randn_like(out))
    (seed,) = drawn
    assert all(seed.data_ptr() in r["args"] for r in C.aot_records() if r["kernel"] != "_attn_bwd_preprocess_kernel")


def test_dropout_double_backward_takes_the_reference_gradients_of_the_same_mask(recording):
    def penalty(attend, q, k, v):
        torch.manual_seed(3)
        grads = torch.autograd.grad(attend(q, k, v).float().sum(), (q, k, v), create_graph=True)
        return [g.detach() for g in grads], torch.autograd.grad(sum(g.float().pow(2).sum() for g in grads), (q, k, v))

    leaves = _leaves(1, 9, 9, 4, 2, 64)
    got = penalty(lambda q, k, v: flash_attn_func(q, k, v, 0.2, causal=True), *leaves)
    want = penalty(lambda q, k, v: flash_attn_func(q, k, v, 0.2, causal=True, backend="reference"), *leaves)
    assert C.aot_records()[0]["case"].endswith("dropout")  # the short path's forward, then the reference
    for g, ref in zip(got[0] + list(got[1]), want[0] + list(want[1])):
        torch.testing.assert_close(g, ref)


def test_varlen_dropout_takes_the_general_path_where_its_backward_cubins_do_not_ship(recording, monkeypatch):
    monkeypatch.setattr(ops.ATTENTION, "choose", lambda *a, **k: (_ for _ in ()).throw(_General()))
    monkeypatch.setattr(_backend, "aot_arch", lambda device: 90)
    q, k, v = _varlen_leaves((16,), (16,), 2, 2, 128)
    with pytest.raises(_General):
        flash_attn_varlen_func(q, k, v, CU, CU, 11, 11, 0.1)
    assert flash_attn_varlen_func(q, k, v, CU, CU, 11, 11, 0.0).grad_fn is not None  # no dropout: the short path
    assert flash_attn_varlen_func(q[..., :64], k[..., :64], v[..., :64], CU, CU, 11, 11, 0.1).grad_fn is not None


@pytest.mark.parametrize("side", [2**31, 10**12])
def test_a_window_side_past_int32_launches_as_an_unbounded_one(recording, monkeypatch, side):
    """flash-attn reads a window side at or past the keys' length as no bound; one past int32 means the same on both
    paths (the launch's bound is UNBOUNDED, not an int32 overflow), dense and varlen."""
    leaves = _leaves(2, 97, 97, 4, 2, 64)
    runs = _both_paths(monkeypatch, lambda q, k, v: flash_attn_func(q, k, v, window_size=(side, 0)), leaves)
    unbounded = _both_paths(monkeypatch, lambda q, k, v: flash_attn_func(q, k, v, window_size=(-1, 0)), leaves)
    assert runs == unbounded and runs[0] == runs[1]
    cu = torch.tensor([0, 60, 97], dtype=torch.int32)
    flat = [t.detach()[0].requires_grad_() for t in leaves]  # (T, H, D) packed sequences

    def varlen(window):
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 60, 60, causal=True, window_size=window)

    runs = _both_paths(monkeypatch, varlen((side, side)), flat)
    assert runs == _both_paths(monkeypatch, varlen((-1, -1)), flat) and runs[0] == runs[1]
