"""Rotary embedding of q and k, forward + backward: fasttrain vs the eager PyTorch rotation (fp32 halves, products, a
cat, a cast back: fasttrain.ops.rotary.apply_rotary_emb_reference, which the model used before) and torch.compile of
it (CUDA). Inputs are the model's: q and k as strided views of one fused qkv projection, fp32 tables.
Memory-bound: the fewest bytes read q and k and write the rotated copies, then read and write their gradients
(4 passes over q and k; the tables, one row per token, are left out), as GB/s and % of the measured copy bandwidth.

    python -m fasttrain.benchmarks.bench_rotary [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import torch

from fasttrain.benchmarks import common
from fasttrain.model.rotary import rotary_tables
from fasttrain.ops import apply_rotary_emb
from fasttrain.ops.rotary import apply_rotary_emb_reference

# (B, T, H, Hkv, D): GPT-2 small's step (B16 x T1024, 12 heads of 64), Llama-3-8B's (GQA 32/8, d128); on the CPU
# the main job's step (B16 x T128, 4 heads of 32) first.
SHAPES = {
    "cuda": [(16, 1024, 12, 12, 64), (4, 4096, 32, 8, 128)],
    "cpu": [(16, 128, 4, 4, 32), (4, 256, 4, 4, 64), (2, 512, 8, 2, 128)],
}
QUICK = {"cuda": [(16, 1024, 12, 12, 64)], "cpu": [(4, 256, 4, 4, 64)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def fwd_bwd(fn, qkv, H, Hkv, cos, sin):
    def run():
        q, k, _ = qkv.split([H, Hkv, Hkv], dim=2)  # (B, T, H|Hkv, D) views
        rq, rk = fn(q, cos, sin), fn(k, cos, sin)
        return torch.autograd.grad((rq, rk), qkv, (torch.ones_like(rq), torch.ones_like(rk)))

    return run


def check_correct(qkv, H, cos, sin) -> float:
    """fasttrain's rotation of q and its gradient against float64: the largest error relative to the largest value."""
    q = qkv[:, :, :H]
    q64 = q.detach().double().requires_grad_()
    want = apply_rotary_emb_reference(q64, cos.double(), sin.double())
    got = apply_rotary_emb(q, cos, sin)
    upstream = torch.randn_like(want)
    (grad,) = torch.autograd.grad(got, qkv, upstream.to(got.dtype))
    (want_grad,) = torch.autograd.grad(want, q64, upstream)
    return common.relative_error(
        [(got, want), (grad[:, :, :H], want_grad)], "rotary", 1e-2 if got.dtype == torch.bfloat16 else 1e-5
    )


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    copy_gbs = common.announce_copy_bandwidth(device)
    rows = []
    for B, T, H, Hkv, D in (QUICK if args.quick else SHAPES)[device]:
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, T, H + 2 * Hkv, D, generator=g, device=device).to(dtype).requires_grad_()
        cos, sin = rotary_tables(T, D, device=device)
        rel_err = check_correct(qkv, H, cos, sin)
        impls = {"torch eager": apply_rotary_emb_reference, "fasttrain": apply_rotary_emb}
        if device == "cuda":
            impls["torch.compile"] = torch.compile(apply_rotary_emb_reference)
        runs = {name: fwd_bwd(fn, qkv, H, Hkv, cos, sin) for name, fn in impls.items()}
        min_bytes = 4 * B * T * (H + Hkv) * D * qkv.element_size()
        rows += common.memory_bound_rows(
            runs,
            device,
            min_bytes,
            copy_gbs,
            B=B,
            T=T,
            H=H,
            Hkv=Hkv,
            D=D,
            dtype=str(dtype).removeprefix("torch."),
            rel_err_vs_float64=rel_err,
        )
        print(f"B {B} T {T} H {H}/{Hkv} D {D} done", flush=True)
    common.print_table(rows, ["B", "T", "H", "Hkv", "D", "dtype", "impl", "ms", "GB/s", "%copy", "x eager"])
    path = common.write_results("rotary", device, rows, {"copy_GB/s": copy_gbs}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
