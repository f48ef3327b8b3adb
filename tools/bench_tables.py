"""The benchmark tables, generated from benchmarks/results/<device>/*.json: every table in docs/benchmarks.md and the
headline table in README.md, each between its markers.

    python tools/bench_tables.py           # rewrite both generated blocks
    python tools/bench_tables.py --check   # exit 1, naming the file, where a block differs from the results

One column vocabulary across every table: the JSON keys of the benchmarks map to the names in VOCABULARY (KEYS),
and the baselines to one set of names (IMPLS). A --quick run's <name>.quick.json is never read.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCH_DOC = ROOT / "docs" / "benchmarks.md"
HEADLINE_MARKERS = ("<!-- headline:start -->", "<!-- headline:end -->")
TABLE_MARKERS = ("<!-- bench-tables:start -->", "<!-- bench-tables:end -->")
HEADLINE_DEVICE = "nvidia-h200"  # the results folder README's headline is read from

# The one vocabulary: column -> what it holds. docs/benchmarks.md prints the entries its tables use.
VOCABULARY = {
    "impl": "what ran: fasttrain, or a stock PyTorch baseline",
    "ms": "median time per call (per optimizer step for the training step), milliseconds",
    "fwd ms": "attention forward alone, milliseconds",
    "bwd ms": "attention backward alone, milliseconds",
    "fwd+bwd ms": "forward + backward, milliseconds",
    "fwd TFLOP/s": "attention forward, 4 B H T T D FLOPs (halved when causal) per second",
    "bwd TFLOP/s": "attention backward, 2.5x the forward's FLOPs per second",
    "fwd+bwd TFLOP/s": "attention forward + backward, 3.5x the forward's FLOPs per second",
    "TFLOP/s": "matmul FLOPs per second: the training step's (6 per parameter per token, plus causal attention), the "
    "linear cross-entropy's (6 N V K: logits, dx, dW)",
    "%matmul": "TFLOP/s as a percentage of a large square matmul measured in the same run",
    "%MFU": "TFLOP/s as a percentage of the device's dense bf16 peak",
    "GB/s": "the fewest bytes the op must move (each input read once, each output written once) per second",
    "%copy": "GB/s as a percentage of device-to-device copy measured in the same run",
    "x eager": "the torch eager baseline's time (the row at 1) over this row's; above 1: faster",
    "x compile": "torch.compile's time at the same shape over this row's; above 1: faster",
    "x SDPA": "SDPA over a static cache: its time over this row's",
    "fwd x SDPA": "torch's SDPA with the same mask: its forward time over this row's",
    "fwd+bwd x SDPA": "torch's SDPA with the same mask: its forward + backward time over this row's",
    "x fused": "torch.optim.AdamW(fused=True): its time over this row's",
    "x torch": "torch's own op of the same kind: its host time over this row's",
    "peak GiB": "peak CUDA memory of the process during the step",
    "peak MiB": "peak memory the call allocated beyond its inputs",
    "GPU busy ms": "time kernels ran in one profiled step; ms minus this is the GPU waiting on the host",
    "tokens/s": "tokens trained (step) or generated (generation) per second",
    "host us": "host time per call on a tiny input, microseconds",
    "to step 1 s": "from process start to the first finished training step, seconds",
    "imports s": "process start and imports, seconds",
    "build s": "model and optimizer built, seconds",
    "step 1 s": "the first step, compiling and autotuning included, seconds",
    "step 2 s": "the second step, seconds",
    "params": "parameters updated (AdamW) or in the model (step)",
    "MB": "document text prepared, MB",
    "MB/s": "document text read, tokenized and written as shards per second, MB",
    "x 1 worker": "the 1-worker row's time over this row's",
    "x peer": "this row's MB/s over HF tokenizers' encode_batch of the same text in memory (tokenizing alone)",
    "images": "images read by OCR",
    "images/s": "images read by OCR per second",
    "recall": "share of the rendered words that OCR recovered",
    "note": "why a row has no numbers",
}
# JSON key -> vocabulary name, with a scale where the unit changes.
KEYS = {
    "provider": "impl",
    "variant": "impl",
    "step_ms": "ms",
    "fwd_ms": "fwd ms",
    "bwd_ms": "bwd ms",
    "fwd+bwd_ms": "fwd+bwd ms",
    "fwd_x_sdpa": "fwd x SDPA",
    "fwd+bwd_x_sdpa": "fwd+bwd x SDPA",
    "to_first_step_s": "to step 1 s",
    "start_and_imports_s": "imports s",
    "build_s": "build s",
    "first_step_s": "step 1 s",
    "second_step_s": "step 2 s",
    "fwd_tflops": "fwd TFLOP/s",
    "bwd_tflops": "bwd TFLOP/s",
    "fwd+bwd_tflops": "fwd+bwd TFLOP/s",
    "mfu_pct": "%MFU",
    "GBs": "GB/s",
    "pct_copy": "%copy",
    "x_eager": "x eager",
    "speedup_vs_eager": "x eager",
    "x_sdpa": "x SDPA",
    "peak_mem_GiB": "peak GiB",
    "peak_MB": "peak MiB",
    "gpu_busy_ms": "GPU busy ms",
    "tokens_per_s": "tokens/s",
    "host_us": "host us",
    "params_M": "params",
    "skipped": "note",
}
SCALE = {"params_M": 1e6}
# Baseline names as the benchmarks write them -> one name for the same thing in every table.
IMPLS = {
    "eager": "torch eager",
    "eager-sdpa": "torch eager + SDPA",
    "compile": "torch.compile",
    "fasttrain+compile": "fasttrain + torch.compile",
    "fasttrain+graph": "fasttrain + CUDA graph",
    "sdpa": "torch SDPA",
    "sdpa_flash": "SDPA FLASH",
    "sdpa_cudnn": "SDPA cuDNN",
    "sdpa_efficient": "SDPA efficient",
    "sdpa_static": "SDPA, static cache",
    "eager_cat": "torch.cat cache + SDPA",
    "eager_loop": "torch eager loop",
    "fasttrain_graph": "fasttrain + CUDA graph",
    "reference": "fasttrain reference",
}
MEASURES = set(VOCABULARY) - {"impl", "params", "MB", "images", "note"}
# The other columns: dimensions and labels of a row, as the benchmarks name them.
LABELS = {"B", "T", "H", "Hkv", "D", "L", "M", "N", "K", "V", "causal", "dtype", "op", "mode", "model", "prompt", "new",
          "format", "tokenizer", "workers", "mask", "cache"}  # fmt: skip


@dataclass(frozen=True)
class Table:
    bench: str
    title: str
    columns: list[str]
    where: dict = field(default_factory=dict)  # rows kept: JSON key -> value


TABLES = [
    Table(
        "step",
        "Training step: forward, backward and AdamW (bf16 autocast on a GPU, fp32 on a CPU)",
        [
            "B",
            "T",
            "params",
            "impl",
            "ms",
            "tokens/s",
            "TFLOP/s",
            "%MFU",
            "x eager",
            "x compile",
            "peak GiB",
            "GPU busy ms",
        ],
    ),  # fmt: skip
    Table(
        "attention",
        "Attention forward and backward (B*T = 16k tokens on a GPU, 2048 on a CPU)",
        ["B", "T", "H", "D", "causal", "impl", "fwd TFLOP/s", "bwd TFLOP/s", "fwd+bwd TFLOP/s", "note"],
    ),
    Table(
        "attention_masks",
        "SDPA with a mask: fasttrain's kernels (the mask's plan kept, or read at the call) against torch's SDPA with "
        "the same mask",
        ["mask", "B", "T", "H", "D", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd x SDPA", "fwd+bwd x SDPA"],
    ),
    Table(
        "decode",
        "KV-cache decode step, one new token per sequence (bytes: the K and V cache read)",
        ["B", "L", "H", "Hkv", "D", "impl", "ms", "GB/s", "%copy", "x SDPA", "x eager"],
        {"kind": "decode"},
    ),
    Table(
        "decode",
        "Generation: prefill, then one decode step per new token",
        ["model", "B", "prompt", "new", "impl", "tokens/s", "x eager"],
        {"kind": "generate"},
    ),
    Table(
        "first_step",
        "Time to the first training step, from process start (cold and warm compile caches)",
        ["B", "T", "impl", "cache", "to step 1 s", "imports s", "build s", "step 1 s", "step 2 s"],
    ),
    Table(
        "adamw",
        "AdamW step (fp32, a GPT-like mix of tensors; 28 bytes per parameter)",
        ["params", "impl", "ms", "GB/s", "%copy", "x eager", "x fused"],
    ),
    Table(
        "cross_entropy",
        "Cross-entropy forward + backward (fewest bytes: 3 N V times the element size)",
        ["N", "V", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "x compile", "peak MiB"],
    ),
    Table(
        "linear_cross_entropy",
        "Linear cross-entropy forward + backward: x (N, K) through a head (V, K) into the loss, gradients of both",
        ["N", "K", "V", "dtype", "impl", "ms", "TFLOP/s", "%matmul", "x eager", "x compile", "peak MiB", "note"],
    ),
    Table(
        "norms",
        "LayerNorm / RMSNorm forward + backward (fp32 residual in; bf16 autocast out on CUDA)",
        ["op", "M", "N", "impl", "ms", "GB/s", "%copy", "x eager", "x compile"],
    ),
    Table(
        "rotary",
        "Rotary embedding of q and k, forward + backward (fewest bytes: 4 passes over q and k)",
        ["B", "T", "H", "Hkv", "D", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "x compile"],
    ),
    Table(
        "activation",
        "GELU (tanh) forward + backward (fewest bytes: 5 passes over x)",
        ["M", "N", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "x compile"],
    ),
    Table(
        "swiglu",
        "SwiGLU / GeGLU, act(gate) * up, forward + backward (fewest bytes: 8 passes over gate)",
        ["op", "M", "N", "dtype", "impl", "ms", "GB/s", "%copy", "x eager", "x compile"],
    ),
    Table(
        "overhead",
        "Host time per call on a tiny input",
        ["op", "mode", "impl", "host us", "x torch"],
    ),
    Table(
        "data",
        "Preparing a corpus: read, tokenize, write shards (a cold `prepare`); OCR of images",
        [
            "format",
            "tokenizer",
            "workers",
            "impl",
            "MB",
            "images",
            "ms",
            "MB/s",
            "x 1 worker",
            "x peer",
            "images/s",
            "recall",
        ],
    ),  # fmt: skip
]


@dataclass(frozen=True)
class Headline:
    kernel: str
    bench: str
    where: dict  # selects one shape: JSON key -> value
    shape: str
    metric: str = "ms"  # the time compared, in the vocabulary
    stock: tuple[str, ...] | None = None  # baselines considered; None: every impl not named fasttrain...


HEADLINE = [
    Headline(
        "training step, eager",
        "step",
        {"B": 16, "T": 1024},
        "GPT-2 small, B 16 x T 1024, bf16",
        stock=("torch eager", "torch eager + SDPA"),
    ),
    Headline("training step", "step", {"B": 16, "T": 1024}, "GPT-2 small, B 16 x T 1024, bf16"),
]
for _T, _B in ((2048, 8), (8192, 2)):
    for _pass in ("fwd", "bwd"):
        HEADLINE.append(
            Headline(
                f"attention {_pass}",
                "attention",
                {"B": _B, "T": _T, "H": 16, "D": 128, "causal": True},
                f"bf16, causal, B {_B} x T {_T} x H 16 x D 128",
                metric=f"{_pass} ms",
            )
        )
HEADLINE += [
    Headline(
        "decode", "decode", {"kind": "decode", "B": 64, "L": 4096, "Hkv": 8}, "B 64 x 4096 cache, GQA 32/8, D 128"
    ),
    Headline("decode", "decode", {"kind": "decode", "B": 1, "L": 1024, "Hkv": 8}, "B 1 x 1024 cache, GQA 32/8, D 128"),
    Headline("AdamW", "adamw", {"params": 139686912}, "140M params, fp32"),
    Headline("AdamW", "adamw", {"params": 1068873216}, "1.07B params, fp32"),
    Headline("cross-entropy", "cross_entropy", {"N": 8192, "V": 50304}, "N 8192 x V 50304, bf16"),
    Headline("LayerNorm", "norms", {"op": "layer_norm", "M": 16384, "N": 768}, "16384 x 768, fp32 in, bf16 out"),
    Headline("rotary", "rotary", {"B": 16, "T": 1024, "H": 12}, "B 16 x T 1024 x H 12 x D 64, bf16"),
    Headline("rotary", "rotary", {"B": 4, "T": 4096, "H": 32}, "B 4 x T 4096, GQA 32/8, D 128, bf16"),
]


def _fmt(v, column: str) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and column == "params":  # 1.06M, 140M, 1,069M
        return f"{v / 1e6:.3g}M" if v < 999_500_000 else f"{v / 1e6:,.0f}M"
    if isinstance(v, int) and abs(v) >= 100_000:  # a dimension, exact: V = 128,256
        return f"{v:,}"
    return "" if v is None else str(v)


def normalize(row: dict) -> dict:
    """A result row in the vocabulary: keys renamed (KEYS), units scaled (SCALE), baselines named (IMPLS)."""
    out = {}
    for key, value in row.items():
        if key in SCALE and value is not None:
            value = round(value * SCALE[key])
        out[KEYS.get(key, key)] = value
    if "impl" in out:
        out["impl"] = IMPLS.get(out["impl"], out["impl"])
    return out


def _shape(row: dict, columns: list[str]) -> tuple:
    return tuple(row.get(c) for c in columns if c not in MEASURES and c != "impl")


def _with_x_compile(rows: list[dict], columns: list[str]) -> list[dict]:
    """Each row with x compile: torch.compile's ms at the same shape over the row's ms."""
    compiled = {_shape(r, columns): r.get("ms") for r in rows if r.get("impl") == "torch.compile"}
    out = []
    for r in rows:
        base = compiled.get(_shape(r, columns))
        out.append({**r, "x compile": base / r["ms"] if base and r.get("ms") else None})
    return out


def _short(commit: str) -> str:
    """The commit's first 12 hex digits, keeping a '+dirty' mark (the run had uncommitted changes)."""
    sha, plus, rest = commit.partition("+")
    return sha[:12] + plus + rest


