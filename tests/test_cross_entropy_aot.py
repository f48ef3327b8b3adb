"""Cross-entropy's aot backend: kernels/cross_entropy.py compiled ahead of time (tools/aot.py --shipped) and launched
from C++ (csrc/aot_launch.h, csrc/cross_entropy_aot.cpp), tested without a GPU.

The shipped set compiles and registers with the C++ launcher; the C++ ops, run on CPU tensors with the launch
recorder on (a recorded launch is kept, not made: no output is computed and none is checked here), hand the launcher
what Triton's JIT launcher is given for the same call (tests/aot_jit_capture.py captures the JIT's side with the
driver mocked); the launcher refuses what the cubins were not compiled for; the C++ autograd runs forward and
backward without Python; torch.compile traces the op. GPU tests (`pytest -m gpu`) hold the aot column to the triton
column and the reference, outputs and gradients.
"""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

import fasttrain._C as C
from fasttrain import _aot, _backend
from fasttrain.ops.cross_entropy import CROSS_ENTROPY, cross_entropy

from helpers import (
    aot_compile,
    aot_jit_launches,
    aot_recording,
    assert_aot_launch_is_the_jit_launch,
    assert_one_error_on_every_backend,
)

SM = 132
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The whole sm_90 shipped set: both kernels for each logits dtype (six cubins)."""
    out = tmp_path_factory.mktemp("aot")
    return out, aot_compile(out, "cross_entropy", list(DTYPES))


@pytest.fixture
def registry(sample):
    """The shipped set registered with the C++ launcher and the launches recorded; both undone after the test."""
    with aot_recording([sample[0]], len(sample[1]), SM):
        yield


def _inputs(N, V, dtype=torch.float16, ignored=0, ignore_index=-100):
    logits = torch.randn(N, V, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (N,))
    target[:ignored] = ignore_index
    return logits, target


def test_shipped_set_is_one_case_per_kernel_and_dtype_for_every_vocabulary():
    from fasttrain.kernels import cross_entropy as ce

    for dtype in DTYPES:
        entries = ce.aot_kernels(90, dtype, shipped=True)
        assert [e["kernel"] for e in entries] == [ce._ce_forward_kernel, ce._ce_backward_kernel]
        for e in entries:
            (case,) = e["cases"]
            assert case["constexprs"] == {"BLOCK_V": ce.BLOCK_V} and case["num_warps"] == ce.NUM_WARPS
            assert e["types"]["Target"] == "*i64"
    # CI's compile check compiles the same two cases
    assert [len(e["cases"]) for e in ce.aot_kernels(90, "bf16")] == [1, 1]


def test_sample_registers_and_serves_every_dtype(sample, registry):
    rows = sample[1]
    assert len(rows) == 6 and all("error" not in r and r["local"] == 0 for r in rows)
    index = json.loads((sample[0] / "index.json").read_text())
    assert {e["arch"] for e in index} == {90} and all((sample[0] / e["cubin"]).exists() for e in index)
    for dtype in DTYPES.values():
        logits, target = _inputs(3, 97, dtype, ignored=1)
        loss, lse = torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100)
        assert loss.shape == lse.shape == (3,) and loss.dtype == lse.dtype == torch.float32
        loss.backward(torch.randn(3))
        assert logits.grad.shape == logits.shape and logits.grad.dtype == dtype
    records = C.aot_records()
    assert [(r["kernel"], r["dtype"]) for r in records] == [
        (k, d) for d in ("Half", "BFloat16", "Float") for k in ("_ce_forward_kernel", "_ce_backward_kernel")
    ]


def test_registration_refuses_cubins_of_other_parameters(sample):
    e = next(e for e in json.loads((sample[0] / "index.json").read_text()) if e["kernel"] == "_ce_forward_kernel")
    args = [n for n, _ in e["args"]]
    with pytest.raises(RuntimeError, match="parameters differ"):
        C.aot_register(
            e["kernel"], e["dtype"], [4096], ["BLOCK_V"], args[::-1], [t for _, t in e["args"]], [], 8, 1, 0,
            len(args) + 2, 0, 0, e["entry"], "x", b"",
        )  # fmt: skip


# (kind, N, V, dtype, ignore_index, ignored rows): one row, one class (the JIT makes constexprs of V = 1 and of a row
# stride 1), 97 rows and classes, GPT-2's odd vocabulary, an ignore_index of 1 (a JIT constexpr) and of 0 (a multiple
# of 16), ignore_index hits.
CASES = [
    ("forward", 1, 1, "fp32", -100, 0),
    ("forward", 97, 97, "fp16", -100, 5),
    ("forward", 3, 50257, "bf16", -100, 1),
    ("forward", 4, 97, "fp32", 1, 2),
    ("backward", 1, 1, "fp16", -100, 0),
    ("backward", 97, 97, "bf16", -100, 7),
    ("backward", 2, 50257, "fp32", -100, 1),
    ("backward", 5, 97, "fp16", 0, 2),
]
FIELDS = ("kind", "N", "V", "dtype", "ignore_index", "ignored")


@pytest.fixture(scope="module")
def captured(sample):
    """One child over every case: the JIT's launch and the recorded C++ launch of each."""
    return aot_jit_launches(sample[0], [dict(zip(FIELDS, c), op="cross_entropy") for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_recorded_launch_is_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    assert_aot_launch_is_the_jit_launch(jit, aot)
    assert aot["grid"] == [CASES[i][1], 1, 1] and aot["num_warps"] == 8
    # 1-valued integers the JIT made constexprs of: V = 1 (n_cols and the row strides) and an ignore_index of 1
    ones = [n for n, t in jit["signature"].items() if t == "constexpr" and n not in aot["constexprs"]]
    # Every tensor is the one the JIT was given (no copy), and the integers are the launcher's.
    assert all(v not in ("buffer", "null") for v in aot["args"].values())
    kind, N, V, _, ignore_index, _ = CASES[i]
    assert aot["args"]["n_cols"] == V and aot["args"]["row_stride"] == V and aot["args"]["ignore_index"] == ignore_index
    assert len(ones) == (2 + (kind == "backward") if V == 1 else 0) + (ignore_index == 1)


def test_launcher_refuses_what_the_cubins_were_not_compiled_for(registry):
    logits, target = _inputs(2, 10)
    with pytest.raises(RuntimeError, match="does not fit the compiled i32"):
        torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, 2**31)
    with pytest.raises(RuntimeError, match=r"no shipped cubin for _ce_forward_kernel with pointers to \(Double"):
        torch.ops.fasttrain.cross_entropy_forward_aot(logits.double(), target, -100)
    with pytest.raises(RuntimeError, match="target must be an \\(N,\\) Long tensor"):
        torch.ops.fasttrain.cross_entropy_forward_aot(logits, target.int(), -100)
    with pytest.raises(RuntimeError, match="logits must be \\(N, V\\)"):
        torch.ops.fasttrain.cross_entropy_forward_aot(logits.t(), target, -100)
    with pytest.raises(RuntimeError, match="reduction must be one of \\('mean', 'sum', 'none'\\), got 'avg'"):
        torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100, "avg")
    assert C.aot_records() == []


