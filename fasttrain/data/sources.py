"""Sources: find the files of a DataConfig (paths, include/exclude globs, max_bytes) and read their documents.

One document per text, Markdown, code or PDF file; one per JSONL record. A file that cannot be read as text
(binary, not UTF-8, corrupt PDF, no pypdf) is skipped with a reason that the summary counts: it never stops a run.
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fasttrain.data.config import JSONL_EXTENSIONS, PDF_EXTENSIONS, TEXT_EXTENSIONS, DataConfig

DEFAULT_SOURCE = "stdlib"
# Not part of the default corpus: third-party code, the stdlib's own test suites (odd encodings, huge data files).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SNIFF_BYTES = 8192
PYPDF_MISSING = "pdf (pypdf not installed: pip install fasttrain[pdf])"


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Absolute path of the file."""
    source: str
    """The configured path (or "stdlib") it was found under: the row of the summary it counts in."""
    kind: str
    """"text", "code", "jsonl" or "pdf"."""
    size: int
    """Bytes on disk when found."""
    mtime_ns: int
    """Modification time when found; with size, what tells a changed corpus."""
    limit: int | None
    """Read at most this many bytes (the file that reaches DataConfig.max_bytes); None reads it all."""


@dataclass
class Documents:
    texts: list[str]
    skipped: dict[str, int]
    """Reason -> count of files (or JSONL records) that gave no document."""


def _kind(path: Path, code_extensions: set[str], explicit: bool) -> str | None:
    ext = path.suffix.lower()
    if ext in JSONL_EXTENSIONS:
        return "jsonl"
    if ext in PDF_EXTENSIONS:
        return "pdf"
    if ext in TEXT_EXTENSIONS:
        return "text"
    if ext in code_extensions:
        return "code"
    # A file named on its own is read as text whatever its name; in a folder, unknown extensions are ignored.
    return "text" if explicit else None


def _matches(rel: str, patterns: list[str]) -> bool:
    # fnmatch's "*" also matches "/", so "*.md" keeps Markdown at any depth; "**/x" must also match a top-level "x".
    return any(
        fnmatch.fnmatchcase(rel, p) or (p.startswith("**/") and fnmatch.fnmatchcase(rel, p[3:])) for p in patterns
    )


