"""The aot column's later calls, tested without a GPU: head dims 96 and 256 (kernels/attention.py and
attention_backward.py SHIPPED_HEAD_DIMS), a backward with lse's gradient (the preprocess's HAS_DLSE cubins) and the
packed functions' dropout backward into their packed gradient (the _into ops with dropout).

96 (Phi-3-mini) takes the d128 class's tiles padded to 128 (HEAD_DIM_PAD), which TMA cannot read: no
warp-specialized tile, TMA_ALIGNED off, and one tile per launch (kernels/_attention_configs.py ONE_TILE: the first the
JIT's pruner keeps that does not spill at 96). 256 (Gemma) has one tile per kernel. The shipped sets hold that; a
sample compiles for sm_90 without spills; the C++ ops, run on CPU tensors with the launch recorder on, hand the
launcher what Triton's JIT launcher is given for the same calls (tests/aot_jit_capture.py), forward and backward,
dense, packed and into a packed gradient, with lse's gradient and with dropout into a packed gradient; head dim 32
still takes the JIT.
"""

import os

import pytest
import torch

from fasttrain import _backend
from fasttrain.ops import attention as ops
from fasttrain.ops.attention_reference import UNBOUNDED as W

from helpers import aot_compile, aot_jit_launches, aot_recording, assert_aot_launch_is_the_jit_launch

SM = 132
FWD_96 = "d96 G{} BLOCK_M=128 BLOCK_N=64 WARP_SPECIALIZE=False w8 s3"  # the d128 class's first config
FWD_256 = "d256 G1 BLOCK_M=32 BLOCK_N=32 WARP_SPECIALIZE=False w4 s2"
# fp16, sm_90: the forward at 96 (MHA dense and packed, GQA 4) and 256 (MHA); the backward's preprocess (with dlse too),
# dK/dV (dQ by atomics or not) and dQ at 96 (MHA; the atomic table's first tile spills at 96, so its second ships; and
# the dQ kernel's plan at GQA 2) and 256 (MHA), and at 64 the preprocess and the dQ kernel's plan with dropout (MHA).
SAMPLE = {
    "attention": f"^({FWD_96.format(1)}( varlen)?|{FWD_96.format(4)}|{FWD_256})$",
    "attention_backward": "^d96 (w4( dlse)?|g[12] m64 n64 w8 s[23]|g1 m32 n128 w8 s2 atomic)$"
    + "|^d256 (w4( dlse)?|g1 m32 n32 w8 s2( atomic)?)$|^d64 (w4|g1 (m64 n128 w8 s2|m128 n64 w8 s3) dropout)$",
}


def _first_kept(table_for_arch, args: dict, spills=()):
    """The first config the JIT's pruner keeps for a launch with args, but those in spills (as tuples)."""
    from fasttrain.kernels._attention_configs import flat, pruner

    for c in pruner(table_for_arch)(flat(table_for_arch), args):
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        tile += (c.kwargs.get("WARP_SPECIALIZE", False),)
        if tile not in spills:
            return c.kwargs, c
    return None


def _tile(constexprs: dict, options) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a shipped case (its constexprs, the case) or of a triton.Config
    (its kwargs, itself)."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name)
    return constexprs["BLOCK_M"], constexprs["BLOCK_N"], get("num_warps"), get("num_stages")


