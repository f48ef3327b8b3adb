"""flash_attn_func's aot column: kernels/attention.py's forward compiled ahead of time (tools/aot.py --shipped) and
launched from C++ (csrc/attention_aot.cpp), tested without a GPU; its backward is the triton column's.

The C++ launcher's global scratch (the sm_90 warp-specialized configs build TMA descriptors on the device, in memory
Triton's launcher asks its allocator for) is registered and sized as Triton's launcher sizes it. The shipped set
lists what the column takes; a sample of it compiles for sm_90 and registers with the C++ launcher; the C++ op, run on
CPU tensors with the launch recorder on (no output is computed here), hands the launcher what Triton's JIT launcher is
given for the same call with its autotuner held to one config (tests/aot_jit_capture.py); the C++ tuner times the
shipped tiles of a shape class; the column's reason sends everything else to the JIT; torch.compile traces the public
function on the column. GPU tests (`pytest -m gpu`) hold the column to the triton column and the reference: outputs,
lse and gradients.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import fasttrain._C as C
from fasttrain import _backend
from fasttrain.ops import attention as ops
from fasttrain.ops.attention import flash_attn_func
from fasttrain.ops.attention_reference import UNBOUNDED

from helpers import aot_compile, aot_jit_launches, aot_recording, assert_aot_launch_is_the_jit_launch

# A registered kernel's parameters (csrc/aot_launch.cpp's spec of the decode combine), for registration-only cases.
_COMBINE = (
    "_decode_combine_kernel",
    ["HEAD_DIM", "BLOCK_S", "BLOCK_D"],
    ["O_PART", "LSE_PART", "Out", "LSE", "stride_ps", "stride_ls", "stride_ob", "stride_ot", "stride_oh",
     "stride_lb", "stride_lh", "stride_lt", "tq", "n_heads", "num_splits"],
)  # fmt: skip


def _register(global_scratch=0, profile_scratch=0, align=1, params=2):
    kernel, constexprs, args = _COMBINE
    types = ["*fp32", "*fp32", "*fp16", "*fp32"] + ["i32"] * (len(args) - 4)
    C.aot_register(
        kernel, "fp16", [64, 2, 64], constexprs, args, types, [], 4, 1, 0, len(args) + params, global_scratch,
        profile_scratch, kernel, "x", b"", global_scratch_align=align,
    )  # fmt: skip


def test_registration_takes_global_scratch_and_refuses_profile_scratch():
    C.aot_clear()
    try:
        _register(global_scratch=128, align=128)
        assert C.aot_registered() == 1
        with pytest.raises(RuntimeError, match="profile scratch"):
            _register(profile_scratch=64)
        with pytest.raises(RuntimeError, match="no scratch parameter"):
            _register(global_scratch=128, params=0)
        with pytest.raises(RuntimeError, match="alignment 3 is not a power of 2"):
            _register(global_scratch=128, align=3)
        with pytest.raises(RuntimeError, match="alignment 1024"):
            _register(global_scratch=128, align=1024)
        assert C.aot_registered() == 1
    finally:
        C.aot_clear()


# ---- the forward from C++ (csrc/attention_aot.cpp) ------------------------------------------------------------------

SM = 132
# The sample: head dim 64, fp16 (bf16 and head dim 128 share every line of the launch path): the class's first sm_90
# config at GQA 1 and 4, and its warp-specialized config (TMA descriptors made on the device: global scratch) at 1;
# packed (varlen) both at GQA 1 (the backward's sample holds a packed GQA launch).
FIRST = "BLOCK_M=128 BLOCK_N=64 WARP_SPECIALIZE=False w4 s3$"  # the d64 class's first sm_90 config
WS = "BLOCK_M=128 BLOCK_N=128 WARP_SPECIALIZE=True w4 s2"  # its warp-specialized config
# Dropout (the pointer loop, TMA_ALIGNED off): the class's first sm_90 config that takes it, at GQA 1; at GQA 4 and
# packed under `-m slow` (SLOW_SAMPLE).
DROPOUT = "BLOCK_M=128 BLOCK_N=128 WARP_SPECIALIZE=False w8 s3"
SAMPLE = f"^d64 G(1|4) {FIRST}|^d64 G1 {FIRST[:-1]} varlen$|^d64 G1 {WS}( varlen)?$|^d64 G1 {DROPOUT} dropout$"
SLOW_SAMPLE = f"^d64 G4 {DROPOUT} dropout$|^d64 G1 {DROPOUT} varlen dropout$"
# csrc/attention_aot.cpp kTiles: (BLOCK_M, BLOCK_N, WARP_SPECIALIZE), the order the op probes the registry in.
CPP_TILES = [(128, 64, False), (128, 128, False), (64, 64, False), (128, 128, True)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(fp16 folder, its rows, bf16 folder): the sample in fp16, and the class's first tile at GQA 1 in bf16."""
    out, out_bf16 = tmp_path_factory.mktemp("aot"), tmp_path_factory.mktemp("aot_bf16")
    rows = aot_compile(out, "attention", ["fp16"], SAMPLE)
    assert len(rows) == 6 and all("error" not in r and r["local"] == 0 for r in rows)
    bf16 = aot_compile(out_bf16, "attention", ["bf16"], f"^d64 G1 {FIRST}")
    assert len(bf16) == 1 and "error" not in bf16[0] and bf16[0]["local"] == 0
    return out, rows, out_bf16


