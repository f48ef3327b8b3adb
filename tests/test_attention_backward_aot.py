"""The attention backward on the ahead-of-time path: kernels/attention_backward.py's preprocess, dK/dV and dQ kernels
compiled ahead of time (tools/aot.py --shipped) and launched from C++ (csrc/attention_backward_aot.cpp), tested
without a GPU.

The shipped set lists what the op takes; a sample of it compiles for sm_90 and registers with the C++ launcher (the
sm_80 sample and the whole set under `-m slow`); the C++ op, run on CPU tensors with the launch recorder on (no
output is computed here), hands the launcher what Triton's JIT launcher is given for the same call with its
autotuners and plan held to the tiles and plan the op launches (tests/aot_jit_capture.py), launch by launch; the
tuner's trials and choices follow the recorder's times, its candidates every shipped tile of each arch's tables in
order; the aot column's backward takes the op. GPU tests (`pytest -m gpu`) hold the op's gradients to the JIT
backward's.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fasttrain._C as C
from fasttrain.ops.attention_reference import UNBOUNDED

from helpers import aot_compile, aot_jit_launches, aot_recording, assert_aot_launch_is_the_jit_launch

SM = 132
# The sample, head dim 64: the preprocess; MHA (group 1) with each kernel's first sm_90 tile; GQA 2:1 with the first
# two tiles of each kernel and the warp-specialized dK/dV tile (the tuning tests); packed (varlen): the preprocess,
# MHA's first dK/dV and dQ tiles (the dQ kernel's plan) and GQA 2:1's atomic dK/dV. bf16: the preprocess and the
# atomic plan's dK/dV kernel at GQA 2:1 (fp16 shares every other line). Dropout (fp16): MHA's first dK/dV tile with
# and without atomic dQ and its first dQ tile; under `-m slow` (SLOW_SAMPLE) GQA 2:1's atomic dK/dV and packed MHA's
# first dK/dV and dQ tiles (no atomic one: the op then takes the dQ kernel's plan, as where none ships).
SAMPLE = {
    "fp16": "^d64 (w4|g1 m64 n128 w8 s2( atomic)?|g1 m128 n64 w8 s3"
    + "|g2 m(64 n128|64 n64|128 n64) w. s.( atomic| ws)?)$"
    + "|^d64 (w4|g1 m64 n128 w8 s2|g1 m128 n64 w8 s3|g2 m64 n128 w8 s2 atomic) varlen$"
    + "|^d64 g1 (m64 n128 w8 s2( atomic)?|m128 n64 w8 s3) dropout$",
    "bf16": "^d64 (w4|g2 m64 n128 w8 s2 atomic)$",
}
SAMPLE_80 = "^d64 (w4|g1 m64 n64 w4 s(2 atomic|3))$"  # sm_80: the preprocess, both dK/dV tiles, dQ
SLOW_SAMPLE = "^d64 g2 m64 n128 w8 s2 atomic dropout$|^d64 g1 (m64 n128 w8 s2|m128 n64 w8 s3) varlen dropout$"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    dirs, count = [], 0
    for dtype, cases in SAMPLE.items():
        out = tmp_path_factory.mktemp(f"aot_{dtype}")
        rows = aot_compile(out, "attention_backward", [dtype], cases)
        assert all("error" not in r and r["local"] == 0 for r in rows), rows
        dirs.append(out)
        count += len(rows)
    assert count == 11 + 4 + 2 + 3
    return dirs, count


@pytest.fixture
def registry(sample):
    with aot_recording(*sample, SM):
        yield


def test_shipped_set_is_the_ops_scope():
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS
    from fasttrain.ops import attention as ops

    assert ab.aot_kernels(90, "fp32", shipped=True) == []
    for arch in (80, 90):
        pre, dkdv, dq = _at_64_and_128(ab.aot_kernels(arch, "bf16", shipped=True))
        assert [c["constexprs"]["HEAD_DIM"] for c in pre["cases"]] == [64, 128, 64, 128]
        assert all(not c["constexprs"]["HAS_DLSE"] for c in pre["cases"])
        assert [c["constexprs"]["VARLEN"] for c in pre["cases"]] == [False, False, True, True]
        assert not any(c["constexprs"].get("DROPOUT") for c in pre["cases"])  # the preprocess takes no dropout
        dropout = {}  # kernel: its dropout cases, which follow the plain ones
        for entry in (dkdv, dq):
            dropout[entry["kernel"]] = [c for c in entry["cases"] if c["constexprs"]["DROPOUT"]]
            entry["cases"] = [c for c in entry["cases"] if not c["constexprs"]["DROPOUT"]]
            assert (
                entry["cases"] + dropout[entry["kernel"]]
                == _at_64_and_128(ab.aot_kernels(arch, "bf16", shipped=True))[(dkdv, dq).index(entry) + 1]["cases"]
            )
        for entry in (pre, dkdv, dq):
            # the dense cases, then the same again packed (FULL_TILES off), labelled " varlen"
            dense = [c for c in entry["cases"] if not c["constexprs"]["VARLEN"]]
            packed = [c for c in entry["cases"] if c["constexprs"]["VARLEN"]]
            assert entry["cases"] == dense + packed
            not_full = [c["label"] for c in dense if not c["constexprs"].get("FULL_TILES")]
            spills = [f"d128 g{g} m64 n64 w8 s2 atomic" for g in (1, 2, 4, 8)] if arch == 90 else []  # DENSE_ONLY
            assert [c["label"] for c in packed] == [label + " varlen" for label in not_full if label not in spills]
            assert not any(c["constexprs"].get("FULL_TILES") for c in packed)
        for entry in (dkdv, dq):
            for c in entry["cases"]:
                k = c["constexprs"]
                assert k["GROUP"] in (1, 2, 4, 8) and k["HEAD_DIM"] == k["HEAD_DIM_PAD"] in (64, 128)
                assert not (k["UPCAST"] or k["DROPOUT"] or k["SOFTCAP"] or k["ALIBI"])
        for table, atomic in ((DKDV_CONFIGS[arch], False), (DKDV_DQ_CONFIGS[arch], True)):
            for cls in ("d64", "d128"):
                tiles = ab.shipped_tiles(table, cls)
                # every config, once per set of constexprs, in the table's order
                assert [t.kwargs for t in tiles] == list(
                    {tuple(c.kwargs.items()): c.kwargs for c in table[cls]}.values()
                )
                assert tiles[0] is table[cls][0]
                ws = [t for t in tiles if t.kwargs["WARP_SPECIALIZE"]]
                assert len(ws) == (arch == 90 and not atomic)  # sm_90's plain dK/dV tables hold one per class
                cases = [c for c in dkdv["cases"] if c["constexprs"]["ATOMIC_DQ"] == atomic]
                cases = [c for c in cases if not c["constexprs"]["VARLEN"]]
                cases = [c for c in cases if c["constexprs"]["HEAD_DIM"] == int(cls[1:])]
                assert len(cases) == 4 * (len(tiles) + len(ws))  # groups x FULL_TILES off (and on: ws)
                assert all(c["constexprs"]["WARP_SPECIALIZE"] for c in cases if c["constexprs"]["FULL_TILES"])
                assert all(c["constexprs"]["TMA_ALIGNED"] for c in cases)
        assert len(dq["cases"]) == 8 * sum(len(ab.shipped_tiles(DQ_CONFIGS[arch], cls)) for cls in ("d64", "d128"))
        # dropout: the plain cases of the tiles the pruner keeps for it (no warp-specialized one, none marked
        # no_dropout), FULL_TILES and TMA_ALIGNED off, labelled " dropout"; packed, none of the tiles that spill then
        # (UNSHIPPED_VARLEN_DROPOUT), nor dQ where no dK/dV tile is left (the column's backward takes the JIT there)
        unshipped = {(arch, d) for d in (64, 128)} - {
            (arch, c["constexprs"]["HEAD_DIM"]) for c in dropout[dkdv["kernel"]] if c["constexprs"]["VARLEN"]
        }
        assert unshipped == {a for a in ops._AOT_UNSHIPPED_VARLEN_DROPOUT if a[0] == arch and a[1] in (64, 128)}
        assert unshipped == ({(90, 128)} if arch == 90 else set())
        for entry, tables in ((dkdv, (DKDV_CONFIGS, DKDV_DQ_CONFIGS)), (dq, (DQ_CONFIGS,))):
            cases = dropout[entry["kernel"]]
            kept = [
                {**c, "label": c["label"] + " dropout", "constexprs": {**c["constexprs"], "DROPOUT": True}}
                for c in entry["cases"]
                if _ships_with_dropout(c["constexprs"], arch, tables, unshipped if entry is dq else set())
            ]
            for c in kept:
                if "TMA_ALIGNED" in c["constexprs"]:
                    c["constexprs"]["TMA_ALIGNED"] = False
            assert cases == kept and cases
        no_atomic = [
            c for c in dropout[dkdv["kernel"]] if c["constexprs"]["ATOMIC_DQ"] and c["constexprs"]["HEAD_DIM"] == 128
        ]
        assert (no_atomic == []) == (arch == 90)  # every sm_90 d128 atomic-dQ tile spills with dropout


def _at_64_and_128(entries: list) -> list:
    """The shipped entries with the cases of head dims 64 and 128 only, without lse's gradient (96, 256 and HAS_DLSE:
    test_attention_aot_coverage.py)."""

    def kept(k: dict) -> bool:
        return k["HEAD_DIM"] in (64, 128) and not k.get("HAS_DLSE", False)

    return [{**e, "cases": [c for c in e["cases"] if kept(c["constexprs"])]} for e in entries]


def _ships_with_dropout(k: dict, arch: int, tables: tuple, unshipped: set) -> bool:
    """Whether the plain case k ships again with dropout: a tile the pruner keeps for dropout, but packed the tiles
    that spill then (UNSHIPPED_VARLEN_DROPOUT) and the (arch, head dim) classes in unshipped."""
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import UNSHIPPED_VARLEN_DROPOUT

    if k.get("FULL_TILES") or k.get("WARP_SPECIALIZE") or (k["VARLEN"] and (arch, k["HEAD_DIM"]) in unshipped):
        return False
    return any(
        t.kwargs == {n: k[n] for n in t.kwargs} and not (k["VARLEN"] and id(t) in UNSHIPPED_VARLEN_DROPOUT)
        for table in tables
        for t in ab.shipped_tiles(table[arch], f"d{k['HEAD_DIM']}", dropout=True)
    )


def test_packed_launches_leave_out_the_tile_that_spills_with_varlen():
    from fasttrain.kernels._attention_configs import DKDV_DQ_CONFIGS, flat, pruner

    configs = flat(DKDV_DQ_CONFIGS[90])

    def kept(head_dim, varlen):
        args = {"HEAD_DIM": head_dim, "VARLEN": varlen, "TMA_ALIGNED": True}
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruner(DKDV_DQ_CONFIGS[90])(configs, args)]

    assert kept(128, False) == [(64, 64), (32, 128)] and kept(128, True) == [(32, 128)]
    assert kept(64, True) == kept(64, False) == [(64, 128), (64, 128), (64, 64)]


@pytest.mark.slow  # the sm_80 tiles' order is held without compiling (test_the_op_tries_every_shipped_tile_...)
def test_sm80_sample_compiles_and_registers(tmp_path):
    rows = aot_compile(tmp_path, "attention_backward", ["fp16"], SAMPLE_80, archs=("80",))
    assert len(rows) == 4 and all("error" not in r for r in rows), rows
    from fasttrain import _aot

    C.aot_clear()
    try:
        assert _aot.load(tmp_path, arch=80) == 4
    finally:
        C.aot_clear()


W = UNBOUNDED
# (B, Tq, Tk, H, Hkv, window, deterministic, dtype): batch 1, T 1, 97 and 128 (whole tiles: FULL_TILES), Tq != Tk,
# causal, full and a sliding window, MHA and GQA 2:1, both plans (atomic dQ where nothing is timed, the dQ kernel when
# deterministic), fp16 and bf16.
CASES = [
    (1, 1, 1, 2, 2, (W, 0), False, "fp16"),
    (1, 97, 97, 4, 2, (W, W), True, "fp16"),  # with tuning times: the warp-specialized dK/dV tile (below)
    (1, 97, 97, 2, 2, (W, 0), True, "fp16"),
    (1, 97, 97, 4, 2, (W, 0), False, "fp16"),
    (1, 97, 97, 4, 2, (W, W), True, "fp16"),
    (1, 1, 97, 4, 2, (16, 0), False, "fp16"),
    (2, 97, 33, 4, 2, (W, W), False, "fp16"),
    (1, 128, 128, 2, 2, (W, W), False, "fp16"),
    (1, 128, 128, 2, 2, (W, W), True, "fp16"),
    (1, 97, 97, 4, 2, (W, 0), False, "bf16"),
]
FIELDS = ("B", "Tq", "Tk", "H", "Hkv", "window", "deterministic", "dtype")
# Packed (flash_attn_varlen_func), fp16: (lengths_q, lengths_k, H, Hkv, window, deterministic). One sequence of one
# token (GQA 2:1, atomic dQ); three of unequal lengths with a one-token one, GQA 2:1 and a window (atomic dQ), MHA
# causal (the dQ kernel); Tq != Tk per sequence, no mask; GQA 2:1 causal.
VARLEN_CASES = [
    ([1], [1], 4, 2, (W, 0), False),
    ([97, 1, 33], [97, 1, 33], 4, 2, (16, 0), False),
    ([97, 1, 33], [97, 1, 33], 2, 2, (W, 0), True),
    ([33, 100], [100, 40], 2, 2, (W, W), True),
    ([200, 57], [200, 57], 4, 2, (W, 0), False),
]
VARLEN_FIELDS = ("lengths_q", "lengths_k", "H", "Hkv", "window", "deterministic")
# The packed functions' backward (gradients into views of one packed gradient), fp16: (packed, shape, H, Hkv, window,
# deterministic), shape (B, Tq, Tk) or (lengths_q, lengths_k). qkvpacked dense with each plan (atomic dQ: its cast
# copied in; the dQ kernel: dQ written in place); kvpacked dense GQA 2:1 with Tq != Tk; varlen qkvpacked with a
# one-token sequence; varlen kvpacked GQA 2:1 with Tq != Tk per sequence.
PACKED_CASES = [
    ("qkv", (1, 97, 97), 2, 2, (W, 0), False),
    ("qkv", (2, 33, 33), 2, 2, (W, W), True),
    ("kv", (2, 33, 97), 4, 2, (W, 0), True),
    ("qkv", ([97, 1, 33], [97, 1, 33]), 2, 2, (W, 0), True),
    ("kv", ([33, 100], [100, 40]), 4, 2, (16, 0), False),
]


def _packed_case(packed, shape, H, Hkv, window, deterministic) -> dict:
    fields = ("B", "Tq", "Tk") if len(shape) == 3 else ("lengths_q", "lengths_k")
    return dict(zip(fields, shape), packed=packed, H=H, Hkv=Hkv, window=window, deterministic=deterministic)


# Dropout, fp16: (B or lengths_q, Tq or lengths_k, Tk, H, Hkv, window, deterministic, dropout_p). MHA causal, two
# sequences (atomic dQ); MHA with a window (the dQ kernel); whole tiles (the JIT's FULL_TILES, which the pointer loop
# ignores). Under `-m slow`: GQA 2:1, two sequences, Tq < Tk (atomic dQ); packed with a one-token sequence and a
# window (the dQ kernel), and packed not deterministic with no atomic tile shipped (the dQ kernel's plan, the JIT's
# held to it).
DROPOUT_CASES = [
    (2, 97, 97, 2, 2, (W, 0), False, 0.1),
    (1, 97, 97, 2, 2, (16, 0), True, 0.2),
    (1, 128, 128, 2, 2, (W, W), True, 0.1),
]
SLOW_DROPOUT_CASES = [
    (2, 33, 100, 4, 2, (W, W), False, 0.1),
    ([97, 1, 33], [97, 1, 33], None, 2, 2, (16, 0), True, 0.1),
    ([33, 100], [100, 40], None, 2, 2, (W, W), False, 0.1),
]


def _dropout_case(case):
    first, second, Tk, H, Hkv, window, deterministic, p = case
    shape = dict(lengths_q=first, lengths_k=second) if Tk is None else dict(B=first, Tq=second, Tk=Tk)
    plan = "dQ kernel" if deterministic or Tk is None else "atomic dQ"
    return dict(shape, H=H, Hkv=Hkv, window=window, deterministic=deterministic, dropout_p=p, plan=plan)


@pytest.fixture(scope="module")
def captured(sample):
    """The dense CASES, then the VARLEN_CASES, the PACKED_CASES, then the DROPOUT_CASES."""
    import os

    cases = [dict(zip(FIELDS, c), op="attention_backward", D=64) for c in CASES]
    cases += [dict(zip(VARLEN_FIELDS, c), op="attention_backward", D=64, dtype="fp16") for c in VARLEN_CASES]
    cases += [dict(_packed_case(*c), op="attention_backward", D=64, dtype="fp16") for c in PACKED_CASES]
    for case in cases:
        case["plan"] = "dQ kernel" if case["deterministic"] else "atomic dQ"
    cases[WS_CASE].update(dkdv_tile=2, times=WS_TIMES)
    cases += [dict(_dropout_case(c), op="attention_backward", D=64, dtype="fp16") for c in DROPOUT_CASES]
    return aot_jit_launches(os.pathsep.join(map(str, sample[0])), cases)


WS_CASE = 1
WS_TIMES = [5.0, 3.0, 1.0, 1.0, 5.0]  # ms: dK/dV's three shipped tiles (the third warp-specialized), then dQ's two
WS_CHOSEN = [0, 4, 7]  # the preprocess and the chosen tiles' launches among the trials


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: f"case{i}")
def test_recorded_launches_are_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[i]["jit"], captured[i]["aot"]
    if i == WS_CASE:
        assert len(aot) == 8 and aot[4]["constexprs"]["WARP_SPECIALIZE"] and aot[4]["case"].endswith(" ws")
        aot = [aot[j] for j in WS_CHOSEN]
        # warp specialization launches 3 warpgroups (one loading, two computing) where the config names one's warps
        assert aot[1]["num_warps"] == 3 * jit[1]["num_warps"] == 12
        jit[1] = {**jit[1], "num_warps": aot[1]["num_warps"]}
    deterministic = CASES[i][6]
    kernels = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + ["_attn_bwd_dq_kernel"] * deterministic
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot] == kernels
    compared = list(jit)
    if not aot[1]["constexprs"]["WARP_SPECIALIZE"]:  # the pipelined loop ignores FULL_TILES: the False cubin serves
        compared[1] = {**jit[1], "constexprs": {**jit[1]["constexprs"], "FULL_TILES": False}}
    for j, a in zip(compared, aot):
        assert_aot_launch_is_the_jit_launch(j, a)
    dkdv = aot[1]
    assert dkdv["constexprs"]["ATOMIC_DQ"] == (not deterministic)
    assert dkdv["args"]["DQAcc"] == ("null" if deterministic else "buffer")
    full = CASES[i][1] % 128 == 0 and CASES[i][2] % 128 == 0 and CASES[i][5] == (W, W)
    assert jit[1]["constexprs"]["FULL_TILES"] == full
    assert dkdv["constexprs"]["FULL_TILES"] == (full and bool(dkdv["constexprs"]["WARP_SPECIALIZE"]))


@pytest.mark.parametrize("i", range(len(VARLEN_CASES)), ids=lambda i: f"varlen{i}")
def test_recorded_varlen_launches_are_what_the_jit_launcher_is_given(captured, i):
    """fasttrain::attention_varlen_backward_aot's launches: the packed cubins (VARLEN), the offsets and longest
    lengths, batch strides 0 and lse (H, total_q), as the JIT launcher is given them, launch by launch."""
    jit, aot = captured[len(CASES) + i]["jit"], captured[len(CASES) + i]["aot"]
    lengths_q, lengths_k, H, Hkv, _, deterministic = VARLEN_CASES[i]
    kernels = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + ["_attn_bwd_dq_kernel"] * deterministic
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot] == kernels
    for j, a in zip(jit, aot):
        assert a["case"].endswith(" varlen") and a["constexprs"]["VARLEN"] == 1
        assert_aot_launch_is_the_jit_launch(j, a)
        assert a["args"]["CuQ"] == "cu_q" and a["args"]["seqlen_q"] == max(lengths_q)
        assert a["args"]["stride_lb"] == 0 and a["args"]["stride_lh"] == sum(lengths_q)
    pre, dkdv = aot[:2]
    assert pre["grid"] == [-(-max(lengths_q) // 32), H, len(lengths_q)]
    assert dkdv["grid"] == [-(-max(lengths_k) // dkdv["constexprs"]["BLOCK_N"]), Hkv, len(lengths_q)]
    assert (dkdv["args"]["CuK"], dkdv["args"]["seqlen_k"], dkdv["args"]["stride_kb"]) == ("cu_k", max(lengths_k), 0)
    assert dkdv["constexprs"]["ATOMIC_DQ"] == (not deterministic) and not dkdv["constexprs"]["FULL_TILES"]
    assert dkdv["args"]["DQAcc"] == ("null" if deterministic else "buffer")


@pytest.mark.parametrize("i", range(len(PACKED_CASES)), ids=lambda i: f"packed{i}")
def test_recorded_packed_launches_write_into_the_packed_gradient(captured, i):
    """fasttrain::attention_(varlen_)backward_into_aot's launches are the JIT's with `into`: dK and dV written in place
    into the packed gradient's views (their pointers, their strides: no copy), dQ too by the dQ kernel, and the
    atomic plan's float32 buffer cast into dQ's view."""
    jit, aot = (captured[len(CASES) + len(VARLEN_CASES) + i][x] for x in ("jit", "aot"))
    packed, shape, H, Hkv, _, deterministic = PACKED_CASES[i]
    kernels = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + ["_attn_bwd_dq_kernel"] * deterministic
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot] == kernels
    for j, a in zip(jit, aot):
        assert_aot_launch_is_the_jit_launch(j, a)
    dkdv = aot[1]
    assert (dkdv["args"]["DK"], dkdv["args"]["DV"]) == ("dk", "dv")
    varlen = len(shape) == 2
    heads = 3 * H if packed == "qkv" else 2 * Hkv  # the packed gradient's rows: (..., 3, H, D) or (..., 2, Hkv, D)
    assert dkdv["args"]["stride_dkt"] == dkdv["args"]["stride_dvt"] == heads * 64
    assert dkdv["args"]["stride_dkb"] == (0 if varlen else shape[2] * heads * 64)
    if deterministic:
        assert dkdv["args"]["DQAcc"] == "null" and aot[2]["args"]["DQ"] == "dq"
        assert aot[2]["args"]["stride_dqt"] == (3 * H * 64 if packed == "qkv" else H * 64)
    else:
        assert dkdv["args"]["DQAcc"] == "buffer"


@pytest.mark.parametrize("i", range(len(DROPOUT_CASES)), ids=lambda i: f"dropout{i}")
def test_recorded_dropout_launches_are_what_the_jit_launcher_is_given(captured, i):
    _check_dropout_launches(captured[len(CASES) + len(VARLEN_CASES) + len(PACKED_CASES) + i], DROPOUT_CASES[i])


@pytest.fixture(scope="module")
def slow_captured(sample, tmp_path_factory):
    """The SLOW_DROPOUT_CASES, with SLOW_SAMPLE compiled beside the sample."""
    import os

    out = tmp_path_factory.mktemp("aot_slow")
    rows = aot_compile(out, "attention_backward", ["fp16"], SLOW_SAMPLE)
    assert len(rows) == 3 and all("error" not in r and r["local"] == 0 for r in rows), rows
    cases = [dict(_dropout_case(c), op="attention_backward", D=64, dtype="fp16") for c in SLOW_DROPOUT_CASES]
    return aot_jit_launches(os.pathsep.join(map(str, [*sample[0], out])), cases)


@pytest.mark.slow  # three more cubins to compile
@pytest.mark.parametrize("i", range(len(SLOW_DROPOUT_CASES)), ids=lambda i: f"dropout_slow{i}")
def test_recorded_dropout_launches_at_gqa_and_packed_are_what_the_jit_launcher_is_given(slow_captured, i):
    _check_dropout_launches(slow_captured[i], SLOW_DROPOUT_CASES[i])


def _check_dropout_launches(got: dict, case: tuple) -> None:
    """With dropout: the DROPOUT cubins of dK/dV (TMA_ALIGNED off: the pointer loop) and dQ, the seed tensor itself
    and the JIT's threshold and scale, launch by launch; the dQ kernel's plan where no atomic tile is shipped."""
    from fasttrain.ops.attention_dropout import keep_threshold

    jit, aot = got["jit"], got["aot"]
    packed, deterministic, p = case[2] is None, case[6], case[7]
    separate = deterministic or packed
    kernels = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + ["_attn_bwd_dq_kernel"] * separate
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot] == kernels
    whole = not packed and case[1] % 128 == 0 and case[2] % 128 == 0 and case[5] == (W, W)
    assert jit[1]["constexprs"]["FULL_TILES"] == whole and not jit[1]["constexprs"]["TMA_ALIGNED"]
    assert aot[1]["constexprs"]["GROUP"] == case[3] // case[4]
    # the pointer loop ignores FULL_TILES: the False cubin serves
    compared = [jit[0], {**jit[1], "constexprs": {**jit[1]["constexprs"], "FULL_TILES": False}}, *jit[2:]]
    for j, a in zip(compared, aot):
        assert_aot_launch_is_the_jit_launch(j, a)
    for launch in aot[1:]:
        assert launch["case"].endswith(" varlen dropout" if packed else " dropout")
        assert launch["constexprs"]["DROPOUT"] == 1 and launch["args"]["Seed"] == "seed"
        assert launch["args"]["dropout_threshold"] == keep_threshold(p)
        assert launch["args"]["dropout_scale"] == pytest.approx(1 / (1 - p))
    assert aot[1]["constexprs"]["ATOMIC_DQ"] == (not separate) and not aot[1]["constexprs"]["TMA_ALIGNED"]


def _tensors(B=1, Tq=97, Tk=97, H=4, Hkv=2, D=64, dtype=torch.float16):
    torch.manual_seed(0)
    q, out, do = (torch.randn(B, Tq, H, D, dtype=dtype) for _ in "qod")
    k, v = (torch.randn(B, Tk, Hkv, D, dtype=dtype) for _ in "kv")
    return do, q, k, v, out, torch.randn(B, H, Tq)


def _tiles(records):
    """(kernel, BLOCK_M, BLOCK_N, ATOMIC_DQ, WARP_SPECIALIZE) of each dK/dV and dQ launch."""
    out = []
    for r in records:
        k = r["constexprs"]
        if r["kernel"] == "_attn_bwd_dkdv_kernel":
            out.append(("dkdv", k[7], k[8], bool(k[10]), bool(k[9])))
            assert (r["scratch_bytes"] > 0) == bool(k[9])  # device-made TMA descriptors: global scratch
        elif r["kernel"] == "_attn_bwd_dq_kernel":
            out.append(("dq", k[5], k[6], False, False))
    return out


def _call(deterministic=False, dropout_p=0.0, **shape):
    seed = torch.tensor([12345, 6789]) if dropout_p else None
    torch.ops.fasttrain.attention_backward_aot(*_tensors(**shape), 0.125, UNBOUNDED, 0, deterministic, dropout_p, seed)
    records = C.aot_records()
    # dK/dV's and dQ's DROPOUT (constexprs 11 and 7) and Seed (arguments 43 and 35): as the call has them
    for r in records[1:]:
        dkdv = r["kernel"] == "_attn_bwd_dkdv_kernel"
        assert r["constexprs"][11 if dkdv else 7] == (dropout_p > 0)
        assert r["args"][43 if dkdv else 35] == (seed.data_ptr() if dropout_p else 0)
    launches = _tiles(records)
    C.aot_record(True, SM)  # clears
    return launches


def test_tuning_times_each_plan_and_shipped_tile_once_per_shape_class_and_keeps_the_fastest(registry):
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS

    # sm_90's shipped tiles of d64 in the tables' order: the order the op tries them in
    first, second = (ab.shipped_tiles(DKDV_CONFIGS[90], "d64")[i].kwargs for i in (0, 1))
    assert (first["BLOCK_M"], first["BLOCK_N"], second["BLOCK_M"], second["BLOCK_N"]) == (64, 128, 64, 64)
    assert [t.kwargs["BLOCK_N"] for t in ab.shipped_tiles(DKDV_DQ_CONFIGS[90], "d64")] == [128, 64]
    assert [t.kwargs["BLOCK_M"] for t in ab.shipped_tiles(DQ_CONFIGS[90], "d64")] == [128, 64]
    a128, a64 = ("dkdv", 64, 128, True, False), ("dkdv", 64, 64, True, False)
    p128, p64, pws = ("dkdv", 64, 128, False, False), ("dkdv", 64, 64, False, False), ("dkdv", 64, 128, False, True)
    q128, q64 = ("dq", 128, 64, False, False), ("dq", 64, 64, False, False)
    # ms, in the order asked: the plans (atomic, dQ kernel), then the atomic plan's dK/dV tiles, the other plan's
    # dK/dV tiles (the third warp-specialized) and its dQ tiles
    C.aot_tune_reset([2.0, 1.0, 1.0, 3.0, 3.0, 1.0, 2.0, 1.0, 2.0])
    trials = [a128, a64, a128, p128, p64, pws, p64, q128, q64, q128]
    assert _call() == trials + [p64, q128]  # the faster plan with its faster tiles
    assert _call() == [p64, q128]  # the class's choices, cached
    assert _call(deterministic=True) == [p64, q128]  # the dQ kernel's plan: the same tiles
    assert _call(Tk=300) == [a128]  # another tune_seqlen (512), no times left: the atomic plan, first tile, uncached
    assert _call(Tk=300) == [a128]
    C.aot_tune_reset([1.0, 2.0, 2.0, 1.0])  # reset: tuned afresh; the other plan's tiles find no times left
    assert _call() == [a128, a64, a64, p128, q128, a64]
    C.aot_tune_reset([5.0, 3.0, 1.0, 1.0, 5.0])  # deterministic: no plan to time, the tiles alone
    assert _call(deterministic=True, Tq=33, Tk=33) == [p128, p64, pws, pws, q128, q64, q128]


def test_tuning_leaves_a_class_with_one_shipped_tile_untimed(registry):
    C.aot_tune_reset([1.0, 2.0])
    a128, p128, q128 = ("dkdv", 64, 128, True, False), ("dkdv", 64, 128, False, False), ("dq", 128, 64, False, False)
    assert _call(H=2, Hkv=2) == [a128, p128, q128, a128]  # MHA: one tile each, untimed; the plans timed
    assert _call(H=2, Hkv=2, deterministic=True) == [p128, q128]


def _shipped_set(arch: int) -> list[list]:
    """Every case of arch's shipped fp16 set as fasttrain._C.aot_register takes it without a cubin (the recorder
    launches none), described as tools/aot.py describes it (constexprs in parameter order; other pointers in the dtype,
    integers i32)."""
    from fasttrain.kernels import attention_backward as ab

    described = []
    for entry in ab.aot_kernels(arch, "fp16", shipped=True):
        kernel = entry["kernel"]
        for case in entry["cases"]:
            cx = case["constexprs"]
            names = [n for n in kernel.arg_names if n in cx]
            args = [n for n in kernel.arg_names if n not in cx]
            types = [entry["types"].get(n) or ("*fp16" if n[0].isupper() else "i32") for n in args]
            scratch = 128 if cx.get("WARP_SPECIALIZE") else 0  # bytes and alignment
            described.append(
                [kernel.__name__, "fp16", [int(cx[n]) for n in names], names, args, types, [], case["num_warps"], 1, 0,
                 len(args) + 2, scratch, 0, kernel.__name__, case["label"], max(1, scratch)]
            )  # fmt: skip
    return described


def _register(described: list[list]) -> int:
    for d in described:
        C.aot_register(*d[:-1], b"", global_scratch_align=d[-1])
    return len(described)


def _register_shipped_set(arch: int) -> int:
    return _register(_shipped_set(arch))


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("D", [64, 128])
def test_the_op_tries_every_shipped_tile_in_the_tables_order(arch, D):
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS, head_dim_class

    def order(table):
        return [
            (t.kwargs["BLOCK_M"], t.kwargs["BLOCK_N"], t.kwargs.get("WARP_SPECIALIZE", False))
            for t in ab.shipped_tiles(table[arch], head_dim_class(D))
        ]

    dkdv, atomic, dq = order(DKDV_CONFIGS), order(DKDV_DQ_CONFIGS), order(DQ_CONFIGS)
    C.aot_clear()
    C.aot_tune_reset()
    try:
        assert _register_shipped_set(arch) == C.aot_registered()
        C.aot_record(True, SM)
        # the plans (atomic faster), then each kernel's tiles, all timed alike: the first is kept
        C.aot_tune_reset([1.0, 2.0] + [1.0] * (len(atomic) + len(dkdv) + len(dq)))
        trials = _call(Tq=200, Tk=200, H=8, Hkv=2, D=D)
        C.aot_record(True, SM)  # clears

        def tried(kind, tiles, is_atomic):  # a trial of each tile when there are several, then the kept (first) one
            launches = [(kind, m, n, is_atomic, ws) for m, n, ws in tiles]
            return launches * (len(tiles) > 1) + launches[:1]

        # both plans' trials (each tuning its tiles), then the atomic plan again with its kept tile
        want = tried("dkdv", atomic, True) + tried("dkdv", dkdv, False) + tried("dq", dq, False)
        want += tried("dkdv", atomic, True)[-1:]
        assert trials == want
    finally:
        C.aot_record(False, 0)
        C.aot_tune_reset()
        C.aot_clear()


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("D", [64, 128])
def test_dropout_tries_the_tiles_shipped_for_it_and_the_dq_kernel_where_no_atomic_tile_takes_it(arch, D):
    """With dropout, the shipped set's tiles that take it (no warp-specialized one, none that spills with it), in the
    tables' order; where no atomic-dQ tile of the head dim takes dropout (d128 on sm_90), the dQ kernel's plan untimed,
    as the JIT's attention_backward takes it."""
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import (
        DKDV_CONFIGS,
        DKDV_DQ_CONFIGS,
        DQ_CONFIGS,
        head_dim_class,
        takes_dropout,
    )

    def order(table, kind, atomic):
        tiles = ab.shipped_tiles(table[arch], head_dim_class(D), dropout=True)
        launches = [(kind, t.kwargs["BLOCK_M"], t.kwargs["BLOCK_N"], atomic, False) for t in tiles]
        return launches * (len(tiles) > 1) + launches[:1]  # a trial of each when there are several, then the first

    C.aot_clear()
    C.aot_tune_reset()
    try:
        _register_shipped_set(arch)
        C.aot_record(True, SM)
        C.aot_tune_reset([1.0] * 16)  # every trial alike: the first candidate is kept
        trials = _call(Tq=200, Tk=200, H=8, Hkv=2, D=D, dropout_p=0.1)
        separate = order(DKDV_CONFIGS, "dkdv", False) + order(DQ_CONFIGS, "dq", False)
        if takes_dropout(DKDV_DQ_CONFIGS[arch], D):  # the plans timed, each tuning its tiles; the atomic one kept
            atomic = order(DKDV_DQ_CONFIGS, "dkdv", True)
            assert trials == atomic + separate + atomic[-1:]
        else:
            assert (arch, D) == (90, 128) and trials == separate
    finally:
        C.aot_record(False, 0)
        C.aot_tune_reset()
        C.aot_clear()


