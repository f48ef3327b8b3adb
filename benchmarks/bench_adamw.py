"""AdamW step: fasttrain (fused kernel, and with fused clipping) vs torch.optim.AdamW foreach=False (eager),
foreach=True and fused=True, over a GPT-like mix of tensors. Memory-bound: 28 bytes per fp32 param per step (read
param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), reported as GB/s and % of measured copy bandwidth.
On CUDA a second ceiling beside copy's: AdamW's access pattern alone (four streams read, three written, one add per
written element) by a Triton kernel, `%streams` of it, which says how much of the gap to copy the pattern itself costs.

    python -m fasttrain.benchmarks.bench_adamw [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import gc

import torch
import triton
import triton.language as tl

from fasttrain.benchmarks import common
from fasttrain.kernels._launch import cdiv
from fasttrain.optim import AdamW

BYTES_PER_PARAM = 28  # fp32: 4 reads + 3 writes of 4 bytes
SIZES = {"cpu": [1 << 20, 4 << 20, 16 << 20, 64 << 20], "cuda": [1 << 20, 16 << 20, 128 << 20, 1 << 30]}
QUICK = {"cpu": [1 << 20], "cuda": [1 << 20, 16 << 20]}


STREAM_CONFIGS = [(1024, 4), (4096, 8), (8192, 16)]  # (BLOCK, num_warps): the fastest sets the ceiling


@triton.jit
def _seven_streams_kernel(P, G, M, V, n, BLOCK: tl.constexpr):
    """AdamW's traffic with none of its arithmetic: read p, g, m, v, write p + g, m + g, v + g (28 bytes/element)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask)
    tl.store(P + offs, tl.load(P + offs, mask=mask) + g, mask=mask)
    tl.store(M + offs, tl.load(M + offs, mask=mask) + g, mask=mask)
    tl.store(V + offs, tl.load(V + offs, mask=mask) + g, mask=mask)


def seven_streams(p, g, m, v, block: int = 1024, num_warps: int = 4) -> None:
    """p, m, v += g in one pass over four flat fp32 tensors of one size."""
    n = p.numel()
    _seven_streams_kernel[(cdiv(n, block),)](p, g, m, v, n, BLOCK=block, num_warps=num_warps)


def seven_stream_gbs(device: str, n: int) -> float | None:
    """GB/s of AdamW's access pattern over n fp32 elements (the fastest of STREAM_CONFIGS), or None off CUDA, where
    Triton would run in its interpreter."""
    if device != "cuda":
        return None
    p, g, m, v = (torch.randn(n, device=device) for _ in range(4))
    best = min(
        common.time_ms(lambda block=block, warps=warps: seven_streams(p, g, m, v, block, warps), device)
        for block, warps in STREAM_CONFIGS
    )
    return BYTES_PER_PARAM * n / (best * 1e-3) / 1e9


def gpt_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT with about n_params parameters: token embedding, then per layer two norms, qkv,
    attention out, MLP up (4x) and down, with biases; widths and depths like GPT-2 at the larger sizes."""
    vocab = 50304 if n_params >= 100e6 else 4096
    for d in (1536, 1024, 768, 512, 256, 128, 64):
        if vocab * d + 4 * 12 * d * d <= n_params:  # at least 4 layers
            break
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((n_params - vocab * d) / per_layer))
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def make_params(shapes, device):
    params = [torch.randn(s, device=device) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def variants(device: str) -> dict:
    """name -> factory(params) -> step function. Torch's are the baselines of docs/benchmarks.md."""
    backend = native_backend(device)
    return {
        "torch eager": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False).step,
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True).step,
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True).step,
        "fasttrain": lambda ps: AdamW(ps, lr=1e-3, backend=backend).step,
        "fasttrain +clip": lambda ps: AdamW(ps, lr=1e-3, max_grad_norm=1.0, backend=backend).step,
    }


def native_backend(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def check_correct(shapes, device: str) -> float:
    """Both timed fasttrain variants (the native backend, with and without clipping) against torch's AdamW (and
    clip_grad_norm_) over 3 steps with fresh grads and non-default betas and decay: a first step alone cannot tell
    moments or bias corrections apart (it is lr * g / |g| whatever the betas). The clip norm is set low enough to
    bite. Returns the largest max |diff| relative to max |param|."""
    hyper = dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    worst = 0.0
    for clip in (None, 1e-2):
        ours = make_params(shapes, device)
        ref = [p.detach().clone() for p in ours]
        opt = AdamW(ours, max_grad_norm=clip, backend=native_backend(device), **hyper)
        torch_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
        for _ in range(3):
            for p, q in zip(ours, ref):
                p.grad = torch.randn_like(p) * 1e-3
                q.grad = p.grad.clone()
            opt.step()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(ref, clip)
            torch_opt.step()
        err = max((p - q).abs().max().item() for p, q in zip(ours, ref))
        scale = max(q.abs().max().item() for q in ref)
        if not err <= 1e-6 * scale:  # NaN too
            raise AssertionError(
                f"fasttrain AdamW (max_grad_norm={clip}) differs from torch: {err:.3g} vs scale {scale:.3g}"
            )
        worst = max(worst, err / scale)
    return worst


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    copy_gbs = common.announce_copy_bandwidth(device)
    streams_gbs = seven_stream_gbs(device, max((QUICK if args.quick else SIZES)[device]))
    if streams_gbs is not None:
        print(f"AdamW's access pattern alone: {streams_gbs:.1f} GB/s, {100 * streams_gbs / copy_gbs:.1f}% of copy")
    rows = []
    for n_target in (QUICK if args.quick else SIZES)[device]:
        shapes = gpt_shapes(n_target)
        n = sum(torch.Size(s).numel() for s in shapes)
        rel_err = check_correct(shapes, device)
        params = make_params(shapes, device)
        steps = {name: factory(params) for name, factory in variants(device).items()}
        for step in steps.values():
            step()  # creates the state outside the timed region
        times = common.time_interleaved_ms(steps, device)
        for name, ms in times.items():
            gbs = BYTES_PER_PARAM * n / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "params": n,
                    "tensors": len(shapes),
                    "impl": name,
                    "ms": ms,
                    "GB/s": gbs,
                    "%copy": 100 * gbs / copy_gbs,
                    "%streams": streams_gbs and 100 * gbs / streams_gbs,
                    "x eager": times["torch eager"] / ms,
                    "x fused": times["torch fused"] / ms,
                    "rel_err_vs_torch": rel_err,
                }
            )
        del steps
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{n / 1e6:.1f}M params in {len(shapes)} tensors done", flush=True)
        del params
        gc.collect()
    common.print_table(
        rows,
        ["params", "tensors", "impl", "ms", "GB/s", "%copy"]
        + (["%streams"] if streams_gbs else [])
        + ["x eager", "x fused"],
    )
    path = common.write_results(
        "adamw", device, rows, {"copy_GB/s": copy_gbs, "seven_streams_GB/s": streams_gbs}, args.out, args.quick
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
