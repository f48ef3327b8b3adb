"""Cross-entropy forward + backward over (N, V) logits: fasttrain vs torch eager (`F.cross_entropy(x.float())`, what
a careful script does under autocast), torch on the native dtype, and torch.compile of the eager form (CUDA).
Memory-bound: the fewest bytes are 3 N V s (read the logits in the forward and in the backward, write the
gradient), reported as GB/s and % of the measured copy bandwidth; on CUDA also the peak memory each one adds.

    python -m fasttrain.benchmarks.bench_cross_entropy [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import cross_entropy

# (N rows = batch x tokens, V): GPT-2's padded vocabulary, Llama-2's, Llama-3's; bf16 on CUDA, fp32 on CPU.
SHAPES = {"cuda": [(8192, 50304), (16384, 32000), (4096, 128256)], "cpu": [(256, 8192), (1024, 32000)]}
QUICK = {"cuda": [(1024, 32000)], "cpu": [(256, 8192)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def eager(x, t):
    return F.cross_entropy(x.float(), t)


def variants(device: str) -> dict:
    """name -> loss function of (logits, targets)."""
    out = {"torch eager": eager, "torch native dtype": F.cross_entropy, "fasttrain": cross_entropy}
    if device == "cuda":
        out["torch.compile"] = torch.compile(eager)
    return out


def fwd_bwd(loss_fn, x, t):
    def run():
        (grad,) = torch.autograd.grad(loss_fn(x, t), x)
        return grad

    return run


def check_correct(x, t) -> float:
    """fasttrain's loss and gradient against torch's in float64: the largest error relative to the largest value."""
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(x64, t)
    (want_grad,) = torch.autograd.grad(want, x64)
    got = cross_entropy(x, t)
    (grad,) = torch.autograd.grad(got, x)
    bound = 1e-2 if x.dtype == torch.bfloat16 else 1e-4  # bf16 gradients round to 8 bits of mantissa
    return common.relative_error([(got, want), (grad, want_grad)], "cross_entropy", bound)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    copy_gbs = common.announce_copy_bandwidth(device)
    rows = []
    for N, V in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        x = (3 * torch.randn(N, V, generator=g, device=device)).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g, device=device)
        rel_err = check_correct(x, t)
        runs = {name: fwd_bwd(fn, x, t) for name, fn in variants(device).items()}
        for run in runs.values():
            run()  # compiles and warms up outside the timed region
        peaks = {name: common.peak_mb(run, device) for name, run in runs.items()}
        for row in common.memory_bound_rows(
            runs, device, 3 * N * V * x.element_size(), copy_gbs, N=N, V=V, dtype=str(dtype).removeprefix("torch.")
        ):
            rows.append({**row, "peak_MB": peaks[row["impl"]], "rel_err_vs_float64": rel_err})
        print(f"N {N} x V {V} done", flush=True)
    common.print_table(rows, ["N", "V", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "peak_MB"])
    path = common.write_results("cross_entropy", device, rows, {"copy_GB/s": copy_gbs}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