def _stamp(result: dict) -> str:
    cuda = f", CUDA {result['cuda']}" if result.get("cuda") else ""
    return (
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}{cuda}, "
        f"commit {_short(result['git_commit'])}, {result['date'][:10]}"
    )


def table(result: dict, spec: Table) -> list[str]:
    rows = [normalize(r) for r in result["rows"] if all(r.get(k) == v for k, v in spec.where.items())]
    if "x compile" in spec.columns:
        rows = _with_x_compile(rows, spec.columns)
    columns = [c for c in spec.columns if any(r.get(c) is not None for r in rows)]
    if not rows:
        return []
    lines = [
        f"**{spec.title}**: {_stamp(result)}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |" for r in rows]
    return lines + [""]


def load(folder: Path) -> dict[str, dict]:
    """benchmark name -> its result, for one device's folder (quick runs left out)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.stem.endswith(".quick")}


def _ceilings(results: dict[str, dict]) -> str:
    copy = [v for r in results.values() for k, v in r.get("ceilings", {}).items() if k in ("copy_GB/s", "copy_GBs")]
    matmul = [
        v
        for r in results.values()
        for k, v in r.get("ceilings", {}).items()
        if k in ("matmul_bf16_tflops", "matmul_fp32_tflops", "matmul_tflops") and v
    ]
    parts = []
    if copy:
        parts.append(f"copy {_fmt(min(copy), 'GB/s')}-{_fmt(max(copy), 'GB/s')} GB/s")
    if matmul:
        parts.append(f"matmul {_fmt(min(matmul), 'TFLOP/s')}-{_fmt(max(matmul), 'TFLOP/s')} TFLOP/s")
    return "Ceilings measured in these runs: " + ", ".join(parts) + "." if parts else ""


def _devices() -> list[Path]:
    """Result folders: GPUs first, newest run first; then CPUs."""
    folders = [p for p in RESULTS.iterdir() if p.is_dir() and load(p)]

    def newest(p: Path) -> str:
        return max(r["date"] for r in load(p).values())

    gpus = sorted((p for p in folders if not p.name.startswith("cpu")), key=newest, reverse=True)
    return gpus + sorted((p for p in folders if p.name.startswith("cpu")), key=lambda p: p.name)


def tables() -> str:
    """docs/benchmarks.md's generated block: the vocabulary, then every table of every device."""
    body, used = [], set()
    for folder in _devices():
        results = load(folder)
        body += [f"### {folder.name}", "", _ceilings(results), ""]
        for spec in TABLES:
            if spec.bench in results:
                lines = table(results[spec.bench], spec)
                body += lines
                if lines:
                    used.update(c.strip() for c in lines[2].strip("|").split("|"))
    legend = ["| column | meaning |", "|---|---|"]
    legend += [f"| {name} | {meaning} |" for name, meaning in VOCABULARY.items() if name in used]
    return "\n".join(legend + [""] + body)


