"""One full training step (forward, backward, optimizer) of the same GPT, five ways (six on CUDA), side by side.

    python -m fasttrain.benchmarks.bench_step            # CPU: a small shape in fp32; GPU: GPT-2 small in bf16
    python -m fasttrain.benchmarks.bench_step --quick    # smallest shape, no torch.compile row on CPU

Rows: `eager` (eager_gpt.EagerGPT, the same model as a stock PyTorch script writes it, with attention by SDPA's math
path and torch.optim.AdamW foreach), `eager-sdpa` (the same with SDPA's default backend, i.e. FlashAttention-2 on an
H100, and torch's fused AdamW), `compile` (torch.compile of eager-sdpa), `fasttrain` (fasttrain.model.GPT on
fasttrain.ops, their backends chosen as in training, FASTTRAIN_BACKEND included, + fasttrain.optim.AdamW),
`fasttrain+compile` (the same model under torch.compile: fasttrain's kernels stay opaque ops, inductor fuses what
lies between them) and, on CUDA, `fasttrain+graph` (fasttrain's whole step, forward, backward and AdamW, captured
once as a CUDA graph and replayed, as train.cuda_graph does). All start from the same weights, take the same
batch, and clip at global norm 1.0. Each variant's first step is checked against eager's before that variant is
timed: the loss, the gradient norm before clipping, and the change the optimizer made to the weights; one that
disagrees is not timed, and the run exits 1 after writing what it measured.
FLOPs per token: fasttrain.model.flops_per_token (6 per matmul weight + causal attention); MFU against the dense
datasheet peak, and the share of the matmul ceiling measured in this run. One more step per variant runs under
torch.profiler (common.profile_call): on CUDA, gpu_busy_ms is the time kernels ran, so step_ms - gpu_busy_ms is the
GPU waiting on the host, and the JSON keeps the kernels and host ops that took the most.
"""

from __future__ import annotations

import copy

import torch

from fasttrain.benchmarks import common
from fasttrain.benchmarks.eager_gpt import EagerGPT
from fasttrain.model import GPT, GPTConfig, flops_per_token
from fasttrain.optim import AdamW
from fasttrain.train.build import param_groups
from fasttrain.train.device import autocast_for, peak_flops
from fasttrain.train.graphed import GraphedStep

WEIGHT_DECAY, LR, CLIP = 0.1, 3e-4, 1.0


def shapes(device: str, quick: bool) -> tuple[GPTConfig, int, int]:
    """(model config, batch size, sequence length)."""
    if device == "cuda":
        # GPT-2 small; B 16 x T 1024 = 16k tokens per step fits every row (eager's T x T scores included) in 80 GB.
        cfg = GPTConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024)
        return (cfg, 4, 1024) if quick else (cfg, 16, 1024)
    if quick:
        return GPTConfig(n_layer=2, n_head=4, d_model=128, vocab_size=320, max_seq_len=128), 4, 128
    return GPTConfig(n_layer=4, n_head=4, d_model=256, vocab_size=320, max_seq_len=256), 8, 256


def make_variant(name: str, base: GPT, device: str):
    if name.startswith("fasttrain"):
        model = copy.deepcopy(base)
        opt = AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP)
        return model, torch.compile(model) if name.endswith("+compile") else model, opt, False
    model = EagerGPT(base.config, math_attention=name == "eager").to(device)
    model.load_state_dict(base.state_dict())  # strict: the same parameter names; their order too, checked here
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    fused = name != "eager" and device == "cuda"
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)
    step_model = torch.compile(model) if name == "compile" else model
    return model, step_model, opt, True


def make_step(model, step_model, opt, clip_outside: bool, x, y, device: str):
    if device == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = torch.autocast("cpu", enabled=False)  # fp32

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, gradient norm before clipping)."""
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) if clip_outside else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), opt.last_grad_norm if norm is None else norm

    return step


def graphed_step(model, opt, x, y):
    """fasttrain's step as one CUDA graph replay (fasttrain.train.graphed.GraphedStep, the trainer's
    train.cuda_graph): what the step costs without the host's launches, where those take longer than the kernels
    (benchmarks/NOTES.md). The capture's warm-up runs at lr 0, so the weights stay the ones every variant starts
    from."""
    graphed = GraphedStep(
        model, opt, 1, x.shape[0], x.shape[1], x.device, autocast_for("bf16", x.device, cache_enabled=False)
    )

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        return graphed.step([(x, y)], LR), opt.last_grad_norm

    return step


def variants(device: str, quick: bool) -> list[str]:
    """The rows in their order; the CUDA graph's last, where a capture the driver refuses costs no other row."""
    compiled = [] if device == "cpu" and quick else ["compile", "fasttrain+compile"]
    return ["eager", "eager-sdpa", "fasttrain", *compiled] + (["fasttrain+graph"] if device == "cuda" else [])


def first_step(model, step) -> dict:
    """The first step's loss, gradient norm and per-parameter change (also the compile warm-up). The change is kept
    in host memory: eager's stays for every later variant, and on the GPU it would count in their peak memory."""
    before = [p.detach().clone() for p in model.parameters()]
    loss, norm = step()
    return {
        "loss": loss.item(),
        "grad_norm": norm.item(),
        "deltas": [(p.detach() - b).cpu() for p, b in zip(model.parameters(), before)],
    }