@pytest.fixture
def registry(sample):
    """The sample registered with the C++ launcher and the launches recorded, nothing tuned; undone after the test."""
    with aot_recording([sample[0], sample[2]], len(sample[1]) + 1, SM):
        yield


def test_shipped_set_is_the_columns_scope():
    from fasttrain.kernels import attention
    from fasttrain.kernels._attention_configs import FWD_CONFIGS

    assert attention.aot_kernels(90, "fp32", shipped=True) == []
    assert (attention.SHIPPED_HEAD_DIMS, attention.SHIPPED_GROUPS) == (ops._AOT_HEAD_DIMS, ops._AOT_GROUPS)
    for arch in (80, 90):
        (entry,) = attention.aot_kernels(arch, "bf16", shipped=True)
        # the cases of head dims 64 and 128 (96 and 256: tests/test_attention_aot_coverage.py)
        entry["cases"] = [c for c in entry["cases"] if c["constexprs"]["HEAD_DIM"] in (64, 128)]
        # the kernel's runtime arguments, in order, as the C++ op passes them (the interpreter's stand-in: .fn)
        parameters = inspect.signature(entry["kernel"].fn).parameters.values()
        assert [p.name for p in parameters if "constexpr" not in str(p.annotation)] == _ARGS
        tables = {cls: FWD_CONFIGS[arch][cls] for cls in ("d64", "d128")}
        ws = sum(c.kwargs.get("WARP_SPECIALIZE", False) for configs in tables.values() for c in configs)
        plain = [c for c in entry["cases"] if not c["constexprs"]["DROPOUT"]]
        dropout = [c for c in entry["cases"] if c["constexprs"]["DROPOUT"]]
        assert entry["cases"] == plain + dropout
        # dropout: the plain cases but FULL_TILES and the configs the pruner leaves out of its launches (the
        # warp-specialized ones, those marked no_dropout), TMA_ALIGNED off, labelled " dropout"
        takes = {
            f"{cls} " + " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"
            for cls, configs in tables.items()
            for c in configs
            if not c.kwargs.get("WARP_SPECIALIZE", False) and not getattr(c, "no_dropout", False)
        }
        expected = [
            c["label"] + " dropout"
            for c in plain
            if c["label"].replace(" varlen", "").replace(f" G{c['constexprs']['GROUP']} ", " ") in takes
        ]
        assert [c["label"] for c in dropout] == expected and len(dropout) == 8 * len(takes)
        assert not any(c["constexprs"]["TMA_ALIGNED"] or c["constexprs"]["FULL_TILES"] for c in dropout)
        assert (f"d64 {FIRST[:-1]}" in takes) == (arch == 80)  # it spills with dropout on sm_90 (no_dropout)
        dense = [c for c in plain if not c["constexprs"]["VARLEN"]]
        packed = [c for c in plain if c["constexprs"]["VARLEN"]]
        assert len(dense) == 4 * (sum(map(len, tables.values())) + ws)  # 4 groups, FULL_TILES off (on: ws)
        assert len(packed) == 4 * sum(map(len, tables.values()))  # packed calls never have FULL_TILES
        assert all(c["label"].endswith(" varlen") for c in packed) and not any(" varlen" in c["label"] for c in dense)
        assert [c["label"] for c in packed] == [
            c["label"] + " varlen" for c in dense if not c["constexprs"]["FULL_TILES"]
        ]
        assert all(c["constexprs"]["WARP_SPECIALIZE"] for c in dense if c["constexprs"]["FULL_TILES"])
        assert any(c["constexprs"]["FULL_TILES"] for c in dense) == (arch == 90)
        assert not any(c["constexprs"]["FULL_TILES"] for c in packed)
        for c in entry["cases"]:
            k = c["constexprs"]
            assert k["TMA_ALIGNED"] != k["DROPOUT"] and not (k["UPCAST"] or k["SOFTCAP"] or k["ALIBI"])
            assert k["HEAD_DIM"] == k["HEAD_DIM_PAD"] in (64, 128) and k["GROUP"] in (1, 2, 4, 8)
        for configs in tables.values():  # the C++ op's probing order is the tables' (a subsequence on sm_80)
            tiles = [
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("WARP_SPECIALIZE", False)) for c in configs
            ]
            assert tiles == [t for t in CPP_TILES if t in tiles]
            assert len(set(tiles)) == len(tiles)  # no two configs collide in the registry's key


