"""Rotary's aot backend: the Triton kernel compiled ahead of time (tools/aot.py --shipped) and launched from C++
(csrc/aot_launch.h, csrc/rotary_aot.cpp), tested without a GPU as the norms' is (tests/test_norms_aot.py).

The shipped set is what fasttrain/ops/rotary.py's aot column takes; a sample of it compiles and registers; the C++ ops,
run on CPU tensors with the launch recorder on (no output is computed), hand the launcher what Triton's JIT launcher
is given for the same call (tests/aot_jit_capture.py); the C++ autograd runs the backward as the conjugate rotation;
torch.compile traces the op; bad input gets the Python path's errors. GPU tests (`pytest -m gpu`) hold the aot column
to the triton column and the reference, outputs and gradients.
"""

import os
import shutil

import pytest
import torch

import fasttrain._C as C
from fasttrain import _aot, _backend
from fasttrain.ops import rotary as ops_rotary
from fasttrain.ops.rotary import ROTARY, apply_rotary_emb, apply_rotary_emb_reference

from helpers import (
    aot_compile,
    aot_jit_launches,
    aot_recording,
    assert_aot_launch_is_the_jit_launch,
    assert_one_error_on_every_backend,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """fp16 at BLOCK_R 16 (9..16 rotated pairs): 16 heads' tiles (9..16 heads) of every flag set and table dtype,
    one head's of the shared fp16 tables; bf16 and fp32 x with fp32 shared tables, forward and conjugate. Two
    folders (the registry takes both)."""
    half = tmp_path_factory.mktemp("aot_fp16")
    rows = aot_compile(half, "rotary", ["fp16"], "^r16 h16 |^r16 h1 fp16 tables shared:")
    other = tmp_path_factory.mktemp("aot_bf16_fp32")
    rows += aot_compile(other, "rotary", ["bf16", "fp32"], "^r16 h16 fp32 tables shared: (plain|conjugate)$")
    return [half, other], rows


@pytest.fixture
def registry(sample):
    with aot_recording(sample[0], len(sample[1])):
        yield


def test_shipped_set_covers_every_tile_the_aot_column_takes():
    from fasttrain.kernels import rotary

    assert (rotary.MAX_HEADS, rotary.MAX_HEAD_DIM, rotary.MIN_HALF) == (
        ops_rotary._AOT_MAX_HEADS,
        ops_rotary._AOT_MAX_HEAD_DIM,
        ops_rotary._AOT_MIN_HALF,
    )
    for dtype, profiles in (("fp32", 1), ("bf16", 2)):
        entries = rotary.aot_kernels(90, dtype, shipped=True)
        assert len(entries) == 4 * profiles  # per table dtype: shared, per-sequence, int32 and int64 offsets
        keys, tiles = set(), {}
        for entry in entries:
            for c in entry["cases"]:
                k = c["constexprs"]
                assert k["BLOCK_T"] == 1 and k["BLOCK_P"] == rotary.PASS_BLOCK and not k["INTERLEAVED"]
                assert not (k["OFFSET_TENSOR"] and (k["CONJUGATE"] or k["PER_SEQUENCE"]))
                keys.add((entry["types"]["Cos"], entry["types"]["Offsets"], *sorted(k.items())))
                flags = (entry["types"]["Cos"], entry["types"]["Offsets"], k["CONJUGATE"], k["COPY_PASS"])
                tiles.setdefault((k["BLOCK_H"], k["BLOCK_R"]), set()).add(
                    (*flags, k["PER_SEQUENCE"], k["OFFSET_TENSOR"])
                )
        assert len(keys) == sum(len(e["cases"]) for e in entries) == 408 * profiles
        # every (BLOCK_H, BLOCK_R) the launcher picks inside the bounds, with every flag set
        assert len({frozenset(f) for f in tiles.values()}) == 1 and len(next(iter(tiles.values()))) == 12 * profiles
        for heads in range(1, rotary.MAX_HEADS + 1):
            for half in range(rotary.MIN_HALF, rotary.MAX_HEAD_DIM // 2 + 1):
                assert rotary.blocks(heads, half) in tiles
    # CI's compile check keeps its three-case sample
    assert [len(k["cases"]) for k in rotary.aot_kernels(90, "bf16")] == [3]


def test_sample_registers(sample, registry):
    rows = sample[1]
    assert len(rows) == 24 + 4 + 4 and all("error" not in r for r in rows)
    assert C.aot_registered() == len(rows)


# (kind, dtype, B, T, H, D, half, tables, mode, offsets_dtype, offset, conjugate, view): T = 1 and 97, batch 1, heads
# 1 and 12, partial rotary dims (out of place: the pass-through copy; in place: none), tensor offsets of both dtypes,
# per-sequence tables, the conjugate (the backward), a strided qkv view, fp16/bf16/fp32.
CASES = [
    ("rotary", "fp16", 2, 97, 12, 32, 16, "fp32", "shared", None, 3, False, True),
    ("rotary", "fp16", 1, 1, 12, 32, 16, "same", "shared", None, 0, True, False),
    ("rotary", "fp16", 2, 5, 1, 32, 16, "same", "shared", None, 1, False, False),
    ("rotary", "fp16", 2, 7, 12, 48, 12, "fp32", "per-sequence", None, 0, True, False),
    ("rotary_", "fp16", 2, 9, 12, 48, 12, "same", "offsets", "int32", 2, False, True),
    ("rotary", "fp16", 3, 4, 16, 32, 10, "fp32", "offsets", "int64", 0, False, False),
    ("rotary", "bf16", 2, 97, 12, 32, 16, "fp32", "shared", None, 0, False, False),
    ("rotary", "fp32", 1, 3, 12, 32, 16, "fp32", "shared", None, 0, True, True),
]
FIELDS = ("kind", "dtype", "B", "T", "H", "D", "half", "tables", "mode", "offsets_dtype", "offset", "conjugate", "view")


@pytest.fixture(scope="module")
def captured(sample):
    return aot_jit_launches(os.pathsep.join(map(str, sample[0])), [dict(zip(FIELDS, c)) for c in CASES])


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i])))
def test_recorded_launch_is_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    assert_aot_launch_is_the_jit_launch(jit, aot)
    assert aot["constexprs"]["COPY_PASS"] == (CASES[i][0] == "rotary" and CASES[i][5] > 2 * CASES[i][6])


