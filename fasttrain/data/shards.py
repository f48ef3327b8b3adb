"""prepare(cfg): sources -> tokenizer -> token shards on disk, reused while the corpus and tokenizer are unchanged.

Layout of one cache folder (named by the hash of everything that decides its contents):
    train.bin, val.bin   packed token ids (uint16 when the vocabulary fits, else uint32), each document followed by
                         the end-of-text id
    tokenizer.json       the BPE or user tokenizer (absent for the byte tokenizer)
    manifest.json        sources, per-source counts, tokenizer, shard sizes and sha256: written last, so a folder
                         without it (a killed run) is never trusted
Every file is written under a temporary name and moved into place with os.replace.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from fasttrain.data.config import DataConfig
from fasttrain.data.corpus import Corpus
from fasttrain.data.parallel import chunks, map_in_order, read_task, tokenize_task, workers_for
from fasttrain.data.sources import PYPDF_MISSING, SourceFile, discover
from fasttrain.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer_file, tokenizer_spec, train_bpe

FORMAT_VERSION = 1
_noted_pypdf = False


def cache_key(cfg: DataConfig, files: list[SourceFile], tok_spec: dict) -> str:
    """Hash of what decides the shards: each file's path, size and mtime (include/exclude/max_bytes/code_extensions
    act through the file list and limits), the JSONL field, the tokenizer, and the split."""
    payload = {
        "format": FORMAT_VERSION,
        "files": [[f.path, f.source, f.kind, f.size, f.mtime_ns, f.limit] for f in files],
        "jsonl_field": cfg.jsonl_field,
        "tokenizer": tok_spec,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare(cfg: DataConfig) -> Corpus:
    """Token shards for `cfg`: reused when a complete build with the same key exists, else built (in parallel with
    cfg.num_workers processes). ValueError, naming the setting, for a missing path, an empty corpus, a JSONL field
    that no record has, or an unusable tokenizer file."""
    cfg.validate()
    files, ignored = discover(cfg)
    key = cache_key(cfg, files, tokenizer_spec(cfg.tokenizer, cfg.vocab_size))
    folder = cfg.resolved_cache_dir() / key[:24]
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        manifest = _trusted_manifest(folder, key)
        reused = manifest is not None
        if manifest is None:
            manifest = _build(cfg, files, ignored, key, folder)
    return Corpus(folder, manifest, reused=reused)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock across processes (e.g. every rank of a torchrun job preparing the same corpus)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent builds of one key are not guarded there
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _trusted_manifest(folder: Path, key: str) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        return None
    for entry in list(manifest["shards"].values()) + ([manifest["tokenizer_file"]] if manifest.get(
            "tokenizer_file") else []):
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
    return manifest


def _atomic_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean per document: True for validation. A seeded uniform draw per document index (`_is_drawn_val`), so
    the split depends only on (seed, document order), never on the number of workers. With two or more documents
    and a positive fraction, each side gets at least one."""
    u = np.random.default_rng(seed).random(n_docs)
    is_val = u < val_fraction
    if val_fraction > 0 and n_docs >= 2:
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return is_val