W = UNBOUNDED
# (B, Tq, Tk, H, Hkv, window, config, times, dtype): the JIT held to the class's config `config`, the C++ tuner given
# `times` for its shipped candidates (none: the first, untimed). One token, 97 (a window, GQA 4), 1025 causal on the
# warp-specialized tile (tuned to it), Tq < Tk, two sequences; whole tiles, no window (FULL_TILES: the pipelined tile
# launches its False cubin); bf16 (one tile shipped in the sample).
CASES = [
    (1, 1, 1, 2, 2, (W, 0), 0, [], "fp16"),
    (1, 97, 97, 8, 2, (16, 0), 0, [], "fp16"),
    (1, 1025, 1025, 2, 2, (W, 0), 3, [2.0, 1.0], "fp16"),
    (2, 33, 100, 4, 4, (W, W), 0, [1.0, 2.0], "fp16"),
    (1, 200, 200, 2, 2, (W, W), 3, [3.0, 1.0], "fp16"),
    (1, 128, 128, 2, 2, (W, W), 0, [], "fp16"),
    (1, 97, 97, 2, 2, (W, 0), 0, [], "bf16"),
]
FIELDS = ("B", "Tq", "Tk", "H", "Hkv", "window", "config", "times", "dtype")
# Packed (flash_attn_varlen_func): (lengths_q, lengths_k, H, Hkv, window, config, times), fp16. One sequence of one
# token; three of unequal lengths with a one-token one and a window; the same causal on the warp-specialized
# tile (tuned to it); two with Tq != Tk per sequence, no mask (the first tile, tuned to it).
VARLEN_CASES = [
    ([1], [1], 2, 2, (W, 0), 0, []),
    ([97, 1, 33], [97, 1, 33], 2, 2, (16, 0), 0, []),
    ([200, 1, 57], [200, 1, 57], 2, 2, (W, 0), 3, [2.0, 1.0]),
    ([33, 100], [100, 40], 2, 2, (W, W), 0, [1.0, 2.0]),
]
VARLEN_FIELDS = ("lengths_q", "lengths_k", "H", "Hkv", "window", "config", "times")


# Dropout, fp16, the JIT held to the class's first config that takes it (1: DROPOUT's tile, the C++ op's only
# candidate in the sample): (B or lengths_q, Tq or lengths_k, Tk, H, Hkv, window, dropout_p). A window at T 97; two
# sequences with Tq < Tk; whole tiles (the JIT's FULL_TILES, which the pointer loop ignores). Under `-m slow`: GQA 4
# causal; packed, three sequences with a one-token one and a window.
DROPOUT_CASES = [
    (1, 97, 97, 2, 2, (16, 0), 0.2),
    (2, 33, 100, 2, 2, (W, W), 0.1),
    (1, 128, 128, 2, 2, (W, W), 0.1),
]
SLOW_DROPOUT_CASES = [
    (1, 97, 97, 8, 2, (W, 0), 0.1),
    ([97, 1, 33], [97, 1, 33], None, 2, 2, (16, 0), 0.1),
]


def _dropout_case(case):
    first, second, Tk, H, Hkv, window, p = case
    shape = dict(lengths_q=first, lengths_k=second) if Tk is None else dict(B=first, Tq=second, Tk=Tk)
    return dict(shape, H=H, Hkv=Hkv, window=window, dropout_p=p, config=1, times=[], dtype="fp16")


