"""One training step (forward with labels, backward, AdamW) of a Hugging Face transformers model, three ways side by
side: unpatched (attn_implementation="sdpa", torch.optim.AdamW), Liger Kernel's patch (`apply_liger_kernel_to_llama`
on the instance: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; its kernels are Triton's, so CUDA only, and it has
no GPT-2 patch) with torch.optim.AdamW, and fasttrain's (`fasttrain.integrations.hf.apply` + fasttrain.optim.AdamW;
and with torch.optim.AdamW, the patch's share alone). torch's AdamW is fused on CUDA, foreach on the CPU.
Models: a Llama-shaped one with Llama 3's vocabulary (128256) and GPT-2 small's shape (vocab 50257).

    python -m fasttrain.benchmarks.bench_hf_step [--device cpu|cuda] [--quick] [--out DIR]

Every variant starts from the same random weights and takes the same batch; its first step's loss and the weight
update its optimizer made are checked against the unpatched model's before it is timed (a variant that disagrees is
not timed). Reported: ms per step, tokens/s, the speed over the unpatched step, and the peak memory a step adds over
the model and optimizer state it starts from (CUDA: the allocator's peak; CPU: the peak resident set). bf16 weights
on CUDA, fp32 on the CPU. The loss alone (fasttrain's linear cross-entropy against eager, torch.compile and Liger's)
is bench_linear_cross_entropy.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import torch

from fasttrain.benchmarks import common
from fasttrain.integrations.hf import apply
from fasttrain.optim import AdamW

LR = 1e-4
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def shapes(device: str, quick: bool) -> dict:
    """model name -> (transformers config, batch, sequence length)."""
    import transformers as tf

    if device == "cuda":  # Llama 3.2 1B's shape; GPT-2 small
        llama = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32)
        llama.update(num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096)
        gpt2 = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        B, T, gB, gT = (2, 1024, 4, 1024) if quick else (4, 2048, 8, 1024)
    else:  # the real vocabularies, a few narrow layers: the head and the loss weigh as in the full models
        llama = dict(hidden_size=128 if quick else 256, intermediate_size=344 if quick else 688)
        llama.update(num_hidden_layers=1 if quick else 2, num_attention_heads=4, num_key_value_heads=2)
        llama.update(vocab_size=128256, max_position_embeddings=512)
        gpt2 = dict(n_embd=128 if quick else 256, n_layer=1 if quick else 2, n_head=4, vocab_size=50257)
        B, T, gB, gT = (1, 64, 1, 64) if quick else (2, 256, 2, 256)
    no_dropout = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return {
        "llama": (tf.LlamaConfig(**llama, attention_dropout=0.0), B, T),
        "gpt2": (tf.GPT2Config(**gpt2, **no_dropout), gB, gT),
    }


def liger_patch(name: str, device: str):
    """Liger Kernel's patch of a model instance, or why it cannot run here."""
    if device != "cuda":
        return "needs CUDA (Liger Kernel's kernels are Triton's)"
    if name != "llama":
        return f"Liger Kernel has no {name} patch"
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as e:
        return f"liger-kernel not installed ({e})"
    return lambda model: liger.apply_liger_kernel_to_llama(model=model)


def variants(name: str, device: str) -> dict:
    """variant -> (patch of the model instance or None, optimizer class), or a string saying why it cannot run."""
    fused = {"fused": True} if device == "cuda" else {"foreach": True}
    torch_adamw = lambda params: torch.optim.AdamW(params, lr=LR, **fused)  # noqa: E731
    return {
        "sdpa": (None, torch_adamw),
        "liger": (p, torch_adamw) if callable(p := liger_patch(name, device)) else p,
        "fasttrain": (apply, lambda params: AdamW(params, lr=LR)),
        "fasttrain, torch AdamW": (apply, torch_adamw),  # the patch's share of the gain alone
    }


def make_step(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def first_step(model, opt, ids) -> dict:
    """The loss and each weight's change after one step from the shared starting weights."""
    before = [p.detach().clone() for p in model.parameters()]
    loss = make_step(model, opt, ids)().item()
    return {"loss": loss, "deltas": [p.detach() - b for p, b in zip(model.parameters(), before)]}


def disagreement(got: dict, want: dict, dtype: torch.dtype) -> str | None:
    """Why a variant's first step is not the unpatched one's, or None. fp32: summation order only; bf16: the
    rounding of bf16 weights, activations and logits."""
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not abs(got["loss"] - want["loss"]) <= tol * abs(want["loss"]):
        return f"loss {got['loss']:.6g}, unpatched {want['loss']:.6g}"
    num = sum((a.float() - b.float()).norm() ** 2 for a, b in zip(got["deltas"], want["deltas"])) ** 0.5
    den = sum(b.float().norm() ** 2 for b in want["deltas"]) ** 0.5
    if not num <= (5 * tol if dtype == torch.bfloat16 else tol) * den:
        return f"weight update off by {num / den:.3g} of its size"
    return None


def bench_model(name: str, cfg, B: int, T: int, device: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    import transformers as tf

    cls = tf.GPT2LMHeadModel if name == "gpt2" else tf.LlamaForCausalLM
    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    base = cls(cfg).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    fields = dict(model=name, params_M=sum(p.numel() for p in base.parameters()) / 1e6, B=B, T=T, V=cfg.vocab_size)
    fields["dtype"] = str(dtype).removeprefix("torch.")
    steps, rows, want = {}, [], None
    for variant, spec in variants(name, device).items():
        if isinstance(spec, str):
            rows.append({**fields, "impl": variant, "note": spec})
            continue
        patch, optimizer = spec
        model = copy.deepcopy(base)
        if patch is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a fallback notice belongs in the run log, not on every row
                patch(model)
        opt = optimizer(model.parameters())
        result = first_step(model, opt, ids)
        if want is None:
            want = result
        elif (why := disagreement(result, want, dtype)) is not None:
            rows.append({**fields, "impl": variant, "note": f"not timed: wrong result ({why})"})
            continue
        steps[variant] = make_step(model, opt, ids)
    for step in steps.values():
        step()  # warm-up: the optimizers' states exist, the kernels are compiled
    peaks = {variant: common.peak_mb(step, device) for variant, step in steps.items()}
    times = common.time_interleaved_ms(steps, device, rounds=1 if quick else 3, min_run_time=0.1 if quick else 0.5)
    for variant, ms in times.items():
        row = {**fields, "impl": variant, "ms": ms, "tokens/s": B * T / (ms * 1e-3), "peak_MB": peaks[variant]}
        row["x sdpa"] = times["sdpa"] / ms if "sdpa" in times else None
        row["x sdpa mem"] = peaks[variant] / peaks["sdpa"] if peaks.get("sdpa") and peaks[variant] else None
        rows.append(row)
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    device, dtype = args.device, DTYPE[args.device]
    print(common.device_name(device))
    rows = []
    for name, (cfg, B, T) in shapes(device, args.quick).items():
        rows += bench_model(name, cfg, B, T, device, dtype, args.quick)
        print(f"{name} done", flush=True)
    columns = ["model", "params_M", "B", "T", "V", "dtype", "impl", "ms", "tokens/s", "x sdpa", "peak_MB", "x sdpa mem"]
    common.print_table(rows, columns + ["note"])
    path = common.write_results("hf_step", device, rows, {}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
