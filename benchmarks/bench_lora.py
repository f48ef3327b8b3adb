"""A LoRA linear layer, forward + backward, against the frozen base layer it rides on: fasttrain.finetune.LoRALinear
(both LoRA matmuls for every adapted span at once, the second accumulated into the base output by addmm) and PEFT's
eager formula `base(x) + lora_B(lora_A(dropout(x))) * scaling` (one Linear pair per span, added per span), beside the
base layer frozen (only dx) and trained (dx and dW: full fine-tuning). The rule: the LoRA branch (LoRA minus frozen
base) costs no more than the base matmul, i.e. `branch / base` <= 1. FLOPs: base forward 2 M K N, backward 2 M K N
for dx (+ 2 M K N for dW when trained); the branch 6 M r (K + n N_span) over forward and backward.

    python -m fasttrain.benchmarks.bench_lora [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain.benchmarks import common
from fasttrain.finetune import LoRALinear

# (M tokens, K in, N out, spans adapted, r): a square projection (o_proj) fully adapted, and a Llama-style fused
# q/k/v (GQA 4:1 here) with PEFT's default targets q and v.
SHAPES = {
    "cuda": [(8192, 4096, 4096, [(0, 4096)], 16), (8192, 4096, 6144, [(0, 4096), (5120, 6144)], 16)],
    "cpu": [(2048, 1024, 1024, [(0, 1024)], 16), (2048, 1024, 1536, [(0, 1024), (1280, 1536)], 16)],
}
QUICK = {"cuda": [(2048, 2048, 2048, [(0, 2048)], 16)], "cpu": [(256, 256, 384, [(0, 256), (320, 384)], 8)]}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


class PeftStyle(nn.Module):
    """PEFT's LoRA forward for a layer holding several target modules: one (A, B) Linear pair per span, each output
    added to its rows."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.base, self.spans, self.scaling = lora, lora.spans, lora.scaling

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        parts, row = [], 0
        for (start, stop), a, b in zip(self.spans, self.base.lora_A, self.base.lora_B):
            parts += [y[..., row:start], y[..., start:stop] + F.linear(F.linear(x, a), b) * self.scaling]
            row = stop
        return torch.cat([*parts, y[..., row:]], -1)


def bench_shape(device: str, dtype: torch.dtype, M: int, K: int, N: int, spans: list, r: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    base = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    lora = LoRALinear(base, spans, r, alpha=2.0 * r, dropout=0.0)
    with torch.no_grad():
        for b in lora.lora_B:
            b.copy_(torch.randn(b.shape, generator=g, device=device) * 0.02)
    x = torch.randn(M, K, generator=g, device=device).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g, device=device).to(dtype)
    peft = PeftStyle(lora)
    lora_params = [*lora.lora_A, *lora.lora_B]
    want = _reference(lora, x.detach().double())
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    rel_err = common.relative_error([(lora(x), want), (peft(x), want)], "LoRA linear", bound)
    trained = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    runs = {
        "base, frozen": lambda: torch.autograd.grad(base(x), [x], dy),
        "base, trained": lambda: torch.autograd.grad(trained(x), [x, trained.weight], dy),
        "LoRA fasttrain": lambda: torch.autograd.grad(lora(x), [x, *lora_params], dy),
        "LoRA PEFT-style": lambda: torch.autograd.grad(peft(x), [x, *lora_params], dy),
    }
    for fn in runs.values():
        fn()
    ms = common.time_interleaved_ms(runs, device)
    rows = []
    for name, t in ms.items():
        row = dict(M=M, K=K, N=N, r=r, spans=len(spans), dtype=str(dtype).removeprefix("torch."), impl=name)
        row.update(ms=round(t, 4), rel_err_vs_float64=rel_err)
        if name.startswith("LoRA"):
            row["branch/base"] = round((t - ms["base, frozen"]) / ms["base, frozen"], 3)
        rows.append(row)
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    rows = []
    for M, K, N, spans, r in (QUICK if args.quick else SHAPES)[device]:
        rows += bench_shape(device, dtype, M, K, N, spans, r)
        print(f"M {M} K {K} N {N} r {r} done", flush=True)
    common.print_table(rows, ["M", "K", "N", "r", "spans", "dtype", "impl", "ms", "branch/base"])
    path = common.write_results("lora", device, rows, {}, args.out, args.quick)
    print(f"wrote {path}")


def _reference(lora: LoRALinear, x64: torch.Tensor) -> torch.Tensor:
    """y = x W^T + scaling B_i A_i x on each span's rows, in float64."""
    w = lora.weight.double().clone()
    for (start, stop), a, b in zip(lora.spans, lora.lora_A, lora.lora_B):
        w[start:stop] += lora.scaling * (b.double() @ a.double())
    return x64 @ w.T


if __name__ == "__main__":
    main()
