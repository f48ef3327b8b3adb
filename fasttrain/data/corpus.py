"""Corpus: the prepared shards of one DataConfig, opened as read-only memmaps, with its tokenizer and summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fasttrain.data import summary
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
        """Per source and format: files, documents, duplicates removed, bytes, tokens, what was skipped and why;
        the parser warnings counted; the tokenizer and the split (fasttrain.data.summary)."""
        return summary.table(self.manifest, self.folder, self.reused)

    def report(self, run_dir: str | Path | None = None) -> None:
        """Print the summary; with run_dir, also write it there as data_summary.txt and data_summary.json."""
        text = self.summary()
        print(text, flush=True)
        if run_dir is not None:
            summary.write(Path(run_dir), text, summary.as_json(self.manifest, self.folder, self.reused))

    def __repr__(self) -> str:
        return (
            f"Corpus(train={len(self.train):,} tokens, val={len(self.val):,} tokens, "
            f"tokenizer={self.tokenizer.name!r}, folder={str(self.folder)!r})"
        )