def _tables(n, half, dtype=torch.float32):
    angles = torch.rand(n, half) * 6.3
    return angles.cos().to(dtype), angles.sin().to(dtype)


def test_autograd_runs_in_cpp_as_the_conjugate_rotation(registry):
    x = torch.randn(2, 5, 12, 32, dtype=torch.float16, requires_grad=True)
    cos, sin = _tables(8, 16)
    y = torch.ops.fasttrain.rotary_aot(x, cos, sin, None, 2, False, False)
    assert "RotaryAot" in y.grad_fn.name()
    y.float().sum().backward()
    fwd, bwd = C.aot_records()
    assert fwd["kernel"] == bwd["kernel"] == "_rotary_kernel"
    assert fwd["constexprs"][1] == 0 and bwd["constexprs"][1] == 1  # CONJUGATE
    assert fwd["args"][9] == bwd["args"][9] == 2  # offset
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype


def test_an_expanded_upstream_gradient_is_copied_to_the_compiled_layout(registry):
    x = torch.randn(1, 3, 12, 32, dtype=torch.float16, requires_grad=True)
    cos, sin = _tables(3, 16)
    y = torch.ops.fasttrain.rotary_aot(x, cos, sin, None, 0, False, False)
    y.backward(torch.ones(1, 1, 1, 1, dtype=torch.float16).expand_as(y))  # stride 0 everywhere
    _, bwd = C.aot_records()
    assert bwd["args"][12:15] == [3 * 12 * 32, 12 * 32, 32]  # a contiguous copy's strides


def test_inplace_op_rotates_x_and_refuses_x_requiring_grad(registry):
    x = torch.randn(2, 3, 12, 32, dtype=torch.float16)
    cos, sin = _tables(3, 16, torch.float16)
    version = x._version
    torch.ops.fasttrain.rotary_aot_(x, cos, sin, None, 0, False)
    (r,) = C.aot_records()
    assert r["args"][0] == r["args"][4] == x.data_ptr() and x._version > version
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.fasttrain.rotary_aot_(x.clone().requires_grad_(), cos, sin, None, 0, False)


def test_launcher_refuses_what_was_not_shipped(registry):
    x = torch.randn(2, 3, 12, 32, dtype=torch.float16)
    cos, sin = _tables(3, 16)
    with pytest.raises(RuntimeError, match="no shipped cubin for _rotary_kernel"):
        torch.ops.fasttrain.rotary_aot(x, cos, sin, None, 0, True, False)  # interleaved
    with pytest.raises(RuntimeError, match="no shipped cubin for _rotary_kernel"):
        torch.ops.fasttrain.rotary_aot(x, cos.half(), sin.float(), None, 0, False, False)
    assert C.aot_records() == []


