"""prepare(cfg): sources -> tokenizer -> token shards on disk, reused while the corpus and tokenizer are unchanged.

Layout of one cache folder (named by the hash of everything that decides its contents):
    train.bin, val.bin   packed token ids (uint16 when the vocabulary fits, else uint32), each document followed by
                         the end-of-text id
    tokenizer.json       the BPE or user tokenizer (absent for the byte tokenizer)
    manifest.json        sources, per-source and per-format counts (documents, bytes, tokens, duplicates, what
                         was skipped and why), tokenizer, shard sizes and sha256: written last, so a folder
                         without it (a killed run) is never trusted
Every file is written whole (fasttrain._files.atomic_write: a temporary name, then a rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fasttrain._files import atomic_write, atomic_write_text
from fasttrain.data.config import DataConfig
from fasttrain.data.corpus import Corpus
from fasttrain.data.parallel import chunks, doc_hash, map_in_order, read_task, tokenize_task, workers_for
from fasttrain.data.scans import PYPDF_MISSING, ocr_version
from fasttrain.data.sources import HF_DATASET, Found, ReadOptions, SourceFile, discover, package_version
from fasttrain.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer_file, tokenizer_spec, train_bpe

FORMAT_VERSION = 3  # 3: HTML, notebooks, tables, compressed files, OCR; exact duplicates removed
_noted_pypdf = False


def cache_key(cfg: DataConfig, files: list[SourceFile], tok_spec: dict) -> str:
    """Hash of what decides the shards: each file's path, size and mtime (include/exclude/max_bytes/code_extensions
    act through the file list and limits), the reader settings and the optional readers installed, the tokenizer,
    dedup, and the split."""
    payload = {
        "format": FORMAT_VERSION,
        "files": [[f.path, f.source, f.kind, f.size, f.mtime_ns, f.limit, f.compression] for f in files],
        "jsonl_field": cfg.jsonl_field,
        "text_column": cfg.text_column,
        "max_decompressed_bytes": cfg.max_decompressed_bytes,
        "readers": _reader_versions(cfg, files),
        "dedup": cfg.dedup,
        "tokenizer": tok_spec,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reader_versions(cfg: DataConfig, files: list[SourceFile]) -> dict:
    """The optional readers these files need, with their versions (None: not installed): installing one, or
    switching OCR on, must rebuild shards that skipped what it reads."""
    kinds, compressions = {f.kind for f in files}, {f.compression for f in files}
    out = {}
    if "pdf" in kinds:
        out["pypdf"] = package_version("pypdf")
    if kinds & {"parquet", HF_DATASET}:
        out["pyarrow"] = package_version("pyarrow")
    if "zstd" in compressions and sys.version_info < (3, 14):
        out["zstandard"] = package_version("zstandard")
    if kinds & {"pdf", "image"}:
        out["ocr"] = ocr_version() if cfg.ocr else "off"
    return out


def prepare(cfg: DataConfig) -> Corpus:
    """Token shards for `cfg`: reused when a complete build with the same key exists, else built (in parallel with
    cfg.num_workers processes). ValueError, naming the setting, for a missing path, an empty corpus, a JSONL field
    that no record has, or an unusable tokenizer file."""
    cfg.validate()
    files, found = discover(cfg)
    key = cache_key(cfg, files, tokenizer_spec(cfg.tokenizer, cfg.vocab_size))
    folder = cfg.resolved_cache_dir() / key[:24]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"DataConfig.cache_dir (or $FASTTRAIN_CACHE): cannot make the shard folder {str(folder)!r} "
            f"({exc.strerror or exc})"
        ) from exc
    with _locked(folder / ".lock"):
        manifest = _trusted_manifest(folder, key)
        reused = manifest is not None
        if manifest is None:
            try:
                manifest = _build(cfg, files, found, key, folder)
            finally:  # a failed build leaves no temporary behind (the token stream is the corpus' size)
                _remove_temporaries(folder)
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
    for entry in list(manifest["shards"].values()) + (
        [manifest["tokenizer_file"]] if manifest.get("tokenizer_file") else []
    ):
        # Size and mtime, as make and ccache judge a file: a shard written over in place is rebuilt, not read
        # (out-of-range ids would reach the embedding). Its sha256 would reread it at ~1 GB/s on every start.
        path = folder / entry["file"]
        stat = path.stat() if path.is_file() else None
        if stat is None or (stat.st_size, stat.st_mtime_ns) != (entry["bytes"], entry["mtime_ns"]):
            return None
    return manifest


def _remove_temporaries(folder: Path) -> None:
    """Every temporary in `folder` (atomic_write's and the packed stream's); the caller holds its lock, so none is
    another build's."""
    for stale in folder.glob("*.tmp*"):
        stale.unlink(missing_ok=True)