def test_misaligned_views_are_copied_not_launched_misaligned(registry):
    tokens = torch.randint(0, 10, (4,))
    target = tokens[1:]  # the usual shifted labels: 8 bytes past an aligned address
    base = torch.randn(3 * 10 + 1, dtype=torch.float16)
    logits = base[1:].view(3, 10)
    torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100)
    (r,) = C.aot_records()
    assert r["args"][1] != target.data_ptr() and r["args"][1] % 16 == 0
    assert r["args"][0] != logits.data_ptr() and r["args"][0] % 16 == 0


def test_cpu_tensors_are_taken_only_while_recording(registry):
    C.aot_record(False, 0)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.cross_entropy_forward_aot(*_inputs(2, 10), -100)


def test_autograd_runs_in_cpp_and_passes_the_per_row_gradient(registry):
    logits, target = _inputs(4, 97, ignored=1)
    loss, lse = torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100)
    assert "CppNode" in type(loss.grad_fn).__name__ or "CrossEntropyAot" in loss.grad_fn.name()
    assert not lse.requires_grad
    loss.sum().backward()  # the sum's gradient arrives expanded (stride 0): made a unit-stride fp32 vector
    fwd, bwd = C.aot_records()
    assert (fwd["kernel"], bwd["kernel"]) == ("_ce_forward_kernel", "_ce_backward_kernel")
    assert bwd["args"][1] == logits.data_ptr() and bwd["args"][3] == fwd["args"][3]  # the saved logits and lse
    assert bwd["args"][5:] == [97, 97, 97, -100]
    assert logits.grad.shape == (4, 97) and logits.grad.dtype == torch.float16


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_call_with_nothing_to_record_skips_the_autograd_node(registry, reduction):
    logits, target = _inputs(4, 97, ignored=1)
    for grad_off, x in ((True, logits), (False, logits.detach())):  # no_grad, or logits that take no gradient
        with torch.set_grad_enabled(not grad_off):
            loss, lse = torch.ops.fasttrain.cross_entropy_forward_aot(x, target, -100, reduction)
        assert loss.grad_fn is None and not loss.requires_grad and not lse.requires_grad
        assert loss.shape == ((4,) if reduction == "none" else ()) and lse.shape == (4,)
        (fwd,) = C.aot_records()
        assert fwd["kernel"] == "_ce_forward_kernel" and fwd["args"][0] == logits.data_ptr()
        C.aot_record(True, SM)  # clears