_WS_OFF_CHILD = """
import json, sys, torch
import fasttrain._C as C
sys.path.insert(0, sys.argv[2])
import test_attention_backward_aot as t
t._register(json.loads(sys.argv[1]))
C.aot_record(True, t.SM)
C.aot_tune_reset([1.0] * 5)
print(json.dumps(t._call(deterministic=True)))
"""


@pytest.mark.slow  # a child process: the switch is read once per process
def test_the_warp_specialized_off_switch_leaves_their_tiles_out():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    described = _shipped_set(90)
    assert any(d[2][9] for d in described if d[0] == "_attn_bwd_dkdv_kernel")  # WARP_SPECIALIZE shipped
    env = {**os.environ, "FASTTRAIN_ATTENTION_WS": "0"}
    child = [sys.executable, "-c", _WS_OFF_CHILD, json.dumps(described), str(Path(__file__).parent)]
    proc = subprocess.run(child, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiles = [tuple(t) for t in json.loads(proc.stdout.splitlines()[-1])]
    p128, p64 = ("dkdv", 64, 128, False, False), ("dkdv", 64, 64, False, False)
    q128, q64 = ("dq", 128, 64, False, False), ("dq", 64, 64, False, False)
    assert tiles == [p128, p64, p128, q128, q64, q128]  # two dK/dV tiles tried, not the third (warp-specialized)


def test_inputs_the_cubins_cannot_take_are_copied(registry):
    do, q, k, v, out, lse = _tensors()
    odd_q = torch.randn(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)  # 2 bytes past an aligned address
    broadcast = torch.randn(1, 1, 1, 64, dtype=q.dtype).expand(q.shape)  # dO of a sum: zero strides
    dq, dk, dv = torch.ops.fasttrain.attention_backward_aot(broadcast, odd_q, k, v, out, lse, 0.125, W, 0, True)
    pre, dkdv, dq_launch = C.aot_records()
    assert dkdv["args"][0] not in (0, odd_q.data_ptr()) and dkdv["args"][0] % 16 == 0
    assert pre["args"][1] != broadcast.data_ptr() and pre["args"][7] != 0  # dO copied: stride_dt no longer 0
    assert dkdv["args"][1] == k.data_ptr() and dq_launch["args"][1] == k.data_ptr()  # aligned inputs are taken as is
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and dq.dtype == q.dtype
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()


def test_targets_the_cubins_cannot_write_take_a_fresh_gradient_copied_in(registry):
    do, q, k, v, out, lse = _tensors(H=2, Hkv=2)
    packed = torch.empty(1, 97, 3, 2, 64, dtype=q.dtype)  # (B, T, 3, H, D): views the cubins write in place
    odd = torch.empty(packed.numel() + 1, dtype=q.dtype)[1:].view(packed.shape)  # 2 bytes past an aligned address
    dq, dk, dv = (packed[:, :, 0], odd[:, :, 1], packed[:, :, 2])
    torch.ops.fasttrain.attention_backward_into_aot(dq, dk, dv, do, q, k, v, out, lse, 0.125, W, 0, True)
    pre, dkdv, dq_launch = C.aot_records()
    assert dkdv["args"][6] not in (0, dk.data_ptr()) and dkdv["args"][6] % 16 == 0  # DK: a fresh tensor
    assert dkdv["args"][7] == dv.data_ptr() and dq_launch["args"][6] == dq.data_ptr()  # written in place
    with pytest.raises(RuntimeError, match="dq, dk and dv must have the shapes of q, k and v"):
        torch.ops.fasttrain.attention_backward_into_aot(dq, dk[:, :5], dv, do, q, k, v, out, lse, 0.125, W, 0, True)


def test_bad_inputs_are_refused_with_the_reason(registry):
    do, q, k, v, out, lse = _tensors()
    bad = {
        "fp16 or bf16": (do.float(), q.float(), k.float(), v.float(), out.float(), lse),
        "head_dim 64, 96, 128 or 256": (do[..., :32], q[..., :32], k[..., :32], v[..., :32], out[..., :32], lse),
        "GQA groups 1, 2, 4 or 8": _tensors(H=6, Hkv=2),
        "multiple of k's": _tensors(H=3, Hkv=2),
        "lse must be": (do, q, k, v, out, lse[:, :1]),
        "q's shape": (do[:, :5], q, k, v, out, lse),
    }
    for words, args in bad.items():
        with pytest.raises(RuntimeError, match=words):
            torch.ops.fasttrain.attention_backward_aot(*args, 0.125, W, 0, False)
    C.aot_record(False, 0)
    with pytest.raises(RuntimeError, match="only while launches are recorded"):
        torch.ops.fasttrain.attention_backward_aot(do, q, k, v, out, lse, 0.125, W, 0, False)


def test_meta_and_fake_tensors_give_the_shapes():
    args = [t.to("meta") for t in _tensors(Tq=5, Tk=7, H=8, Hkv=2)]
    dq, dk, dv = torch.ops.fasttrain.attention_backward_aot(*args, 0.125, W, 0, False)
    assert (dq.shape, dk.shape, dv.shape) == ((1, 5, 8, 64), (1, 7, 2, 64), (1, 7, 2, 64))
    assert dq.dtype == dk.dtype == dv.dtype == torch.float16 and dq.device.type == "meta"
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in _tensors(Tq=5, Tk=7, H=8, Hkv=2, dtype=torch.bfloat16)]
        dq, dk, dv = torch.ops.fasttrain.attention_backward_aot(*fake, 0.125, W, 0, True)
    assert (dq.shape, dk.shape) == ((1, 5, 8, 64), (1, 7, 2, 64)) and dv.dtype == torch.bfloat16