@pytest.fixture(scope="module")
def captured(sample):
    """The dense CASES, then the VARLEN_CASES, then the DROPOUT_CASES."""
    cases = [dict(zip(FIELDS, c), D=64, op="attention") for c in CASES]
    cases += [dict(zip(VARLEN_FIELDS, c), D=64, dtype="fp16", op="attention") for c in VARLEN_CASES]
    cases += [dict(_dropout_case(c), D=64, op="attention") for c in DROPOUT_CASES]
    return aot_jit_launches(f"{sample[0]}{os.pathsep}{sample[2]}", cases)


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"case{i}")
def test_recorded_launch_is_what_the_jit_launcher_is_given(captured, sample, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    config, times, dtype = CASES[i][-3:]
    # the tuner's trials (one per shipped candidate, the tables' order) when it has times, then the chosen tile
    assert ["WARP_SPECIALIZE=True" in a["case"] for a in aot] == [False, True][: len(times)] + [config == 3]
    index = json.loads((sample[0 if dtype == "fp16" else 2] / "index.json").read_text())
    (row,) = [e for e in index if e["case"] == aot[-1]["case"]]
    assert jit["signature"]["Q"] == aot[-1]["types"]["Q"] == f"*{dtype}"
    # The JIT's launcher launches the compiled kernel's warps: 12 for a warp-specialized config of num_warps 4.
    assert row["num_warps"] == jit["num_warps"]
    full = CASES[i][1] % 128 == 0 and CASES[i][2] % 128 == 0 and CASES[i][5] == (W, W)
    ws = bool(aot[-1]["constexprs"]["WARP_SPECIALIZE"])
    assert jit["constexprs"]["FULL_TILES"] == full and aot[-1]["constexprs"]["FULL_TILES"] == (full and ws)
    # the pipelined loop ignores FULL_TILES: the False cubin serves
    constexprs = {**jit["constexprs"], "FULL_TILES": full and ws}
    assert_aot_launch_is_the_jit_launch({**jit, "num_warps": row["launched_warps"], "constexprs": constexprs}, aot[-1])
    # global scratch: what Triton's launcher asks its allocator for, for this cubin and grid
    if config == 3:
        cells = aot[-1]["grid"][0] * aot[-1]["grid"][1] * aot[-1]["grid"][2]
        assert row["global_scratch_size"] > 0 and row["launched_warps"] == 12
        assert aot[-1]["scratch_bytes"] == cells * row["global_scratch_size"]
        assert jit["scratch"] == [[aot[-1]["scratch_bytes"], row["global_scratch_align"]]]
    else:
        assert jit["scratch"] == [] and aot[-1]["scratch_bytes"] == 0


@pytest.mark.parametrize("i", range(len(VARLEN_CASES)), ids=lambda i: f"varlen{i}")
def test_recorded_varlen_launch_is_what_the_jit_launcher_is_given(captured, sample, i):
    """fasttrain::attention_varlen_forward_aot's launch: the packed cubin (VARLEN), the offsets and longest lengths,
    batch stride 0 and lse (H, total_q), as the JIT launcher is given them."""
    jit, aot = captured[len(CASES) + i]["jit"], captured[len(CASES) + i]["aot"]
    lengths_q, lengths_k, H, _, _, config, times = VARLEN_CASES[i]
    assert ["WARP_SPECIALIZE=True" in a["case"] for a in aot] == [False, True][: len(times)] + [config == 3]
    assert all(a["case"].endswith(" varlen") and a["constexprs"]["VARLEN"] == 1 for a in aot)
    index = json.loads((sample[0] / "index.json").read_text())
    (row,) = [e for e in index if e["case"] == aot[-1]["case"]]
    assert row["num_warps"] == jit["num_warps"] and not jit["constexprs"]["FULL_TILES"]
    assert_aot_launch_is_the_jit_launch({**jit, "num_warps": row["launched_warps"]}, aot[-1])
    args = aot[-1]["args"]
    assert (args["CuQ"], args["CuK"]) == ("cu_q", "cu_k")
    assert (args["seqlen_q"], args["seqlen_k"]) == (max(lengths_q), max(lengths_k))
    assert args["stride_qb"] == args["stride_ob"] == args["stride_lb"] == 0 and args["stride_lh"] == sum(lengths_q)
    assert aot[-1]["grid"] == [-(-max(lengths_q) // aot[-1]["constexprs"]["BLOCK_M"]), H, len(lengths_q)]
    if config == 3:
        cells = aot[-1]["grid"][0] * aot[-1]["grid"][1] * aot[-1]["grid"][2]
        assert aot[-1]["scratch_bytes"] == cells * row["global_scratch_size"] > 0
        assert jit["scratch"] == [[aot[-1]["scratch_bytes"], row["global_scratch_align"]]]
    else:
        assert jit["scratch"] == [] and aot[-1]["scratch_bytes"] == 0


@pytest.mark.parametrize("i", range(len(DROPOUT_CASES)), ids=lambda i: f"dropout{i}")
def test_recorded_dropout_launch_is_what_the_jit_launcher_is_given(captured, i):
    _check_dropout_launch(captured[len(CASES) + len(VARLEN_CASES) + i], DROPOUT_CASES[i])


@pytest.fixture(scope="module")
def slow_captured(sample, tmp_path_factory):
    """The SLOW_DROPOUT_CASES, with SLOW_SAMPLE compiled beside the sample."""
    out = tmp_path_factory.mktemp("aot_slow")
    rows = aot_compile(out, "attention", ["fp16"], SLOW_SAMPLE)
    assert len(rows) == 2 and all("error" not in r and r["local"] == 0 for r in rows)
    cases = [dict(_dropout_case(c), D=64, op="attention") for c in SLOW_DROPOUT_CASES]
    return aot_jit_launches(os.pathsep.join(map(str, (sample[0], sample[2], out))), cases)


@pytest.mark.slow  # two more cubins to compile
@pytest.mark.parametrize("i", range(len(SLOW_DROPOUT_CASES)), ids=lambda i: f"dropout_slow{i}")
def test_recorded_dropout_launch_at_gqa_and_packed_is_what_the_jit_launcher_is_given(slow_captured, i):
    _check_dropout_launch(slow_captured[i], SLOW_DROPOUT_CASES[i])


def _check_dropout_launch(got: dict, case: tuple) -> None:
    """With dropout: the DROPOUT cubin with TMA_ALIGNED off (the pointer loop, as the JIT launches it), the seed
    tensor itself and the JIT's threshold and scale."""
    from fasttrain.ops.attention_dropout import keep_threshold

    jit, (launch,) = got["jit"], got["aot"]  # one tile shipped for the class: launched untimed
    p, packed = case[-1], case[2] is None
    assert launch["case"].endswith(" varlen dropout" if packed else f"{DROPOUT} dropout")
    assert launch["case"].startswith(f"d64 G{case[3] // case[4]} ")
    assert jit["constexprs"]["DROPOUT"] and not jit["constexprs"]["TMA_ALIGNED"]
    # the pointer loop ignores FULL_TILES (true for the JIT's whole-tile case): the False cubin serves
    whole = not packed and case[1] % 128 == 0 and case[2] % 128 == 0 and case[5] == (W, W)
    assert not launch["constexprs"]["FULL_TILES"] and jit["constexprs"]["FULL_TILES"] == whole
    assert_aot_launch_is_the_jit_launch({**jit, "constexprs": {**jit["constexprs"], "FULL_TILES": False}}, launch)
    args = launch["args"]
    assert args["Seed"] == jit["args"]["Seed"] == "seed" and args["dropout_threshold"] == keep_threshold(p)
    assert args["dropout_scale"] == pytest.approx(1 / (1 - p))
    assert jit["scratch"] == [] and launch["scratch_bytes"] == 0


# csrc/aot_launch.cpp's spec of the forward's runtime arguments, in order
_ARGS = ["Q", "K", "V", "Out", "Lse", "CuQ", "CuK", "stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt",
         "stride_kh", "stride_vb", "stride_vt", "stride_vh", "stride_ob", "stride_ot", "stride_oh", "stride_lb",
         "stride_lh", "seqlen_q", "seqlen_k", "scale_log2", "left", "right", "tune_seqlen", "tune_left", "tune_right",
         "Seed", "dropout_threshold", "dropout_scale", "softcap_log2", "Alibi", "stride_ab"]  # fmt: skip


def _tensors(B=1, Tq=97, Tk=97, H=2, Hkv=2, D=64, dtype=torch.float16):
    torch.manual_seed(0)
    return torch.randn(B, Tq, H, D, dtype=dtype), *(torch.randn(B, Tk, Hkv, D, dtype=dtype) for _ in "kv")


def _cases(records):
    return [r["case"] for r in records]


def test_tuning_times_each_shipped_tile_once_per_shape_class_and_keeps_the_fastest(registry):
    def call(T, left=W, right=0):
        q, k, v = _tensors(Tq=T, Tk=T)
        torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, left, right)
        launches = ["ws" if "WARP_SPECIALIZE=True" in c else "plain" for c in _cases(C.aot_records())]
        C.aot_record(True, SM)  # clears
        return launches

    C.aot_tune_reset([3.0, 1.0, 1.0, 2.0, 1.0, 2.0])  # ms: the recorded trials' times, in order
    assert call(100) == ["plain", "ws", "ws"]  # a trial of each tile (the table's first first), then the faster
    assert call(100) == ["ws"] and call(127) == ["ws"]  # the class's choice (tune_seqlen 128), cached
    assert call(200) == ["plain", "ws", "plain"]  # another tune_seqlen: its own trials
    assert call(100, right=W) == ["plain", "ws", "plain"]  # another band class: its own trials
    assert call(1000) == ["plain"] and call(1000) == ["plain"]  # no times left: the first tile, untimed, uncached


def test_one_shipped_tile_is_launched_untimed_and_an_unshipped_case_names_its_constexprs(registry):
    C.aot_tune_reset([1.0, 2.0])
    q, k, v = _tensors(H=8, Hkv=2)  # GQA 4: one tile shipped in the sample
    torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0)
    assert len(C.aot_records()) == 1
    q, k, v = _tensors(Tq=128, Tk=256)  # FULL_TILES: the pipelined tile's False cubin serves (its WS tile: unshipped)
    C.aot_record(True, SM)  # clears
    torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, W)
    assert [r["case"] for r in C.aot_records()] == [f"d64 G1 {FIRST[:-1]}"]
    q, k, v = _tensors(H=4, Hkv=2)  # GQA 2: not in the sample
    with pytest.raises(RuntimeError, match=r"constexprs \(2, 64, 64, 0, 0, 1, 0, 128, 64, 0, 0, 0, 0\)"):
        torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0)
    q, k, v = _tensors(H=6, Hkv=2)
    with pytest.raises(RuntimeError, match="GQA groups 1, 2, 4 or 8, got 3"):
        torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0)