def test_backward_of_the_unused_logsumexp_alone_gives_no_gradient(registry):
    logits, target = _inputs(3, 97)
    loss, lse = torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100, "mean")
    (grad,) = torch.autograd.grad((loss * 0).sum(), logits)  # the loss' node reached with a defined gradient
    assert grad.shape == logits.shape
    assert [r["kernel"] for r in C.aot_records()] == ["_ce_forward_kernel", "_ce_backward_kernel"]


def test_double_backward_is_refused_not_silently_first_order(registry):
    logits, target = _inputs(2, 10)
    loss = torch.ops.fasttrain.cross_entropy_forward_aot(logits, target, -100)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss.sum(), logits, create_graph=True)


def test_torch_compile_traces_the_op_forward_and_backward(registry):
    def f(x, t):
        return torch.ops.fasttrain.cross_entropy_forward_aot(x, t, -100)[0].sum()

    logits, target = _inputs(3, 97)
    torch.compile(f, fullgraph=True, backend="aot_eager")(logits, target).backward()
    assert [r["kernel"] for r in C.aot_records()] == ["_ce_forward_kernel", "_ce_backward_kernel"]
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_function_is_one_cpp_call_for_each_reduction(registry, monkeypatch, reduction):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    logits, target = _inputs(5, 97, ignored=2)
    loss = cross_entropy(logits, target.int(), reduction=reduction)  # an int32 target is converted, as on triton
    want = F.cross_entropy(logits.detach().float(), target, reduction=reduction)
    assert loss.shape == want.shape and loss.dtype == torch.float32
    # The reduction's autograd is the C++ node's own: no Python node (SumBackward, DivBackward) above it.
    assert "CppNode" in type(loss.grad_fn).__name__ or "CrossEntropyAot" in loss.grad_fn.name()
    loss.backward(torch.randn_like(loss))
    assert [r["kernel"] for r in C.aot_records()] == ["_ce_forward_kernel", "_ce_backward_kernel"]
    assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.float16


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_short_path_makes_the_general_paths_launches(registry, monkeypatch, reduction):
    module = importlib.import_module("fasttrain.ops.cross_entropy")  # fasttrain.ops.cross_entropy is the function
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    logits, target = _inputs(5, 97, ignored=2)
    launches = {}
    for path, backend in (("general", "aot"), ("short", None)):
        if path == "short":  # the short path never checks or chooses here
            monkeypatch.setattr(module.CROSS_ENTROPY, "choose", lambda *a, **k: pytest.fail("the general path ran"))
        loss = cross_entropy(logits, target, reduction=reduction, backend=backend)
        loss.backward(torch.ones_like(loss))
        fwd, bwd = C.aot_records()
        C.aot_record(True, SM)  # clears
        # logits, target and the integers as given (the outputs, lse and the per-row gradient are each call's own)
        launches[path] = [
            (fwd["kernel"], fwd["case"], fwd["grid"], [fwd["args"][i] for i in (0, 1, 4, 5, 6)]),
            (bwd["kernel"], bwd["case"], bwd["grid"], [bwd["args"][i] for i in (1, 2, 5, 6, 7, 8)]),
        ]
        assert loss.shape == ((5,) if reduction == "none" else ())
    assert launches["short"] == launches["general"]