def test_forward_ships_one_tile_per_launch_at_96_and_the_one_at_256():
    from fasttrain.kernels import attention
    from fasttrain.kernels._attention_configs import FWD_CONFIGS

    assert attention.SHIPPED_HEAD_DIMS == ops._AOT_HEAD_DIMS == (64, 96, 128, 256)
    for arch in (80, 90):
        (entry,) = attention.aot_kernels(arch, "fp16", shipped=True)
        for d in (96, 256):
            cases = [c for c in entry["cases"] if c["constexprs"]["HEAD_DIM"] == d]
            assert len(cases) == 4 * 2  # groups x dense or packed, no dropout (not at 96 or 256): one tile each
            for c in cases:
                k = c["constexprs"]
                assert c["label"].startswith(f"d{d} G{k['GROUP']} ") and k["HEAD_DIM_PAD"] == (128 if d == 96 else 256)
                assert k["TMA_ALIGNED"] == (d == 256 and not k["DROPOUT"])
                assert not (k["WARP_SPECIALIZE"] or k["FULL_TILES"] or k["SOFTCAP"] or k["ALIBI"])
                args = {"HEAD_DIM": d, "TMA_ALIGNED": k["TMA_ALIGNED"], "DROPOUT": k["DROPOUT"], "VARLEN": k["VARLEN"]}
                assert _tile(k, c) == _tile(*_first_kept(FWD_CONFIGS[arch], args))


