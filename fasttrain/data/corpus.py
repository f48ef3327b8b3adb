"""Corpus: the prepared shards of one DataConfig, opened as read-only memmaps, with its tokenizer and summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fasttrain.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer_file


class Corpus:
    """`train` and `val`: 1-D token-id arrays (memmaps; an empty split is a plain empty array, which numpy cannot
    map), documents separated by `tokenizer.eot_id`. `manifest`: what built them. `reused`: found in the cache."""

    def __init__(self, folder: Path, manifest: dict, reused: bool):
        self.folder = Path(folder)
        self.manifest = manifest
        self.reused = reused
        self.tokenizer_file = folder / manifest["tokenizer_file"]["file"] if manifest["tokenizer_file"] else None
        self.tokenizer: Tokenizer = (
            ByteTokenizer() if self.tokenizer_file is None else load_tokenizer_file(self.tokenizer_file)
        )
        self.tokenizer.name = manifest["tokenizer"]["name"]
        self.train = self._open("train")
        self.val = self._open("val")

    def _open(self, split: str) -> np.ndarray:
        entry = self.manifest["shards"][split]
        dtype = np.dtype(self.manifest["dtype"])
        if entry["tokens"] == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(self.folder / entry["file"], dtype=dtype, mode="r", shape=(entry["tokens"],))

    @property
    def key(self) -> str:
        """Hash of the sources, tokenizer and split: equal keys mean identical shards."""
        return self.manifest["key"]

    def summary(self) -> str:
        """Documents, bytes and tokens per source, what was skipped and why, and the split."""
        header = ["source", "files", "documents", "bytes", "tokens", "ignored", "skipped"]
        rows = [header] + [
            [
                source,
                f"{r['files']:,}",
                f"{r['documents']:,}",
                f"{r['bytes']:,}",
                f"{r['tokens']:,}",
                f"{r['ignored']:,}",
                ", ".join(f"{n:,} {why}" for why, n in sorted(r["skipped"].items())) or "0",
            ]
            for source, r in self.manifest["sources"].items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:-1], widths[1:-1])] + [row[-1]])
            for row in rows
        ]
        tok, shards, split = self.manifest["tokenizer"], self.manifest["shards"], self.manifest["split"]
        lines.append(
            f"tokenizer {tok['name']} (vocab {tok['vocab_size']:,}, end-of-text {tok['eot_id']}); "
            f"train {shards['train']['tokens']:,} tokens, val {shards['val']['tokens']:,} tokens "
            f"({split['val_documents']:,} of {split['documents']:,} documents), {self.manifest['dtype']}; "
            f"{'reused' if self.reused else 'built'} in {self.folder}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Corpus(train={len(self.train):,} tokens, val={len(self.val):,} tokens, "
            f"tokenizer={self.tokenizer.name!r}, folder={str(self.folder)!r})"
        )