def _walk(root: Path, skip_dirs: set[str]) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip_dirs)
        found.extend(Path(folder) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def discover(cfg: DataConfig) -> tuple[list[SourceFile], dict[str, int]]:
    """The files to read, in a fixed order (configured paths in order, each sorted), and per source the number of
    files ignored: an unrecognised extension, not a regular file, or a file already found. ValueError for a missing
    path or when nothing is left."""
    code_extensions = {e.lower() for e in cfg.code_extensions}
    if cfg.paths:
        roots = [(str(p), Path(p).expanduser(), None) for p in cfg.paths]
    else:
        roots = [(DEFAULT_SOURCE, Path(sysconfig.get_paths()["stdlib"]), {".py"})]
    files: list[SourceFile] = []
    ignored: dict[str, int] = {}
    seen: set[str] = set()
    used = 0
    for source, root, only in roots:
        if not root.exists():
            raise ValueError(f"DataConfig.paths: {source!r} does not exist")
        explicit = root.is_file()
        candidates = [root] if explicit else _walk(root, _STDLIB_SKIP_DIRS if only else {"__pycache__"})
        ignored[source] = 0
        for path in candidates:
            rel = path.name if explicit else path.relative_to(root).as_posix()
            if (cfg.include and not _matches(rel, cfg.include)) or _matches(rel, cfg.exclude):
                continue
            if only is not None:
                kind = "code" if path.suffix in only else None
            else:
                kind = _kind(path, code_extensions, explicit)
            resolved = str(path.resolve())
            # is_file: False for a dangling link, a socket, a fifo. A file found twice (a folder and a file in it,
            # a link to a file beside it) is read once: twice could put one document in both splits.
            if kind is None or not path.is_file() or resolved in seen:
                ignored[source] += 1
                continue
            seen.add(resolved)
            stat = path.stat()
            limit = None
            if cfg.max_bytes is not None:
                if used >= cfg.max_bytes:
                    break
                if used + stat.st_size > cfg.max_bytes:
                    if kind == "pdf":  # a PDF cannot be cut at a byte offset; the cap ends the corpus here
                        used = cfg.max_bytes
                        break
                    limit = cfg.max_bytes - used
            used += stat.st_size if limit is None else limit
            files.append(SourceFile(resolved, source, kind, stat.st_size, stat.st_mtime_ns, limit))
    if not files:
        raise ValueError(
            f"DataConfig.paths: no readable files in {[r[0] for r in roots]} after include={cfg.include} "
            f"exclude={cfg.exclude} (extensions: text {TEXT_EXTENSIONS}, jsonl {JSONL_EXTENSIONS}, "
            f"pdf, and code_extensions)"
        )
    return files, ignored


def _decode(data: bytes, truncated: bool) -> str | None:
    """UTF-8 text of `data`, or None when it looks binary. A cut file loses its last, incomplete character."""
    if b"\0" in data[:_SNIFF_BYTES]:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None
    return text[1:] if text.startswith("\ufeff") else text


def _read_bytes(f: SourceFile) -> bytes:
    with open(f.path, "rb") as fh:
        return fh.read() if f.limit is None else fh.read(f.limit)


def _count(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _read_jsonl(f: SourceFile, data: bytes, field: str) -> Documents:
    """One document per record. Records are split on b"\n" alone (str.splitlines would also split inside a record at
    U+2028, U+2029 or U+0085, which JSON leaves unescaped) and decoded one by one, so a bad byte or a lone
    surrogate costs its record, not the file."""
    if f.limit is not None and len(data) == f.limit:
        data = data[: data.rfind(b"\n") + 1]  # whole records only
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    docs, skipped, first_keys, field_seen = [], {}, None, False
    missing = f"jsonl record without string {field!r}"
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            _count(skipped, "jsonl line not UTF-8")
            continue
        except json.JSONDecodeError:
            _count(skipped, "jsonl line not JSON")
            continue
        if first_keys is None and isinstance(record, dict):
            first_keys = sorted(record)
        field_seen = field_seen or (isinstance(record, dict) and field in record)
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            _count(skipped, missing)
        elif not _is_encodable(value):
            _count(skipped, "jsonl record with a lone surrogate (\\ud800-\\udfff escape)")
        elif value:
            docs.append(value)
    # A field that no record has is a wrong setting, not a bad record: say so instead of skipping the whole file.
    if first_keys is not None and not field_seen:
        raise ValueError(
            f"DataConfig.jsonl_field {field!r} is in no record of {f.path} (the first record has keys {first_keys})"
        )
    return Documents(docs, skipped)


def _is_encodable(text: str) -> bool:
    """False for a string no UTF-8 tokenizer can take: JSON's "\\ud83d" escape (half of a cut emoji) decodes to a
    lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_pdf(f: SourceFile) -> Documents:
    try:
        import pypdf
    except ImportError:
        return Documents([], {PYPDF_MISSING: 1})
    try:
        reader = pypdf.PdfReader(f.path)
        text = "\n".join(page.extract_text() or "" for page in reader.pages)
    except OSError:
        return Documents([], {"unreadable": 1})
    except Exception:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) for a corrupt file
        return Documents([], {"corrupt pdf": 1})
    return Documents([text], {}) if text.strip() else Documents([], {"pdf without text": 1})


def read_documents(f: SourceFile, jsonl_field: str) -> Documents:
    """The documents of one file; a file that gives none says why in `skipped`."""
    if f.kind == "pdf":
        return _read_pdf(f)
    try:
        data = _read_bytes(f)
    except OSError:
        return Documents([], {"unreadable": 1})
    if f.kind == "jsonl":
        return _read_jsonl(f, data, jsonl_field)
    text = _decode(data, truncated=f.limit is not None)
    if text is None:
        return Documents([], {"binary or not UTF-8": 1})
    return Documents([text], {}) if text.strip() else Documents([], {"empty": 1})
