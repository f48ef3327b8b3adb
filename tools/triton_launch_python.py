"""Host time of Triton's own Python per launch, without a GPU: JITFunction.run (binder, cache key, launch metadata)
with the driver mocked, the kernel compiled ahead of time for sm_90 and its C launcher replaced by a no-op.

    TRITON_INTERPRET=0 python tools/triton_launch_python.py [--calls 5000]
    TRITON_INTERPRET=0 PYTHONPATH=/tmp/t36 python tools/triton_launch_python.py   # another triton, e.g. 3.6.0

What it leaves out is the C launcher: its argument parsing and the driver calls it makes per launch
(cuCtxGetCurrent, cuPointerGetAttribute per pointer argument, cuLaunchKernelEx), which bench_overhead.py times on
a card. The kernel is the norm forward, 14 runtime arguments (8 pointers) and 7 constexprs, as the model launches it.
"""

import argparse
import os
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton: the decorators must build compilable kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _NoGpu:
    """What JITFunction.run asks of the active driver."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    driver.set_active(_NoGpu())
    from fasttrain.kernels import norms

    M, N = 16, 768
    x, w, b = torch.randn(M, N), torch.randn(N), torch.randn(N)
    y, s, mean, rstd = torch.empty(M, N), torch.empty(0), torch.empty(M), torch.empty(M)
    block, warps = norms.block_and_warps(N, backward=False)
    block_m = norms.rows_per_block(x, block)
    launch_args = (x, None, w, b, y, s, mean, rstd, x.stride(0), 0, y.stride(0), M, N, 1e-5)
    constexprs = dict(
        IS_RMS=False,
        HAS_RESIDUAL=False,
        HAS_WEIGHT=True,
        HAS_BIAS=True,
        BLOCK_M=block_m,
        BLOCK_N=block,
        num_warps=warps,
    )
    grid = (-(-M // block_m),)
    kernel = norms._norm_forward_kernel
    compiled = kernel.warmup(*launch_args, grid=grid, **constexprs)  # compiles (ptxas), launches nothing
    compiled.module, compiled.function = object(), 0  # handles "loaded": _init_handles returns at once
    compiled._run = lambda *a: None  # the C launcher

    def launch():
        kernel[grid](*launch_args, **constexprs)

    for _ in range(100):
        launch()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.calls):
            launch()
        times.append((time.perf_counter() - start) / args.calls * 1e6)
    print(
        f"triton {triton.__version__}: {sorted(times)[2]:.1f} us per launch (median of 5 x {args.calls}), "
        f"norm forward, Python only"
    )


if __name__ == "__main__":
    main()
