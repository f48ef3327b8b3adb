"""Data preprocessing throughput: MB of source text tokenized into shards per second, 1 vs 2 workers.

    python -m fasttrain.benchmarks.bench_data [--quick] [--mb 16]

Each timed call is a whole cold `prepare` (discover, read, tokenize, write shards, hash, manifest) into a fresh
cache folder, on the default corpus (the stdlib's .py files) capped at --mb. The BPE tokenizer is trained once
beforehand and passed as a tokenizer.json, so the rows time tokenizing, not training; training is its own row.
The baseline is num_workers=1 (everything in this process). The 2-worker rows force the pool, which `prepare` would
skip for a corpus too small to repay it; each spawn worker re-imports this script, and so torch, as any script
that imports torch would make it do.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np

import fasttrain.data.parallel as parallel
from fasttrain.benchmarks.common import parse_args, print_table, time_ms, write_results
from fasttrain.data import DataConfig, prepare


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=lambda p: p.add_argument("--mb", type=float, default=16.0))
    mb = 2.0 if args.quick else args.mb
    parallel._MIN_WORK_S_PER_WORKER = 1e-9
    # Data preparation runs on the host whatever the accelerator: results are filed under the CPU.
    device = "cpu"
    with tempfile.TemporaryDirectory() as root:
        base = DataConfig(max_bytes=int(mb * 1e6), val_fraction=0.05)
        runs = iter(range(1_000_000))

        def cold(cfg: DataConfig) -> float:
            return time_ms(
                lambda: prepare(dataclasses.replace(cfg, cache_dir=f"{root}/{next(runs)}")),
                device,
                warmup=1,
                min_run_time=2.0 if args.quick else 6.0,
            )

        start = time.perf_counter()
        bpe = prepare(
            dataclasses.replace(base, tokenizer="bpe", vocab_size=4096, num_workers=2, cache_dir=f"{root}/bpe")
        )
        train_s = time.perf_counter() - start
        rows = [
            {
                "tokenizer": "bpe-4096 training (incl. shards)",
                "workers": 2,
                "MB": mb,
                "ms": train_s * 1e3,
                "MB/s": mb / train_s,
                "tokens": len(bpe.train) + len(bpe.val),
            }
        ]
        for tokenizer in ("byte", str(bpe.tokenizer_file)):
            one_ms = serial = None
            for workers in (1, 2):
                cfg = dataclasses.replace(base, tokenizer=tokenizer, num_workers=workers)
                # Checked before it is timed: the pool builds the shards one worker builds, token for token.
                corpus = prepare(dataclasses.replace(cfg, cache_dir=f"{root}/check-{workers}-{len(rows)}"))
                assert corpus.manifest["build"]["workers"] == workers
                serial = serial or corpus
                if not (np.array_equal(corpus.train, serial.train) and np.array_equal(corpus.val, serial.val)):
                    raise SystemExit(f"{tokenizer}: {workers} workers built other shards than 1")
                ms = cold(cfg)
                one_ms = one_ms or ms
                rows.append(
                    {
                        "tokenizer": corpus.tokenizer.name,
                        "workers": workers,
                        "MB": mb,
                        "ms": ms,
                        "MB/s": mb / (ms * 1e-3),
                        "speedup": one_ms / ms,
                        "tokens": len(corpus.train) + len(corpus.val),
                    }
                )
    print_table(rows, ["tokenizer", "workers", "MB", "ms", "MB/s", "speedup", "tokens"])
    path = write_results("data", device, rows, ceilings={}, out=args.out, quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
