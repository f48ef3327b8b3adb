"""The corpus summary a user sees before training: per source and format, the files, documents, exact duplicates
removed, bytes, tokens, and what was skipped and why; the parser warnings counted; the tokenizer and the split.
`fasttrain train` prints it and writes it to the run directory (data_summary.txt, data_summary.json);
`fasttrain data` prints it without training."""

from __future__ import annotations

import json
from pathlib import Path

from fasttrain._files import atomic_write_text

COLUMNS = ["source", "format", "files", "documents", "duplicates", "bytes", "tokens", "skipped (why)"]
_NUMBERS = ("files", "documents", "duplicates", "bytes", "tokens")


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {why}" for why, n in sorted(counts.items())) or "-"


def table(manifest: dict, folder: Path, reused: bool) -> str:
    """The summary as text: one table (a row per format of each source, and the source's totals where it has
    several formats or files not read), the parser warnings, and a line for the tokenizer, split and cache."""
    rows = [COLUMNS]
    for source, r in manifest["sources"].items():
        formats = sorted(r.get("formats", {}).items())
        for i, (fmt, c) in enumerate(formats):
            rows.append([source if i == 0 else "", fmt, *(f"{c[k]:,}" for k in _NUMBERS), _reasons(c["skipped"])])
        from_formats = {}
        for _, c in formats:
            for why, n in c["skipped"].items():
                from_formats[why] = from_formats.get(why, 0) + n
        if len(formats) != 1 or r["ignored"] or r["skipped"] != from_formats:
            why = _reasons(r["skipped"])
            if r["ignored"]:
                ignored = f"{r['ignored']:,} ignored (not a format read, not a regular file, or found twice)"
                why = ignored if why == "-" else f"{why}, {ignored}"
            rows.append([source if not formats else "", "all", *(f"{r[k]:,}" for k in _NUMBERS), why])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            + [v.rjust(w) for v, w in zip(row[2:-1], widths[2:-1])]
            + [row[-1]]
        ).rstrip()
        for row in rows
    ]
    for source, r in manifest["sources"].items():
        if r.get("warnings"):
            lines.append(f"parser warnings in {source} (files): {_reasons(r['warnings'])}")
    tok, shards, split = manifest["tokenizer"], manifest["shards"], manifest["split"]
    duplicates = sum(r.get("duplicates", 0) for r in manifest["sources"].values())
    dedup = f"{duplicates:,} exact duplicates removed" if manifest.get("dedup") else "duplicates kept (dedup off)"
    lines.append(
        f"tokenizer {tok['name']} (vocab {tok['vocab_size']:,}, end-of-text {tok['eot_id']}); "
        f"train {shards['train']['tokens']:,} tokens, val {shards['val']['tokens']:,} tokens "
        f"({split['val_documents']:,} of {split['documents']:,} documents), {manifest['dtype']}; {dedup}; "
        f"{'reused' if reused else 'built'} in {folder}"
    )
    return "\n".join(lines)


def as_json(manifest: dict, folder: Path, reused: bool) -> dict:
    """What data_summary.json holds: the manifest's counts, tokenizer and split, and where the shards are."""
    keys = ("sources", "tokenizer", "split", "dedup", "shards", "build", "key")
    return {"folder": str(folder), "reused": reused, **{k: manifest.get(k) for k in keys}}


def write(folder: Path, text: str, data: dict) -> None:
    """data_summary.txt and data_summary.json in `folder`, each written whole (temporary name, then rename)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, content in (("data_summary.txt", text + "\n"), ("data_summary.json", json.dumps(data, indent=1))):
        atomic_write_text(Path(folder) / name, content)
