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
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fasttrain._C as C
from fasttrain import _aot, _backend
from fasttrain.ops.norms import _AOT_MAX_N, NORMS, add_layer_norm, add_rms_norm, layer_norm, rms_norm

ROOT = Path(__file__).resolve().parent.parent
SM = 132  # the recorder's SM count (an H100's), which the backward's program count follows
FORWARD_FLAGS = ("IS_RMS", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS")


def _compile(out: Path, dtypes: list[str], cases: str | None) -> list[dict]:
    """tools/aot.py --shipped for the norms, sm_90, into out: its rows."""
    command = [sys.executable, str(ROOT / "tools" / "aot.py"), "--arch", "90", "--dtype", *dtypes, "--shipped"]
    command += ["--modules", "norms", "--kernels-dir", str(ROOT / "kernels"), "--out", str(out)]
    command += ["--jobs", str(os.cpu_count() or 1)] + (["--cases", cases] if cases else [])
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The shipped cases at BLOCK_N 128 (rows of 65..128), fp16 and bf16: every flag combination of both kernels."""
    out = tmp_path_factory.mktemp("aot")
    return out, _compile(out, ["fp16", "bf16"], "^n128 ")


@pytest.fixture
def registry(sample):
    """The sample registered with the C++ launcher and the launches recorded; both undone after the test."""
    C.aot_clear()
    assert _aot.load(sample[0], arch=90) == len(sample[1])
    C.aot_record(True, SM)
    yield
    C.aot_record(False, 0)
    C.aot_clear()


def test_shipped_set_lists_every_flag_combination_and_block():
    from fasttrain.kernels import norms

    assert norms.MAX_N == _AOT_MAX_N
    forward, backward = norms.aot_kernels(90, "bf16", shipped=True)
    blocks = {1 << i for i in range(13)}
    fwd = {tuple(c["constexprs"][f] for f in (*FORWARD_FLAGS, "BLOCK_N")) for c in forward["cases"]}
    # LayerNorm: residual x weight x bias; RMSNorm: residual x weight (no bias)
    assert len(fwd) == len(forward["cases"]) == 12 * len(blocks)
    assert {f[-1] for f in fwd} == blocks
    for c in forward["cases"] + backward["cases"]:
        n = c["constexprs"]["BLOCK_N"]
        assert c["constexprs"]["BLOCK_M"] == 1
        assert c["num_warps"] == norms.block_and_warps(n, backward=c in backward["cases"])[1]
    assert all(not c["constexprs"]["HAS_DX2"] for c in backward["cases"]) and len(backward["cases"]) == 12 * 13
    # CI's compile check keeps its three-case sample per kernel
    assert [len(k["cases"]) for k in norms.aot_kernels(90, "bf16")] == [3, 3]


def test_sample_registers_and_serves_every_flag_combination(sample, registry):
    rows = sample[1]
    assert len(rows) == 2 * 2 * 12 and all("error" not in r for r in rows)
    index = json.loads((sample[0] / "index.json").read_text())
    assert {e["arch"] for e in index} == {90} and all((sample[0] / e["cubin"]).exists() for e in index)
    for dtype in (torch.float16, torch.bfloat16):
        for is_rms in (False, True):
            for residual in (False, True):
                for weight in (False, True):
                    for bias in (False,) if is_rms else (False, True):
                        x = torch.randn(3, 100, dtype=dtype, requires_grad=True)
                        r = torch.randn(3, 100, dtype=dtype) if residual else None
                        w = torch.randn(100, dtype=dtype) if weight else None
                        b = torch.randn(100, dtype=dtype) if bias else None
                        y, s, _, _ = torch.ops.fasttrain.norm_forward_aot(x, r, w, b, 1e-5, is_rms, dtype)
                        grads = (torch.randn_like(y), torch.randn_like(s) if residual else None)
                        torch.autograd.backward(
                            [t for t, g in zip((y, s), grads) if g is not None], [g for g in grads if g is not None]
                        )
    records = C.aot_records()
    assert len(records) == 2 * 2 * 12 and {r["case"] for r in records} == {r["case"] for r in rows}


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


# (kind, M, N, dtype, is_rms, residual, weight, bias): awkward widths (97, 65, 100), batch 1, both dtypes, every
# optional tensor absent somewhere.
CASES = [
    ("forward", 5, 97, "fp16", False, False, True, True),
    ("forward", 1, 128, "bf16", True, False, True, False),
    ("forward", 7, 100, "bf16", False, True, False, False),
    ("forward", 3, 65, "fp16", True, True, False, False),
    ("backward", 9, 97, "fp16", False, False, True, True),
    ("backward", 1, 100, "bf16", True, True, True, False),
    ("backward", 600, 65, "fp16", False, True, False, True),  # more rows than 4 programs per SM: 2 rows each
    ("backward", 4, 128, "bf16", True, False, False, False),
]
FIELDS = ("kind", "M", "N", "dtype", "is_rms", "residual", "weight", "bias")


@pytest.fixture(scope="module")
def captured(sample):
    """One child over every case: the JIT's launch and the recorded C++ launch of each."""
    cases = [dict(zip(FIELDS, c)) for c in CASES]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "aot_jit_capture.py"), str(sample[0]), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return [line for line in lines if "case" in line]


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_recorded_launch_is_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    assert jit["kernel"] == aot["kernel"]
    assert jit["grid"] == aot["grid"] and jit["num_warps"] == aot["num_warps"]
    assert aot["shared"] == aot["entry_shared"] and aot["scratch_params"] == 2
    # The compiled case: the kernel's constexprs as the JIT took them.
    assert aot["constexprs"] == {k: int(jit["constexprs"][k]) for k in aot["constexprs"]}
    assert list(aot["args"]) == [
        n for n, t in jit["signature"].items() if t != "constexpr" or n not in aot["constexprs"]
    ]
    for name, value in aot["args"].items():
        if jit["signature"][name] == "constexpr":
            # The JIT made a constexpr of a None pointer (dropped from its launch: the cubin gets a null it never
            # reads) or of a 1-valued integer (the cubin gets the 1 as an ordinary argument).
            assert (value, jit["constexprs"][name]) in (("null", None), (1, 1)), name
            continue
        assert jit["signature"][name] == aot["types"][name], name
        if aot["types"][name] == "fp32":
            assert value == float(np.float32(jit["args"][name])), name
        else:
            assert value == jit["args"][name], name
    # The cubin assumes 16-divisibility only of what the JIT found divisible (or a null it never reads).
    assert all(n in jit["divisible"] or aot["args"][n] == "null" for n in aot["divisible"])


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
    x = torch.randn(4, 100, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 100, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    y, s, mean, rstd = torch.ops.fasttrain.norm_forward_aot(x, r, w, None, 1e-5, True, torch.bfloat16)
    assert "CppNode" in type(y.grad_fn).__name__ or "NormAot" in y.grad_fn.name()
    assert not mean.requires_grad and not rstd.requires_grad
    (y.float().sum() + s.float().sum()).backward()
    fwd, bwd = C.aot_records()
    assert fwd["kernel"] == "_norm_forward_kernel" and bwd["kernel"] == "_norm_backward_kernel"
    assert bwd["constexprs"][3] == 1  # HAS_DRES: the stream's own gradient joins dx
    # dx of the one kernel launch for both (uncomputed: compared bit for bit)
    assert (
        torch.equal(x.grad.view(torch.int16), r.grad.view(torch.int16))
        and w.grad.shape == (100,)
        and w.grad.dtype == torch.bfloat16
    )


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
    rows = _compile(tmp_path, ["bf16", "fp16", "fp32"], None)
    assert len(rows) == 3 * 2 * 12 * 13 and all("error" not in r for r in rows)
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
    # The public functions check their arguments before a backend is chosen: aot's calls get the JIT's errors.
    op, args, kwargs = BAD_CALLS[i]
    errors = set()
    for backend in ("aot", "triton", "reference"):
        with pytest.raises((TypeError, ValueError)) as e:
            op(*args(), **kwargs, backend=backend)
        errors.add((type(e.value), str(e.value)))
    assert len(errors) == 1, errors


def test_the_cpp_op_checks_its_rows(registry):
    x = torch.randn(3, 100, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="norm_forward_aot: weight must be an \\(N,\\) unit-stride tensor in x's"):
        torch.ops.fasttrain.norm_forward_aot(x, None, torch.randn(100), None, 1e-5, True, torch.float16)
    with pytest.raises(RuntimeError, match="norm_forward_aot: residual must be"):
        torch.ops.fasttrain.norm_forward_aot(x, x[:2], None, None, 1e-5, True, torch.float16)
    with pytest.raises(RuntimeError, match="norm_forward_aot: out_dtype must be x's dtype"):
        torch.ops.fasttrain.norm_forward_aot(x, None, None, None, 1e-5, True, torch.float32)
