"""Attention forward, backward and forward+backward TFLOP/s: fasttrain's kernels against eager PyTorch
(matmul-softmax-matmul, the reference in fasttrain.ops.attention_reference), SDPA's backends, and flash-attn when it
is installed. On a GPU: the Triton kernels against SDPA's FLASH, CUDNN and EFFICIENT, bf16, B*T = 16k tokens,
H*D = 2048, T = 512..16384, head_dim 64 and 128, causal and not. On the CPU: the C++ kernel against SDPA's FLASH
(torch's own CPU flash kernel), fp32, B*T = 2048 tokens, H*D = 512, T 128 (the main job's), 256 and 1024, head_dim
64. A row `fasttrain_dropout` times the same kernels with attention dropout 0.1 (its vs_plain_* columns: its time over
the plain kernel's). Before a provider is timed, its output and its gradients are checked against the fp32 reference
on four heads, two of the first sequence and two of the last (the whole shape's fp32 scores would not fit at
T = 16384), the dropout row against the reference's dropout of the same seed on one sequence of at most 256 tokens;
one that is off is not timed, and the run exits 1 after writing what it measured.

    python -m fasttrain.benchmarks.bench_attention [--quick] [--seqlens T ...] [--device cuda|cpu]
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.ops import flash_attn_func
from fasttrain.ops.attention_reference import UNBOUNDED, attention_reference

TOKENS, HIDDEN = 16384, 2048
TOKENS_CPU, HIDDEN_CPU, HEAD_DIM_CPU = 2048, 512, 64
# Largest error allowed against the fp32 reference, relative to the reference's largest magnitude (at least 1): a bf16
# kernel rounds its output and gradients once (2**-8 relative) and sums in fp32. The eager reference in bf16 (scores
# rounded too, worse than any fused kernel) stays under a fifth of it on out, dq, dk, dv at T 2048 and 8192, causal
# or not, d128; a wrong mask, scale or tile misses by O(1).
CHECK_RTOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4}
EAGER_MAX_SCORE_BYTES = 8 << 30  # eager materialises (B, H, T, T) scores several times over; skip beyond this
DROPOUT_P = 0.1  # GPT-2's attn_pdrop


def flops(mode: str, B: int, H: int, T: int, D: int, causal: bool) -> float:
    """docs/benchmarks.md: forward 4*B*H*T*T*D, halved when causal; backward 2.5x the forward."""
    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):  # (B, T, H, D) in and out; SDPA gets (B, H, T, D) views
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    return run


def providers(device: str) -> dict:
    kernel = "triton" if device == "cuda" else "cpu"
    found = {
        "fasttrain": lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal, backend=kernel),
        "fasttrain_dropout": lambda q, k, v, causal: flash_attn_func(
            q, k, v, dropout_p=DROPOUT_P, causal=causal, backend=kernel
        ),
        "eager": lambda q, k, v, causal: attention_reference(
            q, k, v, q.shape[-1] ** -0.5, UNBOUNDED, 0 if causal else UNBOUNDED
        )[0],
    }
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        found.update(
            {
                "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
                "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
                "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
            }
        )
        with contextlib.suppress(ImportError):
            import flash_attn

            found["flash_attn"] = lambda q, k, v, causal: flash_attn.flash_attn_func(q, k, v, causal=causal)
    else:
        from torch.nn.attention import SDPBackend

        found["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
    return found


def _checked_slice(t):
    """(1, T, 4, D): heads 0-1 of the first sequence and the last two of the last, where batch and head offsets are
    largest (heads are independent: no GQA here)."""
    return torch.cat([t[:1, :, :2], t[-1:, :, -2:]], dim=2)


def _reference(q, k, v, dout, causal):
    """fp32 out, dq, dk, dv on the checked slice."""
    q, k, v = (_checked_slice(t).detach().float().requires_grad_() for t in (q, k, v))
    out = attention_reference(q, k, v, q.shape[-1] ** -0.5, UNBOUNDED, 0 if causal else UNBOUNDED)[0]
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), _checked_slice(dout).float()))


def _rel_err(got, want) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _dropout_errors(fn, q, k, v, dout, causal) -> dict:
    """fn's out and gradients against the fp32 reference's with the same dropout seed (the mask depends on the
    sequence and head, so the check runs on a whole sequence: the first, cut to 256 tokens)."""
    q, k, v, dout = (t[:1, :256].detach() for t in (q, k, v, dout))
    reference = lambda q, k, v, c: flash_attn_func(q, k, v, DROPOUT_P, causal=c, backend="reference")  # noqa: E731
    found = []
    for call, dtype in ((fn, q.dtype), (reference, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        torch.manual_seed(0)  # the same dropout seed for both (on every device)
        out = call(*leaves, causal)
        found.append((out, *torch.autograd.grad(out, leaves, dout.to(dtype))))
    got, want = found
    return {what: round(_rel_err(a, b.float()), 6) for what, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def bench_shape(device, dtype, B, T, H, D, causal, modes) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype)
    rows, expected = [], _reference(q, k, v, dout, causal)
    common.take_tuning_timings()  # drop what an earlier shape's tuning left
    for name, fn in providers(device).items():
        row = {"provider": name, "B": B, "T": T, "H": H, "D": D, "causal": causal, "dtype": str(dtype)[6:]}
        if name == "eager" and B * H * T * T * 4 > EAGER_MAX_SCORE_BYTES:
            rows.append({**row, "skipped": "scores too large to materialise"})
            continue
        try:
            out = fn(q, k, v, causal)
        except RuntimeError as e:  # an SDPA backend that does not take this shape/dtype on this device
            rows.append({**row, "skipped": str(e).splitlines()[0][:120]})
            continue
        if name == "fasttrain_dropout":
            errors = _dropout_errors(fn, q, k, v, dout, causal)
        else:
            got = (out, *torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            errors = {
                what: round(_rel_err(_checked_slice(t), want), 6)
                for what, t, want in zip(("out", "dq", "dk", "dv"), got, expected)
            }
            del got
        row["max_rel_err"] = max(errors.values())
        if not row["max_rel_err"] <= CHECK_RTOL[dtype]:  # NaN too
            rows.append({**row, "skipped": f"wrong result: {errors} (allowed {CHECK_RTOL[dtype]})"})
            continue
        for mode in modes:
            if mode == "fwd":
                call = lambda fn=fn: fn(q, k, v, causal)
            elif mode == "bwd":
                call = lambda out=out: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            else:
                call = lambda fn=fn: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
            ms = common.time_ms(call, device)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = flops(mode, B, H, T, D, causal) / (ms * 1e-3) / 1e12
        if name.startswith("fasttrain"):  # every tile's time at this shape, as the autotuner saw it
            row["tuning_ms"] = common.take_tuning_timings()
        if name == "fasttrain_dropout" and "fwd_ms" in rows[0]:  # the plain kernel's row comes first
            for mode in modes:
                row[f"vs_plain_{mode}"] = round(row[f"{mode}_ms"] / rows[0][f"{mode}_ms"], 3)
        rows.append(row)
        del out
    return rows


def main() -> None:
    args = common.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument(
            "--seqlens",
            type=int,
            nargs="+",
            help="these T only (GPU default 512..16384, --quick 512 2048; CPU default 128 256 1024, --quick 256)",
        ),
    )
    modes = ["fwd", "bwd", "fwd+bwd"]
    if args.device == "cpu":
        tokens, seqlens = TOKENS_CPU, args.seqlens or ([256] if args.quick else [128, 256, 1024])
        head_dims, dtype = (HEAD_DIM_CPU,), torch.float32
        hidden, ceilings = HIDDEN_CPU, {"matmul_fp32_tflops": common.matmul_tflops(args.device)}
    else:
        tokens, seqlens = TOKENS, args.seqlens or ([512, 2048] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
        head_dims, dtype = (64, 128), torch.bfloat16
        hidden, ceilings = HIDDEN, {"matmul_bf16_tflops": common.matmul_tflops(args.device)}
    if any(T <= 0 or tokens % T for T in seqlens):
        raise SystemExit(f"--seqlens: each T must divide {tokens} (B * T = {tokens} tokens), got {seqlens}")
    shapes = [(tokens // T, T, hidden // D, D, causal) for D in head_dims for causal in (False, True) for T in seqlens]
    rows = []
    for B, T, H, D, causal in shapes:
        rows += bench_shape(args.device, dtype, B, T, H, D, causal, modes)
    cols = ["provider", "B", "T", "H", "D", "causal", "max_rel_err"] + [f"{m}_tflops" for m in modes]
    cols += [f"vs_plain_{m}" for m in modes]
    common.print_table(rows, cols + ["skipped"])
    print("ceilings:", ceilings)
    print("wrote", common.write_results("attention", args.device, rows, ceilings, args.out, args.quick))
    wrong = [f"{r['provider']} {r['B']}x{r['T']} d{r['D']}" for r in rows if r.get("skipped", "").startswith("wrong")]
    if wrong:
        raise SystemExit(f"wrong results, not timed: {wrong}")


if __name__ == "__main__":
    main()