def _is_drawn_val(seed: int, val_fraction: float) -> Iterator[bool]:
    """The draws of `_split` one document at a time (Generator.random() repeats random(n) value for value), for
    BPE training before the number of documents is known. Only the at-least-one-each-side fix of a tiny corpus is
    not seen here."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.random() < val_fraction


def _tokenizer_for(cfg: DataConfig, files: list[SourceFile]) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer_file(cfg.tokenizer)

    def train_texts() -> Iterator[str]:  # BPE learns from training documents only: validation stays unseen
        draws = _is_drawn_val(cfg.seed, cfg.val_fraction)
        workers = workers_for(files, cfg.num_workers)
        for docs in map_in_order(read_task, [(f, cfg.jsonl_field) for f in files], workers, None):
            yield from (text for text in docs.texts if not next(draws))
    return train_bpe(train_texts(), cfg.vocab_size)


def _build(cfg: DataConfig, files: list[SourceFile], ignored: dict[str, int], key: str, folder: Path) -> dict:
    started = time.perf_counter()
    for stale in folder.glob("*.tmp*"):  # left by a killed build; we hold the lock
        stale.unlink()
    tok = _tokenizer_for(cfg, files)
    tok_file = None
    if not isinstance(tok, ByteTokenizer):
        tmp = _atomic_path(folder / "tokenizer.json")
        tok.save(tmp)
        os.replace(tmp, folder / "tokenizer.json")
        tok_file = {"file": "tokenizer.json", "bytes": (folder / "tokenizer.json").stat().st_size}
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    sources = {s: {"files": 0, "documents": 0, "bytes": 0, "tokens": 0, "skipped": {}, "ignored": n}
               for s, n in ignored.items()}
    workers = workers_for(files, cfg.num_workers)
    all_tmp = _atomic_path(folder / "all.bin")
    lengths = []
    with open(all_tmp, "wb") as out:
        tasks = [(chunk, cfg.jsonl_field, dtype.str) for chunk in chunks(files)]
        results = (r for chunk in map_in_order(tokenize_task, tasks, workers, tok.to_config()) for r in chunk)
        for f, (tokens, doc_lengths, nbytes, skipped) in zip(files, results, strict=True):
            out.write(tokens.tobytes())
            lengths.append(doc_lengths)
            row = sources[f.source]
            row["files"] += 1
            row["documents"] += len(doc_lengths)
            row["bytes"] += nbytes
            row["tokens"] += len(tokens)
            for reason, n in skipped.items():
                row["skipped"][reason] = row["skipped"].get(reason, 0) + n
    _note_pypdf(sources)
    doc_lengths = np.concatenate(lengths)
    if len(doc_lengths) == 0:
        all_tmp.unlink()
        raise ValueError(f"DataConfig.paths: the corpus is empty: {len(files)} files gave no document "
                         f"(skipped: {_skipped_total(sources)})")
    is_val = _split(len(doc_lengths), cfg.val_fraction, cfg.seed)
    shards = _write_splits(folder, all_tmp, doc_lengths, is_val, cfg.val_fraction, dtype)
    all_tmp.unlink()
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "spec": tokenizer_spec(cfg.tokenizer, cfg.vocab_size)},
        "tokenizer_file": tok_file,
        "sources": sources,
        "files": [{"path": f.path, "source": f.source, "kind": f.kind, "size": f.size, "mtime_ns": f.mtime_ns,
                   "limit": f.limit} for f in files],
        "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "documents": len(doc_lengths),
                  "val_documents": int(is_val.sum()) if len(doc_lengths) > 1 else 0},
        "shards": shards,
        "build": {"workers": workers, "seconds": round(time.perf_counter() - started, 3)},
    }
    tmp = _atomic_path(folder / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")
    return manifest


def _write_splits(folder: Path, all_path: Path, doc_lengths: np.ndarray, is_val: np.ndarray, val_fraction: float,
                  dtype: np.dtype) -> dict:
    """Copy each document's tokens from the packed stream into train.bin or val.bin, keeping document order."""
    tokens = np.memmap(all_path, dtype=dtype, mode="r")
    ends = np.cumsum(doc_lengths)
    starts = ends - doc_lengths
    if len(doc_lengths) == 1 and val_fraction > 0:
        # One document cannot be split by document: its tail becomes validation (both sides at least one token).
        cut = min(max(1, round(len(tokens) * (1 - val_fraction))), len(tokens) - 1)
        ranges = {"train": [(0, cut)], "val": [(cut, len(tokens))]}
    else:
        # Runs of consecutive documents on the same side are copied in one slice.
        change = np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1
        run_starts = np.concatenate([[0], change])
        run_ends = np.concatenate([change, [len(doc_lengths)]])
        ranges = {"train": [], "val": []}
        for a, b in zip(run_starts, run_ends):
            ranges["val" if is_val[a] else "train"].append((int(starts[a]), int(ends[b - 1])))
    shards = {}
    for split, spans in ranges.items():
        path = folder / f"{split}.bin"
        tmp = _atomic_path(path)
        with open(tmp, "wb") as out:
            for a, b in spans:
                out.write(tokens[a:b].tobytes())
        os.replace(tmp, path)
        n_tokens = sum(b - a for a, b in spans)
        shards[split] = {"file": path.name, "tokens": n_tokens, "bytes": n_tokens * dtype.itemsize,
                         "sha256": _sha256(path)}
    del tokens
    return shards


def _skipped_total(sources: dict) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in sources.values():
        for reason, n in row["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    return total


def _note_pypdf(sources: dict) -> None:
    global _noted_pypdf
    n = _skipped_total(sources).get(PYPDF_MISSING, 0)
    if n and not _noted_pypdf:
        _noted_pypdf = True
        warnings.warn(f"{n} PDF files skipped: pypdf is not installed (pip install fasttrain[pdf])", stacklevel=3)