@pytest.mark.slow  # a child process (seconds): the variable is read once per process
def test_the_warp_specialized_escape_hatch_leaves_its_tile_out_here_too(sample):
    """FASTTRAIN_ATTENTION_WS=0 (read once per process, as the JIT's tables read it at import): the plain tile only,
    untimed, though the warp-specialized one is shipped and the tuner has times."""
    script = f"""
import torch, fasttrain._C as C
from fasttrain import _aot
C.aot_clear()
assert _aot.load({str(sample[0])!r}, arch=90) == {len(sample[1])}
C.aot_tune_reset([2.0, 1.0])
C.aot_record(True, 132)
q = torch.randn(1, 97, 2, 64, dtype=torch.float16)
torch.ops.fasttrain.attention_forward_aot(q, q, q, 0.125, 1 << 30, 0)
print([r["case"] for r in C.aot_records()])
"""
    env = {**os.environ, "FASTTRAIN_ATTENTION_WS": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == repr([f"d64 G1 {FIRST[:-1]}"])


def test_inputs_the_cubins_cannot_take_are_copied(registry):
    q, k, v = _tensors()
    odd_q = torch.randn(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes past an aligned address
    wide = torch.randn(1, 97, 2, 72, dtype=q.dtype)[..., :64]  # rows of 72: strides not multiples of 16
    expanded = k[:, :, :1].expand(k.shape)  # a head stride of 0: TMA cannot read it
    torch.ops.fasttrain.attention_forward_aot(odd_q, wide, expanded, 0.125, W, 0)
    (r,) = C.aot_records()
    assert r["args"][0] != odd_q.data_ptr() and r["args"][0] % 16 == 0
    assert r["args"][1] != wide.data_ptr() and r["args"][2] != expanded.data_ptr()
    assert r["args"][7:16] == [97 * 128, 128, 64] * 3  # contiguous copies' strides
    C.aot_record(False, 0)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0)


def test_the_varlen_ops_copy_misaligned_offsets_and_refuse_bad_ones(registry):
    q, k, v = (t[0] for t in _tensors())  # packed: (97, 2, 64)
    cu = torch.tensor([7, 0, 97], dtype=torch.int32)[1:]  # 4 bytes past an aligned address
    torch.ops.fasttrain.attention_varlen_forward_aot(q, k, v, cu, cu, 97, 97, 0.125, W, 0)
    (r,) = C.aot_records()
    named = dict(zip(_ARGS, r["args"]))
    assert named["CuQ"] != cu.data_ptr() and named["CuQ"] % 16 == 0 and named["CuK"] % 16 == 0
    bad = {
        "int32 \\(B \\+ 1\\) offsets": (q, k, v, cu.long(), cu),
        "packed q must be": (q[None], k, v, cu, cu),
        "packed k and v must be": (q, k[None], v[None], cu, cu),
    }
    for words, args in bad.items():
        with pytest.raises(RuntimeError, match=words):
            torch.ops.fasttrain.attention_varlen_forward_aot(*args, 97, 97, 0.125, W, 0)
    lse = torch.randn(2, 96)
    with pytest.raises(RuntimeError, match="packed lse must be \\(H, total_q\\)"):
        torch.ops.fasttrain.attention_varlen_backward_aot(q, q, k, v, q, lse, cu, cu, 97, 97, 0.125, W, 0, False)


def test_meta_gives_the_shapes():
    q, k, v = (t.to("meta") for t in _tensors(B=2, Tq=3, Tk=5, H=4, Hkv=2))
    out, lse = torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    q, k, v = (t[0] for t in (q, k, v))  # packed: (total, H, D)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device="meta")
    out, lse = torch.ops.fasttrain.attention_varlen_forward_aot(q, k, v, cu, cu, 2, 2, 0.125, W, 0)
    assert out.shape == q.shape and lse.shape == (4, 3) and lse.dtype == torch.float32
    dout, q_out = torch.randn_like(out), torch.randn_like(out)
    args = (cu, cu, 2, 2, 0.125, W, 0, False)
    dq, dk, dv = torch.ops.fasttrain.attention_varlen_backward_aot(dout, q, k, v, q_out, lse, *args)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape) and dk.device.type == "meta"


