"""Sources: find the files of a DataConfig (paths, include/exclude globs, max_bytes) and read their documents.

One document per text, Markdown, code, HTML, notebook, PDF or image file; one per JSONL record and per row of a
CSV/TSV file, a Parquet file or a Hugging Face `datasets` folder. A file that gives no document (binary, corrupt, a
missing optional reader, a table without the text column, a zip bomb) is skipped with a reason that the summary
counts, and a third-party parser's warnings are caught and counted there too: neither stops a run nor reaches
the console.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fasttrain.data.config import (
    COMPRESSED_EXTENSIONS,
    CSV_EXTENSIONS,
    HTML_EXTENSIONS,
    IMAGE_EXTENSIONS,
    JSONL_EXTENSIONS,
    NOTEBOOK_EXTENSIONS,
    PARQUET_EXTENSIONS,
    PDF_EXTENSIONS,
    TEXT_EXTENSIONS,
    DataConfig,
)

DEFAULT_SOURCE = "stdlib"
# Not part of the default corpus: third-party code, the stdlib's own test suites (odd encodings, huge data files).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HF_DATASET = "hf-dataset"
# Kinds read from their bytes, so also from a .gz/.zst file; the others need the file itself.
BYTE_KINDS = ("text", "code", "jsonl", "html", "notebook", "csv")
# Kinds that max_bytes may cut at a byte offset; any other file that would pass the cap ends the corpus instead.
CUTTABLE_KINDS = ("text", "code", "jsonl")
SYMLINK_LOOP = "symlink loop"
# Loggers of the third-party parsers: their records are counted per file instead of printed.
_PARSER_LOGGERS = ("pypdf", "PIL", "pyarrow", "RapidOCR")


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Absolute path of the file (for a Hugging Face `datasets` folder, of one of its Arrow shards)."""
    source: str
    """The configured path (or "stdlib") it was found under: the row of the summary it counts in."""
    kind: str
    """"text", "code", "jsonl", "html", "notebook", "csv", "parquet", "pdf", "image" or "hf-dataset"."""
    size: int
    """Bytes on disk when found."""
    mtime_ns: int
    """Modification time when found; with size, what tells a changed corpus."""
    limit: int | None
    """Read at most this many bytes (the file that reaches DataConfig.max_bytes); None reads it all."""
    compression: str | None = None
    """"gzip" or "zstd" for a .gz/.zst file, read decompressed; None for a plain file."""

    @property
    def format(self) -> str:
        """The row of the summary it counts in within its source: the kind, with its compression."""
        return self.kind if self.compression is None else f"{self.kind}+{self.compression}"


@dataclass(frozen=True)
class ReadOptions:
    """What the readers take from a DataConfig (picklable, for the worker processes)."""

    jsonl_field: str = "text"
    text_column: str = "text"
    max_decompressed_bytes: int = 1 << 30
    ocr: bool = True
    ocr_cache: str | None = None
    """Folder of cached OCR results; None computes every time."""

    @classmethod
    def of(cls, cfg: DataConfig) -> ReadOptions:
        return cls(
            cfg.jsonl_field,
            cfg.text_column,
            cfg.max_decompressed_bytes,
            cfg.ocr,
            str(cfg.resolved_cache_dir() / "ocr"),
        )


@dataclass
class Documents:
    texts: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> count of files (or records, rows) that gave no document."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Third-party parser warning -> 1 (this file raised it), whether or not the file gave documents."""


@dataclass
class Found:
    """What `discover` found under one configured path besides the files to read."""

    ignored: int = 0
    """Files not read: an unrecognised extension, not a regular file, or a file already found."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> count of entries that could not even be looked at (symlink loops)."""


