"""One attention forward and backward per provider inside an NVTX range, so that Nsight Compute profiles those kernels
alone: fasttrain's (autotuned before the range, so that only the tiles it picked run inside), SDPA's cuDNN and FLASH,
at bench_attention's d128 shape B 4 x T 4096 x 16 heads, causal, bf16. tools/gpu_check.sh's stage `ncu` runs it as

    ncu --clock-control none --nvtx --nvtx-include "profiled/" --section ... python tools/ncu_attention.py

and exports the counters as CSV. On a CPU (TRITON_INTERPRET=1) it runs fasttrain alone at a small shape, unprofiled:
its own check, by a test.
Why: on the H200 the forward ran 0.72-0.80x SDPA cuDNN at d128, T >= 2048 (target 0.9x) and the backward 0.98-1.03x
FLASH (benchmarks/NOTES.md, Attention). Timings say by how much; the counters beside cuDNN's say what limits it: the
tensor pipe's active share (wgmma), issue stalls between the matmuls (the softmax), shared memory and DRAM traffic.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

RANGE = "profiled"  # the NVTX range ncu's --nvtx-include selects


def providers(device: str) -> dict:
    """name -> fn(q, k, v) in flash-attn's (B, T, H, D) layout, causal."""
    from fasttrain.ops import flash_attn_func

    found = {"fasttrain": lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend="triton")}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(backend):
            def run(q, k, v):
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
                return out.transpose(1, 2)  # (B, T, H, D)

            return run

        found.update(sdpa_cudnn=sdpa(SDPBackend.CUDNN_ATTENTION), sdpa_flash=sdpa(SDPBackend.FLASH_ATTENTION))
    return found


def forward_backward(fn, q, k, v, dout) -> None:
    torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    B, T, H, D = (4, 4096, 16, 128) if args.device == "cuda" else (1, 97, 2, 64)
    g = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (
        torch.randn(B, T, H, D, generator=g, device=args.device, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    dout = torch.randn(B, T, H, D, generator=g, device=args.device, dtype=torch.bfloat16)
    found = providers(args.device)
    for fn in found.values():  # compiles and autotunes outside the range
        forward_backward(fn, q, k, v, dout)
    profiled = torch.cuda.nvtx.range(RANGE) if args.device == "cuda" else contextlib.nullcontext()
    with profiled:
        for name, fn in found.items():
            forward_backward(fn, q, k, v, dout)
            print(f"{name}: forward and backward ran in the range", flush=True)
    from fasttrain.kernels import attention, attention_backward

    tuners = {
        "forward": attention._attn_fwd,
        "dK/dV": attention_backward._attn_bwd_dkdv,
        "dK/dV with dQ by atomics": attention_backward._attn_bwd_dkdv_dq,
        "dQ": attention_backward._attn_bwd_dq,
    }
    for what, tuner in tuners.items():  # the tiles the counters describe; None: the backward's plan skipped that one
        best = getattr(tuner, "best_config", None)
        print(f"fasttrain {what} tile: {best and (best.kwargs, best.num_warps, best.num_stages)}")


if __name__ == "__main__":
    main()