def test_short_path_leaves_every_other_call_to_the_general_path(registry, monkeypatch):
    module = importlib.import_module("fasttrain.ops.cross_entropy")
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    chosen = []
    choose = module.CROSS_ENTROPY.choose
    monkeypatch.setattr(module.CROSS_ENTROPY, "choose", lambda *a, **k: chosen.append(1) or choose(*a, **k))
    logits, target = _inputs(4, 97)
    flat = torch.randn(4 * 97 + 1, dtype=logits.dtype)
    general = [
        lambda: cross_entropy(logits, target, backend="aot"),  # a backend named
        lambda: cross_entropy(logits, target.int()),  # an int32 target (converted there)
        lambda: cross_entropy(logits.t().contiguous().t(), target),  # a column stride of N
        lambda: cross_entropy(flat[1:].view(4, 97), target),  # logits not 16-byte aligned
        lambda: cross_entropy(logits, target, ignore_index=2**40),  # an ignore_index past int32
    ]
    for i, call in enumerate(general):
        call()
        assert len(chosen) == i + 1, i
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")
    cross_entropy(logits, target)
    assert len(chosen) == len(general) + 1
    monkeypatch.delenv("FASTTRAIN_BACKEND")
    cross_entropy(logits, target)  # the short path's: no choice
    assert len(chosen) == len(general) + 1
    with pytest.raises(ValueError, match="reduction"):  # the general path's error
        cross_entropy(logits, target, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_compile_traces_the_public_function_on_the_aot_column(registry, monkeypatch, reduction):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    logits, target = _inputs(3, 97, ignored=1)
    f = torch.compile(cross_entropy, fullgraph=True, backend="aot_eager")
    loss = f(logits, target, reduction=reduction)
    assert loss.shape == ((3,) if reduction == "none" else ())
    loss.sum().backward()
    assert [r["kernel"] for r in C.aot_records()] == ["_ce_forward_kernel", "_ce_backward_kernel"]


def test_registered_op_on_the_aot_column_is_the_cpp_op(registry):
    from fasttrain.ops.cross_entropy import _forward_op

    logits, target = _inputs(3, 97)
    loss, lse = _forward_op(logits, target, -100, "aot")
    assert loss.shape == lse.shape == (3,) and "CrossEntropyAot" in loss.grad_fn.name()
    assert [r["kernel"] for r in C.aot_records()] == ["_ce_forward_kernel"]


def test_aot_column_comes_first_and_follows_the_switches(monkeypatch):
    assert list(CROSS_ENTROPY.backends) == ["aot", "triton", "reference"]
    assert CROSS_ENTROPY.direct["aot"] is torch.ops.fasttrain.cross_entropy_forward_aot.default  # no packet lookup
    assert CROSS_ENTROPY.reasons(torch.randn(2, 8), -100)["aot"] is _backend.AOT_TAKES_CUDA
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert _backend.aot_reason(torch.device("cuda")) is _backend.AOT_OFF


def test_aot_column_takes_what_was_shipped(monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)

    def why(logits, ignore_index=-100):
        return CROSS_ENTROPY.reasons(logits, ignore_index)["aot"]

    for dtype in DTYPES.values():
        assert why(torch.randn(3, 97, dtype=dtype)) is None
    assert why(torch.randn(3, 97).t()) is None  # made unit-stride by the op before the call
    assert why(torch.randn(4, 8)[1:]) is None  # 32 bytes in: aligned
    assert "float64" in why(torch.randn(3, 97, dtype=torch.float64))
    assert "aligned" in why(torch.randn(4, 97, dtype=torch.float16)[1:])
    assert "int32" in why(torch.randn(3, 97), ignore_index=-(2**31) - 1)
    assert why(torch.randn(3, 97), ignore_index=-(2**31)) is None
    # a row stride past int32 (4 GiB of address space, never touched)
    huge = torch.empty(2**31 + 8, dtype=torch.float16).as_strided((2, 8), (2**31, 1))
    assert "int32" in why(huge)


# (args, kwargs) of bad calls: a wrong logits dtype, a non-tensor target, a wrong target shape, a float target, a bad
# reduction, a float ignore_index
BAD_CALLS = [
    (lambda: (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long)), {}),
    (lambda: (torch.randn(4, 10), [0, 1, 2, 3]), {}),
    (lambda: (torch.randn(4, 10), torch.zeros(3, dtype=torch.long)), {}),
    (lambda: (torch.randn(4, 10), torch.zeros(4)), {}),
    (lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long)), {"reduction": "avg"}),
    (lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long)), {"ignore_index": 1.0}),
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_bad_input_gives_the_same_error_whichever_backend_is_asked(i):
    args, kwargs = BAD_CALLS[i]
    assert_one_error_on_every_backend(lambda backend: cross_entropy(*args(), **kwargs, backend=backend))


