"""Host time of the aot paths (bench_overhead.AOT_OPS: the norms, rotary, cross-entropy) against torch's op (for rotary
the eager rotation) and the Triton path, interleaved, without a GPU: each round times torch's op, fasttrain's Triton
path with its launches skipped (bench_overhead.launches_skipped) and its aot path with its launches dropped
(bench_overhead.aot_launches_dropped), with and without the op's short path (fasttrain/ops/norms.py, rotary.py and
cross_entropy.py _aot_short: the public function straight to the C++ op), one after another, and keeps each one's
minimum over the rounds, which other tenants' load on a shared machine can only raise. Time is the calling thread's
CPU time (a CPU tensor's backward runs on the calling thread too), so a preempted interval does not count. One
intra-op thread: the ops are tiny.

    python tools/aot_host_ab.py [--rounds 25] [--calls 200] [--ops cross_entropy]   # us per call, fwd and fwd + bwd
"""

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before fasttrain's kernels: the Triton path takes CPU tensors

import torch  # noqa: E402

from fasttrain.benchmarks import bench_overhead  # noqa: E402
from fasttrain.ops import norms, rotary  # noqa: E402

# op -> the module whose _AOT_OP its public function's short path calls (None: the general path)
# (fasttrain.ops.cross_entropy is the public function: its module by name)
SHORT_PATH = {"layer_norm": norms, "add_layer_norm": norms, "rotary": rotary}
SHORT_PATH["cross_entropy"] = sys.modules["fasttrain.ops.cross_entropy"]


def per_call(run, calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        run()
    return (time.thread_time() - start) / calls * 1e6


def runner(fn, inputs, mode: str):
    if mode == "fwd+bwd":
        return bench_overhead.forward_backward(fn, inputs)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--ops", nargs="+", choices=bench_overhead.AOT_OPS, default=bench_overhead.AOT_OPS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = bench_overhead.cases("cpu")
    for name in args.ops:
        inputs, ours, theirs = cases[name]
        for mode in ("fwd", "fwd+bwd"):
            impls = ("torch", "triton, no launch", "aot without the short path, no launch", "aot, no launch")
            if name not in SHORT_PATH:
                impls = impls[:2] + impls[3:]
            best = dict.fromkeys(impls, float("inf"))
            for _ in range(args.rounds):
                best["torch"] = min(best["torch"], per_call(runner(theirs, inputs, mode), args.calls))
                with bench_overhead.launches_skipped():
                    us = per_call(runner(ours, inputs, mode), args.calls)
                best["triton, no launch"] = min(best["triton, no launch"], us)
                with bench_overhead.aot_launches_dropped("cpu", {torch.float32}):
                    if name in SHORT_PATH:
                        module = SHORT_PATH[name]
                        short, module._AOT_OP = module._AOT_OP, None
                        try:
                            us = per_call(runner(ours, inputs, mode), args.calls)
                        finally:
                            module._AOT_OP = short
                        best[impls[2]] = min(best[impls[2]], us)
                    us = per_call(runner(ours, inputs, mode), args.calls)
                best["aot, no launch"] = min(best["aot, no launch"], us)
            times = "  ".join(f"{impl} {us:.1f}" for impl, us in best.items())
            print(f"{name} {mode}: {times} us per call", flush=True)


if __name__ == "__main__":
    main()