def _kind(path: Path, code_extensions: set[str], explicit: bool) -> tuple[str | None, str | None]:
    """(kind, compression) of a file by its name; kind None for a file not to read."""
    ext = path.suffix.lower()
    compression = COMPRESSED_EXTENSIONS.get(ext)
    if compression is not None:
        inner, _ = _kind(path.with_suffix(""), code_extensions, explicit)
        return (inner, compression) if inner in BYTE_KINDS else (None, None)
    for kind, extensions in (
        ("jsonl", JSONL_EXTENSIONS),
        ("pdf", PDF_EXTENSIONS),
        ("text", TEXT_EXTENSIONS),
        ("html", HTML_EXTENSIONS),
        ("notebook", NOTEBOOK_EXTENSIONS),
        ("csv", CSV_EXTENSIONS),
        ("parquet", PARQUET_EXTENSIONS),
        ("image", IMAGE_EXTENSIONS),
        ("code", code_extensions),
    ):
        if ext in extensions:
            return kind, None
    # A file named on its own is read as text whatever its name; in a folder, unknown extensions are ignored.
    return ("text" if explicit else None), None


def is_hf_dataset(folder: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`: state.json (listing the Arrow files) and
    dataset_info.json."""
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _matches(rel: str, patterns: list[str]) -> bool:
    # fnmatch's "*" also matches "/", so "*.md" keeps Markdown at any depth; "**/x" must also match a top-level "x".
    return any(
        fnmatch.fnmatchcase(rel, p) or (p.startswith("**/") and fnmatch.fnmatchcase(rel, p[3:])) for p in patterns
    )


def _walk(root: Path, skip_dirs: set[str], found: Found) -> list[Path]:
    """Files under root in sorted order, following links to folders; a folder reached again through a link (a
    symlink loop) is counted in `found.skipped`, not entered. A `datasets` folder is one entry."""
    entries, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if here != root and any(real == os.path.realpath(p) for p in here.parents):
            count(found.skipped, SYMLINK_LOOP)  # a link to a folder above it: entering would never end
            dirs[:] = []
            continue
        if real in seen:  # a second link to a folder already read: its files would all be duplicates
            dirs[:] = []
            continue
        seen.add(real)
        if here != root and is_hf_dataset(here):
            entries.append(here)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip_dirs)
        entries.extend(here / f for f in files if not f.startswith("."))
    return sorted(entries, key=lambda p: p.relative_to(root).as_posix())


def dataset_shards(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets` folder in its state.json's order; [folder] itself when state.json cannot be
    read (its reader then says so)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [folder]


def discover(cfg: DataConfig) -> tuple[list[SourceFile], dict[str, Found]]:
    """The files to read, in a fixed order (configured paths in order, each sorted), and per source what was found
    but not read. ValueError for a missing path or when nothing is left."""
    code_extensions = {e.lower() for e in cfg.code_extensions}
    if cfg.paths:
        roots = [(str(p), Path(p).expanduser(), None) for p in cfg.paths]
    else:
        roots = [(DEFAULT_SOURCE, Path(sysconfig.get_paths()["stdlib"]), {".py"})]
    files: list[SourceFile] = []
    found: dict[str, Found] = {}
    seen: set[str] = set()
    used = 0
    capped = False
    for source, root, only in roots:
        if root.is_symlink() and not root.exists():
            raise ValueError(f"DataConfig.paths: {source!r} is a broken link or a symlink loop")
        if not root.exists():
            raise ValueError(f"DataConfig.paths: {source!r} does not exist")
        found[source] = here = Found()
        explicit = root.is_file() or is_hf_dataset(root)
        candidates = [root] if explicit else _walk(root, _STDLIB_SKIP_DIRS if only else {"__pycache__"}, here)
        for path in candidates:
            if capped:
                break
            rel = path.name if explicit else path.relative_to(root).as_posix()
            if (cfg.include and not _matches(rel, cfg.include)) or _matches(rel, cfg.exclude):
                continue
            if path.is_dir():  # a `datasets` folder: one file per Arrow shard, so that workers can share them
                members, kind, compression = dataset_shards(path), HF_DATASET, None
            elif only is not None:
                members, kind, compression = [path], ("code" if path.suffix in only else None), None
            else:
                members, (kind, compression) = [path], _kind(path, code_extensions, explicit)
            for member in members:
                try:
                    resolved = str(member.resolve(strict=True))
                except FileNotFoundError:  # a dangling link, or a shard that state.json names but is not there
                    if kind == HF_DATASET:
                        count(here.skipped, "datasets folder without a shard its state.json names")
                    else:
                        here.ignored += 1
                    continue
                except (RuntimeError, OSError):  # a file link that points back at itself (ELOOP)
                    count(here.skipped, SYMLINK_LOOP)
                    continue
                # is_file: False for a socket or a fifo. A file found twice (a folder and a file in it, a link to a
                # file beside it) is read once: twice could put one document in both splits.
                if kind is None or not (member.is_file() or member.is_dir() and kind == HF_DATASET):
                    here.ignored += 1
                    continue
                if resolved in seen:
                    here.ignored += 1
                    continue
                seen.add(resolved)
                stat = member.stat()
                limit = None
                if cfg.max_bytes is not None:
                    if used >= cfg.max_bytes:
                        capped = True
                        break
                    if used + stat.st_size > cfg.max_bytes:
                        if kind not in CUTTABLE_KINDS or compression is not None:
                            capped = True  # a PDF, table, image or compressed file is not cut: the cap ends the corpus
                            break
                        limit = cfg.max_bytes - used
                used += stat.st_size if limit is None else limit
                files.append(SourceFile(resolved, source, kind, stat.st_size, stat.st_mtime_ns, limit, compression))
    if not files:
        loops = sum(f.skipped.get(SYMLINK_LOOP, 0) for f in found.values())
        raise ValueError(
            f"DataConfig.paths: no readable files in {[r[0] for r in roots]} after include={cfg.include} "
            f"exclude={cfg.exclude}{f' ({loops} symlink loops skipped)' if loops else ''} (see docs/data.md "
            f"for the formats read, and DataConfig.code_extensions)"
        )
    return files, found


def package_version(name: str) -> str | None:
    """The installed version of an optional reader's package; None when it is missing (or its import is blocked,
    as tests simulate a missing package)."""
    if name in sys.modules and sys.modules[name] is None:
        return None
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def count(skipped: dict[str, int], reason: str, n: int = 1) -> None:
    skipped[reason] = skipped.get(reason, 0) + n


class _Recorder(logging.Handler):
    def __init__(self, notes: set[str]):
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.add(f"{record.name.split('.')[0]}: {_normal(record.getMessage())}")


def _normal(message: str) -> str:
    """A warning's first line with its numbers as N (object ids, offsets), so that one kind of warning is counted
    under one key."""
    line = (message.strip().splitlines() or [""])[0]
    return re.sub(r"\d+", "N", line)[:120]


@contextlib.contextmanager
def captured(notes: set[str]):
    """Record the warnings (warnings.warn) and WARNING-or-worse log records of the third-party parsers into
    `notes`, instead of the console."""
    handler = _Recorder(notes)
    loggers = [logging.getLogger(name) for name in _PARSER_LOGGERS]
    saved = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Warnings about code (a module imported on the first file a process reads), not about the data.
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning):
                warnings.simplefilter("ignore", category)
            yield
        for w in caught:
            module = getattr(w.category, "__module__", "") or ""
            notes.add(f"{module.split('.')[0] or w.category.__name__}: {_normal(str(w.message))}")
    finally:
        for lg, propagate in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.propagate = propagate


def read_documents(f: SourceFile, opts: ReadOptions) -> Documents:
    """The documents of one file; a file that gives none says why in `skipped`."""
    from fasttrain.data import formats, scans, tables

    notes: set[str] = set()
    with captured(notes):
        if f.kind in ("pdf", "image"):
            docs = scans.read_pdf(f, opts) if f.kind == "pdf" else scans.read_image(f, opts)
        elif f.kind in ("parquet", HF_DATASET):
            docs = tables.read_parquet(f, opts) if f.kind == "parquet" else tables.read_hf_dataset(f, opts)
        else:
            docs = formats.read_bytes_kind(f, opts)
    for note in notes:
        count(docs.warnings, note)
    return docs
