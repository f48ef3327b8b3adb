"""Autotune configs for kernels/attention.py and attention_backward.py, per GPU arch and head-dim class, plus the one
interpreter config.

A kernel's autotuner holds every config of its arch; `pruner` keeps those of the call's head-dim class, so a
d256 call never tries tiles that only fit d64. tests/test_kernels_compile.py compiles each (arch, class, config)
ahead of time and fails on compile errors, on shared memory over the arch's limit, and on register spills in the
sm_90 configs. Tuples are (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M always tiles queries, BLOCK_N keys.
Forward and dK/dV tuples add WARP_SPECIALIZE (see _FWD); FASTTRAIN_ATTENTION_WS=0 drops the specialized configs at
import, the escape hatch should a Triton build fault or hang on them.
"""

import os

import triton

HEAD_DIM_CLASSES = {"d64": (32, 64), "d128": (96, 128), "d256": (256,)}

# sm_90 lists hold only configs that compile without spills (cuobjdump STACK 0, bf16, GQA 2, pointers and row
# strides specialized as multiples of 16 as at a real launch) and on wgmma under triton 3.6.0 and 3.7.1
# (tools/aot_sweep.py over BLOCK 32/64/128, 4/8 warps, 2/3 stages). Left out for spilling: fwd d128 (64,128,4,*)
# 16-80 B; dkdv with 4 warps and 128-key tiles, 8-2056 B; dkdv d128 (64,128,8,*), FlashAttention-2's tile, up to
# 32 B; dq d128 (128,128,8,2) 48-56 B. Left out for wrong results on sm_90 under triton 3.6.0: dkdv d128 (64,64,8,3)
# (an illegal memory access at GQA 4:1, bf16, where the same tile at 2 stages is right), and the warp-specialized
# forward's 128 x 64 tile at 3 stages (NaN rows, masked loop or not: a stage read before its load lands or after its
# reuse), right in the interpreter (benchmarks/NOTES.md).
# sm_80 lists are checked for compile errors and shared memory only (A100: 164 KB per block).
# WARP_SPECIALIZE (sm_90, Q/K/V by TMA): Triton's Hopper warp specialization splits the key loop into one loading
# warpgroup (setmaxnreg 40) and two computing ones (232), each on 64 of the 128 query rows: FlashAttention-3's
# producer/consumer layout. num_warps=4 is one consumer's share: the kernel launches 12 warps. What the pass takes
# under triton 3.6.0 and 3.7.1: one key loop (two or three in a row crash it; a scalar `if` around the mask leaves
# the loop unspecialized and spilling), so that loop masks every tile; Q read by TMA too (a masked tl.load of Q fails
# it: "unsupported load type for producer commit"); no early return (an assertion). The autotuner keeps these
# configs only where they win; they are pruned where TMA cannot read Q/K/V (tma_aligned).
_WS_ON = os.environ.get("FASTTRAIN_ATTENTION_WS", "1") != "0"
FWD_WS_TILES = [(128, 128, 4, 2, True)]
_FWD_WS = FWD_WS_TILES if _WS_ON else []
_FWD = {
    90: {
        "d64": [(128, 64, 4, 3, False), (128, 128, 8, 3, False), (64, 64, 4, 3, False), *_FWD_WS],
        "d128": [(128, 64, 8, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False), *_FWD_WS],
        "d256": [(32, 32, 4, 2, False)],
    },
    80: {
        "d64": [(128, 64, 4, 3, False)],
        "d128": [(128, 64, 8, 3, False), (64, 64, 4, 3, False)],
        "d256": [(64, 32, 4, 2, False)],
    },
}
# dK/dV's WARP_SPECIALIZE tiles: 128 keys, each computing warpgroup holding 64 keys' dK and dV; the same one loop over
# (head, query tile), Q and dO by TMA (lse and delta by plain loads, which the pass takes inside the loop). At d128,
# 64 query rows (FlashAttention-2's tile, which spills as a pointer loop, above) compile spill-free under triton
# 3.6.0 but with 8 B of stack under 3.7.1; 32 rows are clean under both (168 registers at entry, 12 warps), where
# the same 32 x 128 tile as a 4-warp pointer loop takes 255 registers and 776 B of stack.
DKDV_WS_TILES = {"d64": (64, 128, 4, 2, True), "d128": (32, 128, 4, 2, True)}
_DKDV_WS = {cls: [t] if _WS_ON else [] for cls, t in DKDV_WS_TILES.items()}
_DKDV = {  # the dK/dV accumulators are (BLOCK_N, D) fp32 each, live across the whole query loop
    90: {
        "d64": [(64, 128, 8, 2, False), (64, 128, 8, 3, False), (64, 64, 8, 2, False), *_DKDV_WS["d64"]],
        "d128": [(64, 64, 8, 2, False), (32, 128, 8, 2, False), *_DKDV_WS["d128"]],
        "d256": [(32, 32, 8, 2, False)],
    },
    80: {"d64": [(64, 64, 4, 3, False)], "d128": [(32, 64, 8, 2, False)], "d256": [(32, 32, 8, 2, False)]},
}
# dK/dV with dQ added by float32 atomics (ATOMIC_DQ; pointer loop only, see kernels/attention_backward.py): one more
# product per tile, added by REDG.E.ADD.F32x4 (SASS). tools/aot_sweep.py --atomic-dq 1 over 32/64/128 rows x 64/128
# keys x 4/8 warps x 2/3 stages under 3.7.1 and 3.6.0; registers 3.7.1/3.6.0 of those kept, none spilled: d64
# 64x128/8/2 226/226, 64x128/8/3 229/255, 64x64/8/2 202/207; d128 64x64/8/2 243/255, 32x128/8/2 232/248 (64x128/8
# spills 8-112 B, every 4-warp d128 tile 24-2992 B); d256 32x32/8/2 224/234. The sm_80 tiles are its spill-free ones
# (255 registers, no stack, where _DKDV's d64 (64,64,4,3) spills 16 B with the atomics).
_DKDV_DQ = {
    90: {
        "d64": [(64, 128, 8, 2, False), (64, 128, 8, 3, False), (64, 64, 8, 2, False)],
        "d128": [(64, 64, 8, 2, False), (32, 128, 8, 2, False)],
        "d256": [(32, 32, 8, 2, False)],
    },
    80: {"d64": [(64, 64, 4, 2, False)], "d128": [(32, 64, 8, 2, False)], "d256": [(32, 32, 8, 2, False)]},
}
_DQ = {
    90: {
        "d64": [(128, 64, 8, 3), (64, 64, 4, 3)],
        "d128": [(64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        "d256": [(32, 32, 8, 2)],
    },
    80: {"d64": [(64, 64, 4, 3)], "d128": [(64, 32, 4, 3)], "d256": [(32, 32, 8, 2)]},
}
# Tiles left out of the tuning when DROPOUT is on (the warp-specialized ones never take it): those that spill on
# sm_90 with the mask's Philox and select in the loop (tools/aot.py, bf16, triton 3.7.1): forward d64 128x64/4/3
# (255 registers, 64 B of stack) and d128 128x128/8/2 (255, 72 B); dK/dV d128 64x64/8/2 and, with atomic dQ, both
# d128 tiles (255, 8 B each; 229-243 registers and no stack without dropout). dK/dV with atomic dQ keeps no d128
# tile, so at d128 dropout's backward takes the dQ kernel (attention_backward).
_DROPOUT_SPILLS = {
    "fwd": {90: {"d64": [(128, 64, 4, 3, False)], "d128": [(128, 128, 8, 2, False)]}},
    "dkdv": {90: {"d128": [(64, 64, 8, 2, False)]}},
    "dkdv_dq": {90: {"d128": [(64, 64, 8, 2, False), (32, 128, 8, 2, False)]}},
}
# sm_90 tiles that spill once flash-attn's score modifiers (SOFTCAP, ALIBI: a tanh and a distance per score) add
# their registers, so that launches with either leave them out and keep the rest of their class (triton 3.7.1, bf16,
# both modifiers, plain -> modified: fwd d64 (128,64,4,3) 232 -> 255 registers and 32 B of stack, fwd d128
# (128,128,8,2) 255 -> 255 and 72 B; dkdv with atomic dQ d128 (64,64,8,2) 243 -> 255 and 16 B). Since the masked dK/dV
# step also takes one-key rows (kernels/attention_backward.py _dkdv_step): dkdv d128 (64,64,8,2) 249 -> 255 and 16 B,
# d128 (32,128,4,2,WS) 168 -> 168 and 8 B, with atomic dQ d64 (64,128,8,3) 235 -> 255 and 8 B.
_SPILL_MODIFIED_FWD = {90: {"d64": [(128, 64, 4, 3, False)], "d128": [(128, 128, 8, 2, False)]}}
_SPILL_MODIFIED_DKDV = {90: {"d128": [(64, 64, 8, 2, False), (32, 128, 4, 2, True)]}}
_SPILL_MODIFIED_DKDV_DQ = {90: {"d64": [(64, 128, 8, 3, False)], "d128": [(64, 64, 8, 2, False)]}}
# sm_90 tiles that spill in packed launches (VARLEN: each program reads its sequence's offsets), which leave them out
# (tools/aot.py, triton 3.7.1, bf16, GQA 1, 2 and 8): dK/dV with atomic dQ d128 (64,64,8,2) 243 -> 255 registers and
# 24 B of stack.
_SPILL_VARLEN_DKDV_DQ = {90: {"d128": [(64, 64, 8, 2, False)]}}
# sm_90 tiles that spill in packed launches with dropout (tools/aot.py, triton 3.7.1, bf16): dK/dV d128 (32,128,8,2)
# at GQA 1, 250 -> 255 registers and 8 B of stack (GQA 8: 255 and none). The JIT's pruner keeps it (the class's only
# tile that takes dropout there); the shipped cubins leave it out at every group (a shipped cubin never spills), so
# such a backward takes the JIT (fasttrain/ops/attention.py _AOT_UNSHIPPED_VARLEN_DROPOUT).
# So does d256's one tile at every group (255 registers and 8 B of stack); 96 takes the d128 class's configs, so the
# same tile is left out there.
_SPILL_VARLEN_DROPOUT_DKDV = {90: {"d128": [(32, 128, 8, 2, False)], "d256": [(32, 32, 8, 2, False)]}}
# sm_90 tiles that spill in packed launches where they are their class's one tile, so that no packed backward ships
# there (tools/aot.py, triton 3.7.1, bf16 and fp16, every group; the JIT's pruner keeps them): dQ d256 (32,32,8,2), 128
# registers and 24 B of stack (127 and none dense). Such a backward takes the JIT (fasttrain/ops/attention.py
# _AOT_UNSHIPPED_VARLEN).
_SPILL_VARLEN_DQ = {90: {"d256": [(32, 32, 8, 2)]}}
# Head dims whose cubins ship one tile per launch (kernels/attention.py and attention_backward.py _shipped), which
# holds the build's cost (benchmarks/NOTES.md "Build switch"): of the configs the JIT's pruner keeps for a launch,
# the first that compiles without spills at that head dim, {head dim: {arch: {table: [tuple]}}} listing those that
# spill (tools/aot.py, triton 3.7.1). At 96 (the d128 class's tiles, HEAD_DIM_PAD 128): dK/dV with atomic dQ
# (64,64,8,2), 255 registers and 16 B of stack on sm_90.
ONE_TILE = {96: {90: {"dkdv_dq": [(64, 64, 8, 2, False)]}}}
# The interpreter's cost is per program and per tile operation, not per element: fewer, larger tiles are faster.
_INTERPRETER = (64, 64, 4, 1)
# ids of the configs left out of launches with score modifiers (from the _SPILL_MODIFIED tables), of packed ones (from
# the _SPILL_VARLEN tables), and of the shipped cubins of packed dropout launches (_SPILL_VARLEN_DROPOUT_DKDV)
PLAIN_ONLY: set[int] = set()
DENSE_ONLY: set[int] = set()
UNSHIPPED_VARLEN_DROPOUT: set[int] = set()
UNSHIPPED_VARLEN: set[int] = set()


def config(t, **fixed):
    """A triton.Config from (BLOCK_M, BLOCK_N, num_warps, num_stages[, WARP_SPECIALIZE]) and constexprs fixed for
    every config of a table (ATOMIC_DQ)."""
    kwargs = {"BLOCK_M": t[0], "BLOCK_N": t[1], **fixed}
    if len(t) == 5:
        kwargs["WARP_SPECIALIZE"] = t[4]
    return triton.Config(kwargs, num_warps=t[2], num_stages=t[3])


def one_config_table(t, **fixed) -> dict:
    """One config for every class, the same object: an autotuner with one config never benchmarks."""
    one = [config(t, **fixed)]
    return {cls: one for cls in HEAD_DIM_CLASSES}


def _build(
    table,
    interpreter,
    dropout_spills=None,
    spill_modified=None,
    spill_varlen=None,
    spill_varlen_dropout=None,
    unshipped_varlen=None,
    **fixed,
):
    """{arch: {class: [triton.Config]}} of table; a config of dropout_spills ({arch: {class: [tuple]}}) is marked
    no_dropout, which the pruner and tools/aot.py read; one of spill_modified goes into PLAIN_ONLY, one of
    spill_varlen into DENSE_ONLY, one of spill_varlen_dropout into UNSHIPPED_VARLEN_DROPOUT, one of unshipped_varlen
    into UNSHIPPED_VARLEN."""
    out = {}
    for arch, by_class in table.items():
        out[arch] = {}
        for cls, tuples in by_class.items():
            out[arch][cls] = [config(t, **fixed) for t in tuples]
            for c, t in zip(out[arch][cls], tuples):
                c.no_dropout = t in (dropout_spills or {}).get(arch, {}).get(cls, [])
                if t in (spill_modified or {}).get(arch, {}).get(cls, []):
                    PLAIN_ONLY.add(id(c))
                if t in (spill_varlen or {}).get(arch, {}).get(cls, []):
                    DENSE_ONLY.add(id(c))
                if t in (spill_varlen_dropout or {}).get(arch, {}).get(cls, []):
                    UNSHIPPED_VARLEN_DROPOUT.add(id(c))
                if t in (unshipped_varlen or {}).get(arch, {}).get(cls, []):
                    UNSHIPPED_VARLEN.add(id(c))
    out["interpreter"] = one_config_table(interpreter, **fixed)
    return out


def takes_dropout(table_for_arch, head_dim: int) -> bool:
    """Whether some config of head_dim's class in one arch's table takes DROPOUT."""
    return any(not getattr(c, "no_dropout", False) for c in table_for_arch[head_dim_class(head_dim)])


FWD_CONFIGS = _build(_FWD, (*_INTERPRETER, False), _DROPOUT_SPILLS["fwd"], _SPILL_MODIFIED_FWD)
DKDV_CONFIGS = _build(
    _DKDV,
    (*_INTERPRETER, False),
    _DROPOUT_SPILLS["dkdv"],
    _SPILL_MODIFIED_DKDV,
    spill_varlen_dropout=_SPILL_VARLEN_DROPOUT_DKDV,
    ATOMIC_DQ=False,
)
DKDV_DQ_CONFIGS = _build(
    _DKDV_DQ,
    (*_INTERPRETER, False),
    _DROPOUT_SPILLS["dkdv_dq"],
    _SPILL_MODIFIED_DKDV_DQ,
    _SPILL_VARLEN_DKDV_DQ,
    ATOMIC_DQ=True,
)
DQ_CONFIGS = _build(_DQ, _INTERPRETER, unshipped_varlen=_SPILL_VARLEN_DQ)


def one_tile(head_dim: int, arch: int, table: str, configs: list) -> list:
    """configs (those a launch's pruner keeps, in order; table "fwd", "dkdv", "dkdv_dq" or "dq") as head_dim's cubins
    ship them: all, or for a head dim of ONE_TILE the first that does not spill there."""
    if head_dim not in ONE_TILE:
        return configs
    spills = ONE_TILE[head_dim].get(arch, {}).get(table, [])
    for c in configs:
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if tile + (c.kwargs.get("WARP_SPECIALIZE", False),) not in spills:
            return [c]
    return []


def head_dim_class(head_dim: int) -> str:
    for cls, dims in HEAD_DIM_CLASSES.items():
        if head_dim in dims:
            return cls
    raise ValueError(f"head_dim must be one of {sum(HEAD_DIM_CLASSES.values(), ())}, got {head_dim}")


def flat(table_for_arch) -> list:
    """Every config of one arch, the list an autotuner holds."""
    unique = {id(c): c for configs in table_for_arch.values() for c in configs}
    return list(unique.values())


def pruner(table_for_arch):
    """early_config_prune: keep the configs of the call's head-dim class, the warp-specialized ones only where the
    launch says its inputs can be read by TMA (TMA_ALIGNED), with DROPOUT those that take it, with score modifiers
    (SOFTCAP or ALIBI) only those that do not spill with them (PLAIN_ONLY), and when packed (VARLEN) only those that do
    not spill then (DENSE_ONLY)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        keep = table_for_arch[head_dim_class(args["HEAD_DIM"])]
        modified = args.get("SOFTCAP", False) or args.get("ALIBI", False)
        return [
            c
            for c in configs
            if any(c is k for k in keep)
            and (args.get("TMA_ALIGNED", False) or not c.kwargs.get("WARP_SPECIALIZE", False))
            and not (args.get("DROPOUT", False) and getattr(c, "no_dropout", False))
            and not (modified and id(c) in PLAIN_ONLY)
            and not (args.get("VARLEN", False) and id(c) in DENSE_ONLY)
        ]

    return prune
