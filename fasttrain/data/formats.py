"""Readers of the formats that are parsed from their bytes, plain or gzip/zstd-compressed: text and code (one
document per file), JSONL (one per record), HTML (its text, without markup, scripts or styles), Jupyter notebooks
(Markdown cells as text, code cells fenced), CSV/TSV (one per row of the text column)."""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import re
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

from fasttrain.data.config import CSV_EXTENSIONS
from fasttrain.data.sources import Documents, ReadOptions, SourceFile, count

_SNIFF_BYTES = 8192
ZSTD_MISSING = "zstd (zstandard not installed: pip install fasttrain[zstd])"


class Skip(Exception):
    """A file that gives no document; the message is the summary's reason."""


def missing_column(column: str) -> str:
    return f"table without the text column {column!r} (DataConfig.text_column)"


def read_bytes_kind(f: SourceFile, opts: ReadOptions) -> Documents:
    try:
        data = _read_bytes(f, opts.max_decompressed_bytes)
    except Skip as exc:
        return Documents([], {str(exc): 1})
    except OSError:
        return Documents([], {"unreadable": 1})
    if f.kind == "jsonl":
        return read_jsonl(f, data, opts.jsonl_field)
    if f.kind == "notebook":
        return read_notebook(data)
    if f.kind == "csv":
        return read_csv(f, data, opts.text_column)
    text = decode(data, truncated=f.limit is not None, html=f.kind == "html")
    if text is None:
        return Documents([], {"binary or not UTF-8": 1})
    if f.kind == "html":
        text = html_text(text)
    return Documents([text]) if text.strip() else Documents([], {"empty": 1})


def _read_bytes(f: SourceFile, cap: int) -> bytes:
    if f.compression is None:
        with open(f.path, "rb") as fh:
            return fh.read() if f.limit is None else fh.read(f.limit)
    out = bytearray()
    try:
        with _open_compressed(f) as fh:
            # Streamed in blocks and stopped past the cap: a zip bomb never reaches its full size in memory.
            while block := fh.read(1 << 20):
                out += block
                if len(out) > cap:
                    raise Skip(f"decompresses to over {cap:,} bytes (DataConfig.max_decompressed_bytes)")
    except (Skip, FileNotFoundError, PermissionError):
        raise
    except _decompress_errors() as exc:
        raise Skip(f"corrupt {f.compression}") from exc
    return bytes(out)


def _decompress_errors() -> tuple[type[Exception], ...]:
    """What a corrupt or cut stream raises: gzip BadGzipFile (an OSError), EOFError or zlib.error; zstd its
    ZstdError (of whichever zstd module is loaded)."""
    errors = [OSError, EOFError, ValueError, zlib.error]
    errors += [m.ZstdError for m in (sys.modules.get("compression.zstd"), sys.modules.get("zstandard")) if m]
    return tuple(errors)


def _open_compressed(f: SourceFile):
    if f.compression == "gzip":
        return gzip.open(f.path, "rb")
    try:
        from compression import zstd  # Python >= 3.14

        return zstd.open(f.path, "rb")
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise Skip(ZSTD_MISSING) from None
    return zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), read_across_frames=True, closefd=True)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)


def decode(data: bytes, truncated: bool = False, html: bool = False) -> str | None:
    """UTF-8 text of `data`, or None when it looks binary. A cut file loses its last, incomplete character. HTML
    that is not UTF-8 is decoded with the charset its <meta> tag names, as browsers do."""
    if b"\0" in data[:_SNIFF_BYTES]:
        return None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError:
        match = _META_CHARSET.search(data[:_SNIFF_BYTES]) if html else None
        if match is None:
            return None
        try:
            text = data.decode(match.group(1).decode("ascii"))
        except (LookupError, UnicodeDecodeError):
            return None
    return text[1:] if text.startswith("\ufeff") else text


_BLOCK_TAGS = (
    "address article aside blockquote br caption dd details dialog div dl dt fieldset figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr legend li main nav ol p pre section summary table title tr ul"
)