def _reason(q, k, v, cu_q=None, mask=None, dropout_p=0.0, softcap=0.0, alibi=None):
    return ops._aot_reason(q, k, v, cu_q, q.shape[-3], k.shape[-3], mask, dropout_p, softcap, alibi)


def test_the_column_takes_its_scope_and_says_why_not_otherwise(monkeypatch):
    q, k, v = _tensors(H=8, Hkv=2)
    assert _reason(q, k, v) is not None  # CPU tensors: the aot backend serves CUDA
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    assert _reason(q, k, v) is None and _reason(q.bfloat16(), k.bfloat16(), v.bfloat16()) is None
    wide = [t[..., :1].expand(*t.shape[:-1], 128).contiguous() for t in (q, k, v)]
    assert _reason(*wide) is None
    assert _reason(q[0], k[0], v[0], cu_q=torch.tensor([0, 97], dtype=torch.int32)) is None  # packed sequences
    assert _reason(q, k, v, dropout_p=0.1) is None  # dropout: its cubins ship too
    refused = {
        "fp16 or bf16": _reason(q.float(), k.float(), v.float()),
        "head_dim (64, 96, 128, 256), got 32": _reason(*(t[..., :32].contiguous() for t in (q, k, v))),
        "attn_mask": _reason(q, k, v, mask=torch.ones(97, 97, dtype=torch.bool)),
        "softcap": _reason(q, k, v, softcap=30.0),
        "alibi_slopes": _reason(q, k, v, alibi=torch.ones(8)),
        "GQA groups": _reason(q[:, :, :6], k[:, :, :1], v[:, :, :1]),  # 6 query heads per K/V head
    }
    for words, why in refused.items():
        assert why is not None and words in why, (words, why)


