"""LayerNorm and RMSNorm forward + backward over (M, N) rows, alone and with a pre-norm block's residual add fused
in: fasttrain vs torch eager (F.layer_norm / F.rms_norm, after `s = branch + x` for the fused forms) and
torch.compile of the same (CUDA), in the training step's situation: an fp32 residual stream x and a bf16 branch under
bf16 autocast on CUDA (the output is bf16 for fasttrain, fp32 for torch), plain fp32 on CPU.
Memory-bound: the fewest bytes are the forward's reads of x (and the branch) and writes of y (and s), then the
backward's reads of the normalized rows, dy (and the stream's gradient) and writes of the input gradients (weight and
statistics are under 0.1% at these shapes), reported as GB/s and % of the measured copy bandwidth.

    python -m fasttrain.benchmarks.bench_norms [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import add_layer_norm, add_rms_norm, layer_norm, rms_norm

# (M rows = batch x tokens, N): GPT-2 small's B16 x T1024 x 768, GPT-2 XL's 1600, Llama-7B's 4096.
SHAPES = {"cuda": [(16384, 768), (16384, 1600), (8192, 4096)], "cpu": [(2048, 768), (1024, 4096)]}
QUICK = {"cuda": [(16384, 768)], "cpu": [(2048, 768)]}
TORCH = {
    "layer_norm": F.layer_norm,
    "rms_norm": F.rms_norm,
    "add_layer_norm": common.eager_add_norm(F.layer_norm),
    "add_rms_norm": common.eager_add_norm(F.rms_norm),
}
OURS = {"layer_norm": layer_norm, "rms_norm": rms_norm, "add_layer_norm": add_layer_norm, "add_rms_norm": add_rms_norm}


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def leaf_names(kind: str) -> tuple:
    """The tensors a call of `kind` takes gradients for, in `call`'s order."""
    return ("branch",) * kind.startswith("add") + (("x", "w") if kind.endswith("rms_norm") else ("x", "w", "b"))


def call(fn, kind: str, branch, x, w, b) -> tuple:
    """The outputs of one call: (y,), or (y, s) for the fused add."""
    inputs = (branch, x) if kind.startswith("add") else (x,)
    params = (w, b) if kind.endswith("layer_norm") else (w,)
    out = fn(*inputs, x.shape[-1:], *params, 1e-5)
    return out if isinstance(out, tuple) else (out,)


def fwd_bwd(fn, kind: str, branch, x, w, b, device: str):
    leaves = [{"branch": branch, "x": x, "w": w, "b": b}[name] for name in leaf_names(kind)]

    def run():
        with autocast(device):
            outs = call(fn, kind, branch, x, w, b)
        # Upstream gradients in each output's dtype, as the next Linear (and the stream downstream) hand back.
        return torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    return run


def check_correct(kind: str, branch, x, w, b, device: str) -> float:
    """fasttrain's outputs and gradients against torch in float64: the largest error relative to the largest value."""
    given = {"branch": branch, "x": x, "w": w, "b": b}
    leaves = [given[name] for name in leaf_names(kind)]
    ref = {name: given[name].detach().double().requires_grad_() for name in leaf_names(kind)}
    leaves64 = list(ref.values())
    want = call(TORCH[kind], kind, ref.get("branch"), ref["x"], ref["w"], ref.get("b"))
    upstream = [torch.randn_like(t) for t in want]
    with autocast(device):
        got = call(OURS[kind], kind, branch, x, w, b)
    grads = torch.autograd.grad(got, leaves, [u.to(g.dtype) for u, g in zip(upstream, got)])
    want_grads = torch.autograd.grad(want, leaves64, upstream)
    bound = 1e-2 if device == "cuda" else 1e-4  # bf16 outputs and branch gradients round to 8 bits of mantissa
    return common.relative_error(zip((*got, *grads), (*want, *want_grads)), kind, bound)


def min_bytes(kind: str, M: int, N: int, device: str) -> int:
    """Bytes each element must move: x (fp32) read and y written; the fused add also reads the branch (bf16 on CUDA)
    and writes s (fp32); backward reads the normalized rows and dy (and s's gradient) and writes the gradients of x
    (and of the branch, in its own dtype on CUDA)."""
    half = 2 if device == "cuda" else 4  # fasttrain's output and the branch (torch's output is fp32: more bytes)
    if not kind.startswith("add"):
        return M * N * ((4 + half) + (4 + half + 4))
    return M * N * ((half + 4 + 4 + half) + (4 + half + 4 + 4 + (half if device == "cuda" else 0)))


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
        # The branch a block adds to the stream: bf16 out of a Linear under autocast on CUDA.
        branch = (
            torch.randn(M, N, generator=g, device=device)
            .to(torch.bfloat16 if device == "cuda" else torch.float32)
            .requires_grad_()
        )
        for kind in OURS:
            rel_err = check_correct(kind, branch, x, w, b, device)
            impls = {"torch eager": TORCH[kind], "fasttrain": OURS[kind]}
            if device == "cuda":
                impls["torch.compile"] = torch.compile(TORCH[kind])
            runs = {name: fwd_bwd(fn, kind, branch, x, w, b, device) for name, fn in impls.items()}
            rows += common.memory_bound_rows(
                runs, device, min_bytes(kind, M, N, device), copy_gbs, op=kind, M=M, N=N, rel_err_vs_float64=rel_err
            )
        print(f"M {M} x N {N} done", flush=True)
    common.print_table(rows, ["op", "M", "N", "impl", "ms", "GB/s", "%copy", "x eager"])
    path = common.write_results("norms", device, rows, {"copy_GB/s": copy_gbs}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