def test_inplace_op_on_another_layout_rotates_a_copy_and_writes_it_back(registry):
    x = torch.randn(2, 3, 12, 40)[..., :32]  # (B, T, H) strides 1440, 480, 40: not multiples of 16
    cos, sin = _tables(3, 16)
    torch.ops.fasttrain.rotary_aot_(x, cos, sin, None, 0, False)
    (r,) = C.aot_records()
    assert r["args"][0] == r["args"][4] != x.data_ptr() and r["args"][12:15] == [3 * 12 * 32, 12 * 32, 32]
    misaligned = torch.randn(2 * 3 * 12 * 32 + 1)[1:].view(2, 3, 12, 32)  # 4 bytes past an aligned address
    torch.ops.fasttrain.rotary_aot(misaligned, cos, sin, None, 0, False, False)
    torch.ops.fasttrain.rotary_aot_(misaligned, cos, sin, None, 0, False)
    assert all(r["args"][0] % 16 == 0 for r in C.aot_records())


def test_cpu_tensors_are_taken_only_while_recording(registry):
    C.aot_record(False, 0)
    cos, sin = _tables(3, 16)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.rotary_aot(torch.randn(1, 3, 12, 32), cos, sin, None, 0, False, False)


# (change to good arguments, error type, message): the Python path's checks, as the C++ op sees them
OP_ERRORS = [
    (dict(x=torch.randn(2, 3, 32)), ValueError, r"x must be a \(B, T, H, D\) tensor"),
    (dict(x=torch.ones(2, 3, 12, 32, dtype=torch.long)), TypeError, "x must be a floating-point tensor"),
    (dict(cos=torch.ones(3, 16, dtype=torch.long)), TypeError, "cos must be a floating-point tensor"),
    (dict(sin=torch.ones(3, 15)), ValueError, "sin must have cos's shape"),
    (dict(cos=torch.ones(3, 17), sin=torch.ones(3, 17)), ValueError, "cos/sin must have 1..16 columns"),
    (dict(offset=1), ValueError, "cos/sin have 3 positions, fewer than seqlen_offsets \\+ T = 4"),
    (dict(offsets=torch.zeros(3, dtype=torch.int32)), ValueError, r"seqlen_offsets must be an integer tensor of"),
    (dict(offsets=torch.zeros(2)), TypeError, "seqlen_offsets must be an int or an integer tensor"),
    (dict(cos=torch.ones(2, 4, 16), sin=torch.ones(2, 4, 16)), ValueError, "per-sequence cos/sin must be"),
]


@pytest.mark.parametrize("i", range(len(OP_ERRORS)))
def test_the_cpp_op_checks_what_the_python_path_checks(registry, i):
    change, error, match = OP_ERRORS[i]
    cos, sin = _tables(3, 16)
    args = dict(x=torch.randn(2, 3, 12, 32, dtype=torch.float16), cos=cos, sin=sin, offsets=None, offset=0) | change
    with pytest.raises(error, match=match):
        torch.ops.fasttrain.rotary_aot(*args.values(), False, False)
    assert C.aot_records() == []


