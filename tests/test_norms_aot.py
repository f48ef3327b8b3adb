"""The norms' aot backend: the Triton kernels compiled ahead of time (tools/aot.py --shipped) and launched from C++
(csrc/aot_launch.h, csrc/norms_aot.cpp), tested without a GPU.

The shipped set compiles and registers with the C++ launcher; the C++ ops, run on CPU tensors with the launch
recorder on (the recorder keeps a launch instead of making it: no output is computed and none is checked here), hand
the launcher what Triton's JIT launcher is given for the same call (tests/aot_jit_capture.py captures the JIT's side
with the driver mocked): the compiled case, grid, argument values in order, num_warps; the launcher refuses what the
cubin was not compiled for; the C++ autograd runs forward and backward without Python; torch.compile traces the op.
GPU tests (`pytest -m gpu`) hold the aot column to the triton column and the reference, outputs and gradients.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import fasttrain._C as C
from fasttrain import _aot, _backend
from fasttrain.ops.norms import _AOT_MAX_N, NORMS, add_layer_norm, add_rms_norm, layer_norm, rms_norm

from helpers import (
    aot_compile,
    aot_jit_launches,
    aot_recording,
    assert_aot_launch_is_the_jit_launch,
    assert_one_error_on_every_backend,
)

SM = 132  # the recorder's SM count (an H100's), which the backward's program count follows
FORWARD_FLAGS = ("IS_RMS", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS")


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The shipped fp16 cases at BLOCK_N 128 (rows of 65..128): every dtype profile and flag combination of both
    kernels (bf16 shares every line of the launch path; the slow test compiles it)."""
    out = tmp_path_factory.mktemp("aot")
    return out, aot_compile(out, "norms", ["fp16"], "^n128 ")


@pytest.fixture
def registry(sample):
    """The sample registered with the C++ launcher and the launches recorded; both undone after the test."""
    with aot_recording([sample[0]], len(sample[1]), SM):
        yield


def test_shipped_set_lists_every_flag_combination_and_block():
    from fasttrain.kernels import norms

    assert norms.MAX_N == _AOT_MAX_N
    blocks = {1 << i for i in range(13)}
    # fp32: one profile; a half dtype: same, autocast, branch (the branch always with its residual and dx2)
    for dtype, profiles in (("fp32", 1), ("bf16", 3)):
        entries = norms.aot_kernels(90, dtype, shipped=True)
        assert len(entries) == 2 * profiles
        for entry in entries:
            cases = entry["cases"]
            flags = {tuple(v for k, v in c["constexprs"].items() if k != "BLOCK_N") for c in cases}
            branch = "branch" in cases[0]["label"]
            assert len(flags) == (6 if branch and entry["kernel"] is norms._norm_forward_kernel else 12)
            assert {c["constexprs"]["BLOCK_N"] for c in cases} == blocks and len(cases) == len(flags) * len(blocks)
            backward = entry["kernel"] is norms._norm_backward_kernel
            for c in cases:
                assert c["constexprs"]["BLOCK_M"] == 1
                assert c["num_warps"] == norms.block_and_warps(c["constexprs"]["BLOCK_N"], backward=backward)[1]
                assert not backward or c["constexprs"]["HAS_DX2"] == branch
    # CI's compile check keeps its three-case sample per kernel
    assert [len(k["cases"]) for k in norms.aot_kernels(90, "bf16")] == [3, 3]


PROFILES = ("same", "autocast", "branch")


def _profile_tensors(profile, half, M, N, residual, weight, bias):
    rows = half if profile == "same" else torch.float32
    x = torch.randn(M, N, dtype=half if profile != "autocast" else torch.float32, requires_grad=True)
    r = torch.randn(M, N, dtype=rows, requires_grad=True) if residual else None
    w = torch.randn(N, dtype=rows, requires_grad=True) if weight else None
    b = torch.randn(N, dtype=rows, requires_grad=True) if bias else None
    return x, r, w, b