class _HTMLText(HTMLParser):
    """The text a browser shows: no tags, comments, scripts, styles; each block element on its own lines; runs of white
    space collapsed except inside <pre>."""

    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "math", "iframe", "object"})
    BLOCK = frozenset(_BLOCK_TAGS.split())

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self._newline(always=tag == "br")
        elif tag in ("td", "th"):
            self.pieces.append(" ")
        if tag == "pre":
            self.pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK:
            self._newline(always=tag == "br")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self._newline()
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.pieces or self.pieces[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.pieces.append(data)

    def _newline(self, always: bool = False):
        """End the line: a block element starts and ends one (once), <br> each time."""
        if self.pieces and not self.pre:
            self.pieces[-1] = self.pieces[-1].rstrip(" ")
        if always or (self.pieces and not self.pieces[-1].endswith("\n")):
            self.pieces.append("\n")

    def text(self) -> str:
        return re.sub(r"\n{3,}", "\n\n", "".join(self.pieces)).strip()


def html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    return parser.text()


def read_notebook(data: bytes) -> Documents:
    """A Jupyter notebook as Markdown, as `jupyter nbconvert --to markdown` writes it without outputs: Markdown cells
    as they are, code cells in fences tagged with the kernel's language; outputs and raw cells are dropped."""
    try:
        nb = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return Documents([], {"notebook not JSON": 1})
    if isinstance(nb, dict) and "cells" not in nb and isinstance(nb.get("worksheets"), list):  # nbformat 3
        nb = {**nb, "cells": [c for w in nb["worksheets"] if isinstance(w, dict) for c in w.get("cells", [])]}
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list):
        return Documents([], {"notebook without cells": 1})
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    language = (meta.get("kernelspec") or {}).get("language") or (meta.get("language_info") or {}).get("name") or ""
    parts = []
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        source = cell.get("source", cell.get("input", ""))  # nbformat 3 keeps a code cell's source in "input"
        source = "".join(source) if isinstance(source, list) else source
        if not isinstance(source, str) or not source.strip():
            continue
        if cell.get("cell_type") == "markdown":
            parts.append(source.strip("\n"))
        elif cell.get("cell_type") == "code":
            parts.append(f"```{language}\n{source.strip(chr(10))}\n```")
    text = "\n\n".join(parts)
    return Documents([text + "\n"]) if text else Documents([], {"empty": 1})


def read_csv(f: SourceFile, data: bytes, column: str) -> Documents:
    """One document per row: the cell of the header's `column`. Empty cells give none."""
    text = decode(data)
    if text is None:
        return Documents([], {"binary or not UTF-8": 1})
    name = Path(f.path).with_suffix("") if f.compression else Path(f.path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=CSV_EXTENSIONS[name.suffix.lower()])
    docs, skipped = [], {}
    with _field_limit(len(text) + 1):
        try:
            header = next(reader, None)
            if header is None:
                return Documents([], {"empty": 1})
            if column not in header:
                return Documents([], {missing_column(column): 1})
            at = header.index(column)
            for row in reader:
                if row and len(row) <= at:
                    count(skipped, "csv row shorter than its header")
                elif row and row[at]:
                    docs.append(row[at])
        except csv.Error:
            return Documents([], {"corrupt csv": 1})
    return Documents(docs, skipped)


@contextlib.contextmanager
def _field_limit(limit: int):
    """csv's largest field (131072 characters by default) raised to the whole file, for this read only."""
    old = csv.field_size_limit(max(limit, csv.field_size_limit()))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_jsonl(f: SourceFile, data: bytes, field: str) -> Documents:
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
            count(skipped, "jsonl line not UTF-8")
            continue
        except json.JSONDecodeError:
            count(skipped, "jsonl line not JSON")
            continue
        if first_keys is None and isinstance(record, dict):
            first_keys = sorted(record)
        field_seen = field_seen or (isinstance(record, dict) and field in record)
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            count(skipped, missing)
        elif not is_encodable(value):
            count(skipped, "jsonl record with a lone surrogate (\\ud800-\\udfff escape)")
        elif value:
            docs.append(value)
    # A field that no record has is a wrong setting, not a bad record: say so instead of skipping the whole file.
    if first_keys is not None and not field_seen:
        raise ValueError(
            f"DataConfig.jsonl_field {field!r} is in no record of {f.path} (the first record has keys {first_keys})"
        )
    return Documents(docs, skipped)


def is_encodable(text: str) -> bool:
    """False for a string no UTF-8 tokenizer can take: JSON's "\\ud83d" escape (half of a cut emoji) decodes to a
    lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
