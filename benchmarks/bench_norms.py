"""LayerNorm and RMSNorm forward + backward over (M, N) rows: fasttrain vs torch eager (F.layer_norm / F.rms_norm)
and torch.compile of the same (CUDA), in the training step's situation: an fp32 residual stream under bf16 autocast
on CUDA (the output is bf16 for fasttrain, fp32 for torch), plain fp32 on CPU.
Memory-bound: the fewest bytes are the forward's x read and y write, then the backward's x and dy reads and dx write
(weight and statistics are under 0.1% at these shapes), reported as GB/s and % of the measured copy bandwidth.

    python benchmarks/bench_norms.py [--device cpu|cuda] [--quick] [--out DIR]
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fasttrain.ops import layer_norm, rms_norm  # noqa: E402

# (M rows = batch x tokens, N): GPT-2 small's B16 x T1024 x 768, GPT-2 XL's 1600, Llama-7B's 4096.
SHAPES = {"cuda": [(16384, 768), (16384, 1600), (8192, 4096)], "cpu": [(2048, 768), (1024, 4096)]}
QUICK = {"cuda": [(16384, 768)], "cpu": [(2048, 768)]}
TORCH = {"layer_norm": F.layer_norm, "rms_norm": F.rms_norm}
OURS = {"layer_norm": layer_norm, "rms_norm": rms_norm}


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def call(fn, kind: str, x, w, b):
    return fn(x, x.shape[-1:], w, b, 1e-5) if kind == "layer_norm" else fn(x, x.shape[-1:], w, 1e-5)


def fwd_bwd(fn, kind: str, x, w, b, device: str):
    leaves = (x, w) if kind == "rms_norm" else (x, w, b)

    def run():
        with autocast(device):
            y = call(fn, kind, x, w, b)
        # An upstream gradient in y's dtype, as the next Linear hands back.
        return torch.autograd.grad(y, leaves, torch.ones_like(y))
    return run


def check_correct(kind: str, x, w, b, device: str) -> float:
    """fasttrain's output and gradients against torch in float64: the largest error relative to the largest value."""
    leaves = (x, w) if kind == "rms_norm" else (x, w, b)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = call(TORCH[kind], kind, *leaves64, *([None] if kind == "rms_norm" else []))
    upstream = torch.randn_like(want)
    with autocast(device):
        got = call(OURS[kind], kind, x, w, b)
    grads = torch.autograd.grad(got, leaves, upstream.to(got.dtype))
    want_grads = torch.autograd.grad(want, leaves64, upstream)
    err = max(((a.double() - r).abs().max() / r.abs().max()).item()
              for a, r in zip((got, *grads), (want, *want_grads)))
    bound = 1e-2 if got.dtype == torch.bfloat16 else 1e-4  # bf16 outputs round to 8 bits of mantissa
    if not err < bound:
        raise AssertionError(f"fasttrain {kind} differs from torch float64 by {err:.3g} (bound {bound})")
    return err


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    copy_gbs = common.announce_copy_bandwidth(device)
    rows = []
    for M, N in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, N, generator=g, device=device).requires_grad_()  # the fp32 residual stream
        w = (1 + 0.5 * torch.randn(N, generator=g, device=device)).requires_grad_()
        b = (0.5 * torch.randn(N, generator=g, device=device)).requires_grad_()
        for kind in ("layer_norm", "rms_norm"):
            rel_err = check_correct(kind, x, w, b, device)
            impls = {"torch eager": TORCH[kind], "fasttrain": OURS[kind]}
            if device == "cuda":
                impls["torch.compile"] = torch.compile(TORCH[kind])
            runs = {name: fwd_bwd(fn, kind, x, w, b, device) for name, fn in impls.items()}
            for run in runs.values():
                run()  # compiles and warms up outside the timed region
            times = common.time_interleaved_ms(runs, device)
            out_bytes = 2 if device == "cuda" else 4  # fasttrain's output; torch's is fp32 (more bytes, same count)
            min_bytes = M * N * (4 + out_bytes + 4 + out_bytes + 4)
            for name, ms in times.items():
                gbs = min_bytes / (ms * 1e-3) / 1e9
                rows.append({"op": kind, "M": M, "N": N, "impl": name, "ms": ms, "GB/s": gbs,
                             "%copy": 100 * gbs / copy_gbs, "x eager": times["torch eager"] / ms,
                             "rel_err_vs_float64": rel_err})
        print(f"M {M} x N {N} done", flush=True)
    common.print_table(rows, ["op", "M", "N", "impl", "ms", "GB/s", "%copy", "x eager"])
    path = common.write_results("norms", device, rows, {"copy_GB/s": copy_gbs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