def test_the_columns_packed_dropout_backward_takes_the_jit_where_its_cubins_do_not_ship(monkeypatch):
    """Packed d128 dropout on sm_90 ships no backward cubins (its one dK/dV tile spills): the column's backward takes
    the triton column's there, and the C++ op (with the seed) elsewhere. sm_90's shipped set registered without
    cubins (the recorder launches none)."""
    from fasttrain import _backend
    from fasttrain.ops import attention as ops

    do, q, k, v, out, _ = (t[0] for t in _tensors(H=2, Hkv=2))  # packed: (97, 2, 64)
    lse, cu, seed = torch.randn(2, 97), torch.tensor([0, 97], dtype=torch.int32), torch.tensor([5, 6])
    tail = (cu, cu, 97, 97, 0.125, W, 0, None, 0.1, seed, 0.0, None, True, None)  # deterministic: the dQ kernel
    delegated = []
    monkeypatch.setattr(ops.Triton, "backward", lambda *args: delegated.append(args) or "triton")
    monkeypatch.setattr(_backend, "aot_arch", lambda device: 90)
    wide = [torch.cat([t, t], -1) for t in (do, q, k, v, out)]  # head dim 128
    C.aot_clear()
    C.aot_tune_reset()
    try:
        _register_shipped_set(90)
        C.aot_record(True, SM)
        assert ops.Aot.backward(*wide, lse, None, *tail) == "triton" and C.aot_records() == []
        grads = ops.Aot.backward(do, q, k, v, out, lse, None, *tail)  # d64: the C++ op
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and len(delegated) == 1
        records = C.aot_records()
        assert [r["case"] for r in records[1:]] == [
            "d64 g1 m64 n128 w8 s2 varlen dropout",
            "d64 g1 m128 n64 w8 s3 varlen dropout",
        ]
        assert records[1]["args"][43] == records[2]["args"][35] == seed.data_ptr()
        C.aot_record(True, SM)  # clears
        into = tuple(torch.empty_like(t) for t in (q, k, v))  # a packed function's gradient: the _into op, dropout too
        assert ops.Aot.backward(do, q, k, v, out, lse, None, *tail[:-1], into) is into and len(delegated) == 1
        records = C.aot_records()
        assert [r["case"] for r in records[1:]] == [
            "d64 g1 m64 n128 w8 s2 varlen dropout",
            "d64 g1 m128 n64 w8 s3 varlen dropout",
        ]
        assert records[1]["args"][43] == records[2]["args"][35] == seed.data_ptr()
        assert records[2]["args"][6] == into[0].data_ptr()  # dQ written in place
        monkeypatch.setattr(_backend, "aot_arch", lambda device: 80)  # sm_80 ships it: the C++ op (sm_90's lack it)
        with pytest.raises(RuntimeError, match="constexprs"):
            ops.Aot.backward(*wide, lse, None, *tail)
    finally:
        C.aot_record(False, 0)
        C.aot_tune_reset()
        C.aot_clear()