def test_strides_past_int32_take_the_triton_column_with_the_reason(registry, monkeypatch):
    """The cubins take int32 strides and the ops pass a layout they were compiled for as it is: a stride of 2**31 or
    more there would make the op raise, so the column refuses it and the JIT (which passes int64) serves the call."""
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    q, k, v = _tensors(H=8, Hkv=2)
    far = k.as_strided(k.shape, (2**31, *k.stride()[1:]))  # batch stride 2**31: one sequence, so no storage behind it
    with pytest.raises(RuntimeError, match="does not fit the compiled i32"):  # what the op would do with it
        torch.ops.fasttrain.attention_forward_aot(q, far, v, 0.125, W, 0)
    why = _reason(q, far, v)
    assert why is not None and "k's strides" in why and "2**31" in why
    assert ops.ATTENTION.reasons(q, far, v, None, 97, 97, None, 0.0, 0.0, None)["aot"] == why
    assert ops.ATTENTION.choose(q, far, v, None, 97, 97, None, 0.0, 0.0, None) == "triton"
    # two sequences 2**31 elements apart (meta: no storage), and packed rows that far apart
    base = torch.empty(0, dtype=torch.float16, device="meta")
    meta_k, meta_v = k.to("meta"), v.to("meta")
    apart = base.as_strided((2, 97, 8, 64), (2**31, 512, 64, 1))
    assert "q's strides" in _reason(apart, meta_k.expand(2, -1, -1, -1), meta_v.expand(2, -1, -1, -1))
    packed = base.as_strided((97, 8, 64), (64, 2**31, 1))  # a head stride of 2**31
    cu = torch.tensor([0, 97], dtype=torch.int32, device="meta")
    assert "q's strides" in _reason(packed, meta_k[0], meta_v[0], cu_q=cu)
    # layouts the op copies contiguous first (not a multiple of 16 elements, or a zero stride) keep the column
    for stride in (2**31 + 8, 2**31 + 1):
        assert _reason(base.as_strided((1, 97, 8, 64), (stride, 512, 64, 1)), meta_k, meta_v) is None
    assert _reason(q, k.as_strided(k.shape, (2**31, 128, 0, 1)), v) is None


def test_the_public_function_takes_the_column_and_torch_compile_traces_it(registry, monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    q, k, v = _tensors(H=8, Hkv=2)

    def attend(q, k, v):
        return flash_attn_func(q, k, v, causal=True)

    eager = attend(q, k, v)
    (launch,) = C.aot_records()
    assert launch["case"].startswith("d64 G4") and eager.shape == q.shape
    C.aot_record(True, SM)  # clears
    out = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v)
    (traced,) = C.aot_records()
    assert out.shape == q.shape
    assert [a != 0 if t == "ptr" else a for t, a in zip(launch["types"], launch["args"])] == [
        a != 0 if t == "ptr" else a for t, a in zip(traced["types"], traced["args"])
    ]


def test_sdpa_takes_the_column_for_its_band(registry, monkeypatch):
    from fasttrain.ops.attention import scaled_dot_product_attention

    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    q, k, v = (t.transpose(1, 2) for t in _tensors(Tq=97, Tk=97))  # (B, H, T, D) views
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    (launch,) = C.aot_records()
    assert out.shape == q.shape and launch["case"].startswith("d64 G1")
    named = dict(zip(_ARGS, launch["args"]))
    assert (named["left"], named["right"]) == (W, 0)  # top-left causal at Tq == Tk: the bottom-right band


def test_the_packed_functions_take_the_column_without_score_modifiers_only(registry, monkeypatch):
    from fasttrain.ops.attention_packed import flash_attn_qkvpacked_func

    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    qkv = torch.randn(1, 97, 3, 2, 64, dtype=torch.float16)  # (B, T, 3, H, D): q, k and v are views of it
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    (launch,) = C.aot_records()
    assert out.shape == (1, 97, 2, 64) and launch["case"].startswith("d64 G1")
    for kwargs in ({"softcap": 30.0}, {"alibi_slopes": torch.ones(2)}):
        with pytest.raises(RuntimeError, match="softcap|alibi_slopes"):
            flash_attn_qkvpacked_func(qkv, causal=True, backend="aot", **kwargs)
    with pytest.raises(RuntimeError, match="takes no mask, softcap or ALiBi"):
        ops.Aot.forward(*qkv.unbind(2), None, None, 97, 97, 0.125, W, 0, None, 0.0, None, 30.0, None)


def test_dropout_takes_the_column_with_the_seed_every_column_draws(registry, monkeypatch):
    """flash_attn_func with dropout: the C++ launch reads the seed tensor the general path draws from torch's RNG
    before it chooses a backend, so under one torch.manual_seed the column drops what the others drop."""
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)  # CPU tensors take the column (recorded)
    drawn, draw = [], ops.dropout_seed
    monkeypatch.setattr(ops, "dropout_seed", lambda device: drawn.append(draw(device)) or drawn[-1])
    q, k, v = _tensors()
    torch.manual_seed(3)
    flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    (launch,) = C.aot_records()
    named = dict(zip(_ARGS, launch["args"]))
    assert launch["case"] == f"d64 G1 {DROPOUT} dropout" and named["Seed"] == drawn[0].data_ptr()
    torch.manual_seed(3)
    flash_attn_func(q, k, v, dropout_p=0.1, causal=True, backend="reference")
    assert len(drawn) == 2 and torch.equal(drawn[0], drawn[1])
    for p in (-0.1, 1.0):  # the op's own check, for callers that bypass the public functions' checks
        with pytest.raises(RuntimeError, match="dropout_p must be in"):
            torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0, p, drawn[0])
    for seed in (None, drawn[0].int(), drawn[0][:1]):
        with pytest.raises(RuntimeError, match="int64 \\(2,\\) \\(seed, offset\\) tensor"):
            torch.ops.fasttrain.attention_forward_aot(q, k, v, 0.125, W, 0, 0.1, seed)