def headline_rows(results: dict[str, dict]) -> list[list[str]]:
    """[kernel, shape, fasttrain, stock baseline, its time, x stock] per HEADLINE entry, with 'miss' where the
    strongest stock baseline is faster."""
    out = []
    for h in HEADLINE:
        rows = [normalize(r) for r in results[h.bench]["rows"] if all(r.get(k) == v for k, v in h.where.items())]
        ours = [r for r in rows if r.get("impl") == "fasttrain" and r.get(h.metric)]
        stock = [
            r
            for r in rows
            if r.get(h.metric)
            and (h.stock is None and not r["impl"].startswith("fasttrain") or r["impl"] in (h.stock or ()))
        ]
        if len(ours) != 1 or not stock:
            raise ValueError(f"headline {h.kernel} ({h.shape}): {len(ours)} fasttrain rows, {len(stock)} stock rows")
        best = min(stock, key=lambda r: r[h.metric])
        x = best[h.metric] / ours[0][h.metric]
        verdict = f"{x:#.3g}" + (" (miss)" if x < 1 else "")
        out.append(
            [h.kernel, h.shape, _fmt(ours[0][h.metric], "ms"), best["impl"], _fmt(best[h.metric], "ms"), verdict]
        )
    return out


def headline() -> str:
    """README's generated block: one table against the strongest stock baseline, stamped."""
    results = load(RESULTS / HEADLINE_DEVICE)
    stamps = sorted({_stamp(results[h.bench]) for h in HEADLINE})
    lines = ["Measured on " + "; ".join(stamps) + f" (benchmarks/results/{HEADLINE_DEVICE}/).", ""]
    lines += [
        "| kernel | shape | fasttrain ms | strongest stock baseline | its ms | x stock |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(results)]
    return "\n".join(lines)


def replace_block(text: str, markers: tuple[str, str], block: str) -> str:
    start, end = markers
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {start} and one {end}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block}\n{end}{tail}"


TARGETS = ((README, HEADLINE_MARKERS, headline), (BENCH_DOC, TABLE_MARKERS, tables))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a block is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, markers, make in TARGETS:
        text = path.read_text()
        new = replace_block(text, markers, make())
        if new == text:
            continue
        stale.append(str(path.relative_to(ROOT)))
        if not args.check:
            tmp = path.with_suffix(".md.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python tools/bench_tables.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