def test_the_aot_columns_backward_is_the_cpp_op_with_or_without_an_lse_gradient(registry, monkeypatch):
    from fasttrain.ops import attention as ops

    do, q, k, v, out, lse = _tensors()
    tail = (None, None, 97, 97, 0.125, W, 0, None, 0.0, None, 0.0, None)
    # the registered backward op on the aot column: the C++ op's launches (the atomic plan: nothing timed)
    grads = torch.ops.fasttrain.attention_backward(do, q, k, v, out, lse, None, *tail, False, "aot")
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert [r["kernel"] for r in C.aot_records()] == ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"]
    C.aot_record(True, SM)  # clears
    delegated = []
    monkeypatch.setattr(ops.Triton, "backward", lambda *args: delegated.append(args) or "triton")
    into = torch.empty(1, 97, 2, 2, 64, dtype=q.dtype).unbind(2)  # a kvpacked gradient's views
    into = (torch.empty_like(q), *into)
    _, k2, v2 = into  # k and v shaped like them (GQA 2:1)
    assert ops.Aot.backward(do, q, k, v, out, lse, None, *tail, True, into) is into  # the _into op, in place
    pre, dkdv, dq_launch = C.aot_records()
    assert (dkdv["args"][6], dkdv["args"][7], dq_launch["args"][6]) == tuple(t.data_ptr() for t in (k2, v2, into[0]))
    C.aot_record(True, SM)  # clears
    cu = torch.tensor([0, 40, 97], dtype=torch.int32)  # packed sequences: the varlen _into op
    rows = tuple(t[0] for t in (do, q, k, v, out))  # (97, H, D)
    packed_into = (torch.empty_like(rows[1]), *torch.empty(97, 2, 2, 64, dtype=q.dtype).unbind(1))
    varlen_tail = (cu, cu, 57, 57, *tail[4:])
    assert ops.Aot.backward(*rows, torch.randn(4, 97), None, *varlen_tail, False, packed_into) is packed_into
    pre, dkdv = C.aot_records()  # the atomic plan (the sample's packed GQA 2:1 tile)
    assert dkdv["case"].endswith(" varlen") and dkdv["args"][6:8] == [t.data_ptr() for t in packed_into[1:]]
    C.aot_record(True, SM)  # clears
    # lse's gradient: the C++ op, which seeks the preprocess's HAS_DLSE cubin (not in the sample: the registry's error
    # names its constexprs; tests/test_attention_aot_coverage.py launches it)
    for target in (None, into):
        with pytest.raises(RuntimeError, match=r"constexprs \(64, 64, 0, 1, 32\)"):
            ops.Aot.backward(do, q, k, v, out, lse, torch.randn_like(lse), *tail, True, target)
    far = do.as_strided(do.shape, (2**31, *do.stride()[1:]))  # a dO stride the op's int32 arguments cannot pass
    assert ops.Aot.backward(far, q, k, v, out, lse, None, *tail, True, into) == "triton"
    assert C.aot_records() == [] and len(delegated) == 1 and delegated[0][-1] is into and delegated[0][-2] is True
    assert len(delegated[0]) == 21 and delegated[0][:6] == (far, q, k, v, out, lse)