def test_torch_compile_traces_the_public_function_on_the_aot_column(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    cos, sin = _tables(4, 16)

    def f(q, k):
        return apply_rotary_emb(q, cos, sin) + apply_rotary_emb(k, cos, sin)

    q = torch.randn(2, 4, 12, 32, dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 4, 12, 32, dtype=torch.float16, requires_grad=True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(q, k).float().sum().backward()
    assert [r["constexprs"][1] for r in C.aot_records()] == [0, 0, 1, 1]  # two forwards, two conjugate backwards
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _launches(records):
    """The recorded launches with each address reduced to whether it is null (outputs are fresh per call)."""
    return [{**r, "args": [bool(a) if t == "ptr" else a for t, a in zip(r["types"], r["args"])]} for r in records]


# (x's shape, or a qkv view's (B, T, H + 2, D) taking heads 1..H; tables' dtype; seqlen_offsets), fp16 x
SHORT_CALLS = [((2, 5, 12, 32), torch.float32, 0), ((1, 1, 16, 48), torch.float32, 3), ((2, 3, 1, 32), None, 2)]


@pytest.mark.parametrize("view", [False, True], ids=["contiguous", "qkv-view"])
@pytest.mark.parametrize("i", range(len(SHORT_CALLS)), ids=lambda i: str(SHORT_CALLS[i]))
def test_short_path_takes_the_common_call_and_launches_what_the_general_path_does(registry, monkeypatch, i, view):
    shape, table_dtype, offset = SHORT_CALLS[i]
    B, T, H, D = shape
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    torch.manual_seed(0)
    half = 12 if D == 48 else 16  # D 48: the pass-through copy
    cos, sin = _tables(T + offset, half, table_dtype or torch.float16)
    leaf = torch.randn(B, T, H + 2 if view else H, D, dtype=torch.float16, requires_grad=True)
    runs = []
    for short in (True, False):
        if short:  # the short path never asks the table
            monkeypatch.setattr(ROTARY, "choose", lambda *a, **k: pytest.fail("the general path ran"))
        else:
            monkeypatch.undo()
            monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
            monkeypatch.setattr(ops_rotary, "_AOT_OP", None)
        x = leaf[:, :, 1 : H + 1] if view else leaf
        apply_rotary_emb(x, cos, sin, seqlen_offsets=offset).float().sum().backward()
        runs.append((_launches(C.aot_records()[2 * len(runs) :]), leaf.grad))
        leaf.grad = None
    (short_launches, short_grad), (general_launches, general_grad) = runs
    assert len(short_launches) == 2 and short_launches == general_launches
    assert short_grad.shape == general_grad.shape == leaf.shape


@pytest.mark.filterwarnings("ignore:fasttrain. rotary runs on the reference backend")  # the float64 call
def test_short_path_leaves_every_other_call_to_the_general_path(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    chosen = []
    choose = ROTARY.choose
    monkeypatch.setattr(ROTARY, "choose", lambda *a, **k: chosen.append(1) or choose(*a, **k))
    x = torch.randn(2, 3, 12, 32, dtype=torch.float16)
    cos, sin = _tables(3, 16)
    general = [
        lambda: apply_rotary_emb(x, cos, sin, backend="aot"),  # a backend named
        lambda: apply_rotary_emb(x, cos, sin, interleaved=True),
        lambda: apply_rotary_emb(x.clone(), cos, sin, inplace=True),
        lambda: apply_rotary_emb(x, cos[None], sin[None]),  # HF's (1, T, R/2) tables
        lambda: apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.zeros(2, dtype=torch.int32)),
        lambda: apply_rotary_emb(x, cos.t().contiguous().t(), sin),  # a table not contiguous
        lambda: apply_rotary_emb(x.double(), cos, sin),  # not a shipped dtype
        lambda: apply_rotary_emb(x, cos.bfloat16(), sin.bfloat16()),  # tables neither fp32 nor x's dtype
    ]
    for i, call in enumerate(general):
        call()
        assert len(chosen) == i + 1, i
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")
    apply_rotary_emb(x, cos, sin)
    assert len(chosen) == len(general) + 1
    # a bad argument never reaches the op: the general path raises its error
    with pytest.raises(ValueError, match="apply_rotary_emb: cos/sin have 3 positions"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=1)


def test_aot_column_comes_first_and_takes_the_shipped_calls(monkeypatch):
    assert list(ROTARY.backends) == ["aot", "triton", "cpu", "reference"]
    assert ROTARY.direct["aot"] is torch.ops.fasttrain.rotary_aot
    x = torch.randn(2, 3, 12, 32)
    cos, sin = _tables(3, 16)
    assert ROTARY.reasons(x, cos, sin, None, False)["aot"] is _backend.AOT_TAKES_CUDA
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)

    def why(x=x, cos=cos, sin=sin, offsets=None, interleaved=False):
        return ROTARY.reasons(x, cos, sin, offsets, interleaved)["aot"]

    h = torch.float16
    assert why() is None and why(x.half()) is None and why(x.half(), cos.half(), sin.half()) is None
    assert why(x.bfloat16(), cos.bfloat16(), sin.bfloat16()) is None
    assert why(offsets=torch.zeros(2, dtype=torch.int32)) is None
    assert "fp16, bf16 or fp32" in why(x.half(), cos.bfloat16(), sin.bfloat16())
    assert "fp16, bf16 or fp32" in why(x.double(), cos.double(), sin.double())
    assert "fp16, bf16 or fp32" in why(x.half(), cos.half(), sin)
    assert "interleaved" in why(interleaved=True)
    assert "multiple of 16" in why(torch.randn(2, 3, 12, 40, dtype=h))
    assert "multiple of 16" in why(torch.randn(2, 3, 129, 32))
    assert "rotary_dim >= 10" in why(torch.randn(2, 3, 12, 32), *_tables(3, 4))
    assert "int32 or int64" in why(offsets=torch.zeros(2, dtype=torch.int16))
    assert "without a gradient" in why(x.clone().requires_grad_(), offsets=torch.zeros(2, dtype=torch.int64))
    misaligned = torch.randn(2 * 3 * 12 * 32 + 1)[1:].view(2, 3, 12, 32)
    assert why(misaligned) is None  # the C++ ops copy it
    monkeypatch.undo()
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert _backend.aot_reason(torch.device("cuda")) is _backend.AOT_OFF


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (args, kwargs): a wrong dtype, a non-tensor, a wrong shape, bad offsets
BAD_CALLS = [
    (lambda: (_x(2, 3, 4, 32, dtype=torch.long), *_tables(3, 16)), {}),
    (lambda: (_x(2, 3, 4, 32), [1.0], _tables(3, 16)[1]), {}),
    (lambda: (_x(2, 3, 32), *_tables(3, 16)), {}),
    (lambda: (_x(2, 3, 4, 32), *_tables(3, 17)), {}),
    (lambda: (_x(2, 3, 4, 32), *_tables(3, 16)), {"seqlen_offsets": torch.zeros(3, dtype=torch.int32)}),
    (lambda: (_x(2, 3, 4, 32), *_tables(3, 16)), {"seqlen_offsets": 1}),
    (lambda: (_x(2, 3, 4, 32), *_tables(3, 16)), {"interleaved": 1.0}),  # an int reads by truth, as flash-attn
]


@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_bad_input_gives_the_same_error_whichever_backend_is_asked(i):
    args, kwargs = BAD_CALLS[i]
    assert_one_error_on_every_backend(lambda backend: apply_rotary_emb(*args(), **kwargs, backend=backend))


# ---- GPU: the aot column against the triton column and the reference ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B,T,H,D,rot,tables,offsets",
    [
        (2, 97, 12, 64, 64, "fp32", None),
        (1, 1, 1, 128, 128, "same", None),
        (2, 1025, 32, 128, 128, "same", "per-sequence"),
        (3, 33, 8, 80, 32, "fp32", "int32"),  # partial: the pass-through copy
        (2, 17, 16, 256, 256, "fp32", 3),
    ],
    ids=str,
)
def test_gpu_aot_matches_triton_outputs_and_gradients(B, T, H, D, rot, tables, offsets, dtype):
    torch.manual_seed(0)
    table_dtype = torch.float32 if tables == "fp32" else dtype
    x0 = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    angles = torch.rand(B, T, rot // 2) if offsets == "per-sequence" else torch.rand(T + 8, rot // 2)
    cos, sin = angles.cos().to("cuda", table_dtype), angles.sin().to("cuda", table_dtype)
    seqlen = 0
    if offsets == "int32":
        seqlen = torch.randint(0, 8, (B,), device="cuda", dtype=torch.int32)
    elif isinstance(offsets, int):
        seqlen = offsets
    grad_needed = not isinstance(seqlen, torch.Tensor)
    up = torch.randn_like(x0)
    results = {}
    for backend in ("aot", "triton", "reference"):
        x = x0.clone().requires_grad_(grad_needed)
        y = apply_rotary_emb(x, cos, sin, seqlen_offsets=seqlen, backend=backend)
        if grad_needed:
            y.backward(up)
        results[backend] = [y.detach()] + ([x.grad] if grad_needed else [])
        xi = x0.clone()
        apply_rotary_emb(xi, cos, sin, inplace=True, seqlen_offsets=seqlen, backend=backend)
        results[backend].append(xi)
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        torch.testing.assert_close(got, want)  # the same kernel on the same inputs
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_aot_is_chosen_and_off_switches_select_the_jit(monkeypatch):
    x = torch.randn(2, 8, 12, 64, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in _tables(8, 32))
    assert ROTARY.choose(x, cos, sin, None, False) == "aot"
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert ROTARY.choose(x, cos, sin, None, False) == "triton"
    monkeypatch.delenv("FASTTRAIN_AOT")
    monkeypatch.setenv("FASTTRAIN_BACKEND", "triton")
    assert ROTARY.choose(x, cos, sin, None, False) == "triton"
    torch.testing.assert_close(
        apply_rotary_emb(x, cos, sin).float(), apply_rotary_emb_reference(x, cos, sin).float(), rtol=2e-2, atol=2e-2
    )


# ---- the full shipped set -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_shipped_set_compiles_and_registers(tmp_path):
    rows = aot_compile(tmp_path, "rotary", ["bf16", "fp16", "fp32"])
    assert len(rows) == 408 * 5 and all("error" not in r for r in rows)
    C.aot_clear()
    try:
        assert _aot.load(tmp_path, arch=90) == len(rows) == C.aot_registered()
    finally:
        C.aot_clear()
        shutil.rmtree(tmp_path, ignore_errors=True)
