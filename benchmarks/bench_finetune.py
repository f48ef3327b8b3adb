"""A fine-tuning step of a Llama-shaped model (GQA, SwiGLU, RMSNorm, untied head) loaded from a Hugging Face
checkpoint folder: fasttrain (full, LoRA r16 on q/v, first half of the blocks + embeddings frozen) against the same
checkpoint in transformers with eager attention and with SDPA (full, and PEFT LoRA r16 on q/v), torch AdamW for
transformers and fasttrain.optim.AdamW for fasttrain. Tokens/s: the variants' steps timed in turn in one process
(median step). Memory: each variant again in a process of its own, so its peak is its own (CUDA:
max_memory_allocated; CPU: the peak resident set above the set after the model and batch were built), beside the
bytes of parameters, gradients and AdamW state. Every variant's first loss must equal transformers eager's (same
weights, same batch; LoRA starts at B = 0), else its row is marked.

    python -m fasttrain.benchmarks.bench_finetune [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fasttrain.benchmarks import common

# CPU: the largest Llama shape a 2-core machine steps through in a few seconds; CUDA: a 1B-class shape (Llama 3.2 1B's).
SHAPES = {
    "cpu": dict(layers=4, d=512, heads=8, kv=2, ff=1376, vocab=16000, batch=4, seq=256),
    "cuda": dict(layers=16, d=2048, heads=32, kv=8, ff=8192, vocab=128256, batch=4, seq=1024),
}
QUICK = {
    "cpu": dict(layers=2, d=128, heads=4, kv=2, ff=352, vocab=1000, batch=2, seq=64),
    "cuda": dict(layers=4, d=1024, heads=16, kv=4, ff=2816, vocab=32000, batch=4, seq=512),
}
VARIANTS = [
    "transformers eager",
    "transformers sdpa",
    "transformers sdpa + PEFT LoRA",
    "fasttrain",
    "fasttrain LoRA",
    "fasttrain frozen half",
]
LR, STEPS = 1e-4, {"cpu": 8, "cuda": 20}


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bytes(model: torch.nn.Module) -> dict:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "param_MB": sum(p.numel() * p.element_size() for p in params) / 2**20,
        "grad_MB": sum(p.numel() * p.element_size() for p in trainable) / 2**20,
        "adam_state_MB": 2 * sum(p.numel() * 4 for p in trainable) / 2**20,
    }


def build_variant(name: str, ckpt: str, device: str, shape: dict):
    """-> (model, step(): the loss of one optimizer step) for one variant."""
    import transformers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=g).to(device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    if name.startswith("transformers"):
        attn = "eager" if "eager" in name else "sdpa"
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation=attn).to(device).train()
        if "LoRA" in name:
            import peft

            model = peft.get_peft_model(
                model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
            )

        def loss_fn():
            logits = model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    else:
        from fasttrain.finetune import apply_lora, freeze
        from fasttrain.integrations.hf_checkpoint import load_model
        from fasttrain.optim import AdamW
        from fasttrain.train.build import param_groups

        model = load_model(ckpt)[0].to(device).train()
        if "LoRA" in name:
            apply_lora(model, rank=16, alpha=32.0, targets=["q_proj", "v_proj"])
        elif "frozen" in name:
            freeze(model, ["embeddings", f"blocks:{shape['layers'] // 2}"])

        def loss_fn():
            return model(x, y)[1]

        opt = AdamW(param_groups(model, 0.0), lr=LR, weight_decay=0.0)

    def step() -> float:
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def memory_of(name: str, ckpt: str, device: str, shape: dict) -> dict:
    """Peak memory of two steps of one variant, measured in this process (a child of main, one per variant)."""
    model, step = build_variant(name, ckpt, device, shape)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else _rss()
    step()
    step()
    if device == "cuda":
        return {"peak_MB": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    peak = _peak_rss()
    return {"peak_rss_above_setup_MB": round((peak - base) / 2**20, 1), "peak_rss_MB": round(peak / 2**20, 1)}


def time_variants(ckpt: str, device: str, shape: dict) -> list[dict]:
    """Every variant built in this process, their steps taken in turn (round robin), so a machine's drift hits all
    alike: the median step of each after two warm-up rounds."""
    built = {name: build_variant(name, ckpt, device, shape) for name in VARIANTS}
    times: dict = {name: [] for name in VARIANTS}
    first: dict = {}
    for _ in range(STEPS[device]):
        for name, (_, step) in built.items():
            common.synchronize(device)
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            first.setdefault(name, loss)
    rows = []
    for name, (model, _) in built.items():
        warm = sorted(times[name][2:])
        ms = warm[len(warm) // 2] * 1e3
        rows.append(
            {
                "impl": name,
                "step_ms": round(ms, 2),
                "tokens/s": round(shape["batch"] * shape["seq"] / ms * 1e3),
                "first_loss": first[name],
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in _bytes(model).items()},
            }
        )
    return rows


def make_checkpoint(folder: Path, shape: dict) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=shape["layers"],
        hidden_size=shape["d"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        intermediate_size=shape["ff"],
        vocab_size=shape["vocab"],
        max_position_embeddings=shape["seq"],
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def main() -> None:
    args = common.parse_args(
        __doc__.splitlines()[0], lambda p: (p.add_argument("--variant"), p.add_argument("--checkpoint"))
    )
    device = args.device
    shape = (QUICK if args.quick else SHAPES)[device]
    if args.variant:  # a child process: one variant's memory, as JSON on the last line
        print(json.dumps(memory_of(args.variant, args.checkpoint, device, shape)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), shape)
        rows = time_variants(tmp, device, shape)
        print("timed", flush=True)
        for row in rows:
            cmd = [sys.executable, "-m", "fasttrain.benchmarks.bench_finetune", "--device", device]
            cmd += ["--variant", row["impl"], "--checkpoint", tmp] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                row["memory_skipped"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next(r for r in rows if r["impl"] == "transformers eager")
    eager_tps = ref["tokens/s"]
    for row in rows:
        row.update({k: v for k, v in shape.items()})
        if "tokens/s" in row:
            row["x eager"] = round(row["tokens/s"] / eager_tps, 2)
            # Every variant starts from the same weights and batch: the first loss must agree (LoRA starts at B = 0).
            if abs(row["first_loss"] - ref["first_loss"]) > 1e-3 * ref["first_loss"] * (50 if device == "cuda" else 1):
                row["skipped"] = f"first loss {row['first_loss']:.5f} differs from eager's {ref['first_loss']:.5f}"
    peak = "peak_MB" if device == "cuda" else "peak_rss_above_setup_MB"
    cols = ["impl", "step_ms", "tokens/s", "x eager", peak, "trainable", "param_MB", "grad_MB", "adam_state_MB"]
    common.print_table(rows, cols)
    path = common.write_results("finetune", device, rows, {}, args.out, args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