def test_sample_registers_and_serves_every_flag_combination(sample, registry):
    rows = sample[1]
    assert len(rows) == 2 * (12 + 12) + (6 + 12) and all("error" not in r for r in rows)
    index = json.loads((sample[0] / "index.json").read_text())
    assert {e["arch"] for e in index} == {90} and all((sample[0] / e["cubin"]).exists() for e in index)
    for profile in PROFILES:
        for is_rms in (False, True):
            for residual in (True,) if profile == "branch" else (False, True):
                for weight in (False, True):
                    for bias in (False,) if is_rms else (False, True):
                        x, r, w, b = _profile_tensors(profile, torch.float16, 3, 100, residual, weight, bias)
                        y, s, _, _ = torch.ops.fasttrain.norm_forward_aot(x, r, w, b, 1e-5, is_rms, torch.float16)
                        outs = [y] + ([s] if residual else [])
                        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    records = C.aot_records()
    assert len(records) == len(rows) - 6  # the branch's backward without dres runs only when s goes unused
    assert {r["case"] for r in records} <= {r["case"] for r in rows}


def test_registration_refuses_cubins_of_other_parameters(sample):
    e = json.loads((sample[0] / "index.json").read_text())[0]
    args = [n for n, _ in e["args"]]
    with pytest.raises(RuntimeError, match="parameters differ"):
        C.aot_register(
            e["kernel"],
            e["dtype"],
            list(map(int, e["constexprs"].values())),
            list(e["constexprs"]),
            args[::-1],
            [t for _, t in e["args"]],
            [],
            1,
            1,
            0,
            len(args) + 2,
            0,
            0,
            e["entry"],
            "x",
            b"",
        )


# (kind, M, N, profile, is_rms, residual, weight, bias), fp16: awkward widths (97, 65, 100), batch 1, every dtype
# profile, every optional tensor absent somewhere.
CASES = [
    ("forward", 5, 97, "same", False, False, True, True),
    ("forward", 1, 128, "same", True, False, True, False),
    ("forward", 7, 100, "autocast", False, True, False, False),
    ("forward", 3, 65, "branch", True, True, True, False),
    ("forward", 2, 97, "branch", False, True, True, True),
    ("backward", 9, 97, "same", False, False, True, True),
    ("backward", 1, 100, "autocast", True, True, True, False),
    ("backward", 600, 65, "same", False, True, False, True),  # more rows than 4 programs per SM: 2 rows each
    ("backward", 4, 128, "branch", True, True, False, False),
    ("backward", 5, 100, "branch", False, False, True, True),  # dx2 without dres: the stream output unused
]
FIELDS = ("kind", "M", "N", "profile", "is_rms", "residual", "weight", "bias")


