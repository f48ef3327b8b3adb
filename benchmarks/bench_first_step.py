"""Time to first step: from process start to the first finished training step, fasttrain against torch.compile.

    python -m fasttrain.benchmarks.bench_first_step            # CPU: bench_step's small shape; GPU: GPT-2 small, bf16
    python -m fasttrain.benchmarks.bench_first_step --quick    # smallest shape; on the CPU fasttrain's row only

Rows as in bench_step (`fasttrain`, `compile` of the eager model with SDPA, `fasttrain+compile`), each run twice in a
fresh Python process: `cold` over empty Triton and inductor caches (TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR in a
new temporary folder), so every JIT compile and autotuning run is paid, then `warm` over the caches the cold process
filled, as a script's second run finds them. The parent reads the clock just before it starts the child; the child
reports the clock when its first step's loss is on the host, and its own split: interpreter start and imports, model
build, first step, second step. Every row's first loss is checked against the first row's (same weights and batch)
before its time is kept; one that disagrees or fails is reported, and the run exits 1 after writing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fasttrain.benchmarks import bench_step, common
from fasttrain.model import GPT

_MARK = "first-step: "
CHILD_TIMEOUT_S = 900  # a cold torch.compile of GPT-2 small takes about a minute on a GPU machine's host


def variants(device: str, quick: bool) -> list[str]:
    """inductor's C++ compile of even the smallest model takes minutes on a 2-core CPU: --quick there skips it."""
    return ["fasttrain"] if device == "cpu" and quick else ["fasttrain", "compile", "fasttrain+compile"]


def child(variant: str, device: str, quick: bool, started: float) -> dict:
    """One process's first two steps of `variant`, timed from `started` (the parent's clock at this process's
    start)."""
    imported = time.time()
    cfg, B, T = bench_step.shapes(device, quick)
    torch.manual_seed(0)
    base = GPT(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    model, step_model, opt, clip_outside = bench_step.make_variant(variant, base, device)
    step = bench_step.make_step(model, step_model, opt, clip_outside, x, y, device)
    built = time.time()
    loss = step()[0].item()  # .item() waits for the step's kernels
    first = time.time()
    step()[0].item()
    second = time.time()
    return {
        "to_first_step_s": first - started,
        "start_and_imports_s": imported - started,
        "build_s": built - imported,
        "first_step_s": first - built,
        "second_step_s": second - first,
        "first_loss": loss,
    }


def run_child(variant: str, device: str, quick: bool, caches: Path) -> dict:
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
    }
    command = [sys.executable, "-m", "fasttrain.benchmarks.bench_first_step", "--device", device, "--child", variant]
    started = time.time()
    proc = subprocess.run(
        [*command, "--started", repr(started), *(["--quick"] if quick else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return json.loads(lines[-1][len(_MARK) :])


def main() -> None:
    def extra(parser):
        parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
        parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)

    args = common.parse_args(__doc__.splitlines()[0], extra)
    if args.child is not None:
        print(_MARK + json.dumps(child(args.child, args.device, args.quick, args.started)), flush=True)
        return
    cfg, B, T = bench_step.shapes(args.device, args.quick)
    tol = 2e-2 if args.device == "cuda" else 1e-4
    rows, wrong, first_loss = [], [], None
    for variant in variants(args.device, args.quick):
        with tempfile.TemporaryDirectory(prefix="fasttrain-first-step-") as caches:
            for cache in ("cold", "warm"):
                row = {"variant": variant, "cache": cache, "B": B, "T": T}
                try:
                    row |= run_child(variant, args.device, args.quick, Path(caches))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    rows.append(row | {"skipped": f"failed: {e}"[:300]})
                    wrong.append(f"{variant} {cache}")
                    continue
                first_loss = row["first_loss"] if first_loss is None else first_loss
                if not abs(row["first_loss"] - first_loss) <= tol * abs(first_loss):  # NaN too
                    why = f"wrong result: first loss {row['first_loss']:.6g}, the first row's {first_loss:.6g}"
                    row = {k: row[k] for k in ("variant", "cache", "B", "T")} | {"skipped": why}
                    wrong.append(f"{variant} {cache}")
                rows.append(row)
    columns = ["variant", "cache", "to_first_step_s", "start_and_imports_s", "build_s", "first_step_s", "second_step_s"]
    print(f"time to first step, {common.device_name(args.device)}, B {B} x T {T}, {cfg.n_layer} layers")
    common.print_table(rows, columns + (["skipped"] if wrong else []))
    path = common.write_results("first_step", args.device, rows, {}, args.out, args.quick)
    print(f"wrote {path}")
    if wrong:
        raise SystemExit(f"failed or wrong, not kept: {wrong}")


if __name__ == "__main__":
    main()
