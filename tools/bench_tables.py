"""Regenerate README.md's benchmark section from benchmarks/results/<device>/*.json.

python tools/readme_table.py          # rewrites the block between the bench-table markers in README.md
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

# benchmark -> (title, columns); rows are shown as measured.
TABLES = {
    "adamw": (
        "AdamW step (fp32, GPT-like mix of tensors; 28 bytes/param)",
        ["params", "impl", "ms", "GB/s", "%copy", "x eager", "x fused"],
    ),
    "attention": (
        "Attention forward/backward (B*T = 16k tokens on a GPU, 2048 on a CPU)",
        ["provider", "B", "T", "H", "D", "causal", "fwd_tflops", "bwd_tflops", "fwd+bwd_tflops"],
    ),
    "cross_entropy": (
        "Cross-entropy forward + backward (fewest bytes: 3 N V s)",
        ["N", "V", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "peak_MB"],
    ),
    "norms": (
        "LayerNorm / RMSNorm forward + backward (fp32 residual in; bf16 autocast out on CUDA)",
        ["op", "M", "N", "impl", "ms", "GB/s", "%copy", "x eager"],
    ),
    "rotary": (
        "Rotary embedding of q and k, forward + backward (fewest bytes: 4 passes over q and k)",
        ["B", "T", "H", "Hkv", "D", "dtype", "impl", "ms", "GB/s", "%copy", "x eager"],
    ),
    "activation": (
        "GELU (tanh) forward + backward (fewest bytes: 5 passes over x)",
        ["M", "N", "dtype", "impl", "ms", "GB/s", "%copy", "x eager"],
    ),
    "decode": (
        "KV-cache decode (K and V bytes read)",
        ["kind", "B", "L", "H", "Hkv", "impl", "ms", "GBs", "pct_copy", "x_sdpa", "tokens_per_s"],
    ),
    "step": (
        "Training step (forward, backward, optimizer)",
        [
            "variant",
            "B",
            "T",
            "params_M",
            "step_ms",
            "tokens_per_s",
            "speedup_vs_eager",
            "mfu_pct",
            "peak_mem_GiB",
            "gpu_busy_ms",
        ],
    ),
    "overhead": (
        "Host time per call on a tiny input (x torch > 1: fasttrain's host costs less)",
        ["op", "mode", "impl", "host_us", "x torch"],
    ),
    "data": ("Tokenizing into shards", ["tokenizer", "workers", "MB", "MB/s"]),
}


def _fmt(v, column: str) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and column == "params":  # 1.06M, 140M, 1,069M
        return f"{v / 1e6:.3g}M" if v < 999_500_000 else f"{v / 1e6:,.0f}M"
    if isinstance(v, int) and abs(v) >= 100_000:  # a dimension, exact: V = 128,256
        return f"{v:,}"
    return "" if v is None else str(v)


def table(result: dict) -> list[str]:
    title, wanted = TABLES[result["benchmark"]]
    columns = [c for c in wanted if any(c in r for r in result["rows"])]
    lines = [
        f"**{title}** — {result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"{result['date'][:10]}, commit {result['git_commit'][:12]}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in result["rows"]]
    return lines + [""]


def section() -> str:
    out = []
    folders = [p for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir()]
    for folder in sorted(folders, key=lambda p: (p.name.startswith("cpu"), p.name)):  # GPU results first
        results = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
        out.append(f"### {folder.name}\n")
        for name in TABLES:
            if name not in results:
                continue
            out.extend(table(results[name]))
    return "\n".join(out)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    os.replace(tmp, readme)


if __name__ == "__main__":
    main()
