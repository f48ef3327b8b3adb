"""The loss alone, forward + backward (gradients of x and of the head's weight): fasttrain's fused linear
cross-entropy vs torch eager (`F.cross_entropy(F.linear(x, w).float(), t)`, which holds the (N, V) logits and their
fp32 copies), torch.compile of that pair, and Liger Kernel's LigerFusedLinearCrossEntropyLoss (CUDA only: its kernels
are Triton's). Compute-bound: 6 N V K FLOPs (the logits, dx and dW matmuls), reported as TFLOP/s and % of a measured
matmul; and the peak memory each one adds over its inputs (CUDA: the allocator's peak; CPU: the process's peak
resident memory, reset before each call through /proc/self/clear_refs after malloc_trim has handed back what earlier
calls freed).

    python -m fasttrain.benchmarks.bench_linear_cross_entropy [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import linear_cross_entropy

# (N rows = batch x tokens, K, V): Llama-2's and Llama-3's vocabularies at their widths; bf16 on CUDA, fp32 on CPU.
SHAPES = {
    "cuda": [(8192, 4096, 32000), (16384, 4096, 32000), (8192, 4096, 128256), (16384, 4096, 128256)],
    "cpu": [(4096, 768, 32768)],
}
QUICK = {"cuda": [(8192, 4096, 32000)], "cpu": [(512, 256, 8192)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
CHECK_ROWS = 256  # rows checked against float64 before timing (float64 matmuls of every row would dominate the run)


def eager(x, w, t):
    return F.cross_entropy(F.linear(x, w).float(), t)


def liger_loss():
    """Liger Kernel's fused linear cross-entropy as a function of (x, w, t), or why it cannot run here."""
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as e:
        return f"liger-kernel not installed ({e})"
    module = liger.LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: module(w, x, t)


def variants(device: str) -> dict:
    """name -> loss function of (x, weight, targets), or a string saying why it cannot run here."""
    out = {"torch eager": eager, "fasttrain": linear_cross_entropy, "torch.compile": torch.compile(eager)}
    out["liger"] = liger_loss() if device == "cuda" else "needs CUDA (Liger Kernel's kernels are Triton's)"
    return out


def fwd_bwd(loss_fn, x, w, t):
    def run():
        return torch.autograd.grad(loss_fn(x, w, t), (x, w))

    return run


def check_correct(x, w, t) -> float:
    """fasttrain's loss and gradients on the first CHECK_ROWS rows against torch's in float64."""
    x, t = x[:CHECK_ROWS].detach().requires_grad_(), t[:CHECK_ROWS]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(F.linear(x64, w64), t)
    got = linear_cross_entropy(x, w, t)
    pairs = [(got, want), *zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x64, w64)))]
    bound = 2e-2 if x.dtype == torch.bfloat16 else 1e-4  # bf16 logits and gradients keep 8 bits of mantissa
    return common.relative_error(pairs, "linear_cross_entropy", bound)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    tflops_ceiling = common.matmul_tflops(device, dtype=dtype)
    print(f"{common.device_name(device)}: matmul {tflops_ceiling:.3g} TFLOP/s")
    rows = []
    for N, K, V in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, K, generator=g, device=device).to(dtype).requires_grad_()
        w = (torch.randn(V, K, generator=g, device=device) * 3 / K**0.5).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g, device=device)
        rel_err = check_correct(x, w, t)
        fields = dict(N=N, K=K, V=V, dtype=str(dtype).removeprefix("torch."))
        runs, missing = {}, {}
        for name, fn in variants(device).items():
            if isinstance(fn, str):
                missing[name] = fn
            else:
                runs[name] = fwd_bwd(fn, x, w, t)
        for run in runs.values():
            run()  # compiles and warms up outside the timed region
        peaks = {name: common.peak_mb(run, device) for name, run in runs.items()}
        times = common.time_interleaved_ms(runs, device, rounds=3 if device == "cpu" else 5)
        for name, ms in times.items():
            tflops = 6 * N * V * K / (ms * 1e-3) / 1e12
            rows.append(
                {
                    **fields,
                    "impl": name,
                    "ms": ms,
                    "TFLOP/s": tflops,
                    "%matmul": 100 * tflops / tflops_ceiling,
                    "x eager": times["torch eager"] / ms,
                    "peak_MB": peaks[name],
                    "x eager mem": peaks[name] / peaks["torch eager"],
                    "rel_err_vs_float64": rel_err,
                }
            )
        rows += [{**fields, "impl": name, "note": why} for name, why in missing.items()]
        print(f"N {N} x K {K} x V {V} done", flush=True)
    columns = ["N", "K", "V", "dtype", "impl", "ms", "TFLOP/s", "%matmul", "x eager", "peak_MB", "x eager mem", "note"]
    common.print_table(rows, columns)
    path = common.write_results(
        "linear_cross_entropy", device, rows, {"matmul_TFLOP/s": tflops_ceiling}, args.out, args.quick
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
