"""Compile a grid of attention tile configs for one arch ahead of time and print registers, stack and shared memory.

Picks candidates for kernels/_attention_configs.py without a GPU: a config that spills here spills on the GPU. The
compiles are those of tools/aot.py (the attention family's launch, kernels/_attention_launch.aot_launch, with the
tile swept). Run it under each Triton release the kernels support (3.6 to 3.8), e.g.

    TRITON_INTERPRET=0 python tools/aot_sweep.py --kernel dkdv --head-dim 128 > sweep.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import aot  # tools/aot.py, beside this file

from fasttrain.kernels import attention, attention_backward
from fasttrain.kernels._attention_launch import AOT_TYPES, aot_launch

KERNELS = {
    "fwd": attention._attn_fwd_kernel,
    "dkdv": attention_backward._attn_bwd_dkdv_kernel,
    "dq": attention_backward._attn_bwd_dq_kernel,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--arch", type=int, choices=sorted(aot.SHARED_LIMIT), default=90)
    parser.add_argument("--block-m", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--warp-specialize",
        type=int,
        nargs="+",
        choices=[0, 1],
        default=[0],
        help="fwd and dkdv: 1 compiles the TMA, warp-specialized loop (see launched_warps, setmaxnreg)",
    )
    parser.add_argument(
        "--atomic-dq",
        type=int,
        nargs="+",
        choices=[0, 1],
        default=[0],
        help="dkdv: 1 compiles the variant that adds dQ by float32 atomics",
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    import triton

    kernel = KERNELS[args.kernel]
    hints = aot.divisible(kernel)
    dtype = aot.DTYPE[args.arch]
    specialize = args.warp_specialize if "WARP_SPECIALIZE" in kernel.arg_names else [None]
    atomic = args.atomic_dq if "ATOMIC_DQ" in kernel.arg_names else [None]
    for bm, bn, warps, stages, ws, adq in itertools.product(
        args.block_m, args.block_n, args.warps, args.stages, specialize, atomic
    ):
        tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        if ws is not None:
            tile["WARP_SPECIALIZE"] = bool(ws)
        if adq is not None:
            tile["ATOMIC_DQ"] = bool(adq)
        row = {
            "triton": triton.__version__,
            "kernel": args.kernel,
            "head_dim": args.head_dim,
            "arch": args.arch,
            "config": [bm, bn, warps, stages] + ([] if ws is None else [bool(ws)]),
        }
        if adq is not None:
            row["atomic_dq"] = bool(adq)
        try:
            signature, constexprs = aot.signature(
                kernel, AOT_TYPES, {**aot_launch(args.head_dim, dtype), **tile}, dtype
            )
            row.update(aot.compile_one(kernel, signature, constexprs, args.arch, warps, stages, hints))
        except Exception as e:  # one row per config, whatever happens to the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