def test_backward_ships_one_tile_per_launch_at_96_and_the_one_at_256():
    from fasttrain.kernels import attention_backward as ab
    from fasttrain.kernels._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS, ONE_TILE

    assert ab.SHIPPED_HEAD_DIMS == ops._AOT_HEAD_DIMS
    for arch in (80, 90):
        pre, dkdv, dq = ab.aot_kernels(arch, "fp16", shipped=True)
        # the preprocess: dense at every head dim, packed where the packed backward ships, then again with HAS_DLSE
        packed = [d for d in ops._AOT_HEAD_DIMS if (arch, d) not in ops._AOT_UNSHIPPED_VARLEN]
        dims = [64, 96, 128, 256] + packed
        cx = [c["constexprs"] for c in pre["cases"]]
        assert [(k["HEAD_DIM"], k["HAS_DLSE"]) for k in cx] == [(d, dlse) for dlse in (False, True) for d in dims]
        plain, with_dlse = pre["cases"][: len(dims)], pre["cases"][len(dims) :]
        assert [c["label"] for c in with_dlse] == [c["label"] + " dlse" for c in plain]
        assert all(k["HEAD_DIM_PAD"] == (128 if k["HEAD_DIM"] == 96 else k["HEAD_DIM"]) for k in cx)
        # sm_90's packed d256 backward: its one dQ tile spills packed (_SPILL_VARLEN_DQ), so none of it ships
        varlen = {c["constexprs"]["HEAD_DIM"] for c in dkdv["cases"] + dq["cases"] if c["constexprs"]["VARLEN"]}
        assert varlen == set(packed) and {(90, 256)} == ops._AOT_UNSHIPPED_VARLEN
        tables = {False: DKDV_CONFIGS[arch], True: DKDV_DQ_CONFIGS[arch]}
        for d in (96, 256):
            spills = ONE_TILE.get(d, {}).get(arch, {})
            for c in dkdv["cases"] + dq["cases"]:
                k = c["constexprs"]
                if k["HEAD_DIM"] != d:
                    continue
                assert k["HEAD_DIM_PAD"] == (128 if d == 96 else 256) and not (k["SOFTCAP"] or k["ALIBI"])
                args = {**k, "HEAD_DIM": d, "TMA_ALIGNED": d == 256 and not k["DROPOUT"]}  # the expected TMA last
                if "ATOMIC_DQ" in k:
                    assert k["TMA_ALIGNED"] == args["TMA_ALIGNED"] and not k["FULL_TILES"]
                    name = "dkdv_dq" if k["ATOMIC_DQ"] else "dkdv"
                    first = _first_kept(tables[k["ATOMIC_DQ"]], args, spills.get(name, ()))
                else:
                    first = _first_kept(DQ_CONFIGS[arch], args)
                assert _tile(k, c) == _tile(*first)
            groups = {c["constexprs"]["GROUP"] for c in dkdv["cases"] if c["constexprs"]["HEAD_DIM"] == d}
            assert groups == {1, 2, 4, 8}
        # dropout only at 64 and 128 (the build's budget); packed at 128 on sm_90 the plain dK/dV tile that takes it
        # spills (UNSHIPPED_VARLEN_DROPOUT), so nothing ships (no atomic or dQ tile either): the JIT's there
        shipped = {
            c["constexprs"]["HEAD_DIM"]
            for c in dkdv["cases"]
            if c["constexprs"]["VARLEN"] and c["constexprs"]["DROPOUT"]
        }
        assert {c["constexprs"]["HEAD_DIM"] for c in dkdv["cases"] + dq["cases"] if c["constexprs"]["DROPOUT"]} == {
            64,
            128,
        }
        assert ab.SHIPPED_DROPOUT_HEAD_DIMS == ops._AOT_DROPOUT_HEAD_DIMS == (64, 128)
        unshipped = {(arch, d) for d in ops._AOT_DROPOUT_HEAD_DIMS} - {(arch, d) for d in shipped}
        assert unshipped == {a for a in ops._AOT_UNSHIPPED_VARLEN_DROPOUT if a[0] == arch}
        assert unshipped == ({(90, 128)} if arch == 90 else set())
        packed_dropout_dq = {
            c["constexprs"]["HEAD_DIM"] for c in dq["cases"] if c["constexprs"]["VARLEN"] and c["constexprs"]["DROPOUT"]
        }
        assert packed_dropout_dq == shipped


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The SAMPLE compiled (fp16, sm_90), each kernel module into its own folder: (folders, cases in all)."""
    dirs, count = [], 0
    for module, cases in SAMPLE.items():
        out = tmp_path_factory.mktemp(module)
        rows = aot_compile(out, module, ["fp16"], cases)
        assert all("error" not in r and r["local"] == 0 and r["stack"] == 0 for r in rows), rows  # no spills
        dirs.append(out)
        count += len(rows)
    assert count == 4 + 15
    return dirs, count


# The forward, the JIT held to the class's first config (the one shipped at 96 and 256): (B or lengths_q, Tq or
# lengths_k, Tk, H, Hkv, window, D, dropout_p). At 96: one token; 97 with a window at GQA 4; packed, three
# sequences with a one-token one. At 256: 97 causal; two sequences with Tq < Tk.
FORWARD = [
    (1, 1, 1, 2, 2, (W, 0), 96, 0.0),
    (1, 97, 97, 8, 2, (16, 0), 96, 0.0),
    ([97, 1, 33], [97, 1, 33], None, 2, 2, (W, 0), 96, 0.0),
    (1, 97, 97, 2, 2, (W, 0), 256, 0.0),
    (2, 33, 100, 2, 2, (W, W), 256, 0.0),
]
# The backward, with nothing to time (atomic dQ unless deterministic): (B, Tq, Tk, H, Hkv, window, D, deterministic,
# packed, dropout_p, dlse). At 96: GQA 2 with a window (the dQ kernel); MHA 97 causal with each plan, one token, with
# lse's gradient (each plan); at 256: 97 full with each plan; a qkvpacked function's backward into its packed
# gradient (its views' strides are the cubins': written in place) at 96, at 256 with lse's gradient, and at 64 with
# dropout (the dQ kernel's plan).
BACKWARD = [
    (1, 97, 97, 4, 2, (16, 0), 96, True, None, 0.0, False),
    (1, 97, 97, 2, 2, (W, 0), 96, False, None, 0.0, False),
    (1, 97, 97, 2, 2, (W, 0), 96, True, None, 0.0, False),
    (1, 1, 1, 2, 2, (W, 0), 96, True, None, 0.0, False),
    (1, 97, 97, 2, 2, (W, 0), 96, False, None, 0.0, True),
    (2, 33, 33, 2, 2, (W, W), 96, True, None, 0.0, True),
    (1, 97, 97, 2, 2, (W, W), 256, False, None, 0.0, False),
    (1, 97, 97, 2, 2, (W, W), 256, True, None, 0.0, False),
    (2, 33, 33, 2, 2, (W, 0), 96, True, "qkv", 0.0, False),
    (1, 97, 97, 2, 2, (W, W), 256, True, "qkv", 0.0, True),
    (1, 97, 97, 2, 2, (W, 0), 64, True, "qkv", 0.1, False),
]


def _forward_case(first, second, Tk, H, Hkv, window, D, p) -> dict:
    shape = dict(lengths_q=first, lengths_k=second) if Tk is None else dict(B=first, Tq=second, Tk=Tk)
    return dict(shape, H=H, Hkv=Hkv, window=window, D=D, dropout_p=p, config=0, times=[], dtype="fp16")


def _backward_case(B, Tq, Tk, H, Hkv, window, D, deterministic, packed, dropout_p, dlse) -> dict:
    case = dict(B=B, Tq=Tq, Tk=Tk, H=H, Hkv=Hkv, window=window, D=D, deterministic=deterministic, dtype="fp16")
    case.update(plan="dQ kernel" if deterministic else "atomic dQ", dropout_p=dropout_p, dlse=dlse)
    return dict(case, **({"packed": packed} if packed else {}))


@pytest.fixture(scope="module")
def captured(sample):
    """The FORWARD cases, then the BACKWARD ones."""
    cases = [dict(_forward_case(*c), op="attention") for c in FORWARD]
    cases += [dict(_backward_case(*c), op="attention_backward") for c in BACKWARD]
    return aot_jit_launches(os.pathsep.join(map(str, sample[0])), cases)


@pytest.mark.parametrize("i", range(len(FORWARD)), ids=lambda i: f"forward{i}")
def test_recorded_forward_launch_is_what_the_jit_launcher_is_given(captured, i):
    jit, (aot,) = captured[i]["jit"], captured[i]["aot"]  # one tile shipped: launched untimed
    D, p = FORWARD[i][-2:]
    group, packed = FORWARD[i][3] // FORWARD[i][4], FORWARD[i][2] is None
    label = FWD_96.format(group) if D == 96 else FWD_256.replace("G1", f"G{group}")
    assert aot["case"] == label + " varlen" * packed + " dropout" * (p > 0)
    assert jit["constexprs"]["HEAD_DIM_PAD"] == aot["constexprs"]["HEAD_DIM_PAD"] == (128 if D == 96 else 256)
    assert jit["constexprs"]["TMA_ALIGNED"] == (D == 256 and p == 0)
    # the pointer loop ignores FULL_TILES: its False cubin serves
    assert_aot_launch_is_the_jit_launch({**jit, "constexprs": {**jit["constexprs"], "FULL_TILES": False}}, aot)
    assert jit["scratch"] == [] and aot["scratch_bytes"] == 0


@pytest.mark.parametrize("i", range(len(BACKWARD)), ids=lambda i: f"backward{i}")
def test_recorded_backward_launches_are_what_the_jit_launcher_is_given(captured, i):
    jit, aot = captured[len(FORWARD) + i]["jit"], captured[len(FORWARD) + i]["aot"]
    D, deterministic, packed, p, dlse = BACKWARD[i][-5:]
    kernels = ["_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel"] + ["_attn_bwd_dq_kernel"] * deterministic
    assert [launch["kernel"] for launch in jit] == [launch["kernel"] for launch in aot] == kernels
    assert all(a["case"].startswith(f"d{D} ") and a["constexprs"]["HEAD_DIM"] == D for a in aot)
    dkdv = aot[1]
    assert dkdv["constexprs"]["ATOMIC_DQ"] == (not deterministic) and not dkdv["constexprs"]["WARP_SPECIALIZE"]
    assert dkdv["constexprs"]["TMA_ALIGNED"] == (D != 96 and p == 0) and dkdv["constexprs"]["DROPOUT"] == (p > 0)
    # lse's gradient: the preprocess's HAS_DLSE cubin, given dlse itself (contiguous, aligned: no copy)
    assert aot[0]["constexprs"]["HAS_DLSE"] == dlse and aot[0]["args"]["DLse"] == ("dlse" if dlse else "null")
    assert all(a["args"]["Seed"] == ("seed" if p else "null") for a in aot[1:])
    if D == 96 and not deterministic:  # the atomic table's first tile spills at 96: its second ships
        assert (dkdv["constexprs"]["BLOCK_M"], dkdv["constexprs"]["BLOCK_N"]) == (32, 128)
    for j, a in zip(jit, aot):
        # the pointer loop ignores FULL_TILES: its False cubin serves
        j = {**j, "constexprs": {**j["constexprs"], "FULL_TILES": False}} if "FULL_TILES" in a["constexprs"] else j
        assert_aot_launch_is_the_jit_launch(j, a)
    if packed:  # dK and dV written in place into the packed gradient's views: rows of 3 * H heads of D
        assert (dkdv["args"]["DK"], dkdv["args"]["DV"]) == ("dk", "dv")
        assert dkdv["args"]["stride_dkt"] == dkdv["args"]["stride_dvt"] == 3 * BACKWARD[i][3] * D


def test_the_column_takes_96_and_256_without_dropout_but_not_32(monkeypatch):
    monkeypatch.setattr(_backend, "aot_reason", lambda device: None)
    for D in (96, 256):
        q, k, v = (torch.randn(1, 97, 2, D, dtype=torch.float16) for _ in "qkv")
        assert ops._aot_reason(q, k, v, None, 97, 97, None, 0.0, 0.0, None) is None
        why = ops._aot_reason(q, k, v, None, 97, 97, None, 0.1, 0.0, None)
        assert why is not None and f"dropout at head_dim (64, 128), got {D}" in why
    q = torch.randn(1, 97, 2, 32, dtype=torch.float16)
    why = ops._aot_reason(q, q, q, None, 97, 97, None, 0.0, 0.0, None)
    assert why is not None and "head_dim (64, 96, 128, 256), got 32" in why


def test_the_forward_op_refuses_an_unshipped_head_dim_with_its_name(sample):
    q = torch.randn(1, 97, 2, 32, dtype=torch.float16)
    with aot_recording(*sample, SM), pytest.raises(RuntimeError, match="head_dim 64, 96, 128 or 256, got 32"):
        torch.ops.fasttrain.attention_forward_aot(q, q, q, 0.125, W, 0)
    q, seed = torch.randn(1, 97, 2, 96, dtype=torch.float16), torch.tensor([1, 2])
    with aot_recording(*sample, SM), pytest.raises(RuntimeError, match="dropout at head_dim 64 or 128, got 96"):
        torch.ops.fasttrain.attention_forward_aot(q, q, q, 0.125, W, 0, 0.1, seed)


def test_the_ops_tile_lists_at_256_hold_the_tables():
    """csrc/attention_aot.cpp tiles(256) and attention_backward_aot.cpp dkdv_tiles(256) / dq_tiles(256): the d256
    class's configs of both archs, in the order the ops probe the registry (96 probes the d128 class's lists, which
    tests/test_attention_aot.py and test_attention_backward_aot.py hold)."""
    from fasttrain.kernels._attention_configs import DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS, FWD_CONFIGS

    def tiles(table, arch):
        return [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("WARP_SPECIALIZE", False))
            for c in table[arch]["d256"]
        ]

    forward = [(32, 32, False), (64, 32, False)]
    for arch in (90, 80):
        assert tiles(FWD_CONFIGS, arch) == [t for t in forward if t in tiles(FWD_CONFIGS, arch)]
        for table in (DKDV_CONFIGS, DKDV_DQ_CONFIGS, DQ_CONFIGS):
            assert tiles(table, arch) == [(32, 32, False)]
    assert {t for arch in (90, 80) for t in tiles(FWD_CONFIGS, arch)} == set(forward)