def _scratch_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _file_entry(path: Path) -> dict:
    """What `_trusted_manifest` checks of a file before reusing it."""
    stat = path.stat()
    return {"file": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean per document: True for validation. A seeded uniform draw per document index (streamed by
    `_train_side`), so the split depends only on (seed, document order), never on the number of workers. With two
    or more documents and a positive fraction, each side gets at least one."""
    u = np.random.default_rng(seed).random(n_docs)
    is_val = u < val_fraction
    if val_fraction > 0 and n_docs >= 2:
        if not is_val.any():
            is_val[np.argmin(u)] = True
        if is_val.all():
            is_val[np.argmax(u)] = False
    return is_val


def _train_side(texts: Iterator[str], seed: int, val_fraction: float) -> Iterator[str]:
    """The documents `_split` puts in training, streamed before their number is known (Generator.random() repeats
    random(n) value for value), for BPE to learn from training text only. The at-least-one-each-side fix of
    `_split` is followed by holding back one document: while no document has drawn validation, the one with the
    smallest draw (the one `_split` moves to validation if none does); while none has drawn training, the
    validation one with the largest draw (the one it moves to training). A one-document corpus gives its head, the
    characters in the share `_write_splits` cuts in tokens."""
    if val_fraction == 0:
        yield from texts
        return
    rng = np.random.default_rng(seed)
    held_train = held_val = None  # (draw, text)
    any_train = any_val = False
    n = 0
    for text in texts:
        u, n = rng.random(), n + 1
        if u < val_fraction:
            any_val = True
            if held_train is not None:
                yield held_train[1]
                held_train = None
            if not any_train and (held_val is None or u > held_val[0]):
                held_val = (u, text)
            continue
        any_train, held_val = True, None
        if any_val:
            yield text
        elif held_train is None or u < held_train[0]:
            if held_train is not None:
                yield held_train[1]
            held_train = (u, text)
        else:
            yield text
    held = held_train or held_val
    if n == 1:
        yield held[1][: round(len(held[1]) * (1 - val_fraction))]
    elif held_val is not None:
        yield held_val[1]


def _unique(texts: Iterator[str]) -> Iterator[str]:
    """The texts less exact repeats of an earlier one, as _build drops them."""
    seen: set[bytes] = set()
    for text in texts:
        h = doc_hash(text.encode("utf-8"))
        if h not in seen:
            seen.add(h)
            yield text


def _tokenizer_for(cfg: DataConfig, files: list[SourceFile]) -> Tokenizer:
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer_file(cfg.tokenizer)
    workers = workers_for(files, cfg.num_workers)
    docs = map_in_order(read_task, [(f, ReadOptions.of(cfg)) for f in files], workers, None)
    texts = (text for d in docs for text in d.texts)
    texts = _unique(texts) if cfg.dedup else texts
    return train_bpe(_train_side(texts, cfg.seed, cfg.val_fraction), cfg.vocab_size)


def _row() -> dict:
    """One source's (or one format's) counts in the manifest."""
    return {"files": 0, "documents": 0, "bytes": 0, "tokens": 0, "duplicates": 0, "skipped": {}}


def _add(counts: dict[str, int], more: dict[str, int]) -> None:
    for reason, n in more.items():
        counts[reason] = counts.get(reason, 0) + n


def _build(cfg: DataConfig, files: list[SourceFile], found: dict[str, Found], key: str, folder: Path) -> dict:
    started = time.perf_counter()
    _remove_temporaries(folder)  # left by a killed build
    tok = _tokenizer_for(cfg, files)
    tok_file = None
    if not isinstance(tok, ByteTokenizer):
        tok.save(folder / "tokenizer.json")
        tok_file = _file_entry(folder / "tokenizer.json")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)

    sources = {}
    for s, here in found.items():
        sources[s] = {**_row(), "ignored": here.ignored, "skipped": dict(here.skipped), "warnings": {}, "formats": {}}
    tasks = [(chunk, ReadOptions.of(cfg), dtype.str) for chunk in chunks(files)]
    workers = min(workers_for(files, cfg.num_workers), len(tasks))
    all_tmp = _scratch_path(folder / "all.bin")
    lengths, seen = [], set()
    with open(all_tmp, "wb") as out:
        results = (r for chunk in map_in_order(tokenize_task, tasks, workers, tok.to_config()) for r in chunk)
        for f, r in zip(files, results, strict=True):
            keep = np.ones(len(r.lengths), dtype=bool)
            if cfg.dedup:
                for i, h in enumerate(r.hashes):
                    keep[i] = h not in seen
                    seen.add(h)
            tokens = r.tokens if keep.all() else r.tokens[np.repeat(keep, r.lengths)]
            out.write(tokens.tobytes())
            lengths.append(r.lengths[keep])
            row = sources[f.source]
            fmt = row["formats"].setdefault(f.format, _row())
            for counts in (row, fmt):
                counts["files"] += 1
                counts["documents"] += int(keep.sum())
                counts["duplicates"] += int((~keep).sum())
                counts["bytes"] += int(r.nbytes[keep].sum())
                counts["tokens"] += len(tokens)
                _add(counts["skipped"], r.skipped)
            _add(row["warnings"], r.warnings)
    _note_pypdf(sources)
    doc_lengths = np.concatenate(lengths)
    if len(doc_lengths) == 0:
        all_tmp.unlink()
        skipped = ", ".join(f"{n:,} {why}" for why, n in sorted(_skipped_total(sources).items())) or "none"
        raise ValueError(
            f"DataConfig.paths: the corpus is empty: {len(files)} files gave no document (skipped: {skipped})"
        )
    is_val = _split(len(doc_lengths), cfg.val_fraction, cfg.seed)
    shards = _write_splits(folder, all_tmp, doc_lengths, is_val, cfg.val_fraction, dtype)
    all_tmp.unlink()
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "dtype": dtype.name,
        "tokenizer": {
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "spec": tokenizer_spec(cfg.tokenizer, cfg.vocab_size),
        },
        "tokenizer_file": tok_file,
        "sources": sources,
        "files": [
            {
                "path": f.path,
                "source": f.source,
                "kind": f.kind,
                "compression": f.compression,
                "size": f.size,
                "mtime_ns": f.mtime_ns,
                "limit": f.limit,
            }
            for f in files
        ],
        "split": {
            "val_fraction": cfg.val_fraction,
            "seed": cfg.seed,
            "documents": len(doc_lengths),
            "val_documents": int(is_val.sum()) if len(doc_lengths) > 1 else 0,
        },
        "dedup": cfg.dedup,
        "shards": shards,
        "build": {"workers": workers, "seconds": round(time.perf_counter() - started, 3)},
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _write_splits(
    folder: Path, all_path: Path, doc_lengths: np.ndarray, is_val: np.ndarray, val_fraction: float, dtype: np.dtype
) -> dict:
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

        def write(out, spans=spans, tokens=tokens):
            for a, b in spans:
                out.write(tokens[a:b].tobytes())

        atomic_write(path, write)
        shards[split] = {**_file_entry(path), "tokens": sum(b - a for a, b in spans), "sha256": _sha256(path)}
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
