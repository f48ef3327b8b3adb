"""GELU (tanh approximation, the model's MLP activation), forward + backward: fasttrain.ops.gelu against torch's
F.gelu(approximate="tanh") and torch.compile of it, with torch's exact (erf) GELU beside them for scale. On the CPU
fasttrain runs its C++ kernel; on a GPU it is torch's own kernel (the reference), so the rows there show no kernel of
ours, only that the op adds no cost. Inputs are the MLP's: (B*T, 4 * d_model) rows.
Memory-bound: the fewest bytes read x and write y, then read the gradient and x and write dx (5 passes), as GB/s
and % of the measured copy bandwidth.

    python -m fasttrain.benchmarks.bench_activation [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import gelu

# (rows, width): the bench_step CPU model's MLP (B8 x T256, d 256 -> 1024) and GPT-2 small's (B16 x T1024, 3072).
SHAPES = {"cuda": [(16384, 3072), (4096, 3072)], "cpu": [(2048, 1024), (8192, 3072)]}
QUICK = {"cuda": [(4096, 3072)], "cpu": [(2048, 1024)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def fwd_bwd(fn, x, dy):
    return lambda: torch.autograd.grad(fn(x), x, dy)


def check_correct(x, dy) -> float:
    """fasttrain's GELU and its gradient against float64 (x * sigmoid(2u)): the largest error relative to the
    largest value."""
    x64 = x.detach().double().requires_grad_()
    u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
    want = x64 * torch.sigmoid(2 * u)
    (want_grad,) = torch.autograd.grad(want, x64, dy.double())
    got = gelu(x, approximate="tanh")
    (grad,) = torch.autograd.grad(got, x, dy)
    return common.relative_error([(got, want), (grad, want_grad)], "gelu", 1e-2 if x.dtype == torch.bfloat16 else 1e-5)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    copy_gbs = common.announce_copy_bandwidth(device)
    rows = []
    for M, N in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        x = (2 * torch.randn(M, N, generator=g, device=device)).to(dtype).requires_grad_()
        dy = torch.randn(M, N, generator=g, device=device).to(dtype)
        rel_err = check_correct(x, dy)
        tanh = lambda t: F.gelu(t, approximate="tanh")  # noqa: E731
        impls = {
            "torch eager": tanh,
            "fasttrain": lambda t: gelu(t, approximate="tanh"),
            "torch.compile": torch.compile(tanh),
            "torch eager, erf": F.gelu,
        }
        runs = {name: fwd_bwd(fn, x, dy) for name, fn in impls.items()}
        rows += common.memory_bound_rows(
            runs,
            device,
            5 * M * N * x.element_size(),
            copy_gbs,
            M=M,
            N=N,
            dtype=str(dtype).removeprefix("torch."),
            rel_err_vs_float64=rel_err,
        )
        print(f"M {M} N {N} done", flush=True)
    common.print_table(rows, ["M", "N", "dtype", "impl", "ms", "GB/s", "%copy", "x eager"])
    path = common.write_results("activation", device, rows, {"copy_GB/s": copy_gbs}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