# ---- on a GPU: the op against the JIT backward ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "B,Tq,Tk,H,Hkv,D,window",
    [
        (1, 1, 1, 4, 4, 64, (W, 0)),
        (2, 97, 97, 8, 2, 128, (W, 0)),
        (1, 1025, 1025, 16, 2, 64, (W, W)),
        (2, 256, 512, 8, 8, 128, (127, 0)),
        (1, 1024, 1024, 32, 4, 128, (W, 0)),
    ],
    ids=str,
)
def test_gpu_aot_matches_the_jit_backward(B, Tq, Tk, H, Hkv, D, window, deterministic, dtype):
    from fasttrain import _aot
    from fasttrain.kernels.attention import attention_forward
    from fasttrain.kernels.attention_backward import attention_backward

    assert _aot.reason(torch.device("cuda")) is None
    torch.manual_seed(0)
    q = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Tk, Hkv, D, device="cuda", dtype=dtype) for _ in "kv")
    do = torch.randn_like(q)
    scale, (left, right) = D**-0.5, window
    out, lse = attention_forward(q, k, v, None, None, Tq, Tk, scale, left, right)[:2]
    want = attention_backward(do, q, k, v, out, lse, None, None, None, Tq, Tk, scale, left, right, deterministic)
    got = torch.ops.fasttrain.attention_backward_aot(do, q, k, v, out, lse, scale, left, right, deterministic)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.isfinite(g).all()
        # The same kernels, but a tile or plan chosen apart may sum in another order: within a few roundings
        torch.testing.assert_close(g.float(), w.float(), atol=4e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", ["qkv", "kv", "varlen qkv", "varlen kv"])
def test_gpu_packed_gradients_written_in_place_match_the_jit_backward(packed):
    from fasttrain import _aot
    from fasttrain.ops import attention_packed as ap

    assert _aot.reason(torch.device("cuda")) is None
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 97, 8, 8 if "qkv" in packed else 2, 64
    lead = (B * T,) if "varlen" in packed else (B, T)
    cu = torch.tensor([0, 40, B * T], dtype=torch.int32, device="cuda")
    q = torch.randn(*lead, H, D, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(*lead, 3 if "qkv" in packed else 2, Hkv, D, device="cuda", dtype=torch.bfloat16)
    grads = []
    for backend in ("aot", "triton"):
        leaves = [t.clone().requires_grad_() for t in ((src,) if "qkv" in packed else (q, src))]
        if packed == "qkv":
            out = ap.flash_attn_qkvpacked_func(*leaves, causal=True, backend=backend)
        elif packed == "kv":
            out = ap.flash_attn_kvpacked_func(*leaves, causal=True, backend=backend)
        elif packed == "varlen qkv":
            out = ap.flash_attn_varlen_qkvpacked_func(*leaves, cu, B * T - 40, causal=True, backend=backend)
        else:
            out = ap.flash_attn_varlen_kvpacked_func(
                *leaves, cu, cu, B * T - 40, B * T - 40, causal=True, backend=backend
            )
        out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for g, w in zip(*grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), w.float(), atol=4e-2, rtol=2e-2)


# ---- the full shipped set -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_full_shipped_set_compiles_without_spills_and_registers(tmp_path, arch):
    from fasttrain import _aot
    from fasttrain.kernels import attention_backward as ab

    rows = aot_compile(tmp_path, "attention_backward", ["bf16", "fp16"], archs=(str(arch),))
    want = sum(len(e["cases"]) for dtype in ("bf16", "fp16") for e in ab.aot_kernels(arch, dtype, shipped=True))
    assert len(rows) == want and all("error" not in r for r in rows)
    if arch == 90:
        assert all(r["stack"] == 0 and r["local"] == 0 for r in rows), [r["case"] for r in rows if r["stack"]]
    C.aot_clear()
    try:
        assert _aot.load(tmp_path, arch=arch) == len(rows) == C.aot_registered()
    finally:
        C.aot_clear()