def disagreement(got: dict, eager: dict, device: str) -> str | None:
    """Why a variant's first step is not eager's, or None. Same weights and batch: the loss and the norm agree to
    the dtype's precision; the update is compared on average, since the first Adam step is lr * sign(grad) and a
    gradient near 0 may flip sign between two correct kernels (bf16)."""
    tol = 2e-2 if device == "cuda" else 1e-4
    for key in ("loss", "grad_norm"):
        if not abs(got[key] - eager[key]) <= tol * abs(eager[key]):  # NaN too
            return f"{key} {got[key]:.6g}, eager's {eager[key]:.6g}"
    moved = sum(d.abs().sum().item() for d in eager["deltas"])
    off = sum((a - b).abs().sum().item() for a, b in zip(got["deltas"], eager["deltas"]))
    if not off <= (0.1 if device == "cuda" else 1e-3) * moved:  # one that did nothing is off by 1.0; NaN too
        return f"weight update off by {off / moved:.3g} of eager's (mean absolute)"
    return None


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device = args.device
    cfg, B, T = shapes(device, args.quick)
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    names = variants(device, args.quick)
    ceiling = common.matmul_tflops(device)
    peak = peak_flops(torch.device(device), "bf16")  # datasheet bf16 peak on CUDA, None on CPU
    flops = flops_per_token(cfg, T) * B * T
    rows, wrong, eager_step = [], [], None

    def measure(name, model, step, ms, first_loss):
        row = {
            "variant": name,
            "B": B,
            "T": T,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_ms": ms,
            "tokens_per_s": B * T / (ms * 1e-3),
            "TFLOP/s": flops / (ms * 1e-3) / 1e12,
            "first_loss": first_loss,
        }
        row["pct_matmul_ceiling"] = 100 * row["TFLOP/s"] / ceiling
        if peak is not None:
            row["mfu_pct"] = 100 * flops / (ms * 1e-3) / peak
        if device == "cuda":
            row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        profile = common.profile_call(step, device)
        if device == "cuda":
            # The GPU idles for step_ms - gpu_busy_ms: the host's launches, not the kernels, set that part.
            row["gpu_busy_ms"] = profile["gpu_busy_ms"]
        row["profile"] = profile
        rows.append(row)

    # On a GPU each variant is timed alone (its peak memory is its own); on the CPU all are kept and timed in
    # alternation, since a shared virtual machine's speed drifts within a run (NOTES.md, Training step).
    kept = {}

    def run_variant(name):
        nonlocal eager_step
        model, step_model, opt, clip_outside = make_variant(name, base, device)
        if name.endswith("+graph"):
            step = graphed_step(model, opt, x, y)
        else:
            step = make_step(model, step_model, opt, clip_outside, x, y, device)
        checked = first_step(model, step)
        eager_step = eager_step or checked
        if (why := disagreement(checked, eager_step, device)) is not None:
            rows.append({"variant": name, "B": B, "T": T, "skipped": f"wrong result: {why}"})
            wrong.append(name)
            return
        first_loss = checked["loss"]
        del checked  # eager's deltas stay, as eager_step
        if device != "cuda":
            kept[name] = (model, step, first_loss)
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        measure(name, model, step, common.time_ms(step, device), first_loss)
        del model, step_model, opt, step
        torch.cuda.empty_cache()

    for name in names:
        try:
            run_variant(name)
        except RuntimeError as e:  # CUDA's errors included (torch.AcceleratorError is one)
            if not name.endswith("+graph"):
                raise
            # a capture or replay the driver refuses costs this row, not the rows measured (written below)
            rows.append({"variant": name, "B": B, "T": T, "skipped": f"failed: {type(e).__name__}: {e}"[:300]})
            wrong.append(name)
    if kept:
        times = common.time_interleaved_ms({name: step for name, (_, step, _) in kept.items()}, device)
        for name, (model, step, first_loss) in kept.items():
            measure(name, model, step, times[name], first_loss)
    rows.sort(key=lambda r: names.index(r["variant"]))
    eager = next(r for r in rows if r["variant"] == "eager")
    for r in rows:
        if "tokens_per_s" in r:
            r["speedup_vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
    columns = (
        [
            "variant",
            "B",
            "T",
            "params_M",
            "step_ms",
            "tokens_per_s",
            "speedup_vs_eager",
            "TFLOP/s",
            "pct_matmul_ceiling",
        ]
        + (["mfu_pct"] if peak is not None else [])
        + (["peak_mem_GiB", "gpu_busy_ms"] if device == "cuda" else [])
        + (["skipped"] if wrong else [])
    )
    print(
        f"training step, {common.device_name(device)}, {'bf16 autocast' if device == 'cuda' else 'fp32'}; "
        f"matmul ceiling {ceiling:.3g} TFLOP/s"
    )
    common.print_table(rows, columns)
    path = common.write_results(
        "step", device, rows, {"matmul_tflops": ceiling, "peak_tflops": peak and peak / 1e12}, args.out, args.quick
    )
    print(f"wrote {path}")
    if wrong:
        raise SystemExit(f"wrong results or failed captures, not timed: {wrong}")


if __name__ == "__main__":
    main()