@pytest.fixture(scope="module")
def captured(sample):
    """One child over every case: the JIT's launch and the recorded C++ launch of each."""
    return aot_jit_launches(sample[0], [dict(zip(FIELDS, c), dtype="fp16") for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_recorded_launch_is_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    assert_aot_launch_is_the_jit_launch(jit, aot)


def test_launcher_refuses_what_the_cubin_was_not_compiled_for(registry):
    # A row stride past int32: the JIT would compile an i64 variant; the i32 cubin must not be launched with it.
    # (4 GiB of address space, never touched: the recorder reads no element)
    x = torch.empty(2**31 + 100, dtype=torch.float16).as_strided((2, 100), (2**31, 1))
    with pytest.raises(RuntimeError, match="does not fit the compiled i32"):
        torch.ops.fasttrain.norm_forward_aot(x, None, None, None, 1e-5, False, torch.float16)
    # A case that was not shipped (BLOCK_N 256)
    with pytest.raises(RuntimeError, match="no shipped cubin for _norm_forward_kernel"):
        torch.ops.fasttrain.norm_forward_aot(torch.randn(2, 200).half(), None, None, None, 1e-5, False, torch.float16)
    assert C.aot_records() == []


def test_misaligned_input_is_copied_not_launched_misaligned(registry):
    base = torch.randn(3 * 100 + 1, dtype=torch.float16)
    x = base[1:].view(3, 100)  # 2 bytes past an aligned address
    torch.ops.fasttrain.norm_forward_aot(x, None, None, None, 1e-5, False, torch.float16)
    (r,) = C.aot_records()
    assert r["args"][0] != x.data_ptr() and r["args"][0] % 16 == 0


def test_cpu_tensors_are_taken_only_while_recording(registry):
    C.aot_record(False, 0)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.norm_forward_aot(torch.randn(2, 100).half(), None, None, None, 1e-5, False, torch.float16)


def test_autograd_runs_in_cpp_and_gives_both_inputs_the_stream_gradient(registry):
    x, r, w, _ = _profile_tensors("same", torch.float16, 4, 100, True, True, False)
    y, s, mean, rstd = torch.ops.fasttrain.norm_forward_aot(x, r, w, None, 1e-5, True, torch.float16)
    assert "CppNode" in type(y.grad_fn).__name__ or "NormAot" in y.grad_fn.name()
    assert not mean.requires_grad and not rstd.requires_grad
    (y.float().sum() + s.float().sum()).backward()
    fwd, bwd = C.aot_records()
    assert fwd["kernel"] == "_norm_forward_kernel" and bwd["kernel"] == "_norm_backward_kernel"
    assert bwd["constexprs"][3] == 1  # HAS_DRES: the stream's own gradient joins dx
    # dx of the one kernel launch for both (uncomputed: compared bit for bit)
    assert torch.equal(x.grad.view(torch.int16), r.grad.view(torch.int16))
    assert w.grad.shape == (100,) and w.grad.dtype == torch.float16


def test_autograd_gives_a_half_branch_its_own_copy_of_the_fp32_stream_gradient(registry):
    x, r, w, b = _profile_tensors("branch", torch.float16, 4, 100, True, True, True)
    y, s, _, _ = torch.ops.fasttrain.norm_forward_aot(x, r, w, b, 1e-5, False, torch.float16)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    y.float().sum().backward()  # the stream unused: no dres, but dx2 for the branch
    _, bwd = C.aot_records()
    assert bwd["constexprs"][3:5] == [0, 1] and "branch" in bwd["case"]
    assert x.grad.dtype == torch.float16 and r.grad.dtype == torch.float32
    assert w.grad.dtype == b.grad.dtype == torch.float32


def test_a_call_with_nothing_to_record_skips_the_autograd_node(registry):
    x, r, w, b = _profile_tensors("same", torch.float16, 4, 100, True, True, True)
    for grad_off, args in ((True, (x, r, w, b)), (False, tuple(t.detach() for t in (x, r, w, b)))):
        with torch.set_grad_enabled(not grad_off):
            y, s, mean, rstd = torch.ops.fasttrain.norm_forward_aot(*args, 1e-5, False, torch.float16)
        assert all(t.grad_fn is None and not t.requires_grad for t in (y, s, mean, rstd))
        assert y.shape == s.shape == (4, 100) and mean.shape == rstd.shape == (4,)
        (fwd,) = C.aot_records()
        assert fwd["kernel"] == "_norm_forward_kernel" and fwd["args"][:4] == [t.data_ptr() for t in (x, r, w, b)]
        C.aot_record(True, SM)  # clears
    # one input taking a gradient is enough for the node
    y = torch.ops.fasttrain.norm_forward_aot(x.detach(), None, w, None, 1e-5, False, torch.float16)[0]
    assert y.requires_grad and y.grad_fn is not None


def test_double_backward_is_refused_not_silently_first_order(registry):
    x = torch.randn(2, 100, dtype=torch.float16, requires_grad=True)
    y = torch.ops.fasttrain.norm_forward_aot(x, None, None, None, 1e-5, False, torch.float16)[0]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)


def test_torch_compile_traces_the_op_forward_and_backward(registry):
    def f(x, w):
        return torch.ops.fasttrain.norm_forward_aot(x, None, w, None, 1e-5, True, torch.float16)[0]

    x = torch.randn(3, 100, dtype=torch.float16, requires_grad=True)
    w = torch.randn(100, dtype=torch.float16, requires_grad=True)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    y.float().sum().backward()
    assert [r["kernel"] for r in C.aot_records()] == ["_norm_forward_kernel", "_norm_backward_kernel"]
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_torch_compile_traces_the_public_functions_on_the_aot_column(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)

    def f(x, r, w, b):
        y, s = add_layer_norm(x, r, (100,), w, b)
        return rms_norm(s, (100,), w) + y

    x, r, w, b = _profile_tensors("same", torch.float16, 3, 100, True, True, True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w, b).float().sum().backward()
    kernels = [rec["kernel"] for rec in C.aot_records()]
    assert kernels.count("_norm_forward_kernel") == 2 and kernels.count("_norm_backward_kernel") == 2
    assert all(t.grad is not None for t in (x, r, w, b))


def _launches(records):
    """The recorded launches with each address reduced to whether it is null (outputs and statistics are fresh
    allocations per call)."""
    return [{**r, "args": [bool(a) if t == "ptr" else a for t, a in zip(r["types"], r["args"])]} for r in records]


SHORT_CALLS = {
    "layer_norm": lambda x, r, w, b: layer_norm(x, (100,), w, b),
    "layer_norm, no bias": lambda x, r, w, b: layer_norm(x, (100,), w, None, 1e-6),
    "rms_norm, eps None": lambda x, r, w, b: rms_norm(x, [100], w),
    "add_layer_norm": lambda x, r, w, b: add_layer_norm(x, r, torch.Size([100]), w, b),
    "add_rms_norm, eps None": lambda x, r, w, b: add_rms_norm(x, r, (100,), None),
}


@pytest.mark.parametrize("shape", [(3, 100), (2, 3, 100), (1, 100)], ids=str)
@pytest.mark.parametrize("call", list(SHORT_CALLS))
def test_short_path_takes_the_common_calls_and_launches_what_the_general_path_does(registry, monkeypatch, call, shape):
    import fasttrain.ops.norms as norms

    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    torch.manual_seed(0)
    leaves = [torch.randn(*s, dtype=torch.float16, requires_grad=True) for s in (shape, shape, (100,), (100,))]
    runs = []
    for short in (True, False):
        if short:  # the short path never asks the table
            monkeypatch.setattr(NORMS, "choose", lambda *a, **k: pytest.fail("the general path ran"))
        else:
            monkeypatch.undo()
            monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
            monkeypatch.setattr(norms, "_AOT_OP", None)
        out = SHORT_CALLS[call](*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o.shape == shape for o in outs)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        runs.append((_launches(C.aot_records()[2 * len(runs) :]), [t.grad for t in leaves]))
        for t in leaves:
            t.grad = None
    (short_launches, short_grads), (general_launches, general_grads) = runs
    assert len(short_launches) == 2 and short_launches == general_launches
    assert [g is None for g in short_grads] == [g is None for g in general_grads]


def test_short_path_leaves_every_other_call_to_the_general_path(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    chosen = []
    choose = NORMS.choose
    monkeypatch.setattr(NORMS, "choose", lambda *a, **k: chosen.append(1) or choose(*a, **k))
    x = torch.randn(3, 100, dtype=torch.float16)
    w = torch.randn(100, dtype=torch.float16)
    general = [
        lambda: layer_norm(x, (100,), w, backend="aot"),  # a backend named
        lambda: layer_norm(x, (100,), w.float()),  # a dtype mix (the general path takes it to triton or reference)
        lambda: layer_norm(x.view(3, 10, 10), (10, 10)),  # two normalized dims
        lambda: layer_norm(x, (100,), w, eps=0),  # an int eps
        lambda: rms_norm(x.double(), (100,)),  # not a shipped dtype
        lambda: layer_norm(x, (100,), torch.randn(200, dtype=torch.float16)[::2]),  # a strided weight (copied there)
        lambda: add_rms_norm(x, x.float(), (100,), w.float()),  # a half branch onto an fp32 stream
    ]
    for i, call in enumerate(general):
        call()
        assert len(chosen) == i + 1, i
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")
    layer_norm(x, (100,), w)
    assert len(chosen) == len(general) + 1
    monkeypatch.setenv("FASTTRAIN_BACKEND", "auto")  # auto is no backend forced: the short path takes the call
    layer_norm(x, (100,), w)
    assert len(chosen) == len(general) + 1
    seen = []  # a TorchFunctionMode sees the op called from Python: under one, the general path runs

    class Log(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        layer_norm(x, (100,), w)
    assert len(chosen) == len(general) + 2 and any("norm_forward" in name for name in seen)
    # a bad argument never reaches the op: the general path raises its error
    with pytest.raises(ValueError, match="layer_norm: weight must have shape"):
        layer_norm(x, (100,), w[:99])
    with pytest.raises(ValueError, match="rms_norm: eps must be a float >= 0"):  # NaN is not >= 0
        rms_norm(x, (100,), w, eps=float("nan"))
    with pytest.raises(TypeError, match="normalized_shape must be a tuple or list of ints"):  # as torch's
        layer_norm(x, 100, w)


def test_cpp_short_path_takes_the_shipped_widths_only(registry):
    # csrc/aot_short.cpp's own copy of the widest shipped row (_AOT_MAX_N), and machine epsilon for eps None
    assert C.norm_short(torch.randn(1, _AOT_MAX_N + 1), None, (_AOT_MAX_N + 1,), None, None, 1e-5, False) is None
    x = torch.randn(2, 100, dtype=torch.float16)
    assert C.norm_short(x, None, 100, None, None, 1e-5, False) is None  # a bare int: the general path refuses it
    assert C.norm_short(x, None, (100,), None, None, 1e-5, False).shape == (2, 100)
    C.norm_short(x, None, [100], None, None, None, True)
    (launch,) = C.aot_records()[1:]
    assert launch["args"][-1] == torch.finfo(torch.float32).eps  # torch's for fp16 rows: its fp32 computation's


def test_aot_column_comes_first_and_follows_the_switches(monkeypatch):
    assert list(NORMS.backends) == ["aot", "triton", "reference"]
    assert NORMS.direct["aot"] is torch.ops.fasttrain.norm_forward_aot
    x = torch.randn(2, 8)
    assert NORMS.reasons(x, 8, None, None, None)["aot"] is _backend.AOT_TAKES_CUDA
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert _backend.aot_reason(torch.device("cuda")) is _backend.AOT_OFF
    monkeypatch.delenv("FASTTRAIN_AOT")
    if not C.built_with_cuda():
        assert "without CUDA" in _backend.aot_reason(torch.device("cuda"))


def test_aot_column_takes_the_shipped_dtype_profiles(monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    h, b, f = torch.float16, torch.bfloat16, torch.float32

    def why(x, r=None, w=None, autocast=None, n=100):
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: autocast is not None)
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: autocast)
        t = lambda dtype, *shape: None if dtype is None else torch.empty(*shape, dtype=dtype)  # noqa: E731
        return NORMS.reasons(t(x, 2, n), n, t(r, 2, n), t(w, n), t(w, n))["aot"]

    # same; autocast's half output from fp32 rows; a half branch onto an fp32 stream under autocast
    for args in [(h, h, h), (b, None, b), (f, f, f), (f, None, f, h), (f, f, f, b), (h, f, f, h), (b, f, None, b)]:
        assert why(*args) is None, args
    for args in [(h, None, f), (f, h, f), (h, f, f), (h, b, h), (b, f, f, h), (h, h, h, b), (torch.float64,)]:
        assert why(*args) is not None, args
    assert "exceed" in why(h, n=_AOT_MAX_N + 1)


# ---- GPU: the aot column against the triton column and the reference ------------------------------------------------

GPU_OPS = {
    "layer_norm": lambda x, r, w, b, be: layer_norm(x, x.shape[-1:], w, b, backend=be),
    "rms_norm": lambda x, r, w, b, be: rms_norm(x, x.shape[-1:], w, backend=be),
    "add_layer_norm": lambda x, r, w, b, be: add_layer_norm(x, r, x.shape[-1:], w, b, backend=be),
    "add_rms_norm": lambda x, r, w, b, be: add_rms_norm(x, r, x.shape[-1:], w, backend=be),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N", [(1, 768), (97, 1025), (4096, 768), (3, 1), (5, 4096)], ids=str)
@pytest.mark.parametrize("op", list(GPU_OPS))
def test_gpu_aot_matches_triton_outputs_and_gradients(op, M, N, dtype):
    torch.manual_seed(0)
    leaves = [
        torch.randn(M, N, device="cuda", dtype=dtype),
        torch.randn(M, N, device="cuda", dtype=dtype),
        1 + 0.5 * torch.randn(N, device="cuda", dtype=dtype),
        0.5 * torch.randn(N, device="cuda", dtype=dtype),
    ]
    results = {}
    for backend in ("aot", "triton", "reference"):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        out = GPU_OPS[op](*inputs, backend)
        outs = out if isinstance(out, tuple) else (out,)
        torch.manual_seed(1)
        up = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, up)
        results[backend] = [o.detach() for o in outs] + [t.grad for t in inputs]
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        if want is None:
            assert got is None
            continue
        # The same kernels on the same inputs, compiled with fewer specializations (no divisibility hints on ints)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_gpu_aot_bf16_branch_onto_fp32_stream_under_autocast_matches_triton(op):
    torch.manual_seed(0)
    leaves = [
        torch.randn(97, 768, device="cuda", dtype=torch.bfloat16),
        torch.randn(97, 768, device="cuda"),
        1 + 0.5 * torch.randn(768, device="cuda"),
        0.5 * torch.randn(768, device="cuda"),
    ]
    up = [torch.randn(97, 768, device="cuda", dtype=torch.bfloat16), torch.randn(97, 768, device="cuda")]
    results = {}
    for backend in ("aot", "triton"):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = GPU_OPS[op](*inputs, backend)
        assert outs[0].dtype == torch.bfloat16 and outs[1].dtype == torch.float32
        torch.autograd.backward(outs, up)
        results[backend] = [o.detach() for o in outs] + [t.grad for t in inputs]
    for got, want in zip(results["aot"], results["triton"]):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_gpu_aot_is_chosen_and_off_switches_select_the_jit(monkeypatch):
    x = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    assert NORMS.choose(x, 768, None, None, None) == "aot"
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert NORMS.choose(x, 768, None, None, None) == "triton"
    monkeypatch.delenv("FASTTRAIN_AOT")
    monkeypatch.setenv("FASTTRAIN_BACKEND", "triton")
    assert NORMS.choose(x, 768, None, None, None) == "triton"
    torch.testing.assert_close(F.layer_norm(x.float(), (768,)), layer_norm(x, (768,)).float(), rtol=2e-2, atol=2e-2)


# ---- the full shipped set -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_shipped_set_compiles_and_registers(tmp_path):
    rows = aot_compile(tmp_path, "norms", ["bf16", "fp16", "fp32"])
    assert len(rows) == 2 * (12 + 12 + 12 + 12 + 6 + 12) * 13 + (12 + 12) * 13 and all("error" not in r for r in rows)
    C.aot_clear()
    try:
        assert _aot.load(tmp_path, arch=90) == len(rows) == C.aot_registered()
    finally:
        C.aot_clear()


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (op, args, kwargs): a wrong dtype, a non-tensor, a wrong shape, a wrong eps type and value
BAD_CALLS = [
    (layer_norm, lambda: (_x(4, 8, dtype=torch.long), (8,)), {}),
    (layer_norm, lambda: (_x(4, 8), (8,)), {"weight": [1.0] * 8}),
    (layer_norm, lambda: (_x(4, 8), (7,)), {}),
    (rms_norm, lambda: (_x(4, 8), "8"), {}),
    (rms_norm, lambda: (_x(4, 8), (8,)), {"weight": _x(4)}),
    (add_layer_norm, lambda: (_x(4, 8), _x(4, 4), (8,)), {}),
    (add_rms_norm, lambda: (_x(4, 8), _x(4, 8), (8,)), {"eps": "1e-6"}),
    (add_rms_norm, lambda: (_x(4, 8), _x(4, 8), (8,)), {"eps": -1.0}),
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_bad_input_gives_the_same_error_whichever_backend_is_asked(i):
    op, args, kwargs = BAD_CALLS[i]
    assert_one_error_on_every_backend(lambda backend: op(*args(), **kwargs, backend=backend))


def test_the_cpp_op_checks_its_rows(registry):
    x = torch.randn(3, 100, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="norm_forward_aot: weight must be an \\(N,\\) unit-stride tensor"):
        torch.ops.fasttrain.norm_forward_aot(x, None, torch.randn(99).half(), None, 1e-5, True, torch.float16)
    with pytest.raises(RuntimeError, match="norm_forward_aot: residual must be"):
        torch.ops.fasttrain.norm_forward_aot(x, x[:2], None, None, 1e-5, True, torch.float16)
    # a dtype mix that was not shipped (fp32 weight on fp16 rows) is named, not launched
    with pytest.raises(RuntimeError, match=r"no shipped cubin .* pointers to \(Half, Half, Float, Half"):
        torch.ops.fasttrain.norm_forward_aot(x, None, torch.randn(100), None, 1e-5, True, torch.float16)
    assert C.aot_records() == []
