"""scaled_dot_product_attention with an attn_mask: fasttrain (the mask recognized and run on the kernels, as a band or
as varlen launches over gathered rows) against torch's SDPA with the same mask, forward and forward + backward.

    python -m fasttrain.benchmarks.bench_attention_masks [--quick] [--device cuda|cpu]

Masks, each (B, 1, T, T) bool: `causal` (a band), `right-padded causal` and `left-padded causal` (lengths T, 0.7 T,
0.33 T, 0.9 T repeating over the batch), `key padding` (B, 1, 1, T), `documents` (four causal documents per row, at
different cuts in each row). Rows: `fasttrain` (its SDPA with the mask, the plan read once and kept, as a model's
layers after the first), `fasttrain, first read` (the plan read again at every call: what the first layer pays),
`sdpa` (torch's default choice for a masked call: EFFICIENT on CUDA, the math or flash CPU kernel on the CPU),
`sdpa efficient` on CUDA. GPU: bf16, B 8 x T 2048, H 16 x D 128; CPU: fp32, B 4 x T 512, H 8 x D 64. Each
provider's output and gradients are checked against torch's SDPA in float64 (relative to the largest magnitude)
before it is timed; one that is off is not timed and the run exits 1 after writing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import attention_masks, scaled_dot_product_attention

CHECK_RTOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


def masks(B: int, T: int, device) -> dict:
    """name -> (B, 1, T, T) or (B, 1, 1, T) bool mask."""
    fractions = torch.tensor([1.0, 0.7, 0.33, 0.9])
    lengths = (fractions.repeat(-(-B // 4))[:B] * T).long().clamp(min=1)
    pos = torch.arange(T)
    right = pos[None] < lengths[:, None]  # (B, T)
    left = pos[None] >= T - lengths[:, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    docs = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        cuts = [0, *sorted(((torch.tensor([0.2, 0.45, 0.8]) + 0.03 * b) * T).long().tolist()), T]
        for s, e in zip(cuts, cuts[1:]):
            docs[b, 0, s:e, s:e] = causal[: e - s, : e - s]
    found = {
        "causal": causal[None, None].expand(B, 1, T, T),
        "right-padded causal": (right[:, None, :] & causal)[:, None],
        "left-padded causal": (left[:, None, :] & causal)[:, None],
        "key padding": right[:, None, None, :],
        "documents": docs,
    }
    return {name: m.contiguous().to(device) for name, m in found.items()}


def providers(device: str) -> dict:
    def fasttrain(q, k, v, mask):
        return scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def first_read(q, k, v, mask):
        attention_masks._last[0] = None  # the kept plan dropped: the mask is read again
        return scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdpa(backend=None):
        def run(q, k, v, mask):
            ctx = torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
            with ctx:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return run

    found = {"fasttrain": fasttrain, "fasttrain, first read": first_read, "sdpa": sdpa()}
    if device == "cuda":
        found["sdpa efficient"] = sdpa(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION)
    return found


def _rel_err(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def bench_mask(name, mask, q, k, v, dout, device, dtype) -> list[dict]:
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
    want = (want_out.detach(), *torch.autograd.grad(want_out, leaves, dout.double()))
    rows = []
    B, H, T, D = q.shape
    for provider, fn in providers(device).items():
        row = {"mask": name, "provider": provider, "B": B, "T": T, "H": H, "D": D, "dtype": str(dtype)[6:]}
        try:
            out = fn(q, k, v, mask)
        except RuntimeError as e:  # an SDPA backend that refuses this mask or dtype here
            rows.append(row | {"skipped": str(e).splitlines()[0][:120]})
            continue
        got = (out, *torch.autograd.grad(out, (q, k, v), dout))
        row["max_rel_err"] = max(round(_rel_err(a, b), 6) for a, b in zip(got, want))
        del got, out
        if not row["max_rel_err"] <= CHECK_RTOL[dtype]:  # NaN too
            rows.append(row | {"skipped": f"wrong result: {row['max_rel_err']} (allowed {CHECK_RTOL[dtype]})"})
            continue
        row["fwd_ms"] = common.time_ms(lambda fn=fn: fn(q, k, v, mask), device)
        row["fwd+bwd_ms"] = common.time_ms(
            lambda fn=fn: torch.autograd.grad(fn(q, k, v, mask), (q, k, v), dout), device
        )
        rows.append(row)
    sdpa = next((r for r in rows if r["provider"] == "sdpa" and "fwd_ms" in r), None)
    for r in rows:
        if sdpa is not None and "fwd_ms" in r:
            r["fwd_x_sdpa"] = sdpa["fwd_ms"] / r["fwd_ms"]
            r["fwd+bwd_x_sdpa"] = sdpa["fwd+bwd_ms"] / r["fwd+bwd_ms"]
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    if device == "cuda":
        (B, T, H, D), dtype = ((4, 1024, 16, 128) if args.quick else (8, 2048, 16, 128)), torch.bfloat16
    else:
        (B, T, H, D), dtype = ((2, 128, 4, 64) if args.quick else (4, 512, 8, 64)), torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype)
    rows = []
    for name, mask in masks(B, T, device).items():
        rows += bench_mask(name, mask, q, k, v, dout, device, dtype)
    cols = ["mask", "provider", "max_rel_err", "fwd_ms", "fwd+bwd_ms", "fwd_x_sdpa", "fwd+bwd_x_sdpa"]
    print(f"SDPA with a mask, {common.device_name(device)}, B {B} x T {T} x H {H} x D {D}, {str(dtype)[6:]}")
    common.print_table(rows, cols + ["skipped"])
    print("wrote", common.write_results("attention_masks", device, rows, {}, args.out, args.quick))
    wrong = [f"{r['provider']} {r['mask']}" for r in rows if r.get("skipped", "").startswith("wrong")]
    if wrong:
        raise SystemExit(f"wrong results, not timed: {wrong}")


if __name__ == "__main__":
    main()