# ---- GPU: the aot column against the triton column and the reference ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,V", [(1, 1), (1, 97), (97, 97), (97, 50257), (4096, 4097)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_aot_matches_triton_and_reference_outputs_and_gradients(reduction, N, V, dtype):
    torch.manual_seed(0)
    logits = 3 * torch.randn(N, V, device="cuda", dtype=dtype)
    target = torch.randint(0, V, (N,), device="cuda")
    target[::3] = -100
    results = {}
    for backend in ("aot", "triton", "reference"):
        x = logits.detach().clone().requires_grad_()
        loss = cross_entropy(x, target, reduction=reduction, backend=backend)
        torch.manual_seed(1)
        loss.backward(torch.randn_like(loss))
        results[backend] = (loss.detach(), x.grad)
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)  # the same kernels on the same inputs
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2, equal_nan=True)


@pytest.mark.gpu
def test_gpu_aot_is_chosen_and_off_switches_select_the_jit(monkeypatch):
    x = torch.randn(8, 50257, device="cuda", dtype=torch.bfloat16)
    assert CROSS_ENTROPY.choose(x, -100) == "aot"
    assert CROSS_ENTROPY.choose(x[1:], -100) == "triton"  # 50257 * 2 bytes in: misaligned
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert CROSS_ENTROPY.choose(x, -100) == "triton"
    monkeypatch.delenv("FASTTRAIN_AOT")
    monkeypatch.setenv("FASTTRAIN_BACKEND", "triton")
    assert CROSS_ENTROPY.choose(x, -100) == "triton"


# ---- the full shipped set -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_shipped_set_compiles_and_registers(tmp_path):
    rows = aot_compile(tmp_path, "cross_entropy", list(DTYPES), archs=("80", "90"))
    assert len(rows) == 12 and all("error" not in r and r["local"] == 0 for r in rows)
    C.aot_clear()
    try:
        assert _aot.load(tmp_path, arch=90) == 6 == C.aot_registered()
    finally:
        C.aot_clear()
