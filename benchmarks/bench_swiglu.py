"""The gated MLP's activation, forward + backward: fasttrain.ops.swiglu (silu(gate) * up) and geglu
(gelu_tanh(gate) * up) against torch eager (F.silu(gate) * up, as transformers' Llama MLP writes it) and torch.compile
of it. Inputs are the MLP's: (B*T, intermediate) rows, gate and up of one shape.
Memory-bound: the fewest bytes read gate and up and write out, then read the gradient, gate and up and write both
gradients (8 passes), as GB/s and % of the measured copy bandwidth.

    python -m fasttrain.benchmarks.bench_swiglu [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import geglu, swiglu

# (rows, width): Llama-7B's MLP (B4 x T2048, 11008) and Llama 3.2 1B's (8192); the CPU's a bench_hf_step MLP.
SHAPES = {"cuda": [(8192, 11008), (16384, 8192)], "cpu": [(2048, 688), (4096, 2048)]}
QUICK = {"cuda": [(8192, 11008)], "cpu": [(2048, 688)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
TORCH = {"swiglu": lambda g, u: F.silu(g) * u, "geglu": lambda g, u: F.gelu(g, approximate="tanh") * u}
OURS = {"swiglu": swiglu, "geglu": geglu}


def fwd_bwd(fn, gate, up, dy):
    return lambda: torch.autograd.grad(fn(gate, up), (gate, up), dy)


def check_correct(op, gate, up, dy) -> float:
    """fasttrain's result and both gradients against torch's in float64: the largest error relative to the largest
    value."""
    g64, u64 = (t.detach().double().requires_grad_() for t in (gate, up))
    want = TORCH[op](g64, u64)
    got = OURS[op](gate, up)
    pairs = [
        (got, want),
        *zip(torch.autograd.grad(got, (gate, up), dy), torch.autograd.grad(want, (g64, u64), dy.double())),
    ]
    return common.relative_error(pairs, op, 1e-2 if gate.dtype == torch.bfloat16 else 1e-5)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    copy_gbs = common.announce_copy_bandwidth(device)
    rows = []
    for M, N in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        gate = (2 * torch.randn(M, N, generator=g, device=device)).to(dtype).requires_grad_()
        up = torch.randn(M, N, generator=g, device=device).to(dtype).requires_grad_()
        dy = torch.randn(M, N, generator=g, device=device).to(dtype)
        for op in ("swiglu", "geglu"):
            rel_err = check_correct(op, gate, up, dy)
            impls = {"torch eager": TORCH[op], "fasttrain": OURS[op], "torch.compile": torch.compile(TORCH[op])}
            runs = {name: fwd_bwd(fn, gate, up, dy) for name, fn in impls.items()}
            rows += common.memory_bound_rows(
                runs,
                device,
                8 * M * N * gate.element_size(),
                copy_gbs,
                op=op,
                M=M,
                N=N,
                dtype=str(dtype).removeprefix("torch."),
                rel_err_vs_float64=rel_err,
            )
        print(f"M {M} N {N} done", flush=True)
    common.print_table(rows, ["op", "M", "N", "dtype", "impl", "ms", "GB/s", "%copy", "x eager"])
    path = common.write_results("swiglu", device, rows, {"copy_GB/s": copy_gbs}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
