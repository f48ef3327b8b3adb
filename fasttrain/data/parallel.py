"""Parallel reading and tokenizing: tasks of consecutive files, run in this process or a 'spawn' pool, results
always in file order, so the shards are identical for any number of workers."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from fasttrain.data.sources import Documents, ReadOptions, SourceFile, read_documents
from fasttrain.data.tokenizers import ByteTokenizer, Tokenizer, tokenizer_from_config

# When a pool repays its start. Measured on the 2-core CI machine, shared with other jobs: a 'spawn' worker starts
# in 0.3-1 s, and in 2-6.5 s when the main script imports torch (every worker re-imports the main module). In this
# process, stdlib .py files are read and tokenized at ~60-100 MB/s with the byte tokenizer and ~1.3 MB/s with an HF
# BPE-4096, whose encode_batch already uses every core; forcing 2 workers on 8 MB gave 2.1 MB/s byte (all start-up)
# and 0.95 MB/s BPE (benchmarks/bench_data.py). Only Python-bound work can gain: pypdf reads ~0.2-0.3 MB/s of real
# (compressed) PDF per process, and OCR takes ~1-6 s per image (plus ~2 s to load its models, once per worker).
# There 2 workers matched 1 (3.2 MB of PDF: 10.4 vs 9.9 s) because other jobs held the second core; with idle cores
# they split the work. So work is estimated as PDF bytes at that rate, images at their rate and the rest at the byte
# rate, and a worker is started per whole ~10 s of it: ~5 MB of PDF, or 10 images, get two.
_FAST_MB_S = 100.0
_PDF_MB_S = 0.25
_OCR_S_PER_IMAGE = 2.0
_MIN_WORK_S_PER_WORKER = 10.0
_CHUNK_BYTES = 1 << 20
# Kinds whose files each make a task of their own (seconds of work each), so that a pool shares them out evenly.
_SLOW_KINDS = ("pdf", "image")

_worker_tokenizer: Tokenizer | None = None


def workers_for(files: list[SourceFile], num_workers: int) -> int:
    """Processes worth starting for `files`: at most num_workers, one per _MIN_WORK_S_PER_WORKER of estimated work.
    The shards never depend on this: tasks come back in file order whatever the count."""
    seconds = sum(_work_s(f) for f in files)
    return max(1, min(num_workers, int(seconds / _MIN_WORK_S_PER_WORKER)))


def _work_s(f: SourceFile) -> float:
    if f.kind == "image":
        return _OCR_S_PER_IMAGE
    return (f.limit or f.size) / 1e6 / (_PDF_MB_S if f.kind == "pdf" else _FAST_MB_S)


def _set_tokenizer(tok_config: dict | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = None if tok_config is None else tokenizer_from_config(tok_config)


def _init_pool_worker(tok_config: dict | None) -> None:
    # One of several worker processes: HF's own thread pool on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _set_tokenizer(tok_config)


def read_task(args: tuple[SourceFile, ReadOptions]) -> Documents:
    return read_documents(*args)


def doc_hash(data: bytes) -> bytes:
    """What tells exact duplicates apart: 128 bits of BLAKE2b (a collision among 10^12 documents has odds ~1e-15)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class FileTokens(NamedTuple):
    """One file's share of the token stream."""

    tokens: np.ndarray
    """Every document's ids, each followed by end-of-text."""
    lengths: np.ndarray
    """Tokens per document, its end-of-text included."""
    nbytes: np.ndarray
    """UTF-8 bytes per document."""
    hashes: list[bytes]
    """doc_hash per document."""
    skipped: dict[str, int]
    warnings: dict[str, int]


def tokenize_task(args: tuple[list[SourceFile], ReadOptions, str]) -> list[FileTokens]:
    files, opts, dtype = args
    docs = [read_documents(f, opts) for f in files]
    texts = [t for d in docs for t in d.texts]
    tok = _worker_tokenizer
    if isinstance(tok, ByteTokenizer):
        ids = [tok.encode_array(t) for t in texts]
    else:
        # One call for the whole chunk: HF spreads it over its threads (in this process) and skips per-call costs.
        ids = [np.asarray(i, dtype=np.int64) for i in tok.encode_batch(texts)]
    eot = np.array([tok.eot_id], dtype=dtype)
    out, first = [], 0
    for d in docs:
        mine = ids[first : first + len(d.texts)]
        encoded = [t.encode("utf-8") for t in d.texts]
        first += len(d.texts)
        tokens = np.concatenate([p for i in mine for p in (i.astype(dtype), eot)]) if mine else np.empty(0, dtype)
        lengths = np.array([len(i) + 1 for i in mine], dtype=np.int64)
        nbytes = np.array([len(b) for b in encoded], dtype=np.int64)
        out.append(FileTokens(tokens, lengths, nbytes, [doc_hash(b) for b in encoded], d.skipped, d.warnings))
    return out


def chunks(files: list[SourceFile]) -> list[list[SourceFile]]:
    """Tasks of consecutive files: text up to about _CHUNK_BYTES (about a second of BPE at the rate above, and many
    documents per HF encode_batch call), each PDF or image alone (seconds each), so a pool shares work out evenly."""
    groups, size = [[]], 0
    for f in files:
        if groups[-1] and (size >= _CHUNK_BYTES or f.kind in _SLOW_KINDS or groups[-1][-1].kind in _SLOW_KINDS):
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.limit or f.size
    return groups


def map_in_order(fn: Callable, tasks: list, workers: int, tok_config: dict | None) -> Iterator:
    """fn over tasks, in task order: in this process for workers <= 1, else in a 'spawn' pool (safe beside torch's
    threads, where 'fork' is not). A worker that dies (killed, out of memory) is an error, not a hang:
    multiprocessing.Pool.imap waits forever for its task."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        _set_tokenizer(tok_config)
        yield from map(fn, tasks)
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_pool_worker, initargs=(tok_config,)
    )
    completed = False
    try:
        yield from pool.map(fn, tasks)
        completed = True
    except BrokenProcessPool as exc:
        raise RuntimeError(
            f"a data worker process died or failed to start (killed, out of memory, a tokenizer it "
            f"could not build?); DataConfig.num_workers=0 works in this process instead ({exc})"
        ) from exc
    finally:  # a caller that stops early (an error while writing) does not wait for the tasks still queued
        pool.shutdown(wait=completed, cancel_futures=not completed)