# ---- on a GPU: the column against the triton column and the reference -------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B,Tq,Tk,H,Hkv,D,causal,window",
    [
        (1, 1, 1, 8, 8, 64, True, (-1, -1)),
        (1, 97, 97, 8, 2, 128, True, (-1, -1)),
        (2, 1025, 1025, 16, 2, 64, False, (-1, -1)),
        (1, 256, 512, 8, 1, 128, False, (-1, -1)),
        (2, 300, 300, 4, 4, 64, False, (64, 0)),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_aot_matches_triton_and_the_reference(B, Tq, Tk, H, Hkv, D, causal, window, dtype):
    torch.manual_seed(0)
    q = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Tk, Hkv, D, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv")
    do = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype)
    assert ops.ATTENTION.choose(q, k, v, None, Tq, Tk, None, 0.0, 0.0, None) == "aot"
    results = {}
    for backend in ("aot", "triton", "reference"):
        out, lse, _ = flash_attn_func(
            q, k, v, causal=causal, window_size=window, return_attn_probs=True, backend=backend
        )
        results[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), do))
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        # The same kernel, but the JIT's autotuner may pick another tile (another summation order)
        scale = ref.float().abs().max().item()  # gradients summed over many keys are large: errors relative to them
        torch.testing.assert_close(got.float(), want.float(), atol=4 * ulp * scale, rtol=4 * ulp)
        torch.testing.assert_close(got.float(), ref.float(), atol=8 * ulp * scale, rtol=8 * ulp)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lengths_q,lengths_k,H,Hkv,D,causal,window",
    [
        ([1], [1], 8, 8, 64, True, (-1, -1)),
        ([97, 1, 300], [97, 1, 300], 8, 2, 128, True, (-1, -1)),
        ([33, 1025], [100, 1025], 16, 2, 64, False, (-1, -1)),
        ([256, 7, 512], [256, 7, 512], 4, 4, 64, False, (64, 0)),
    ],
    ids=str,
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_aot_varlen_matches_triton_and_the_reference(
    lengths_q, lengths_k, H, Hkv, D, causal, window, deterministic
):
    from fasttrain.ops.attention import flash_attn_varlen_func

    torch.manual_seed(0)
    dtype = torch.bfloat16
    cu_q, cu_k = (
        torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        for n in (lengths_q, lengths_k)
    )
    q = torch.randn(sum(lengths_q), H, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lengths_k), Hkv, D, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv")
    do = torch.randn_like(q)
    max_q, max_k = max(lengths_q), max(lengths_k)
    assert ops.ATTENTION.choose(q, k, v, cu_q, max_q, max_k, None, 0.0, 0.0, None) == "aot"
    results = {}
    for backend in ("aot", "triton", "reference"):
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window, deterministic=deterministic,
            return_attn_probs=True, backend=backend,
        )  # fmt: skip
        results[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), do))
    ulp = 2.0**-7
    for got, want, ref in zip(results["aot"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=4 * ulp * scale, rtol=4 * ulp)
        torch.testing.assert_close(got.float(), ref.float(), atol=8 * ulp * scale, rtol=8 * ulp)


@pytest.mark.gpu
def test_gpu_aot_is_chosen_and_off_switches_select_the_jit(monkeypatch):
    q = torch.randn(1, 128, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 128, 8, 128, device="cuda", dtype=torch.bfloat16)
    assert ops.ATTENTION.choose(q, k, k, None, 128, 128, None, 0.0, 0.0, None) == "aot"
    assert ops.ATTENTION.choose(q, k, k, None, 128, 128, None, 0.0, 30.0, None) == "triton"
    monkeypatch.setenv("FASTTRAIN_AOT", "0")
    assert ops.ATTENTION.choose(q, k, k, None, 128, 128, None, 0.0, 0.0, None) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("D,H,Hkv,window", [(64, 8, 8, (-1, -1)), (128, 8, 2, (64, 0))], ids=str)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_aot_dropout_matches_triton_under_one_seed(D, H, Hkv, window, packed, deterministic):
    """Dropout on the column: under one torch.manual_seed the same mask as the triton column's (the seed is drawn
    before the backend is chosen), so the same outputs, lse and gradients up to the tiles' summation order."""
    from fasttrain.ops.attention import flash_attn_varlen_func

    torch.manual_seed(0)
    dtype, lengths = torch.bfloat16, [300, 1, 257]
    q = torch.randn(sum(lengths), H, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lengths), Hkv, D, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv")
    do = torch.randn_like(q)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    dense = [t[:256].view(2, 128, *t.shape[1:]) for t in (q, k, v)]  # (2, 128, H, D) views of the first 256 rows
    assert ops.ATTENTION.choose(q, k, v, cu, 300, 300, None, 0.1, 0.0, None) == "aot"
    assert ops.ATTENTION.choose(*dense, None, 128, 128, None, 0.1, 0.0, None) == "aot"
    results = {}
    for backend in ("aot", "triton"):
        torch.manual_seed(7)
        kwargs = dict(dropout_p=0.1, causal=True, window_size=window, deterministic=deterministic, backend=backend)
        if packed:
            out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, return_attn_probs=True, **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), do)
        else:
            out, lse, _ = flash_attn_func(*dense, return_attn_probs=True, **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), do[:256].view(out.shape))
        results[backend] = (out, lse, *grads)
    ulp = 2.0**-7
    for got, want in zip(results["aot"], results["triton"]):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=4 * ulp * scale, rtol=4 * ulp)
